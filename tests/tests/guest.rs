//! Hotplug and power events seen from inside a real Linux guest (TCG).

use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::{GuestConsole, in_guest, pci_address, start_guest_with};
use kvm_agent_tests::*;

const GUEST_SEES_TIMEOUT: Duration = Duration::from_secs(20);

async fn start_guest(agent: &TestAgent, name: &str) -> (pb::InstanceInfo, GuestConsole) {
    start_guest_with(agent, name, |_| {}).await
}

/// The names of the block nodes QEMU has, sorted.
fn block_nodes(qmp: &mut Qmp) -> Vec<String> {
    let nodes = qmp.execute("query-named-block-nodes", serde_json::json!({}));
    let mut names: Vec<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn hotplugged_nic_and_disk_are_seen_by_the_guest_and_unplug_cleanly() {
    let agent = TestAgent::start().await;
    let (_, console) = start_guest(&agent, "guest1").await;
    let pattern = format!("KVMAGENT-PATTERN-{}", uuid::Uuid::new_v4().simple());
    let image = agent.raw_image("hot.img", 8);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all(pattern.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    let mut client = agent.client().await;
    let nodes_before = block_nodes(&mut operator_qmp(&agent, "guest1"));

    let nic = client
        .add_nic(pb::AddNicRequest {
            name: "guest1".into(),
            nic: Some(pb::NicSpec {
                name: "eth1".into(),
                mac: "52:54:00:00:70:01".into(),
                queues: 2,
                ..Default::default()
            }),
        })
        .await
        .expect("add NIC")
        .into_inner()
        .device
        .unwrap();
    let disk = client
        .add_disk(pb::AddDiskRequest {
            name: "guest1".into(),
            disk: Some(pb::DiskSpec {
                name: "hot".into(),
                path: image.display().to_string(),
                cache: pb::DiskCache::Writeback as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("add disk")
        .into_inner()
        .device
        .unwrap();

    let (nic_addr, disk_addr) = (pci_address(nic.pci_slot), pci_address(disk.pci_slot));
    let read_pattern = format!("dd if=/dev/vda bs={} count=1 2>/dev/null", pattern.len());
    let (console, (listing, data, mac, features)) = in_guest(console, move |c| {
        let listing = c.run_until("ls /sys/bus/pci/devices", GUEST_SEES_TIMEOUT, |out| {
            out.contains(&nic_addr) && out.contains(&disk_addr)
        });
        c.run_until("ls /dev", GUEST_SEES_TIMEOUT, |out| {
            out.split_whitespace().any(|d| d == "vda")
        });
        let data = c.run(&read_pattern);
        let mac = c.run("cat /sys/class/net/*/address");
        // The guest uses one queue pair per vCPU, but the device must offer
        // multiqueue: virtio feature bit 22 (VIRTIO_NET_F_MQ).
        let features = c.run("cat /sys/class/net/eth0/device/features");
        (listing, data, mac, features)
    })
    .await;
    assert!(listing.contains(&pci_address(nic.pci_slot)), "{listing}");
    assert!(
        data.contains(&pattern),
        "the guest must read the host's bytes: {data:?}"
    );
    assert!(mac.contains("52:54:00:00:70:01"), "{mac}");
    assert_eq!(
        features.chars().nth(22),
        Some('1'),
        "the guest sees a multiqueue NIC: {features}"
    );
    assert!(agent.taps().contains(&nic.tap));

    for device in ["eth1", "hot"] {
        client
            .remove_device(pb::RemoveDeviceRequest {
                name: "guest1".into(),
                device: device.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("remove {device}: {s:?}"));
    }

    let (nic_addr, disk_addr) = (pci_address(nic.pci_slot), pci_address(disk.pci_slot));
    let (_console, listing) = in_guest(console, move |c| {
        c.run_until("ls /sys/bus/pci/devices", GUEST_SEES_TIMEOUT, |out| {
            !out.contains(&nic_addr) && !out.contains(&disk_addr)
        })
    })
    .await;
    assert!(!listing.contains(&pci_address(disk.pci_slot)));
    let mut qmp = operator_qmp(&agent, "guest1");
    let pci = qmp.pci_devices();
    assert!(
        pci.iter()
            .all(|(_, id, _)| id != &nic.qemu_id && id != &disk.qemu_id),
        "{pci:?}"
    );
    assert_eq!(
        block_nodes(&mut qmp),
        nodes_before,
        "the disk's block nodes must be gone with it"
    );
    assert_eq!(
        qmp.execute("query-fdsets", serde_json::json!({})),
        serde_json::json!([])
    );
    let rt = agent.runtime_json("guest1").await;
    assert_eq!(rt["nics"], serde_json::json!([]));
    assert_eq!(rt["disks"], serde_json::json!([]));
    assert!(
        !agent.taps().contains(&nic.tap),
        "the tap must be gone: {:?}",
        agent.taps()
    );
}

#[tokio::test]
async fn a_guest_that_powers_itself_off_is_stopped_not_crashed() {
    let agent = TestAgent::start().await;
    let (info, console) = start_guest(&agent, "selfoff").await;
    let mut events = agent
        .client()
        .await
        .watch_events(pb::WatchEventsRequest {
            name: "selfoff".into(),
            after_sequence: None,
        })
        .await
        .unwrap()
        .into_inner();

    let (_console, uname) = in_guest(console, |c| {
        let uname = c.run("uname -s");
        c.send("poweroff -f");
        uname
    })
    .await;
    assert_eq!(uname, "Linux");
    let stopped = wait_for(Duration::from_secs(10), async || {
        let i = agent
            .client()
            .await
            .get_instance(pb::GetInstanceRequest {
                name: "selfoff".into(),
            })
            .await
            .ok()?
            .into_inner();
        (i.state != pb::InstanceState::Running as i32).then_some(i)
    })
    .await
    .expect("the instance leaves running");

    assert_eq!(
        stopped.state,
        pb::InstanceState::Stopped as i32,
        "{}",
        stopped.state_detail
    );
    let event = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.state, pb::InstanceState::Stopped as i32);
    assert!(
        event.guest_initiated,
        "a guest's own power-off is told apart: {event:?}"
    );
    assert!(
        stopped.state_detail.contains("guest powered itself off"),
        "{}",
        stopped.state_detail
    );
    assert!(!process_alive(info.pid));
    // The record follows the in-memory state a moment later.
    let record = wait_for(Duration::from_secs(2), async || {
        let r = std::fs::read_to_string(agent.record_path("selfoff")).ok()?;
        r.contains("stopped_by_guest").then_some(r)
    })
    .await;
    assert!(
        record.is_some(),
        "the record must say the guest stopped itself"
    );
    assert_eq!(
        agent.runtime_json("selfoff").await["memory_mib"],
        256,
        "the runtime is kept"
    );
}

#[tokio::test]
async fn a_guest_that_reboots_itself_keeps_its_qemu() {
    let agent = TestAgent::start().await;
    let (info, console) = start_guest(&agent, "selfreboot").await;
    let mut events = agent
        .client()
        .await
        .watch_events(pb::WatchEventsRequest {
            name: "selfreboot".into(),
            after_sequence: None,
        })
        .await
        .unwrap()
        .into_inner();

    let (_console, _) = in_guest(console, |c| {
        c.run("uname -s");
        c.send("reboot -f");
    })
    .await;
    let event = tokio::time::timeout(Duration::from_secs(20), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    assert_eq!(event.kind, pb::EventKind::Rebooted as i32, "{event:?}");
    assert!(event.guest_initiated);
    let now = agent
        .client()
        .await
        .get_instance(pb::GetInstanceRequest {
            name: "selfreboot".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.state, pb::InstanceState::Running as i32);
    assert_eq!(now.pid, info.pid, "the same QEMU keeps running");
}

#[tokio::test]
async fn a_guest_that_reboots_stops_an_instance_that_exits_on_reboot() {
    let agent = TestAgent::start().await;
    let (info, console) =
        start_guest_with(&agent, "rebootexit", |spec| spec.exit_on_reboot = true).await;

    let (_console, _) = in_guest(console, |c| {
        c.run("uname -s");
        c.send("reboot -f");
    })
    .await;
    let stopped = wait_for(Duration::from_secs(30), async || {
        let now = agent.instance("rebootexit").await;
        (now.state == pb::InstanceState::Stopped as i32).then_some(now)
    })
    .await
    .unwrap_or_else(|| panic!("the instance never stopped:\n{}", agent.log()));

    assert!(stopped.state_detail.contains("rebooted"), "{stopped:?}");
    assert_eq!(stopped.pid, 0);
    assert!(!process_alive(info.pid), "its QEMU ended");
}

#[tokio::test]
async fn the_console_command_runs_a_command_in_the_guest_and_detaches() {
    use std::io::{Read, Write};
    let agent = TestAgent::start().await;
    let (info, console) = start_guest(&agent, "talk").await;
    // The serial socket takes one client at a time; make room for the CLI.
    drop(console);
    let pty = nix::pty::openpty(None, None).expect("a pseudo-terminal");
    let slave = std::fs::File::from(pty.slave);
    let mut cli = std::process::Command::new(agent_binary())
        .args([
            "--socket",
            agent.socket().to_str().unwrap(),
            "console",
            "talk",
        ])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);

    let screen = tokio::task::spawn_blocking(move || {
        let mut screen = String::new();
        let mut buf = [0u8; 4096];
        let mut sent = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !screen.contains("@@C1@@") && std::time::Instant::now() < deadline {
            if !sent && screen.contains("Ctrl-]") {
                master
                    .write_all(b"uname -s; printf '@@%s@@\\n' C1\n")
                    .unwrap();
                sent = true;
            }
            let n = master.read(&mut buf).unwrap_or(0);
            screen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        master.write_all(&[0x1d]).unwrap();
        screen
    })
    .await
    .unwrap();
    let status = tokio::task::spawn_blocking(move || cli.wait())
        .await
        .unwrap()
        .unwrap();

    assert!(screen.contains("press Ctrl-] to detach"), "{screen}");
    assert!(
        screen.contains("Linux"),
        "the guest answered through the console: {screen}"
    );
    assert!(status.success(), "detaching ends the command cleanly");
    let now = agent.instance("talk").await;
    assert_eq!(now.state, pb::InstanceState::Running as i32);
    assert_eq!(now.pid, info.pid, "the guest keeps running");
}

fn mem_total_kib(meminfo: &str) -> u64 {
    meminfo
        .split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {meminfo:?}"))
}

#[tokio::test]
async fn set_memory_moves_the_balloon_and_never_past_the_runtime_memory() {
    let agent = TestAgent::start().await;
    let (_, console) = start_guest(&agent, "balloon1").await;
    let (console, before) = in_guest(console, |c| c.run("grep MemTotal /proc/meminfo")).await;
    let set_memory = async |memory_mib: u64| {
        agent
            .client()
            .await
            .set_memory(pb::SetMemoryRequest {
                name: "balloon1".into(),
                memory_mib,
                wait: true,
                timeout_ms: 60_000,
            })
            .await
    };
    let query_balloon_mib = || {
        operator_qmp(&agent, "balloon1").execute("query-balloon", serde_json::json!({}))["actual"]
            .as_u64()
            .unwrap()
            >> 20
    };

    let lowered = set_memory(128)
        .await
        .expect("lower to 128 MiB")
        .into_inner();

    assert_eq!(
        (lowered.target_mib, lowered.actual_mib, lowered.maximum_mib),
        (128, 128, 256)
    );
    assert_eq!(query_balloon_mib(), 128);
    // GetInstance says what the guest has now; QEMU reports balloon
    // changes at most once a second.
    let reported = wait_for(Duration::from_secs(5), async || {
        Some(agent.instance("balloon1").await.balloon_mib).filter(|&mib| mib == 128)
    })
    .await;
    assert_eq!(reported, Some(128), "GetInstance's balloon_mib");
    let (console, after) = in_guest(console, |c| c.run("grep MemTotal /proc/meminfo")).await;
    assert!(
        mem_total_kib(&after) + 100 * 1024 <= mem_total_kib(&before),
        "the guest gave the memory up: {before} → {after}"
    );

    for too_much in [257, 4096, 0] {
        let err = set_memory(too_much).await.expect_err("out of range");
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{too_much}: {err:?}"
        );
        assert!(err.message().contains("256 MiB"), "{}", err.message());
    }
    assert_eq!(query_balloon_mib(), 128, "a refused target changes nothing");

    let raised = set_memory(256).await.expect("back to 256 MiB").into_inner();
    assert_eq!(raised.actual_mib, 256);
    assert_eq!(query_balloon_mib(), 256);
    assert_eq!(agent.instance("balloon1").await.balloon_mib, 256);
    let (_, restored) = in_guest(console, |c| c.run("grep MemTotal /proc/meminfo")).await;
    assert_eq!(mem_total_kib(&restored), mem_total_kib(&before));
}

async fn ask_guest_agent(
    agent: &TestAgent,
    name: &str,
    call: &str,
    timeout_ms: u32,
) -> Result<u32, tonic::Status> {
    let mut client = agent.client().await;
    let request = pb::GuestAgentRequest {
        name: name.into(),
        timeout_ms,
    };
    let answer = match call {
        "ping" => client.ping_guest_agent(request).await,
        "freeze" => client.freeze_guest_filesystems(request).await,
        _ => client.thaw_guest_filesystems(request).await,
    };
    answer.map(|a| a.into_inner().filesystems)
}

#[tokio::test]
async fn the_guest_agent_answers_and_freezes_a_mounted_filesystem() {
    let agent = TestAgent::start().await;
    let image = agent.raw_image("data.img", 16);
    let (_, console) = start_guest_with(&agent, "agented", |spec| {
        spec.guest_agent = true;
        spec.disks = vec![disk("data", &image)];
    })
    .await;
    // The channel's controller has a slot of its own, after the balloon.
    let runtime = agent.runtime_json("agented").await;
    let channel_slot = runtime["guest_agent_slot"].as_u64().unwrap();
    assert_eq!(runtime["balloon_slot"].as_u64(), Some(channel_slot - 1));
    let devices = operator_qmp(&agent, "agented").pci_devices();
    assert!(
        devices
            .iter()
            .any(|(slot, id, _)| *slot == channel_slot && id == "qga-serial"),
        "{devices:?}"
    );

    // qemu-ga starts as the guest comes up.
    let answered = wait_for(GUEST_SEES_TIMEOUT, async || {
        ask_guest_agent(&agent, "agented", "ping", 2000).await.ok()
    })
    .await;
    assert_eq!(answered, Some(0), "the guest agent never answered");
    let (_console, mounted) = in_guest(console, |c| {
        c.run(
            "mke2fs -q /dev/vda && mkdir -p /data && mount -t ext4 /dev/vda /data && echo mounted",
        )
    })
    .await;
    assert!(mounted.ends_with("mounted"), "{mounted}");
    for call in ["freeze", "thaw"] {
        let filesystems = ask_guest_agent(&agent, "agented", call, 0).await;
        assert_eq!(filesystems.expect(call), 1, "{call}");
    }

    // A hot-added NIC goes past the channel's controller.
    let added = agent
        .client()
        .await
        .add_nic(pb::AddNicRequest {
            name: "agented".into(),
            nic: Some(nic("eth9", "52:54:00:00:61:01")),
        })
        .await
        .expect("hot-add")
        .into_inner();
    let slot = u64::from(added.device.unwrap().pci_slot);
    assert!(
        slot > channel_slot,
        "slot {slot} vs the channel's {channel_slot}"
    );
}

#[tokio::test]
async fn without_a_channel_or_a_guest_the_guest_agent_calls_say_why() {
    let agent = TestAgent::start().await;
    agent.start_spec(agent.spec("plain", 64)).await;
    let refused = ask_guest_agent(&agent, "plain", "ping", 0)
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("guest_agent"), "{refused:?}");
    // A channel, but no guest OS to run qemu-ga.
    let mut spec = agent.spec("silent", 64);
    spec.guest_agent = true;
    agent.start_spec(spec).await;
    let silent = ask_guest_agent(&agent, "silent", "freeze", 300)
        .await
        .unwrap_err();
    assert_eq!(silent.code(), tonic::Code::DeadlineExceeded, "{silent:?}");
    assert!(silent.message().contains("qemu-guest-agent"), "{silent:?}");
}

#[tokio::test]
async fn a_guest_without_virtio_reads_its_ide_disk_which_never_hotplugs() {
    let agent = TestAgent::start().await;
    let pattern = format!("KVMAGENT-IDE-{}", uuid::Uuid::new_v4().simple());
    let image = agent.raw_image("ide.img", 8);
    std::fs::write(&image, format!("{pattern}\n")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let (info, console) = start_guest_with(&agent, "legacy", |spec| {
        let mut legacy = disk("legacy", &image);
        legacy.bus = pb::DiskBus::Ide as i32;
        spec.disks = vec![legacy];
    })
    .await;
    // On IDE, not on PCI.
    assert_eq!(info.devices[0].pci_slot, 0);
    let (_console, seen) = in_guest(console, |c| {
        c.run_until("head -c 64 /dev/sda", GUEST_SEES_TIMEOUT, |out| {
            out.contains("KVMAGENT-IDE-")
        })
    })
    .await;
    assert!(seen.contains(&pattern), "{seen}");
    let path = format!("/machine/peripheral/{}", info.devices[0].qemu_id);
    let kind = operator_qmp(&agent, "legacy").execute(
        "qom-get",
        serde_json::json!({"path": path, "property": "type"}),
    );
    assert_eq!(kind, "ide-hd");

    let mut client = agent.client().await;
    let mut more = disk("more", &agent.raw_image("more.img", 8));
    more.bus = pb::DiskBus::Ide as i32;
    let refused = client
        .add_disk(pb::AddDiskRequest {
            name: "legacy".into(),
            disk: Some(more),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let refused = client
        .remove_device(pb::RemoveDeviceRequest {
            name: "legacy".into(),
            device: "legacy".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
}
