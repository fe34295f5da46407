//! The Ganeti hypervisor class (integrations/ganeti) driven with Ganeti 3.0's
//! own Python code against two real agents. The Python tests are in
//! integrations/ganeti/tests.

use std::path::{Path, PathBuf};

use kvm_agent_tests::guest::guest_image;
use kvm_agent_tests::*;

fn from_env(var: &str, script: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set; run scripts/test, or set it to what scripts/{script} prints")
    });
    assert!(
        path.exists(),
        "{} is missing; run scripts/{script}",
        path.display()
    );
    path
}

#[tokio::test]
async fn the_ganeti_hypervisor_class_drives_the_agents() {
    let python = from_env("KVM_AGENT_PYTHON", "python-env");
    let ganeti = from_env("KVM_AGENT_GANETI", "ganeti-env");
    let source = TestAgent::start().await;
    let target = TestAgent::start().await;
    let uuids: Vec<uuid::Uuid> = (0..5).map(|_| uuid::Uuid::new_v4()).collect();
    for uuid in &uuids {
        source.track(*uuid);
        target.track(*uuid);
    }
    let image = guest_image();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python_path = std::env::join_paths([ganeti, root.join("integrations/ganeti")]).unwrap();

    let out = tokio::process::Command::new(&python)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(root.join("integrations/ganeti/tests"))
        .env("PYTHONPATH", python_path)
        .env("KVM_AGENT_TEST_SOCKET", source.socket())
        .env("KVM_AGENT_TEST_STATE_DIR", source.state_dir())
        .env("KVM_AGENT_TEST_TARGET_SOCKET", target.socket())
        .env("KVM_AGENT_TEST_TARGET_STATE_DIR", target.state_dir())
        .env("KVM_AGENT_TEST_KERNEL", &image.kernel)
        .env("KVM_AGENT_TEST_INITRD", &image.initrd)
        .env("KVM_AGENT_TEST_SCRATCH", source.scratch())
        .env(
            "KVM_AGENT_TEST_UUIDS",
            uuids
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
        .output()
        .await
        .unwrap();

    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "Ganeti integration tests failed:\n{report}\nsource agent log:\n{}\ntarget agent log:\n{}",
        source.log(),
        target.log()
    );
    assert!(report.contains("Ran 7 tests"), "{report}");
    assert!(!report.contains("skipped"), "{report}");
}
