//! The Python client (clients/python) against a real agent, installed from
//! its wheel into fresh virtualenvs (scripts/python-env --client and
//! --minimum): the newcomer scripts and their async twin, mypy --strict on
//! them, the checks made before a call, the typed errors, streams, the
//! unix socket authority that stock grpcio gets wrong and the mutual-TLS
//! channel. Once with the grpcio and protobuf pip picks, once with the
//! oldest the wheel declares. The Python tests themselves are in
//! clients/python/tests.

use std::path::Path;

use kvm_agent_tests::tls::{TestCa, agent_on_loopback_tcp};
use kvm_agent_tests::*;

/// The Python tests in clients/python/tests.
const PYTHON_TESTS: usize = 22;

async fn python_client_tests(python_var: &str, script_flag: &str) {
    let python = prepared_path(python_var, &format!("python-env {script_flag}"));
    // The agent also serves loopback TCP with mutual TLS, for the client's
    // TLS channel.
    let ca = TestCa::new("cluster");
    let (agent, port) = agent_on_loopback_tcp(&ca).await;
    let operator = ca.issue("operator", &[]);
    let uuids: Vec<_> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    for uuid in &uuids {
        agent.track(*uuid);
    }
    let uuids = uuids.iter().map(ToString::to_string).collect::<Vec<_>>();

    run_python_tests_with(
        &python,
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python/tests"),
        &[
            ("KVM_AGENT_TEST_SOCKET", agent.socket().into()),
            ("KVM_AGENT_TEST_UUIDS", uuids.join(" ").into()),
            (
                "KVM_AGENT_TEST_TLS_TARGET",
                format!("localhost:{port}").into(),
            ),
            ("KVM_AGENT_TEST_TLS_CERT", operator.cert.clone().into()),
            ("KVM_AGENT_TEST_TLS_KEY", operator.key.clone().into()),
            ("KVM_AGENT_TEST_TLS_CA", operator.ca.clone().into()),
        ],
        PYTHON_TESTS,
        || format!("agent log:\n{}", agent.log()),
    )
    .await;
}

#[tokio::test]
async fn python_client_tests_pass_against_the_agent() {
    python_client_tests("KVM_AGENT_PYTHON_CLIENT", "--client").await;
}

#[tokio::test]
async fn python_client_tests_pass_with_the_oldest_grpcio_and_protobuf_it_declares() {
    python_client_tests("KVM_AGENT_PYTHON_MINIMUM", "--minimum").await;
}
