//! The Ganeti hypervisor class (integrations/ganeti) driven with Ganeti 3.0's
//! own Python code against two real agents. The Python tests are in
//! integrations/ganeti/tests.

use std::path::Path;

use kvm_agent_tests::guest::guest_image;
use kvm_agent_tests::*;

#[tokio::test]
async fn the_ganeti_hypervisor_class_drives_the_agents() {
    let ganeti = prepared_path("KVM_AGENT_GANETI", "ganeti-env");
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let uuids: Vec<uuid::Uuid> = (0..8).map(|_| uuid::Uuid::new_v4()).collect();
    for uuid in &uuids {
        source.track(*uuid);
        target.track(*uuid);
    }
    let image = guest_image();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python_path = std::env::join_paths([ganeti, root.join("integrations/ganeti")]).unwrap();
    let uuids = uuids.iter().map(ToString::to_string).collect::<Vec<_>>();

    run_python_tests(
        &root.join("integrations/ganeti/tests"),
        &[
            ("PYTHONPATH", python_path),
            ("KVM_AGENT_TEST_SOCKET", source.socket().into()),
            ("KVM_AGENT_TEST_STATE_DIR", source.state_dir().into()),
            ("KVM_AGENT_TEST_TARGET_SOCKET", target.socket().into()),
            ("KVM_AGENT_TEST_TARGET_STATE_DIR", target.state_dir().into()),
            ("KVM_AGENT_TEST_KERNEL", image.kernel.clone().into()),
            ("KVM_AGENT_TEST_INITRD", image.initrd.clone().into()),
            ("KVM_AGENT_TEST_BOOT_ISO", image.boot_iso.clone().into()),
            ("KVM_AGENT_TEST_SCRATCH", source.scratch().into()),
            ("KVM_AGENT_TEST_UUIDS", uuids.join(",").into()),
            ("KVM_AGENT_TEST_BINARY", agent_binary().into()),
        ],
        23,
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
