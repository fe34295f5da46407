//! Instances started by Ganeti 3.0's own KVM driver (hv_kvm), taken over by
//! the agent while they run, then hot-plugged, soft-rebooted and migrated
//! through it. The Python tests are in integrations/ganeti/tests/adoption.

use std::path::Path;

use kvm_agent_tests::guest::guest_image;
use kvm_agent_tests::*;

#[tokio::test]
async fn instances_of_ganetis_kvm_driver_are_taken_over_while_they_run() {
    require_qemu();
    let ganeti = prepared_path("KVM_AGENT_GANETI", "ganeti-env");
    let metrics = format!("127.0.0.1:{}", free_port());
    let source = TestAgent::start_with(AgentOptions {
        args: vec!["--metrics-listen".into(), metrics.clone()],
        ..AgentOptions::default()
    })
    .await;
    let target = TestAgent::start().await;
    let bridge = Bridge::create();
    let uuids: Vec<uuid::Uuid> = (0..6).map(|_| uuid::Uuid::new_v4()).collect();
    for uuid in &uuids {
        source.track(*uuid);
        target.track(*uuid);
    }
    let image = guest_image();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python_path = std::env::join_paths([ganeti, root.join("integrations/ganeti")]).unwrap();
    let uuids = uuids.iter().map(ToString::to_string).collect::<Vec<_>>();

    run_python_tests(
        &root.join("integrations/ganeti/tests/adoption"),
        &[
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
            ("KVM_AGENT_TEST_UUIDS", uuids.join(",").into()),
        ],
        5,
        || {
            format!(
                "source agent log:\n{}\ntarget agent log:\n{}",
                source.log(),
                target.log()
            )
        },
    )
    .await;
}
