//! Hotplug against real QEMU without a guest OS: the runtime keeps what was
//! added, slots run out cleanly, failures roll back without leaks, and an
//! unplug the guest never acknowledges is reported, not pretended.

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use serde_json::json;
use tonic::Code;

async fn start(agent: &TestAgent, name: &str) -> pb::InstanceInfo {
    agent
        .client()
        .await
        .start_instance(start_request(agent.spec(name, 64)))
        .await
        .unwrap_or_else(|s| panic!("start: {s:?}\n{}", agent.log()))
        .into_inner()
}

fn slot_of(qmp: &mut Qmp, id: &str) -> Option<u64> {
    qmp.pci_devices()
        .into_iter()
        .find(|(_, qdev, _)| qdev == id)
        .map(|(slot, _, _)| slot)
}

#[tokio::test]
async fn soft_reboot_keeps_hotplugged_devices_at_their_slots() {
    let agent = TestAgent::start().await;
    start(&agent, "grow").await;
    let image = agent.raw_image("extra.img", 8);
    let added_nic = agent
        .add_nic("grow", nic("eth9", "52:54:00:00:60:01"))
        .await
        .unwrap()
        .device
        .unwrap();
    let added_disk = agent
        .add_disk("grow", disk("extra", &image))
        .await
        .unwrap()
        .device
        .unwrap();
    let mut qmp = operator_qmp(&agent, "grow");
    assert_eq!(
        slot_of(&mut qmp, &added_nic.qemu_id),
        Some(added_nic.pci_slot.into())
    );
    assert_eq!(
        slot_of(&mut qmp, &added_disk.qemu_id),
        Some(added_disk.pci_slot.into())
    );
    drop(qmp);

    let rebooted = agent
        .client()
        .await
        .reboot_instance(pb::RebootInstanceRequest {
            name: "grow".into(),
            mode: pb::RebootMode::Soft as i32,
            spec: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let mut qmp = operator_qmp(&agent, "grow");
    assert_eq!(
        slot_of(&mut qmp, &added_nic.qemu_id),
        Some(added_nic.pci_slot.into())
    );
    assert_eq!(
        slot_of(&mut qmp, &added_disk.qemu_id),
        Some(added_disk.pci_slot.into())
    );
    let tap = &rebooted
        .devices
        .iter()
        .find(|d| d.name == "eth9")
        .unwrap()
        .tap;
    assert_eq!(agent.taps(), vec![tap.clone()]);
    let rt = agent.runtime_json("grow").await;
    assert_eq!(rt["nics"][0]["slot"], added_nic.pci_slot);
    assert_eq!(rt["disks"][0]["slot"], added_disk.pci_slot);
}

#[tokio::test]
async fn multiqueue_nics_get_one_tap_fd_per_queue_at_start_and_at_hot_add() {
    let agent = TestAgent::start().await;
    let mut spec = agent.spec("mq", 64);
    spec.nics = vec![pb::NicSpec {
        queues: 2,
        ..nic("eth0", "52:54:00:00:66:01")
    }];
    let info = agent.start_spec(spec).await;

    let added = agent
        .add_nic(
            "mq",
            pb::NicSpec {
                queues: 4,
                ..nic("eth1", "52:54:00:00:66:02")
            },
        )
        .await
        .unwrap()
        .device
        .unwrap();

    let started = &info.devices[0];
    assert_eq!(tap_queue_fds(info.pid, &started.tap), 2);
    assert_eq!(tap_queue_fds(info.pid, &added.tap), 4);
    let mut qmp = operator_qmp(&agent, "mq");
    for (device, vectors) in [(started, 6), (&added, 10)] {
        let path = format!("/machine/peripheral/{}", device.qemu_id);
        assert_eq!(
            qmp.execute("qom-get", json!({ "path": path, "property": "mq" })),
            json!(true)
        );
        assert_eq!(
            qmp.execute("qom-get", json!({ "path": path, "property": "vectors" })),
            json!(vectors)
        );
    }
    assert_eq!(agent.runtime_json("mq").await["nics"][1]["queues"], 4);

    // The same on a QEMU that came in by migration.
    let target = TestAgent::start().await;
    target.track(info.uuid.parse().unwrap());
    agent.migrate_to("mq", &target).await.unwrap();
    let moved = target
        .add_nic(
            "mq",
            pb::NicSpec {
                queues: 3,
                ..nic("eth2", "52:54:00:00:66:03")
            },
        )
        .await
        .unwrap()
        .device
        .unwrap();
    let pid = target.instance("mq").await.pid;
    assert_eq!(tap_queue_fds(pid, &moved.tap), 3);
}

#[tokio::test]
async fn a_full_bus_is_resource_exhausted_and_changes_nothing() {
    let agent = TestAgent::start().await;
    start(&agent, "crowded").await;
    let mut added = 0;
    let err = loop {
        let mac = format!("52:54:00:00:61:{added:02x}");
        match agent
            .add_nic("crowded", nic(&format!("n{added}"), &mac))
            .await
        {
            Ok(_) => added += 1,
            Err(e) => break e,
        }
        assert!(added <= 32, "the bus can't hold more than 32 devices");
    };
    let before = agent.runtime_json("crowded").await;

    let again = agent
        .add_nic("crowded", nic("one-more", "52:54:00:00:62:01"))
        .await
        .unwrap_err();

    // Slots 0-2 are reserved and the balloon holds one, so 28 NICs fit.
    assert_eq!(added, 28);
    for e in [&err, &again] {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("no free PCI slot"), "{}", e.message());
    }
    assert_eq!(agent.runtime_json("crowded").await, before);
    assert_eq!(
        agent.taps().len(),
        28,
        "the refused add must not leave a tap"
    );
}

/// The lowest slot a hot-add can take in `qmp`'s QEMU (0-2 are reserved).
fn lowest_free_slot(qmp: &mut Qmp) -> u64 {
    let taken: Vec<u64> = qmp.pci_devices().iter().map(|(slot, _, _)| *slot).collect();
    (3..32).find(|s| !taken.contains(s)).expect("a free slot")
}

#[tokio::test]
async fn a_slot_taken_behind_the_agents_back_is_skipped_at_hot_add() {
    let agent = TestAgent::start().await;
    start(&agent, "sidestep").await;
    let image = agent.raw_image("sidestep.img", 8);
    // The first hot-add has the agent know the bus.
    agent
        .add_nic("sidestep", nic("eth0", "52:54:00:00:64:01"))
        .await
        .unwrap();
    let mut qmp = operator_qmp(&agent, "sidestep");

    for (round, kind) in ["nic", "disk"].into_iter().enumerate() {
        let blocked = lowest_free_slot(&mut qmp);
        qmp.execute(
            "device_add",
            json!({ "driver": "virtio-rng-pci", "id": format!("rng{round}"), "bus": "pci.0", "addr": format!("{blocked:#x}") }),
        );
        let added = match kind {
            "nic" => {
                agent
                    .add_nic("sidestep", nic("eth1", "52:54:00:00:64:02"))
                    .await
            }
            _ => agent.add_disk("sidestep", disk("data", &image)).await,
        };
        let device = added
            .unwrap_or_else(|e| panic!("{kind}: {e:?}\n{}", agent.log()))
            .device
            .unwrap();

        assert_ne!(u64::from(device.pci_slot), blocked, "{kind}");
        assert_eq!(
            slot_of(&mut qmp, &device.qemu_id),
            Some(device.pci_slot.into()),
            "{kind}"
        );
        assert_eq!(
            slot_of(&mut qmp, &format!("rng{round}")),
            Some(blocked),
            "{kind}"
        );
    }
    let rt = agent.runtime_json("sidestep").await;
    assert_eq!(rt["nics"].as_array().unwrap().len(), 2, "{rt}");
    assert_eq!(rt["disks"].as_array().unwrap().len(), 1, "{rt}");
    assert_eq!(
        agent.log().matches("behind the agent's back").count(),
        2,
        "each hot-add found its slot taken and tried the next: {}",
        agent.log()
    );
}

#[tokio::test]
async fn a_nic_refused_at_device_add_is_rolled_back_without_leaks() {
    let agent = TestAgent::start().await;
    let info = start(&agent, "refuse-nic").await;
    let nic_uuid = uuid::Uuid::new_v4();
    let mut qmp = operator_qmp(&agent, "refuse-nic");
    // Occupy the NIC's QEMU id so that device_add fails after netdev_add.
    let id = format!("nic-{}", &nic_uuid.simple().to_string()[..12]);
    qmp.execute(
        "device_add",
        json!({ "driver": "virtio-rng-pci", "id": id, "bus": "pci.0", "addr": "0x1f" }),
    );
    let fds_before = fd_count(info.pid);
    let runtime_before = agent.runtime_json("refuse-nic").await;

    let err = agent
        .add_nic(
            "refuse-nic",
            pb::NicSpec {
                uuid: nic_uuid.to_string(),
                ..nic("eth1", "52:54:00:00:63:01")
            },
        )
        .await
        .unwrap_err();

    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("device_add"), "{}", err.message());
    assert_eq!(fd_count(info.pid), fds_before, "no fd may leak into QEMU");
    assert_eq!(qmp.execute("query-fdsets", json!({})), json!([]));
    assert!(
        agent.taps().is_empty(),
        "the tap must be closed: {:?}",
        agent.taps()
    );
    assert_eq!(agent.runtime_json("refuse-nic").await, runtime_before);
    let intent = std::fs::read(agent.state_dir().join("journal/refuse-nic.intent")).unwrap();
    assert!(
        intent.trim_ascii().is_empty(),
        "the intent must be cleared: {}",
        String::from_utf8_lossy(&intent)
    );
}

#[tokio::test]
async fn a_disk_refused_at_device_add_is_rolled_back_without_leaks() {
    let agent = TestAgent::start().await;
    let info = start(&agent, "refuse-disk").await;
    let image = agent.raw_image("refused.img", 8);
    let disk_uuid = uuid::Uuid::new_v4();
    let mut qmp = operator_qmp(&agent, "refuse-disk");
    let short = &disk_uuid.simple().to_string()[..12];
    qmp.execute("device_add", json!({ "driver": "virtio-rng-pci", "id": format!("disk-{short}"), "bus": "pci.0", "addr": "0x1f" }));
    let fds_before = fd_count(info.pid);
    let runtime_before = agent.runtime_json("refuse-disk").await;

    let err = agent
        .add_disk(
            "refuse-disk",
            pb::DiskSpec {
                uuid: disk_uuid.to_string(),
                ..disk("data", &image)
            },
        )
        .await
        .unwrap_err();

    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(fd_count(info.pid), fds_before, "no fd may leak into QEMU");
    assert_eq!(qmp.execute("query-fdsets", json!({})), json!([]));
    let nodes = qmp.execute("query-named-block-nodes", json!({}));
    assert!(
        !nodes.to_string().contains(short),
        "block nodes must be deleted: {nodes}"
    );
    assert_eq!(agent.runtime_json("refuse-disk").await, runtime_before);
}

#[tokio::test]
async fn a_disk_with_a_bad_format_is_rolled_back_at_blockdev_add() {
    let agent = TestAgent::start().await;
    let info = start(&agent, "badfmt").await;
    let image = agent.raw_image("plain.img", 8);
    let mut qmp = operator_qmp(&agent, "badfmt");
    let fds_before = fd_count(info.pid);

    let err = agent
        .add_disk(
            "badfmt",
            pb::DiskSpec {
                format: pb::DiskFormat::Qcow2 as i32,
                ..disk("data", &image)
            },
        )
        .await
        .unwrap_err();

    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("qcow2"),
        "QEMU's reason must be kept: {}",
        err.message()
    );
    assert_eq!(fd_count(info.pid), fds_before);
    assert_eq!(qmp.execute("query-fdsets", json!({})), json!([]));
}

#[tokio::test]
async fn unplug_without_a_guest_os_is_deadline_exceeded_and_the_device_stays() {
    let options = AgentOptions {
        args: [
            "--powerdown-timeout-ms",
            "1000",
            "--unplug-timeout-ms",
            "1000",
        ]
        .map(String::from)
        .to_vec(),
        ..AgentOptions::default()
    };
    let agent = TestAgent::start_with(options).await;
    start(&agent, "deaf").await;
    let added = agent
        .add_nic("deaf", nic("eth1", "52:54:00:00:64:01"))
        .await
        .unwrap()
        .device
        .unwrap();

    let err = agent.remove_device("deaf", "eth1").await.unwrap_err();

    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("did not release"),
        "{}",
        err.message()
    );
    let rt = agent.runtime_json("deaf").await;
    assert_eq!(rt["nics"][0]["name"], "eth1");
    let mut qmp = operator_qmp(&agent, "deaf");
    assert_eq!(
        slot_of(&mut qmp, &added.qemu_id),
        Some(added.pci_slot.into())
    );
}

#[tokio::test]
async fn bad_hotplug_requests_change_nothing() {
    let agent = TestAgent::start().await;
    let mut spec = agent.spec("strict", 64);
    spec.nics = vec![nic("eth0", "52:54:00:00:65:01")];
    agent.start_spec(spec).await;
    start(&agent, "asleep").await;
    agent
        .client()
        .await
        .stop_instance(pb::StopInstanceRequest {
            name: "asleep".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let before = agent.runtime_json("strict").await;
    let directory = agent.scratch();

    let stopped = agent
        .add_nic("asleep", nic("eth1", "52:54:00:00:65:02"))
        .await
        .unwrap_err();
    let same_mac = agent
        .add_nic("strict", nic("eth1", "52:54:00:00:65:01"))
        .await
        .unwrap_err();
    let same_name = agent
        .add_nic("strict", nic("eth0", "52:54:00:00:65:03"))
        .await
        .unwrap_err();
    let multicast = agent
        .add_nic("strict", nic("eth1", "01:00:5e:00:00:09"))
        .await
        .unwrap_err();
    let missing = agent
        .add_disk(
            "strict",
            disk("d", std::path::Path::new("/nonexistent/x.img")),
        )
        .await
        .unwrap_err();
    let not_a_file = agent
        .add_disk("strict", disk("d", &directory))
        .await
        .unwrap_err();
    let relative = agent
        .add_disk("strict", disk("d", std::path::Path::new("x.img")))
        .await
        .unwrap_err();
    let vhost = agent
        .add_nic(
            "strict",
            pb::NicSpec {
                vhost: true,
                ..nic("eth1", "52:54:00:00:65:04")
            },
        )
        .await;
    let unknown = agent.remove_device("strict", "nope").await.unwrap_err();

    assert_eq!(stopped.code(), Code::FailedPrecondition, "{stopped:?}");
    for e in [
        &same_mac,
        &same_name,
        &multicast,
        &missing,
        &not_a_file,
        &relative,
    ] {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    assert!(
        missing.message().contains("/nonexistent/x.img"),
        "{}",
        missing.message()
    );
    // Where the node has vhost-net the NIC is added, with a tap of its
    // own; elsewhere it is refused and leaves nothing.
    let expected_taps = if std::path::Path::new("/dev/vhost-net").exists() {
        vhost.expect("vhost works where /dev/vhost-net exists");
        2
    } else {
        let e = vhost.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("/dev/vhost-net"), "{}", e.message());
        assert_eq!(agent.runtime_json("strict").await, before);
        1
    };
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(
        agent.taps().len(),
        expected_taps,
        "eth0's tap, and the vhost NIC's"
    );
}

#[tokio::test]
async fn support_reports_each_capability_with_reasons() {
    let agent = TestAgent::start().await;
    start(&agent, "able").await;

    let s = agent
        .client()
        .await
        .hotplug_support(pb::HotplugSupportRequest {
            name: "able".into(),
        })
        .await
        .unwrap()
        .into_inner();

    assert!(s.nic.unwrap().supported);
    assert!(s.disk.unwrap().supported);
    assert!(s.remove.unwrap().supported);
    let vhost = s.vhost.unwrap();
    assert_eq!(
        vhost.supported,
        std::path::Path::new("/dev/vhost-net").exists()
    );
    if !vhost.supported {
        assert!(vhost.reason.contains("/dev/vhost-net"), "{}", vhost.reason);
    }
}

/// The bridge a tap is a port of, if any.
fn master_of(tap: &str) -> Option<String> {
    std::fs::read_link(format!("/sys/class/net/{tap}/master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn nic_tap(info: &pb::InstanceInfo) -> String {
    info.devices
        .iter()
        .find(|d| d.kind == pb::DeviceKind::Nic as i32)
        .expect("a NIC")
        .tap
        .clone()
}

#[tokio::test]
async fn a_running_nic_moves_between_bridges_and_keeps_the_new_one() {
    let agent = TestAgent::start().await;
    let (first, second) = (Bridge::create(), Bridge::create());
    let mut spec = agent.spec("mover", 64);
    spec.nics = vec![pb::NicSpec {
        bridge: first.name.clone(),
        ..nic("eth0", "52:54:00:00:41:01")
    }];
    let started = agent.start_spec(spec).await;
    let tap = nic_tap(&started);
    assert_eq!(master_of(&tap), Some(first.name.clone()));
    let set_bridge = async |device: &str, bridge: &str| {
        agent
            .client()
            .await
            .set_nic_bridge(pb::SetNicBridgeRequest {
                name: "mover".into(),
                device: device.into(),
                bridge: bridge.into(),
            })
            .await
    };

    let moved = set_bridge("eth0", &second.name).await.unwrap().into_inner();
    assert_eq!(master_of(&tap), Some(second.name.clone()));
    assert_eq!(moved.device.unwrap().tap, tap);
    let runtime = agent.runtime_json("mover").await;
    assert_eq!(runtime["nics"][0]["bridge"], second.name.as_str());

    // A bridge that doesn't exist changes nothing.
    let missing = set_bridge("eth0", "kbmissing0").await.unwrap_err();
    assert_eq!(missing.code(), Code::FailedPrecondition, "{missing:?}");
    assert_eq!(master_of(&tap), Some(second.name.clone()));
    assert_eq!(
        agent.runtime_json("mover").await["nics"][0]["bridge"],
        second.name.as_str()
    );
    let unknown = set_bridge("eth9", &first.name).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // A soft reboot attaches the new tap where the runtime says.
    let rebooted = agent
        .client()
        .await
        .reboot_instance(pb::RebootInstanceRequest {
            name: "mover".into(),
            mode: pb::RebootMode::Soft as i32,
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let new_tap = nic_tap(&rebooted);
    assert_eq!(master_of(&new_tap), Some(second.name.clone()));

    // No bridge at all.
    set_bridge("eth0", "").await.unwrap();
    assert_eq!(master_of(&new_tap), None);
    assert!(agent.runtime_json("mover").await["nics"][0]["bridge"].is_null());
}

#[tokio::test]
async fn disks_take_native_aio_and_discard_at_start_and_at_hot_add() {
    let agent = TestAgent::start().await;
    let direct = |name: &str| pb::DiskSpec {
        cache: pb::DiskCache::None as i32,
        aio: pb::DiskAio::Native as i32,
        discard: true,
        ..disk(name, &agent.raw_image(&format!("{name}.img"), 8))
    };
    let mut spec = agent.spec("aio", 64);
    spec.disks.push(direct("root"));
    let info = agent.start_spec(spec).await;
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", info.pid)).unwrap();
    assert!(
        cmdline.contains("cache.direct=on,cache.no-flush=off,aio=native,discard=unmap"),
        "{cmdline:?}"
    );
    assert!(
        cmdline.contains("read-only=off,discard=unmap"),
        "{cmdline:?}"
    );

    agent.add_disk("aio", direct("data")).await.unwrap();
    let runtime = agent.runtime_json("aio").await;
    assert_eq!(runtime["disks"][1]["aio"], "native");
    assert_eq!(runtime["disks"][1]["discard"], true);

    // Native AIO through the host's cache is refused before QEMU sees it.
    let cached = pb::DiskSpec {
        cache: pb::DiskCache::Writeback as i32,
        ..direct("cached")
    };
    let refused = agent.add_disk("aio", cached).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("native AIO"), "{refused:?}");
}
