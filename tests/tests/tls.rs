//! The API on TCP: mutual TLS lets in the cluster's certificates and
//! nobody else, and the agent won't serve the network without it.

use std::process::Command;

use kvm_agent_tests::tls::{Handshake, TestCa, agent_on_loopback_tcp, handshake, tls_client};
use kvm_agent_tests::*;
use serde_json::Value;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[tokio::test]
async fn only_certificates_of_the_cluster_ca_get_in() {
    let ca = TestCa::new("cluster");
    let (agent, port) = agent_on_loopback_tcp(&ca).await;
    let url = format!("https://127.0.0.1:{port}");
    let operator = ca.issue("operator", &[]);
    let elsewhere = TestCa::new("elsewhere");
    let stranger = elsewhere.issue("stranger", &[]);
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();

    let member = tls_client(&url, Some(operator.client_config())).await;
    let anonymous = tls_client(
        &url,
        Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem()))),
    )
    .await;
    let foreign_certificate = tls_client(
        &url,
        Some(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca.pem()))
                .identity(Identity::from_pem(
                    read(&stranger.cert),
                    read(&stranger.key),
                )),
        ),
    )
    .await;
    let expired = tls_client(&url, Some(ca.issue_expired("former", &[]).client_config())).await;
    let plain_text = tls_client(&format!("http://127.0.0.1:{port}"), None).await;
    // A client that trusts another CA doesn't talk to this agent either.
    let other_trust = tls_client(&url, Some(stranger.client_config())).await;

    member.unwrap_or_else(|e| panic!("a cluster certificate is let in: {e}\n{}", agent.log()));
    for (who, outcome) in [
        ("no certificate", anonymous),
        ("a certificate of another CA", foreign_certificate),
        ("an expired certificate", expired),
    ] {
        outcome.err().unwrap_or_else(|| panic!("{who} got in"));
    }
    // What the agent said to each, at the TLS layer.
    for (who, identity, alert) in [
        (
            "no certificate",
            None,
            rustls::AlertDescription::CertificateRequired,
        ),
        (
            "a certificate of another CA",
            Some(&stranger),
            rustls::AlertDescription::UnknownCA,
        ),
        (
            "an expired certificate",
            Some(&ca.issue_expired("former", &[])),
            rustls::AlertDescription::CertificateExpired,
        ),
    ] {
        assert_eq!(
            handshake(port, ca.pem(), identity).await,
            Handshake::Alert(alert),
            "{who}"
        );
    }
    assert_eq!(
        handshake(port, ca.pem(), Some(&operator)).await,
        Handshake::Admitted,
        "the probe lets a member in"
    );
    // Plain HTTP/2 gets a TLS alert record (content type 21) or a closed
    // connection, never an HTTP/2 frame.
    drop(plain_text);
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 16];
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut raw, &mut answer),
    )
    .await
    .expect("the agent answers plain text at once");
    match read {
        Ok(0) | Err(_) => {}
        Ok(n) => assert_eq!(answer[0], 21, "plain text got {:?}", &answer[..n]),
    }
    let distrust = other_trust.err().unwrap_or_default();
    assert!(
        distrust.contains("UnknownIssuer"),
        "a client trusting another CA refuses the agent's certificate: {distrust}"
    );
    // The agent keeps serving its own socket and its cluster.
    agent
        .client()
        .await
        .list_instances(kvm_agent_proto::v1::ListInstancesRequest::default())
        .await
        .expect("unix socket still served");
    tls_client(&url, Some(operator.client_config()))
        .await
        .expect("TCP still served");
}

#[tokio::test]
async fn the_command_line_reaches_an_agent_over_mutual_tls() {
    let ca = TestCa::new("cluster");
    let (_agent, port) = agent_on_loopback_tcp(&ca).await;
    let operator = ca.issue("operator", &[]);
    let url = format!("https://localhost:{port}");

    let with_certificate = Command::new(agent_binary())
        .args(["--agent", &url])
        .args(operator.args())
        .args(["node", "info", "--output", "json"])
        .output()
        .unwrap();
    let without = Command::new(agent_binary())
        .args(["--agent", &url, "node", "info"])
        .output()
        .unwrap();

    assert!(
        with_certificate.status.success(),
        "{}",
        String::from_utf8_lossy(&with_certificate.stderr)
    );
    let info: Value = serde_json::from_slice(&with_certificate.stdout).unwrap();
    assert!(info["qemu_version"].as_str().unwrap().contains("QEMU"));
    assert!(!without.status.success());
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(stderr.contains("--tls-cert"), "says what to give: {stderr}");
}

#[test]
fn the_agent_refuses_the_network_without_tls() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str]| {
        let out = Command::new(agent_binary())
            .arg("serve")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ca = TestCa::new("cluster");
    let node = ca.issue("node1", &["192.0.2.10"]);

    let (code, stderr) = serve(&["--listen", "tcp://192.0.2.10:7070"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("without mutual TLS"), "{stderr}");

    let cert_only = ["--tls-cert", node.cert.to_str().unwrap()];
    let (code, stderr) = serve(&[&["--listen", "tcp://192.0.2.10:7070"][..], &cert_only].concat());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--tls-key") && stderr.contains("--tls-ca"),
        "{stderr}"
    );

    let bad_key = dir.path().join("bad.key");
    std::fs::write(&bad_key, "not a key").unwrap();
    let mut args = node.args();
    args[3] = bad_key.display().to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stderr) = serve(&[&["--listen", "tcp://192.0.2.10:7070"][..], &args].concat());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("bad.key"), "names the file: {stderr}");
    assert!(
        !dir.path().join("state").join("agent.sock").exists(),
        "nothing is served after a refusal"
    );
}

#[tokio::test]
async fn another_local_user_cannot_open_the_socket() {
    let agent = TestAgent::start().await;
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args)
            .output()
            .expect("setpriv (util-linux) runs")
    };
    // The same user could: the binary and the command work as nobody.
    let version = as_nobody(&[agent_binary().to_str().unwrap(), "--version"]);
    assert!(version.status.success(), "{version:?}");

    let socket = agent.socket();
    let out = as_nobody(&[
        agent_binary().to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
        "node",
        "info",
    ]);

    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
}

/// Runs `kvm-agent tls ...` and returns its output.
fn tls_command(args: &[&str]) -> std::process::Output {
    Command::new(agent_binary())
        .arg("tls")
        .args(args)
        .output()
        .expect("run kvm-agent tls")
}

#[tokio::test]
async fn the_agents_own_ca_and_certificates_carry_mutual_tls() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    let d = tls_dir.to_str().unwrap();
    for args in [
        vec!["init-ca", "--dir", d, "--name", "test cluster"],
        vec![
            "issue",
            "node1",
            "--dir",
            d,
            "--ip",
            "127.0.0.1",
            "--dns",
            "localhost",
        ],
        vec!["issue", "operator", "--dir", d],
    ] {
        let made = tls_command(&args);
        assert!(
            made.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    for key in ["ca-key.pem", "node1-key.pem", "operator-key.pem"] {
        let mode = std::fs::metadata(tls_dir.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // Nothing is ever overwritten.
    let ca_before = std::fs::read(tls_dir.join("ca.pem")).unwrap();
    let again = tls_command(&["init-ca", "--dir", d]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    assert_eq!(std::fs::read(tls_dir.join("ca.pem")).unwrap(), ca_before);

    // A node serves with its files, and an operator's certificate gets in.
    let port = free_port();
    let mut options = AgentOptions::default();
    options.args.extend([
        "--listen".into(),
        format!("tcp://127.0.0.1:{port}"),
        "--tls-cert".into(),
        format!("{d}/node1.pem"),
        "--tls-key".into(),
        format!("{d}/node1-key.pem"),
        "--tls-ca".into(),
        format!("{d}/ca.pem"),
    ]);
    let _agent = TestAgent::start_with(options).await;
    let operator = |ca_dir: &str, name: &str| {
        Command::new(agent_binary())
            .args(["--agent", &format!("https://127.0.0.1:{port}")])
            .args(["--tls-cert", &format!("{ca_dir}/{name}.pem")])
            .args(["--tls-key", &format!("{ca_dir}/{name}-key.pem")])
            .args(["--tls-ca", &format!("{d}/ca.pem")])
            .args(["node", "info", "--output", "json"])
            .output()
            .unwrap()
    };
    let admitted = operator(d, "operator");
    assert!(
        admitted.status.success(),
        "{}",
        String::from_utf8_lossy(&admitted.stderr)
    );
    let info: Value = serde_json::from_slice(&admitted.stdout).unwrap();
    assert!(info["qemu_version"].as_str().unwrap().contains("QEMU"));

    // A certificate of another CA made the same way does not.
    let other = dir.path().join("other");
    let o = other.to_str().unwrap();
    assert!(tls_command(&["init-ca", "--dir", o]).status.success());
    assert!(
        tls_command(&["issue", "operator", "--dir", o])
            .status
            .success()
    );
    let refused = operator(o, "operator");
    assert!(!refused.status.success());
}
