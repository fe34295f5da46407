//! Start, stop, reboot and supervision against real QEMU, real taps and
//! real image files, driven through the gRPC API.

use std::time::{Duration, Instant};

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use serde_json::json;
use tonic::Code;

async fn stop(agent: &TestAgent, name: &str, force: bool) -> pb::StopInstanceResponse {
    agent
        .client()
        .await
        .stop_instance(pb::StopInstanceRequest {
            name: name.into(),
            force,
            powerdown_timeout_ms: 0,
        })
        .await
        .expect("stop")
        .into_inner()
}

fn nic_count(qmp: &mut Qmp) -> usize {
    qmp.pci_devices()
        .iter()
        .filter(|(_, id, _)| id.starts_with("nic-"))
        .count()
}

#[tokio::test]
async fn devices_sit_at_their_runtime_slots_and_taps_live_with_qemu() {
    let agent = TestAgent::start().await;
    let bridge = Bridge::create();
    let mut spec = agent.spec("web1", 128);
    let root = agent.raw_image("root.img", 32);
    let data = agent.raw_image("data.img", 16);
    spec.disks = vec![disk("root", &root), disk("data", &data)];
    spec.nics = vec![pb::NicSpec {
        bridge: bridge.name.clone(),
        ..nic("eth0", "52:54:00:00:10:01")
    }];

    let info = agent.start_spec(spec).await;

    assert_eq!(info.state, pb::InstanceState::Running as i32);
    let mut qmp = operator_qmp(&agent, "web1");
    let pci = qmp.pci_devices();
    for device in &info.devices {
        let at_slot = pci
            .iter()
            .find(|(slot, _, _)| u32::try_from(*slot).unwrap() == device.pci_slot);
        assert_eq!(
            at_slot.map(|(_, id, _)| id.as_str()),
            Some(device.qemu_id.as_str()),
            "device {} should be at slot {}: {pci:?}",
            device.name,
            device.pci_slot
        );
    }
    // The images came as fds: QEMU names them by their fd sets and holds
    // them open.
    let blocks = qmp.execute("query-block", json!({}));
    let files: Vec<String> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["inserted"]["file"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(files.len(), 2, "{blocks}");
    assert!(
        files.iter().all(|f| f.starts_with("/dev/fdset/")),
        "{files:?}"
    );
    let held = open_files(info.pid);
    assert!(held.contains(&root) && held.contains(&data), "{held:?}");
    let tap = info
        .devices
        .iter()
        .find(|d| d.name == "eth0")
        .unwrap()
        .tap
        .clone();
    assert!(!tap.is_empty());
    assert_eq!(agent.taps(), vec![tap.clone()]);
    let master =
        std::fs::read_link(format!("/sys/class/net/{tap}/master")).expect("tap has a master");
    assert!(master.ends_with(&bridge.name), "{master:?}");
    let qemu_fd_on_tun = std::fs::read_dir(format!("/proc/{}/fd", info.pid))
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l == std::path::Path::new("/dev/net/tun"))
        });
    assert!(qemu_fd_on_tun, "QEMU must hold the tap fd");
    drop(qmp);

    stop(&agent, "web1", false).await;

    assert!(
        agent.taps().is_empty(),
        "tap must vanish with QEMU: {:?}",
        agent.taps()
    );
    agent.settled("web1").await;
    assert!(!agent.run_dir("web1").join("qmp.sock").exists());
    assert!(!agent.run_dir("web1").join("pid").exists());
}

#[tokio::test]
async fn soft_reboot_replays_the_runtime_and_hard_reboot_applies_the_spec() {
    let agent = TestAgent::start().await;
    let mut spec = agent.spec("seed", 128);
    spec.nics = vec![nic("eth0", "52:54:00:00:20:01")];
    let first = agent.start_spec(spec.clone()).await;
    let mut bigger = spec.clone();
    bigger.memory_mib = 256;
    bigger.nics.push(nic("eth1", "52:54:00:00:20:02"));
    let record = agent.record_path("seed");
    let written = || std::fs::metadata(&record).unwrap().modified().unwrap();
    let before = (std::fs::read(&record).unwrap(), written());

    let soft = agent
        .client()
        .await
        .reboot_instance(pb::RebootInstanceRequest {
            name: "seed".into(),
            mode: pb::RebootMode::Soft as i32,
            spec: Some(bigger.clone()),
            ..Default::default()
        })
        .await
        .expect("soft reboot")
        .into_inner();

    assert_ne!(soft.pid, first.pid, "a soft reboot starts a new QEMU");
    assert_eq!(soft.runtime_generation, first.runtime_generation);
    assert!(
        before == (std::fs::read(&record).unwrap(), written()),
        "a soft reboot leaves the record as it was, unwritten"
    );
    let mut qmp = operator_qmp(&agent, "seed");
    assert_eq!(qmp.base_memory(), 128 << 20);
    assert_eq!(nic_count(&mut qmp), 1);
    drop(qmp);

    let hard = agent
        .client()
        .await
        .reboot_instance(pb::RebootInstanceRequest {
            name: "seed".into(),
            mode: pb::RebootMode::Hard as i32,
            spec: Some(bigger),
            ..Default::default()
        })
        .await
        .expect("hard reboot")
        .into_inner();

    assert_eq!(hard.runtime_generation, first.runtime_generation + 1);
    let mut qmp = operator_qmp(&agent, "seed");
    assert_eq!(qmp.base_memory(), 256 << 20);
    assert_eq!(nic_count(&mut qmp), 2);
    let eth0_before = first.devices.iter().find(|d| d.name == "eth0").unwrap();
    let eth0_after = hard.devices.iter().find(|d| d.name == "eth0").unwrap();
    assert_eq!(
        eth0_before.uuid, eth0_after.uuid,
        "device identity survives a hard reboot"
    );
}

#[tokio::test]
async fn stop_of_a_guest_that_ignores_powerdown_ends_with_quit() {
    let agent = TestAgent::start().await;
    agent.start_spec(agent.spec("deaf", 64)).await;
    let began = Instant::now();

    let reply = stop(&agent, "deaf", false).await;

    // powerdown waits 1 s (agent flag), then quit succeeds at once.
    assert_eq!(reply.method, pb::StopMethod::Quit as i32);
    assert!(
        began.elapsed() < Duration::from_millis(1000 + 2000),
        "{:?}",
        began.elapsed()
    );
    assert!(began.elapsed() >= Duration::from_millis(1000));
    assert!(agent.live_qemus().is_empty());
    agent.settled("deaf").await;
    assert!(!agent.run_dir("deaf").join("qmp.sock").exists());
    assert!(!agent.run_dir("deaf").join("pid").exists());
}

#[tokio::test]
async fn stop_kills_a_qemu_that_answers_nothing() {
    let options = AgentOptions {
        args: [
            "--powerdown-timeout-ms",
            "1000",
            "--quit-timeout-ms",
            "500",
            "--qmp-timeout-ms",
            "500",
        ]
        .map(String::from)
        .to_vec(),
        ..AgentOptions::default()
    };
    let agent = TestAgent::start_with(options).await;
    let info = agent.start_spec(agent.spec("hung", 64)).await;
    // A stopped process answers neither powerdown nor quit, but SIGKILL ends it.
    send_signal(info.pid, libc::SIGSTOP);
    let began = Instant::now();

    let reply = stop(&agent, "hung", false).await;

    assert_eq!(reply.method, pb::StopMethod::Kill as i32);
    // powerdown (1 s) + quit (0.5 s) + the kill itself
    assert!(
        began.elapsed() < Duration::from_millis(1000 + 500 + 2000),
        "{:?}",
        began.elapsed()
    );
    assert!(!process_alive(info.pid));
    agent.settled("hung").await;
    assert!(!agent.run_dir("hung").join("qmp.sock").exists());
    assert!(!agent.run_dir("hung").join("pid").exists());
}

#[tokio::test]
async fn force_stop_kills_at_once() {
    let agent = TestAgent::start().await;
    let info = agent.start_spec(agent.spec("forced", 64)).await;
    let began = Instant::now();

    let reply = stop(&agent, "forced", true).await;

    assert_eq!(reply.method, pb::StopMethod::Kill as i32);
    assert!(
        began.elapsed() < Duration::from_millis(900),
        "{:?}",
        began.elapsed()
    );
    assert!(!process_alive(info.pid));
    assert_eq!(
        reply.instance.unwrap().state,
        pb::InstanceState::Stopped as i32
    );
}

#[tokio::test]
async fn killed_qemu_is_reported_crashed_with_its_log_tail() {
    let agent = TestAgent::start().await;
    let info = agent.start_spec(agent.spec("victim", 64)).await;
    let marker = format!("marker-{}", uuid::Uuid::new_v4());
    let log = agent.run_dir("victim").join("qemu.log");
    std::fs::write(
        &log,
        format!(
            "{}{marker}\n",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    )
    .unwrap();

    send_signal(info.pid, libc::SIGKILL);
    let crashed = wait_for(Duration::from_secs(2), async || {
        let i = agent.instance("victim").await;
        (i.state == pb::InstanceState::Crashed as i32).then_some(i)
    })
    .await
    .expect("crashed within 2 s");

    assert!(
        crashed.state_detail.contains("exited unexpectedly"),
        "{}",
        crashed.state_detail
    );
    assert!(
        crashed.state_detail.contains(&marker),
        "{}",
        crashed.state_detail
    );
    assert_eq!(crashed.pid, 0);
    // The record follows the in-memory state a moment later.
    let record = wait_for(Duration::from_secs(2), async || {
        let r = std::fs::read_to_string(agent.record_path("victim")).ok()?;
        r.contains("\"crashed\"").then_some(r)
    })
    .await;
    assert!(record.is_some(), "the record must say crashed");
}

#[tokio::test]
async fn starting_a_running_instance_is_already_exists_and_harmless() {
    let agent = TestAgent::start().await;
    let spec = agent.spec("twice", 64);
    let first = agent.start_spec(spec.clone()).await;

    let err = agent
        .client()
        .await
        .start_instance(start_request(spec))
        .await
        .unwrap_err();

    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let now = agent.instance("twice").await;
    assert_eq!(now.pid, first.pid);
    assert_eq!(now.state, pb::InstanceState::Running as i32);
    assert!(process_alive(first.pid));
}

#[tokio::test]
async fn a_pidfile_naming_another_process_is_not_taken_as_running() {
    let mut agent = TestAgent::start().await;
    let spec = agent.spec("reused", 64);
    agent.start_spec(spec.clone()).await;
    // The agent dies and QEMU dies with the host, say; the pid is reused
    // by an unrelated process before the agent comes back.
    agent.kill_agent();
    for pid in agent.live_qemus() {
        send_signal(pid, libc::SIGKILL);
    }
    let mut stranger = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let stranger_pid = stranger.id();
    std::fs::write(
        agent.run_dir("reused").join("pid"),
        format!("{stranger_pid}\n"),
    )
    .unwrap();

    agent.restart().await;
    let after_restart = agent.instance("reused").await;
    let restarted = agent.start_spec(spec).await;

    assert_eq!(
        after_restart.state,
        pb::InstanceState::Crashed as i32,
        "{}",
        after_restart.state_detail
    );
    assert_eq!(restarted.state, pb::InstanceState::Running as i32);
    assert_ne!(restarted.pid, stranger_pid);
    assert!(
        process_alive(stranger_pid),
        "the stranger must be left alone"
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
}

#[tokio::test]
async fn agent_restart_adopts_running_instances() {
    let mut agent = TestAgent::start().await;
    let mut spec = agent.spec("survivor", 64);
    spec.nics = vec![nic("eth0", "52:54:00:00:30:01")];
    let before = agent.start_spec(spec).await;

    agent.restart().await;
    let after = agent.instance("survivor").await;

    assert_eq!(
        after.state,
        pb::InstanceState::Running as i32,
        "{}",
        after.state_detail
    );
    assert_eq!(after.pid, before.pid);
    assert_eq!(
        after.devices[0].tap, before.devices[0].tap,
        "taps are found again"
    );
    assert_eq!(
        stop(&agent, "survivor", false).await.method,
        pb::StopMethod::Quit as i32
    );
    assert!(!process_alive(before.pid));
}

#[tokio::test]
async fn a_paused_start_runs_no_guest_instruction_until_resumed() {
    let mut agent = TestAgent::start().await;
    let mut request = start_request(agent.spec("held", 64));
    request.paused = true;
    let started = agent
        .client()
        .await
        .start_instance(request)
        .await
        .expect("paused start")
        .into_inner();
    assert_eq!(started.state, pb::InstanceState::Paused as i32);
    // "prelaunch" is QEMU's word for a guest that never ran; one paused
    // after it ran would be "paused".
    let status = |agent: &TestAgent| operator_qmp(agent, "held").execute("query-status", json!({}));
    assert_eq!(status(&agent)["status"], "prelaunch");

    agent.restart().await;
    assert_eq!(
        agent.instance("held").await.state,
        pb::InstanceState::Paused as i32
    );
    let resumed = agent
        .client()
        .await
        .resume_instance(pb::ResumeInstanceRequest {
            name: "held".into(),
        })
        .await
        .expect("resume")
        .into_inner();
    assert_eq!(resumed.state, pb::InstanceState::Running as i32);
    assert_eq!(status(&agent)["status"], "running");
    assert_eq!(resumed.pid, started.pid);
}

#[tokio::test]
async fn reset_keeps_the_same_qemu() {
    let agent = TestAgent::start().await;
    let before = agent.start_spec(agent.spec("resettable", 64)).await;

    let after = agent
        .client()
        .await
        .reboot_instance(pb::RebootInstanceRequest {
            name: "resettable".into(),
            mode: pb::RebootMode::Reset as i32,
            spec: None,
            ..Default::default()
        })
        .await
        .expect("reset")
        .into_inner();

    assert_eq!(after.pid, before.pid);
    assert_eq!(after.state, pb::InstanceState::Running as i32);
}

#[tokio::test]
async fn soft_reboot_of_a_stopped_instance_is_failed_precondition() {
    let agent = TestAgent::start().await;
    agent.start_spec(agent.spec("idle", 64)).await;
    stop(&agent, "idle", true).await;

    let err = agent
        .client()
        .await
        .reboot_instance(pb::RebootInstanceRequest {
            name: "idle".into(),
            mode: pb::RebootMode::Soft as i32,
            spec: None,
            ..Default::default()
        })
        .await
        .unwrap_err();

    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test]
async fn pinned_vcpus_keep_their_cpus_across_a_soft_reboot() {
    let agent = TestAgent::start().await;
    let host_cpus = std::thread::available_parallelism().unwrap().get();
    let last = host_cpus - 1;
    // vCPU 0 on the last CPU and vCPU 1 on CPU 0: apart wherever there
    // are two CPUs.
    let mask = format!("{last}:0");
    let mut spec = agent.spec("pinned", 64);
    spec.vcpus = 2;
    spec.cpu_mask = mask.clone();

    let started = agent.start_spec(spec).await;
    assert_eq!(started.cpu_mask, mask);
    let threads = thread_affinities(started.pid);
    assert_eq!(vcpu_affinity(&threads, 0), last.to_string());
    assert_eq!(vcpu_affinity(&threads, 1), "0");
    let unpinned = format!("0-{last}");
    if host_cpus > 1 {
        let main = threads
            .iter()
            .find(|(name, _)| name.starts_with("qemu-system"))
            .unwrap();
        assert_eq!(
            main.1, unpinned,
            "only vCPU threads are pinned: {threads:?}"
        );
    }
    let mut qmp = operator_qmp(&agent, "pinned");
    let status = qmp.execute("query-status", serde_json::json!({}));
    assert_eq!(status["status"], "running", "the guest runs once pinned");
    drop(qmp);

    let rebooted = agent
        .client()
        .await
        .reboot_instance(pb::RebootInstanceRequest {
            name: "pinned".into(),
            mode: pb::RebootMode::Soft as i32,
            spec: None,
            ..Default::default()
        })
        .await
        .expect("soft reboot")
        .into_inner();

    assert_ne!(rebooted.pid, started.pid);
    let threads = thread_affinities(rebooted.pid);
    assert_eq!(vcpu_affinity(&threads, 0), last.to_string());
    assert_eq!(vcpu_affinity(&threads, 1), "0");
}

#[tokio::test]
async fn a_mask_that_does_not_fit_is_refused_before_qemu_starts() {
    let agent = TestAgent::start().await;
    let host_cpus = std::thread::available_parallelism().unwrap().get();
    let client = || agent.client();
    let cases = [
        ("0:0:0", "has 3 entries for 2 vCPUs"),
        ("0-", "is invalid"),
        (&*format!("{}", host_cpus + 64), "this host has CPUs"),
    ];
    for (mask, says) in cases {
        let mut spec = agent.spec("misfit", 64);
        spec.vcpus = 2;
        spec.cpu_mask = mask.into();
        let status = client()
            .await
            .start_instance(start_request(spec))
            .await
            .expect_err(mask);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{mask}: {status:?}"
        );
        assert!(
            status.message().contains(says),
            "{mask}: {}",
            status.message()
        );
    }
    assert!(agent.live_qemus().is_empty());
}

#[tokio::test]
async fn the_guest_sees_the_cpu_topology_asked_for_and_a_local_time_clock() {
    let agent = TestAgent::start().await;
    let mut spec = agent.spec("shaped", 64);
    spec.vcpus = 4;
    spec.cpu_topology = Some(pb::CpuTopology {
        sockets: 1,
        cores: 2,
        threads: 2,
    });
    spec.rtc_localtime = true;
    let info = agent.start_spec(spec).await;

    let cpus = operator_qmp(&agent, "shaped").execute("query-cpus-fast", json!({}));
    let mut places: Vec<(u64, u64, u64)> = cpus
        .as_array()
        .unwrap()
        .iter()
        .map(|cpu| {
            let at = |key: &str| {
                cpu["props"][key]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{cpu}"))
            };
            (at("socket-id"), at("core-id"), at("thread-id"))
        })
        .collect();
    places.sort();
    assert_eq!(places, [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", info.pid)).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    assert!(
        args.windows(2)
            .any(|w| w == [&b"-rtc"[..], &b"base=localtime"[..]]),
        "{:?}",
        String::from_utf8_lossy(&cmdline)
    );

    // A topology that can't hold the vCPUs is the request's fault.
    let mut bad = agent.spec("misshaped", 64);
    bad.vcpus = 3;
    bad.cpu_topology = Some(pb::CpuTopology {
        sockets: 0,
        cores: 2,
        threads: 0,
    });
    let refused = agent
        .client()
        .await
        .start_instance(start_request(bad))
        .await
        .expect_err("2 cores per socket can't hold 3 vCPUs");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("cpu topology"), "{refused:?}");
}

#[tokio::test]
async fn every_nic_model_sits_on_pci_with_its_mac_cold_and_hot() {
    let agent = TestAgent::start().await;
    let models = [
        pb::NicModel::Virtio,
        pb::NicModel::E1000,
        pb::NicModel::Rtl8139,
        pb::NicModel::Ne2kPci,
        pb::NicModel::I82551,
        pb::NicModel::I82557b,
        pb::NicModel::I82559er,
    ];
    let expected_type = |model: pb::NicModel| match model {
        pb::NicModel::Virtio | pb::NicModel::Unspecified => "virtio-net-pci",
        pb::NicModel::E1000 => "e1000",
        pb::NicModel::Rtl8139 => "rtl8139",
        pb::NicModel::Ne2kPci => "ne2k_pci",
        pb::NicModel::I82551 => "i82551",
        pb::NicModel::I82557b => "i82557b",
        pb::NicModel::I82559er => "i82559er",
        pb::NicModel::Pcnet => "pcnet",
        pb::NicModel::Ne2kIsa => "ne2k_isa",
    };
    let mut spec = agent.spec("models", 64);
    spec.nics = models
        .iter()
        .enumerate()
        .map(|(i, &model)| pb::NicSpec {
            model: model as i32,
            ..nic(&format!("eth{i}"), &format!("52:54:00:8a:00:{i:02x}"))
        })
        .collect();
    agent.start_spec(spec).await;
    // One hot-added, into a chrooted QEMU that finds its ROM in the chroot.
    agent
        .add_nic(
            "models",
            pb::NicSpec {
                model: pb::NicModel::Pcnet as i32,
                ..nic("eth7", "52:54:00:8a:00:07")
            },
        )
        .await
        .unwrap_or_else(|s| panic!("hot-add a pcnet NIC: {s:?}\n{}", agent.log()));

    let info = agent.instance("models").await;
    let root = std::fs::read_link(format!("/proc/{}/root", info.pid)).unwrap();
    assert_ne!(root, std::path::Path::new("/"), "QEMU runs in its chroot");
    let mut qmp = operator_qmp(&agent, "models");
    let on_pci: std::collections::HashMap<String, u64> = qmp
        .pci_devices()
        .into_iter()
        .map(|(slot, id, _)| (id, slot))
        .collect();
    let all = models.iter().copied().chain([pb::NicModel::Pcnet]);
    for (i, model) in all.enumerate() {
        let device = info
            .devices
            .iter()
            .find(|d| d.name == format!("eth{i}"))
            .unwrap();
        assert_eq!(
            on_pci.get(&device.qemu_id),
            Some(&u64::from(device.pci_slot)),
            "{model:?} at its slot"
        );
        let path = format!("/machine/peripheral/{}", device.qemu_id);
        let get = |qmp: &mut Qmp, property: &str| {
            qmp.execute("qom-get", json!({"path": path, "property": property}))
        };
        assert_eq!(get(&mut qmp, "type"), json!(expected_type(model)));
        assert_eq!(
            get(&mut qmp, "mac"),
            json!(format!("52:54:00:8a:00:{i:02x}"))
        );
    }
}

#[tokio::test]
async fn an_isa_nic_has_no_slot_and_never_hotplugs() {
    let agent = TestAgent::start().await;
    let isa = |name: &str, mac: &str| pb::NicSpec {
        model: pb::NicModel::Ne2kIsa as i32,
        ..nic(name, mac)
    };
    let mut spec = agent.spec("legacy", 64);
    spec.machine_type = "q35".into();
    spec.nics = vec![
        isa("eth0", "52:54:00:8a:01:00"),
        nic("eth1", "52:54:00:8a:01:01"),
    ];
    let info = agent.start_spec(spec).await;
    let device = &info.devices.iter().find(|d| d.name == "eth0").unwrap();
    assert_eq!(device.pci_slot, 0);
    let mut qmp = operator_qmp(&agent, "legacy");
    let path = format!("/machine/peripheral/{}", device.qemu_id);
    let get = |qmp: &mut Qmp, property: &str| {
        qmp.execute("qom-get", json!({"path": path, "property": property}))
    };
    assert_eq!(get(&mut qmp, "type"), "ne2k_isa");
    assert_eq!(get(&mut qmp, "mac"), "52:54:00:8a:01:00");
    // QEMU's own ISA resources, and not on PCI.
    assert_eq!(get(&mut qmp, "iobase"), 0x300);
    let on_pci = qmp.pci_devices();
    assert!(
        on_pci.iter().all(|(_, id, _)| id != &device.qemu_id),
        "{on_pci:?}"
    );
    drop(qmp);

    let added = agent
        .add_nic("legacy", isa("eth2", "52:54:00:8a:01:02"))
        .await
        .unwrap_err();
    assert_eq!(added.code(), Code::FailedPrecondition, "{added:?}");
    let removed = agent
        .client()
        .await
        .remove_device(pb::RemoveDeviceRequest {
            name: "legacy".into(),
            device: "eth0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(removed.code(), Code::FailedPrecondition, "{removed:?}");
    // ISA has room for one.
    let mut two = agent.spec("crowded", 64);
    two.nics = vec![
        isa("eth0", "52:54:00:8a:02:00"),
        isa("eth1", "52:54:00:8a:02:01"),
    ];
    let refused = agent.start_refused(two).await;
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("ne2k_isa"), "{refused:?}");
}

/// The server's greeting of a VNC display on `port`, from `host`.
fn rfb_greeting(host: &str, port: u16) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect((host, port))
        .unwrap_or_else(|e| panic!("connect to VNC on {host}:{port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 12];
    stream.read_exact(&mut greeting).expect("RFB greeting");
    String::from_utf8_lossy(&greeting).into_owned()
}

#[tokio::test]
async fn vnc_serves_any_display_on_the_address_asked_for() {
    let agent = TestAgent::start().await;
    // Displays far above 99, as Ganeti's ports from 11000 give them.
    let everywhere = free_port();
    let mut spec = agent.spec("seen", 64);
    spec.vnc = Some(pb::VncSpec {
        display: u32::from(everywhere) - 5900,
        address: "0.0.0.0".into(),
        keymap: "de".into(),
        ..Default::default()
    });
    spec.usb_pointer = pb::UsbPointer::Tablet as i32;
    spec.usb_devices = vec![
        pb::UsbDevice::Keyboard as i32,
        pb::UsbDevice::WacomTablet as i32,
    ];
    spec.sound_card = pb::SoundCard::Hda as i32;
    spec.display_adapter = pb::DisplayAdapter::Cirrus as i32;
    let seen = agent.start_spec(spec).await;
    // The adapter in its slot, the USB controller beside the PIIX3, a
    // tablet on it, and the keymap in use.
    let mut qmp = operator_qmp(&agent, "seen");
    let devices = qmp.pci_devices();
    assert!(
        devices.contains(&(2, String::new(), "VGA controller".into())),
        "{devices:?}"
    );
    assert!(
        devices
            .iter()
            .any(|(slot, _, class)| *slot == 1 && class == "USB controller"),
        "{devices:?}"
    );
    let pci = qmp.execute("query-pci", json!({}));
    let adapter = pci[0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["slot"] == 2)
        .unwrap();
    assert_eq!(adapter["id"]["vendor"], 0x1013, "Cirrus Logic: {adapter}");
    let mice = qmp.execute("query-mice", json!({}));
    assert!(mice.to_string().contains("QEMU HID Tablet"), "{mice}");
    // The sound card after the balloon, and the devices without an id.
    assert!(
        devices.contains(&(4, "sound0".into(), "Audio controller".into())),
        "{devices:?}"
    );
    let anonymous: Vec<String> = qmp
        .execute("qom-list", json!({"path": "/machine/peripheral-anon"}))
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str().filter(|n| n.starts_with("device[")))
        .map(|name| {
            let path = format!("/machine/peripheral-anon/{name}");
            let kind = qmp.execute("qom-get", json!({"path": path, "property": "type"}));
            kind.as_str().unwrap().to_owned()
        })
        .collect();
    for kind in ["usb-kbd", "usb-wacom-tablet", "hda-duplex"] {
        assert!(anonymous.iter().any(|k| k == kind), "{anonymous:?}");
    }
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", seen.pid)).unwrap();
    assert!(cmdline.contains("-k\0de\0"), "{cmdline:?}");
    assert!(
        cmdline.contains("cirrus-vga,bus=pci.0,addr=0x2"),
        "{cmdline:?}"
    );
    // Reached through an address of the node that isn't loopback.
    let node_address = nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip()))
        .find(|ip| !ip.is_loopback())
        .expect("an IPv4 address besides loopback")
        .to_string();
    assert_eq!(rfb_greeting(&node_address, everywhere), "RFB 003.008\n");
    let console = agent
        .client()
        .await
        .get_console_info(pb::GetConsoleInfoRequest {
            name: "seen".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert_eq!(console.vnc_address, format!("{host}:{everywhere}"));

    let loopback = free_port();
    let mut spec = agent.spec("local", 64);
    spec.vnc = Some(pb::VncSpec {
        display: u32::from(loopback) - 5900,
        ..Default::default()
    });
    agent.start_spec(spec).await;
    assert_eq!(rfb_greeting("127.0.0.1", loopback), "RFB 003.008\n");
    assert!(
        std::net::TcpStream::connect((node_address.as_str(), loopback)).is_err(),
        "loopback only by default"
    );

    let mut bad = agent.spec("unseen", 64);
    bad.vnc = Some(pb::VncSpec {
        display: 1,
        address: "eth0".into(),
        ..Default::default()
    });
    let refused = agent
        .client()
        .await
        .start_instance(start_request(bad))
        .await
        .expect_err("an interface name isn't an address");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
}
