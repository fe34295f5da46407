//! CD-ROM and floppy drives against real QEMU and the test guest (TCG): a
//! guest that boots from an ISO, reads the medium put in while it runs,
//! and keeps its drives and media across a soft reboot.

use std::path::Path;
use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::{GuestConsole, guest_image, in_guest};
use kvm_agent_tests::*;
use serde_json::json;

/// From the firmware through isolinux to the shell, under TCG.
const ISO_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const READ_MEDIUM: &str =
    "mkdir -p /mnt; mount -t iso9660 -o ro /dev/sr0 /mnt && cat /mnt/medium.txt; umount /mnt";

fn drive(name: &str, kind: pb::MediaKind, image: &Path) -> pb::MediaDriveSpec {
    pb::MediaDriveSpec {
        name: name.into(),
        kind: kind as i32,
        image: image.display().to_string(),
    }
}

/// `query-block`'s file for the drive `id`; `None` when it holds no medium.
fn medium_in(qmp: &mut Qmp, id: &str) -> Option<String> {
    let blocks = qmp.execute("query-block", json!({}));
    let drive = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == id)
        .unwrap_or_else(|| panic!("no drive {id} in {blocks}"));
    drive["inserted"]["file"].as_str().map(str::to_owned)
}

async fn change_medium(agent: &TestAgent, drive: &str, image: Option<&Path>) -> pb::InstanceInfo {
    agent
        .client()
        .await
        .change_medium(pb::ChangeMediumRequest {
            name: "installer".into(),
            drive: drive.into(),
            image: image.map(|i| i.display().to_string()).unwrap_or_default(),
        })
        .await
        .unwrap_or_else(|s| panic!("change medium: {s:?}\n{}", agent.log()))
        .into_inner()
}

fn detail_of(info: &pb::InstanceInfo, name: &str) -> String {
    let device = info.devices.iter().find(|d| d.name == name).unwrap();
    device.detail.clone()
}

#[tokio::test]
async fn a_guest_boots_from_its_cdrom_and_reads_the_medium_changed_while_it_runs() {
    let agent = TestAgent::start().await;
    let image = guest_image();
    let floppy = agent.raw_image("drivers.img", 1);
    let mut spec = agent.spec("installer", 128);
    // No kernel: only the CD-ROM can start this guest.
    spec.boot = Some(pb::BootSpec {
        device: pb::BootDevice::Cdrom as i32,
        ..Default::default()
    });
    spec.serial_console = true;
    spec.accelerator = pb::Accelerator::Tcg as i32;
    spec.media = vec![
        drive("install", pb::MediaKind::Cdrom, &image.boot_iso),
        drive("drivers", pb::MediaKind::Floppy, &floppy),
    ];
    let started = agent.start_spec(spec).await;
    let kinds: Vec<i32> = started.devices.iter().map(|d| d.kind).collect();
    assert_eq!(
        kinds,
        [pb::DeviceKind::Cdrom as i32, pb::DeviceKind::Floppy as i32]
    );
    let socket = agent.run_dir("installer").join("serial.sock");
    let console =
        tokio::task::spawn_blocking(move || GuestConsole::connect(&socket, ISO_BOOT_TIMEOUT))
            .await
            .unwrap();
    let (console, seen) = in_guest(console, |c| c.run(READ_MEDIUM)).await;
    assert!(seen.contains("KVM-AGENT-MEDIUM boot"), "{seen}");

    let changed = change_medium(&agent, "install", Some(&image.data_iso)).await;
    assert_eq!(
        detail_of(&changed, "install"),
        image.data_iso.display().to_string()
    );
    // The guest learns of the new disc at its next look at the drive.
    let (_console, seen) = in_guest(console, |c| {
        c.run_until(READ_MEDIUM, Duration::from_secs(30), |out| {
            out.contains("KVM-AGENT-MEDIUM")
        })
    })
    .await;
    assert!(seen.contains("KVM-AGENT-MEDIUM data"), "{seen}");
    // The old disc is closed, not only out of the drive.
    let pid = changed.pid;
    let open = open_files(pid);
    assert!(open.contains(&image.data_iso), "{open:?}");
    assert!(!open.contains(&image.boot_iso), "{open:?}");

    let mut qmp = operator_qmp(&agent, "installer");
    assert!(medium_in(&mut qmp, "media-drivers").is_some());
    let ejected = change_medium(&agent, "drivers", None).await;
    assert_eq!(detail_of(&ejected, "drivers"), "");
    assert_eq!(medium_in(&mut qmp, "media-drivers"), None);

    // A soft reboot replays the runtime, with the media as they are now.
    agent
        .client()
        .await
        .reboot_instance(pb::RebootInstanceRequest {
            name: "installer".into(),
            mode: pb::RebootMode::Soft as i32,
            ..Default::default()
        })
        .await
        .expect("soft reboot");
    let mut qmp = operator_qmp(&agent, "installer");
    assert!(medium_in(&mut qmp, "media-install").is_some());
    assert_eq!(medium_in(&mut qmp, "media-drivers"), None);
    let pid = agent.instance("installer").await.pid;
    assert!(open_files(pid).contains(&image.data_iso));
    let runtime = agent.runtime_json("installer").await;
    assert_eq!(
        runtime["media"],
        json!([
            {"name": "install", "kind": "cdrom", "image": image.data_iso},
            {"name": "drivers", "kind": "floppy"},
        ])
    );
}

#[tokio::test]
async fn a_medium_outside_the_rules_is_refused_and_changes_nothing() {
    let agent = TestAgent::start().await;
    let mut spec = agent.spec("installer", 64);
    spec.media = vec![pb::MediaDriveSpec {
        kind: pb::MediaKind::Cdrom as i32,
        ..Default::default()
    }];
    let started = agent.start_spec(spec).await;
    // Unnamed, the drive is named after its kind.
    assert_eq!(started.devices[0].name, "cdrom0");
    let mut client = agent.client().await;
    let mut request = pb::ChangeMediumRequest {
        name: "installer".into(),
        drive: "cdrom0".into(),
        image: "relative.iso".into(),
    };
    let refused = client.change_medium(request.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    request.image = agent.scratch().join("absent.iso").display().to_string();
    let refused = client.change_medium(request.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("absent.iso"), "{refused:?}");
    request.drive = "nothing".into();
    let refused = client.change_medium(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    let mut qmp = operator_qmp(&agent, "installer");
    assert_eq!(medium_in(&mut qmp, "media-cdrom0"), None);
    assert_eq!(
        agent.runtime_json("installer").await["media"][0].get("image"),
        None
    );

    // The machine has room for two CD-ROMs.
    let mut three = agent.spec("crowded", 64);
    three.media = (0..3)
        .map(|_| pb::MediaDriveSpec {
            kind: pb::MediaKind::Cdrom as i32,
            ..Default::default()
        })
        .collect();
    let refused = client
        .start_instance(start_request(three))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("at most 2"), "{refused:?}");
}
