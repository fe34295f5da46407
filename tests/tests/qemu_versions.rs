//! Two QEMU versions side by side, as in a cluster upgraded one node at a
//! time: the system's QEMU (7.2) and a newer one (10.0) unpacked beside
//! it. A guest moves to the newer QEMU, by migration or through a save
//! file, and keeps its machine type; a runtime replays on whichever QEMU
//! its node runs, spelled for that QEMU; a move the older QEMU can't take
//! is refused before anything starts.

use std::path::{Path, PathBuf};

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::{leave_marker, marker_and_pci_devices, pci_address, start_guest_with};
use kvm_agent_tests::*;
use tonic::Code;
use uuid::Uuid;

/// A test agent on `qemu`.
async fn agent_on(qemu: &Path) -> TestAgent {
    TestAgent::start_with(AgentOptions {
        qemu_binary: Some(qemu.to_owned()),
        ..AgentOptions::default()
    })
    .await
}

/// The binary a process runs.
fn executable(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("a live process")
}

/// A process's command line, its arguments joined by spaces.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("a live process")
        .split(|&b| b == 0)
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

fn slots(info: &pb::InstanceInfo) -> Vec<(String, u32)> {
    let mut slots: Vec<_> = info
        .devices
        .iter()
        .map(|d| (d.name.clone(), d.pci_slot))
        .collect();
    slots.sort();
    slots
}

async fn soft_reboot(agent: &TestAgent, name: &str) -> pb::InstanceInfo {
    agent
        .client()
        .await
        .reboot_instance(pb::RebootInstanceRequest {
            name: name.into(),
            mode: pb::RebootMode::Soft as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("soft reboot: {s:?}\nlog:\n{}", agent.log()));
    agent.instance(name).await
}

#[tokio::test]
async fn a_guest_moves_from_the_older_qemu_to_the_newer_with_its_hotplugged_devices() {
    let (older, newer) = (system_qemu(), newer_qemu());
    let source = agent_on(&older).await;
    let target = agent_on(&newer).await;
    let root = source.raw_image("root.img", 8);
    let (started, console) = start_guest_with(&source, "upgraded", |spec| {
        spec.disks.push(disk("root", &root));
        spec.nics.push(nic("eth0", "52:54:00:00:a0:01"));
    })
    .await;
    target.track(started.uuid.parse().unwrap());
    let machine = source.runtime_json("upgraded").await["machine_type"].clone();
    assert_eq!(machine, "pc-i440fx-7.2", "the older QEMU's machine type");
    assert_eq!(executable(started.pid), older.canonicalize().unwrap());
    let hot_nic = source
        .add_nic("upgraded", nic("eth1", "52:54:00:00:a0:02"))
        .await
        .expect("hot-add NIC")
        .device
        .unwrap();
    let hot_disk = source
        .add_disk("upgraded", disk("data", &source.raw_image("data.img", 8)))
        .await
        .expect("hot-add disk")
        .device
        .unwrap();
    // Its shell is up: the console isn't needed any more.
    drop(console);
    let marker = leave_marker(&source, "upgraded").await;
    let before = source.instance("upgraded").await;

    source
        .migrate_to("upgraded", &target)
        .await
        .unwrap_or_else(|s| panic!("migration: {s:?}\nsource log:\n{}", source.log()));

    let after = target.instance("upgraded").await;
    assert_eq!(executable(after.pid), newer.canonicalize().unwrap());
    assert!(
        cmdline(after.pid).contains("pc-i440fx-7.2"),
        "{}",
        cmdline(after.pid)
    );
    assert_eq!(
        target.runtime_json("upgraded").await["machine_type"],
        machine
    );
    assert_eq!(slots(&after), slots(&before));
    let (nic_addr, disk_addr) = (
        pci_address(hot_nic.pci_slot),
        pci_address(hot_disk.pci_slot),
    );
    let (seen, devices) = marker_and_pci_devices(&target, "upgraded").await;
    assert!(seen.contains(&marker), "the guest's memory moved: {seen:?}");
    assert!(
        devices.contains(&nic_addr) && devices.contains(&disk_addr),
        "the guest sees its hot-added devices on the newer QEMU: {devices}"
    );

    // A soft reboot on the newer QEMU keeps the machine and every slot.
    let rebooted = soft_reboot(&target, "upgraded").await;
    assert_ne!(rebooted.pid, after.pid);
    assert_eq!(executable(rebooted.pid), newer.canonicalize().unwrap());
    assert!(cmdline(rebooted.pid).contains("pc-i440fx-7.2"));
    assert_eq!(slots(&rebooted), slots(&before));
    let mut qmp = operator_qmp(&target, "upgraded");
    let present: Vec<u64> = qmp.pci_devices().iter().map(|d| d.0).collect();
    for slot in [hot_nic.pci_slot, hot_disk.pci_slot] {
        assert!(
            present.contains(&u64::from(slot)),
            "slot {slot}: {present:?}"
        );
    }
}

#[tokio::test]
async fn a_save_from_the_older_qemu_restores_on_the_newer() {
    let (older, newer) = (system_qemu(), newer_qemu());
    let source = agent_on(&older).await;
    let target = agent_on(&newer).await;
    let mut spec = source.spec("carried", 64);
    spec.disks
        .push(disk("root", &source.raw_image("root.img", 8)));
    let uuid: Uuid = spec.uuid.parse().unwrap();
    target.track(uuid);
    source.start_spec(spec).await;
    let file = source.scratch().join("carried.save");
    source
        .client()
        .await
        .save_instance(pb::SaveInstanceRequest {
            name: "carried".into(),
            path: file.display().to_string(),
        })
        .await
        .unwrap_or_else(|s| panic!("save: {s:?}\nlog:\n{}", source.log()));
    // The disk goes with the file, as it would on shared storage.
    source
        .client()
        .await
        .delete_instance(pb::DeleteInstanceRequest {
            name: "carried".into(),
        })
        .await
        .unwrap();

    target
        .client()
        .await
        .restore_instance(pb::RestoreInstanceRequest {
            path: file.display().to_string(),
            paused: false,
        })
        .await
        .unwrap_or_else(|s| panic!("restore: {s:?}\nlog:\n{}", target.log()));

    let restored = target.instance("carried").await;
    assert_eq!(
        pb::InstanceState::try_from(restored.state).unwrap(),
        pb::InstanceState::Running,
        "{restored:?}"
    );
    assert_eq!(executable(restored.pid), newer.canonicalize().unwrap());
    assert!(cmdline(restored.pid).contains("pc-i440fx-7.2"));
    let status = operator_qmp(&target, "carried").execute("query-status", serde_json::json!({}));
    assert_eq!(status["status"], "running", "{status}");
}

#[tokio::test]
async fn a_move_to_an_older_qemu_without_the_machine_type_is_refused_before_anything_starts() {
    let (older, newer) = (system_qemu(), newer_qemu());
    let source = agent_on(&newer).await;
    let target = agent_on(&older).await;
    let spec = source.spec("pinned-new", 64);
    let uuid: Uuid = spec.uuid.parse().unwrap();
    target.track(uuid);
    let started = source.start_spec(spec).await;
    let machine = source.runtime_json("pinned-new").await["machine_type"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(machine.ends_with("-10.0"), "{machine}");

    let refused = source
        .migrate_to("pinned-new", &target)
        .await
        .expect_err("the older QEMU lacks the machine type");

    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(&machine), "{refused:?}");
    let still = source.instance("pinned-new").await;
    assert_eq!(still.pid, started.pid, "the source's QEMU never stopped");
    assert_eq!(
        pb::InstanceState::try_from(still.state).unwrap(),
        pb::InstanceState::Running
    );
    assert_eq!(qemu_pids_with_uuids(&[uuid].into()), vec![started.pid]);
    let on_target = target
        .client()
        .await
        .get_instance(pb::GetInstanceRequest {
            name: "pinned-new".into(),
        })
        .await;
    assert_eq!(on_target.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn a_runtime_replays_on_the_nodes_qemu_with_that_qemus_chroot_option() {
    let (older, newer) = (system_qemu(), newer_qemu());
    let mut agent = agent_on(&older).await;
    let mut from_older = agent.spec("made-on-older", 64);
    from_older.machine_type = "pc-i440fx-7.2".into();
    let first = agent.start_spec(from_older).await;
    assert!(
        cmdline(first.pid).contains("-chroot "),
        "{}",
        cmdline(first.pid)
    );

    // The node's QEMU is upgraded under the running instance.
    agent.set_qemu_binary(&newer);
    agent.restart().await;
    let on_newer = soft_reboot(&agent, "made-on-older").await;

    assert_eq!(executable(on_newer.pid), newer.canonicalize().unwrap());
    let argv = cmdline(on_newer.pid);
    assert!(argv.contains("-run-with chroot="), "{argv}");
    assert!(!argv.contains("-chroot "), "{argv}");
    assert!(argv.contains("pc-i440fx-7.2"), "{argv}");
    let mut from_newer = agent.spec("made-on-newer", 64);
    from_newer.machine_type = "pc-i440fx-7.2".into();
    agent.start_spec(from_newer).await;

    // And back, as when a node is rolled back.
    agent.set_qemu_binary(&older);
    agent.restart().await;
    for name in ["made-on-older", "made-on-newer"] {
        let on_older = soft_reboot(&agent, name).await;
        assert_eq!(executable(on_older.pid), older.canonicalize().unwrap());
        let argv = cmdline(on_older.pid);
        assert!(argv.contains("-chroot "), "{name}: {argv}");
        assert!(!argv.contains("-run-with"), "{name}: {argv}");
    }
}
