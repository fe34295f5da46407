//! Instances started by Ganeti 3.0's own KVM driver (hv_kvm), taken over by
//! the agent while they run, then hot-plugged, soft-rebooted and migrated
//! through it. The Python tests are in integrations/ganeti/tests/adoption.

use std::path::Path;
use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::guest::guest_image;
use kvm_agent_tests::*;

#[tokio::test]
async fn instances_of_ganetis_kvm_driver_are_taken_over_while_they_run() {
    require_qemu();
    let ganeti = prepared_path("KVM_AGENT_GANETI", "ganeti-env");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut source = TestAgent::start_with(AgentOptions {
        args: vec!["--metrics-listen".into(), metrics.clone()],
        ..AgentOptions::default()
    })
    .await;
    let target = TestAgent::start().await;
    let bridge = Bridge::create();
    let uuids: Vec<uuid::Uuid> = (0..7).map(|_| uuid::Uuid::new_v4()).collect();
    for uuid in &uuids {
        source.track(*uuid);
        target.track(*uuid);
    }
    let image = guest_image();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tests = root.join("integrations/ganeti/tests/adoption");
    let python_path = std::env::join_paths([ganeti, root.join("integrations/ganeti")]).unwrap();
    let uuid_list = uuids.iter().map(ToString::to_string).collect::<Vec<_>>();
    let env: Vec<(&str, std::ffi::OsString)> = vec![
        ("PYTHONPATH", python_path),
        ("KVM_AGENT_TEST_SOCKET", source.socket().into()),
        ("KVM_AGENT_TEST_STATE_DIR", source.state_dir().into()),
        ("KVM_AGENT_TEST_TARGET_SOCKET", target.socket().into()),
        ("KVM_AGENT_TEST_TARGET_STATE_DIR", target.state_dir().into()),
        ("KVM_AGENT_TEST_KERNEL", image.kernel.clone().into()),
        ("KVM_AGENT_TEST_INITRD", image.initrd.clone().into()),
        ("KVM_AGENT_TEST_SCRATCH", source.scratch().into()),
        ("KVM_AGENT_TEST_BRIDGE", bridge.name.clone().into()),
        ("KVM_AGENT_TEST_METRICS", metrics.into()),
        ("KVM_AGENT_TEST_UUIDS", uuid_list.join(",").into()),
    ];
    let logs = || {
        format!(
            "source agent log:\n{}\ntarget agent log:\n{}",
            source.log(),
            target.log()
        )
    };
    run_python_tests(&tests, &env, 5, logs).await;

    // An agent restarted under a QEMU it took over finds it again, still
    // running as Ganeti started it.
    let name = "restarted.example.com";
    let python = prepared_path("KVM_AGENT_PYTHON", "python-env");
    let started = std::process::Command::new(python)
        .arg(tests.join("test_adoption.py"))
        .args(["start", name, &uuid_list[6], "52:54:00:6b:00:08"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run Ganeti's driver");
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let pid: u32 = String::from_utf8_lossy(&started.stdout)
        .trim()
        .parse()
        .unwrap();
    // Taken over by hand, as the switch-over procedure does: a dry run
    // first, which changes nothing.
    let ganeti_dir = source.scratch().join("kvm-hypervisor");
    let adopt_ganeti = |extra: &[&str]| {
        std::process::Command::new(agent_binary())
            .args([
                "--socket",
                source.socket().to_str().unwrap(),
                "adopt-ganeti",
            ])
            .args(["--ganeti-dir", ganeti_dir.to_str().unwrap(), name])
            .args(extra)
            .output()
            .unwrap()
    };
    let dry = adopt_ganeti(&["--dry-run"]);
    let printed = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert!(
        printed.contains(&format!("{name} (pid {pid}): would adopt")),
        "{printed}"
    );
    let unknown = source
        .client()
        .await
        .get_instance(pb::GetInstanceRequest { name: name.into() })
        .await
        .unwrap_err();
    assert_eq!(
        unknown.code(),
        tonic::Code::NotFound,
        "a dry run takes nothing"
    );
    let adopted = adopt_ganeti(&[]);
    let printed = String::from_utf8_lossy(&adopted.stdout);
    assert!(adopted.status.success(), "{printed}");
    assert!(
        printed.contains(&format!("{name} (pid {pid}): adopted")),
        "{printed}"
    );
    assert!(printed.contains("unconfined:"), "{printed}");
    source.restart().await;
    source.wait_reconciled(Duration::from_secs(30)).await;
    let info = source.instance(name).await;
    assert_eq!(info.pid, pid, "{}", source.log());
    assert_eq!(info.state, pb::InstanceState::Running as i32);
    assert!(info.unconfined.contains("soft reboot"), "{info:?}");
    assert_eq!(info.devices.iter().filter(|d| !d.tap.is_empty()).count(), 1);
    source
        .client()
        .await
        .stop_instance(pb::StopInstanceRequest {
            name: name.into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(15), async || {
            (!process_alive(pid)).then_some(())
        })
        .await
        .is_some(),
        "the restarted agent stops it"
    );
}
