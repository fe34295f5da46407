//! Guest RAM from a file or from huge pages, against real QEMU.

use std::process::Command;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use serde_json::json;
use tonic::Code;

#[tokio::test]
async fn guest_ram_can_live_in_a_shared_file() {
    let agent = TestAgent::start().await;
    let ram = agent.scratch().join("guest.ram");
    let mut spec = agent.spec("filemem", 128);
    spec.memory = Some(pb::MemoryBacking {
        file: ram.display().to_string(),
        share: true,
        hugepages: false,
    });

    agent.start_spec(spec).await;

    let memdevs = operator_qmp(&agent, "filemem").execute("query-memdev", json!({}));
    let memdev = &memdevs.as_array().expect("memdev list")[0];
    assert_eq!(memdev["share"], true, "{memdevs}");
    assert_eq!(memdev["size"], 128u64 << 20, "{memdevs}");
    assert_eq!(std::fs::metadata(&ram).unwrap().len(), 128 << 20);
    let runtime = agent.runtime_json("filemem").await;
    assert_eq!(runtime["memory_backing"]["kind"], "file", "{runtime}");
}

#[tokio::test]
async fn a_node_without_free_huge_pages_refuses_a_hugepage_guest_clearly() {
    let agent = TestAgent::start().await;
    let mount = tempfile::Builder::new().prefix("kahuge").tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "hugetlbfs", "none"])
        .arg(mount.path())
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mounting hugetlbfs needs root");
    let free: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut spec = agent.spec("hugemem", 64);
    spec.memory = Some(pb::MemoryBacking {
        file: mount.path().display().to_string(),
        share: false,
        hugepages: true,
    });

    let result = agent
        .client()
        .await
        .start_instance(start_request(spec))
        .await;

    if free >= 32 {
        // Enough huge pages here: the guest must simply run.
        let info = result.expect("start with huge pages").into_inner();
        assert_eq!(info.state, pb::InstanceState::Running as i32);
        drop(agent);
        let _ = Command::new("umount").arg(mount.path()).status();
        return;
    }
    let _ = Command::new("umount").arg(mount.path()).status();
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("huge pages"), "{}", err.message());
    assert!(err.message().contains("backing store"), "{}", err.message());
    assert!(agent.live_qemus().is_empty());
}

#[tokio::test]
async fn set_memory_without_a_balloon_driver_times_out_and_says_why() {
    let agent = TestAgent::start().await;
    agent.start_spec(agent.spec("nodriver", 128)).await;
    let set_memory = async |wait: bool| {
        agent
            .client()
            .await
            .set_memory(pb::SetMemoryRequest {
                name: "nodriver".into(),
                memory_mib: 64,
                wait,
                timeout_ms: 300,
            })
            .await
    };

    // Without an OS nothing inflates the balloon: the target is set, the
    // guest keeps its memory.
    let err = set_memory(true)
        .await
        .expect_err("no driver to reach the target");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("virtio_balloon"),
        "{}",
        err.message()
    );
    let set = set_memory(false)
        .await
        .expect("set without waiting")
        .into_inner();
    assert_eq!(
        (set.target_mib, set.actual_mib, set.maximum_mib),
        (64, 128, 128)
    );
    let pci = operator_qmp(&agent, "nodriver").pci_devices();
    assert!(
        pci.iter().any(|(_, id, _)| id == "balloon0"),
        "every instance has a balloon: {pci:?}"
    );

    let stopped = agent.spec("stopped", 64);
    agent.start_spec(stopped).await;
    agent
        .client()
        .await
        .stop_instance(pb::StopInstanceRequest {
            name: "stopped".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = agent
        .client()
        .await
        .set_memory(pb::SetMemoryRequest {
            name: "stopped".into(),
            memory_mib: 32,
            ..Default::default()
        })
        .await
        .expect_err("not running");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}
