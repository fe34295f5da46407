//! SCSI disks and block devices against real QEMU and the test guest
//! (TCG): each SCSI controller shows the guest the bytes written on the
//! host, a SCSI disk hot-adds and hot-removes, and a disk on a host block
//! device opens as one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::{GuestConsole, guest_image, in_guest, start_guest_with};
use kvm_agent_tests::*;
use serde_json::json;

const GUEST_SEES_TIMEOUT: Duration = Duration::from_secs(30);

/// A raw image whose first bytes are a pattern unique to this run, and the
/// pattern.
fn patterned_image(agent: &TestAgent, name: &str) -> (PathBuf, String) {
    let pattern = format!("KVMAGENT-{name}-{}", uuid::Uuid::new_v4().simple());
    let image = agent.raw_image(&format!("{name}.img"), 8);
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[..pattern.len()].copy_from_slice(pattern.as_bytes());
    std::fs::write(&image, bytes).unwrap();
    (image, pattern)
}

fn on_bus(mut disk: pb::DiskSpec, bus: pb::DiskBus) -> pb::DiskSpec {
    disk.bus = bus as i32;
    disk
}

/// The first bytes of the guest's `device`, read until they show
/// `pattern`.
fn read_in_guest(
    device: &str,
    pattern: &str,
) -> impl Fn(&mut GuestConsole) -> String + Send + 'static {
    let (device, pattern) = (device.to_owned(), pattern.to_owned());
    move |c| {
        let read = format!("head -c {} /dev/{device} 2>&1", pattern.len());
        c.run_until(&read, GUEST_SEES_TIMEOUT, |out| out.contains(&pattern))
    }
}

/// A loop device over a file, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux) must be installed");
        assert!(
            out.status.success(),
            "losetup needs root and /dev/loop-control: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// QOM type of device `id` of a running instance.
fn qom_type(agent: &TestAgent, instance: &str, id: &str) -> serde_json::Value {
    operator_qmp(agent, instance).execute(
        "qom-get",
        json!({ "path": format!("/machine/peripheral/{id}"), "property": "type" }),
    )
}

/// Starts the guest with one scsi-hd disk behind `controller` and checks
/// that the guest reads what the host wrote, on the controller's device.
async fn guest_reads_its_disk_behind(controller: pb::ScsiController, device: &str) {
    let agent = TestAgent::start().await;
    let (image, pattern) = patterned_image(&agent, "scsi");
    let (info, console) = start_guest_with(&agent, "scsi", |spec| {
        spec.scsi_controller = controller as i32;
        spec.disks = vec![on_bus(disk("data", &image), pb::DiskBus::ScsiHd)];
    })
    .await;
    let data = &info.devices[0];
    assert_eq!((data.pci_slot, data.scsi_target), (0, Some(0)), "{info:?}");
    let (_console, seen) = in_guest(console, read_in_guest("sda", &pattern)).await;
    assert!(seen.contains(&pattern), "{seen}");
    assert_eq!(qom_type(&agent, "scsi", "scsi"), device);
    assert_eq!(qom_type(&agent, "scsi", &data.qemu_id), "scsi-hd");
}

#[tokio::test]
async fn the_guest_reads_its_disk_behind_an_lsi_controller() {
    guest_reads_its_disk_behind(pb::ScsiController::Lsi, "lsi53c895a").await;
}

#[tokio::test]
async fn the_guest_reads_its_disk_behind_a_megaraid_controller() {
    guest_reads_its_disk_behind(pb::ScsiController::Megasas, "megasas").await;
}

#[tokio::test]
async fn virtio_scsi_disks_hot_add_and_remove_beside_a_cdrom_and_a_block_device() {
    let agent = TestAgent::start().await;
    let (first, first_pattern) = patterned_image(&agent, "first");
    let (block, block_pattern) = patterned_image(&agent, "block");
    let loop_device = LoopDevice::attach(&block);
    let cd = guest_image().data_iso.clone();
    let (info, console) = start_guest_with(&agent, "vscsi", |spec| {
        spec.disks = vec![
            on_bus(disk("first", &first), pb::DiskBus::ScsiHd),
            on_bus(disk("disc", &cd), pb::DiskBus::ScsiCd),
            // virtio-blk on a block device: QEMU's host_device driver.
            disk("block", Path::new(&loop_device.0)),
        ];
        spec.disks[1].read_only = true;
    })
    .await;
    let targets: Vec<_> = info.devices.iter().map(|d| d.scsi_target).collect();
    assert_eq!(targets[..3], [Some(0), Some(1), None], "{info:?}");
    // Implied by the SCSI disks.
    assert_eq!(qom_type(&agent, "vscsi", "scsi"), "virtio-scsi-pci");

    let read_disc =
        "mkdir -p /mnt; mount -t iso9660 -o ro /dev/sr0 /mnt && cat /mnt/medium.txt; umount /mnt";
    let (console, (first_seen, block_seen, disc)) = in_guest(console, move |c| {
        let first_seen = read_in_guest("sda", &first_pattern)(c);
        let block_seen = read_in_guest("vda", &block_pattern)(c);
        let disc = c.run_until(read_disc, GUEST_SEES_TIMEOUT, |out| {
            out.contains("KVM-AGENT-MEDIUM")
        });
        (first_seen, block_seen, disc)
    })
    .await;
    assert!(first_seen.contains("KVMAGENT-first-"), "{first_seen}");
    assert!(block_seen.contains("KVMAGENT-block-"), "{block_seen}");
    assert!(disc.contains("KVM-AGENT-MEDIUM data"), "{disc}");

    // Hot-add: the next free target, seen by the guest as the next disk.
    let (hot, hot_pattern) = patterned_image(&agent, "hot");
    let mut client = agent.client().await;
    let added = agent
        .add_disk("vscsi", on_bus(disk("hot", &hot), pb::DiskBus::ScsiHd))
        .await
        .unwrap_or_else(|s| panic!("add: {s:?}\n{}", agent.log()))
        .device
        .unwrap();
    assert_eq!((added.pci_slot, added.scsi_target), (0, Some(2)));
    let (console, hot_seen) = in_guest(console, read_in_guest("sdb", &hot_pattern)).await;
    assert!(hot_seen.contains("KVMAGENT-hot-"), "{hot_seen}");
    let runtime = agent.runtime_json("vscsi").await;
    let recorded = runtime["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "hot")
        .cloned();
    assert_eq!(recorded.map(|d| d["scsi_target"].clone()), Some(json!(2)));

    client
        .remove_device(pb::RemoveDeviceRequest {
            name: "vscsi".into(),
            device: "hot".into(),
        })
        .await
        .unwrap_or_else(|s| panic!("remove: {s:?}\n{}", agent.log()));
    let (_console, gone) = in_guest(console, |c| {
        c.run_until("ls /sys/block", GUEST_SEES_TIMEOUT, |out| {
            !out.contains("sdb")
        })
    })
    .await;
    assert!(gone.contains("sda"), "{gone}");
    let blocks = operator_qmp(&agent, "vscsi").execute("query-block", json!({}));
    assert!(
        !blocks.to_string().contains(&added.qemu_id),
        "QEMU still has the removed disk: {blocks}"
    );
    drop(loop_device);
}

#[tokio::test]
async fn scsi_refusals_say_what_to_do() {
    let agent = TestAgent::start().await;
    // scsi-block passes the guest's SCSI commands through: a file isn't a
    // SCSI device, and neither is a loop device.
    let file = agent.raw_image("plain.img", 8);
    let loop_device = LoopDevice::attach(&agent.raw_image("loop.img", 8));
    for (name, path) in [
        ("file", file.as_path()),
        ("loop", Path::new(&loop_device.0)),
    ] {
        let mut spec = agent.spec(name, 64);
        spec.disks = vec![on_bus(disk("sg", path), pb::DiskBus::ScsiBlock)];
        let refused = agent.start_refused(spec).await;
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(refused.message().contains("SCSI device"), "{refused:?}");
    }
    let mut qcow = on_bus(disk("sg", &file), pb::DiskBus::ScsiGeneric);
    qcow.format = pb::DiskFormat::Qcow2 as i32;
    let mut spec = agent.spec("qcow", 64);
    spec.disks = vec![qcow];
    let refused = agent.start_refused(spec).await;
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // Without a controller from the start, a SCSI disk can't come later.
    agent.start_spec(agent.spec("bare", 64)).await;
    let refused = agent
        .add_disk("bare", on_bus(disk("late", &file), pb::DiskBus::ScsiHd))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("scsi_controller"), "{refused:?}");

    // The LSI has seven targets: an eighth disk finds none.
    let mut spec = agent.spec("full", 64);
    spec.scsi_controller = pb::ScsiController::Lsi as i32;
    spec.disks = (0..7)
        .map(|i| {
            let image = agent.raw_image(&format!("full{i}.img"), 1);
            on_bus(disk(&format!("d{i}"), &image), pb::DiskBus::ScsiHd)
        })
        .collect();
    agent.start_spec(spec).await;
    let refused = agent
        .add_disk("full", on_bus(disk("d7", &file), pb::DiskBus::ScsiHd))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
}
