//! The Python client (clients/python) against a real agent: the unix socket
//! authority that stock grpcio gets wrong, typed errors, a lifecycle and
//! the mutual-TLS channel. The Python tests themselves are in
//! clients/python/tests.

use std::path::Path;

use kvm_agent_tests::tls::{TestCa, agent_on_loopback_tcp};
use kvm_agent_tests::*;

#[tokio::test]
async fn python_client_tests_pass_against_the_agent() {
    // The agent also serves loopback TCP with mutual TLS, for the client's
    // TLS channel.
    let ca = TestCa::new("cluster");
    let (agent, port) = agent_on_loopback_tcp(&ca).await;
    let operator = ca.issue("operator", &[]);
    let uuid = uuid::Uuid::new_v4();
    agent.track(uuid);

    run_python_tests(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python/tests"),
        &[
            ("KVM_AGENT_TEST_SOCKET", agent.socket().into()),
            ("KVM_AGENT_TEST_UUID", uuid.to_string().into()),
            (
                "KVM_AGENT_TEST_TLS_TARGET",
                format!("localhost:{port}").into(),
            ),
            ("KVM_AGENT_TEST_TLS_CERT", operator.cert.clone().into()),
            ("KVM_AGENT_TEST_TLS_KEY", operator.key.clone().into()),
            ("KVM_AGENT_TEST_TLS_CA", operator.ca.clone().into()),
        ],
        8,
        || format!("agent log:\n{}", agent.log()),
    )
    .await;
}
