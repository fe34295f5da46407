//! The Python client (clients/python) against a real agent: the unix socket
//! authority that stock grpcio gets wrong, typed errors and a lifecycle.
//! The Python tests themselves are in clients/python/tests.

use std::path::PathBuf;
use std::process::Command;

use kvm_agent_tests::tls::TestCa;
use kvm_agent_tests::*;

/// The Python with the client installed, from scripts/python-env (which
/// scripts/test runs and names in KVM_AGENT_PYTHON).
fn client_python() -> PathBuf {
    let python = std::env::var_os("KVM_AGENT_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        panic!("KVM_AGENT_PYTHON is not set; run scripts/test, or set it to the python that scripts/python-env prints")
    });
    assert!(
        python.is_file(),
        "{} is missing; run scripts/python-env",
        python.display()
    );
    python
}

#[tokio::test]
async fn python_client_tests_pass_against_the_agent() {
    let python = client_python();
    // The agent also serves loopback TCP with mutual TLS, for the client's
    // TLS channel.
    let ca = TestCa::new("cluster");
    let node = ca.issue("node1", &["127.0.0.1", "localhost"]);
    let operator = ca.issue("operator", &[]);
    let port = free_port();
    let mut options = AgentOptions::default();
    options
        .args
        .extend(["--listen".into(), format!("tcp://127.0.0.1:{port}")]);
    options.args.extend(node.args());
    let agent = TestAgent::start_with(options).await;
    let uuid = uuid::Uuid::new_v4();
    agent.track(uuid);
    let tests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python/tests");

    let out = tokio::process::Command::from({
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "unittest", "discover", "-v", "-s"])
            .arg(&tests)
            .env("KVM_AGENT_TEST_SOCKET", agent.socket())
            .env("KVM_AGENT_TEST_UUID", uuid.to_string())
            .env("KVM_AGENT_TEST_TLS_TARGET", format!("localhost:{port}"))
            .env("KVM_AGENT_TEST_TLS_CERT", &operator.cert)
            .env("KVM_AGENT_TEST_TLS_KEY", &operator.key)
            .env("KVM_AGENT_TEST_TLS_CA", &operator.ca);
        cmd
    })
    .output()
    .await
    .unwrap();

    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client tests failed:\n{report}\nagent log:\n{}",
        agent.log()
    );
    // unittest reports each test; all must have run, none skipped.
    assert!(report.contains("Ran 8 tests"), "{report}");
    assert!(!report.contains("skipped"), "{report}");
}
