//! The agent under pressure: reads that never wait behind a long operation,
//! operations on different instances in parallel, SIGTERM that leaves
//! instances running, and a full disk that costs nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use tonic::Code;

#[tokio::test]
async fn reads_and_other_instances_do_not_wait_behind_a_long_stop() {
    let agent = TestAgent::start().await;
    let mut client = agent.client().await;
    client
        .start_instance(pb::StartInstanceRequest {
            spec: Some(agent.spec("slow", 64)),
        })
        .await
        .unwrap();
    // The guest has no OS, so this stop waits out its full powerdown timeout.
    let mut stopper = agent.client().await;
    let long_stop = tokio::spawn(async move {
        stopper
            .stop_instance(pb::StopInstanceRequest {
                name: "slow".into(),
                force: false,
                powerdown_timeout_ms: 3000,
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let began = Instant::now();
    let info = client
        .get_instance(pb::GetInstanceRequest {
            name: "slow".into(),
        })
        .await
        .unwrap()
        .into_inner();
    client
        .list_instances(pb::ListInstancesRequest {})
        .await
        .unwrap();
    client
        .get_node_info(pb::GetNodeInfoRequest {})
        .await
        .unwrap();
    let reads = began.elapsed();
    let began = Instant::now();
    client
        .start_instance(pb::StartInstanceRequest {
            spec: Some(agent.spec("other", 64)),
        })
        .await
        .unwrap();
    let other_start = began.elapsed();

    assert_eq!(info.state, pb::InstanceState::Stopping as i32);
    assert!(
        reads < Duration::from_millis(500),
        "reads took {reads:?} behind a stop"
    );
    assert!(
        other_start < Duration::from_millis(2000),
        "another instance's start took {other_start:?}"
    );
    assert!(
        !long_stop.is_finished(),
        "the stop is still waiting for the guest"
    );
    long_stop.await.unwrap().unwrap();
}

#[tokio::test]
async fn sigterm_stops_the_agent_and_leaves_instances_running() {
    let mut agent = TestAgent::start().await;
    let info = agent.start_spec(agent.spec("stays", 64)).await;
    let agent_pid = agent.agent_pid().expect("agent runs");

    // SAFETY: kill(2) on the agent this test started.
    unsafe { libc::kill(agent_pid as libc::pid_t, libc::SIGTERM) };
    let exited = wait_for(Duration::from_secs(10), async || {
        (!process_alive(agent_pid)).then_some(())
    })
    .await;

    assert!(exited.is_some(), "the agent must exit on SIGTERM");
    assert!(process_alive(info.pid), "QEMU must keep running");
    assert!(!agent.socket().exists(), "the socket is removed");
    agent.restart().await;
    let adopted = agent
        .client()
        .await
        .get_instance(pb::GetInstanceRequest {
            name: "stays".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(adopted.pid, info.pid);
}

/// A 1 MiB tmpfs, unmounted on drop.
struct TinyDisk(tempfile::TempDir);

impl TinyDisk {
    fn mount() -> TinyDisk {
        let dir = tempfile::Builder::new().prefix("kafull").tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a small tmpfs needs root");
        TinyDisk(dir)
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    /// Fills what is left; returns the filler to remove.
    fn fill(&self) -> std::path::PathBuf {
        let filler = self.path().join("filler");
        let _ = std::fs::write(&filler, vec![0u8; 2 << 20]);
        filler
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[tokio::test]
async fn a_hot_add_that_cannot_be_recorded_leaves_qemu_and_the_record_as_they_were() {
    let disk_full = TinyDisk::mount();
    let state = disk_full.path().join("state");
    let agent = TestAgent::start_with(AgentOptions {
        state_dir: Some(state.clone()),
        ..AgentOptions::default()
    })
    .await;
    let bridge = Bridge::create();
    agent.start_spec(agent.spec("full1", 64)).await;
    let image = agent.raw_image("extra.img", 8);
    let record_before = std::fs::read(state.join("runtime/full1.json")).unwrap();
    let devices_before = operator_qmp(&agent, "full1").pci_devices();
    let filler = disk_full.fill();

    let nic_err = agent
        .add_nic(
            "full1",
            pb::NicSpec {
                bridge: bridge.name.clone(),
                ..nic("eth1", "52:54:00:00:70:01")
            },
        )
        .await
        .expect_err("nowhere to record the NIC");
    let disk_err = agent
        .add_disk("full1", disk("data", &image))
        .await
        .expect_err("nowhere to record the disk");

    assert_eq!(nic_err.code(), Code::ResourceExhausted, "{nic_err:?}");
    assert_eq!(disk_err.code(), Code::ResourceExhausted, "{disk_err:?}");
    let mut qmp = operator_qmp(&agent, "full1");
    assert_eq!(qmp.pci_devices(), devices_before, "QEMU has no new device");
    assert_eq!(
        qmp.execute("query-fdsets", serde_json::json!({})),
        serde_json::json!([])
    );
    assert!(
        agent.taps().is_empty(),
        "no tap is left: {:?}",
        agent.taps()
    );
    assert_eq!(
        std::fs::read(state.join("runtime/full1.json")).unwrap(),
        record_before,
        "the previous record is intact"
    );
    let info = agent.instance("full1").await;
    assert_eq!(info.state, pb::InstanceState::Running as i32);

    // With room again, the same hot-add works.
    std::fs::remove_file(filler).unwrap();
    agent
        .add_disk("full1", disk("data", &image))
        .await
        .expect("hot-add once there is room");
}

#[tokio::test]
async fn a_full_state_disk_is_resource_exhausted_and_starts_nothing() {
    let disk_full = TinyDisk::mount();
    let mount = &disk_full.0;
    let state = mount.path().join("state");
    let agent = TestAgent::start_with(AgentOptions {
        args: vec!["--powerdown-timeout-ms".into(), "1000".into()],
        state_dir: Some(state.clone()),
        ..AgentOptions::default()
    })
    .await;
    let mut client = agent.client().await;
    client
        .start_instance(pb::StartInstanceRequest {
            spec: Some(agent.spec("kept", 64)),
        })
        .await
        .unwrap();
    client
        .stop_instance(pb::StopInstanceRequest {
            name: "kept".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let record_before = std::fs::read(state.join("runtime/kept.json")).unwrap();
    disk_full.fill();

    let full = client
        .start_instance(pb::StartInstanceRequest {
            spec: Some(agent.spec("kept", 64)),
        })
        .await
        .unwrap_err();
    let fresh = client
        .start_instance(pb::StartInstanceRequest {
            spec: Some(agent.spec("new", 64)),
        })
        .await
        .unwrap_err();

    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert_eq!(fresh.code(), Code::ResourceExhausted, "{fresh:?}");
    assert!(full.message().contains("free space"), "{}", full.message());
    assert_eq!(
        std::fs::read(state.join("runtime/kept.json")).unwrap(),
        record_before,
        "the previous record is intact"
    );
    assert!(agent.live_qemus().is_empty(), "nothing may start");
    drop(agent);
}

#[tokio::test]
async fn a_caller_whose_deadline_passes_does_not_cut_the_operation_short() {
    let agent = TestAgent::start().await;
    let pid = agent.start_spec(agent.spec("deadline1", 64)).await.pid;
    // Without an OS the guest ignores the powerdown, so the stop runs
    // through the whole escalation, well past the caller's deadline.
    let mut request = tonic::Request::new(pb::StopInstanceRequest {
        name: "deadline1".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(300));

    let started = Instant::now();
    let err = agent
        .client()
        .await
        .stop_instance(request)
        .await
        .expect_err("the deadline passes first");
    let waited = started.elapsed();

    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(waited < Duration::from_millis(900), "waited {waited:?}");
    let stopped = wait_for(Duration::from_secs(15), async || {
        let info = agent.instance("deadline1").await;
        (info.state == pb::InstanceState::Stopped as i32).then_some(info)
    })
    .await;
    assert!(
        stopped.is_some(),
        "the stop went on to its end\n{}",
        agent.log()
    );
    assert!(!process_alive(pid));
    assert!(agent.log().contains("operation done"), "{}", agent.log());
}
