//! How VNC and SPICE let viewers in, against real QEMU: the security
//! types VNC offers a viewer (RFB and VeNCrypt, read off the wire), a
//! password set on the running instance and kept nowhere else, the
//! node's certificate files copied where only that instance's QEMU reads
//! them, and SPICE's TLS port, compression and agent channel.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::*;
use serde_json::json;
use tonic::Code;

/// RFB's security type of VNC authentication, and VeNCrypt's.
const VNC_AUTH: u8 = 2;
const VENCRYPT: u8 = 19;
/// VeNCrypt subtypes: anonymous TLS with VNC authentication, and x509
/// with it.
const TLS_VNC: u32 = 258;
const X509_VNC: u32 = 261;

/// Connects as a viewer: the RFB 3.8 handshake up to the security types
/// the server offers, with the connection to go on.
fn security_types(port: u16) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to VNC");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0u8; 12];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"RFB 003.008\n");
    stream.write_all(b"RFB 003.008\n").unwrap();
    let mut count = [0u8];
    stream.read_exact(&mut count).unwrap();
    let mut types = vec![0u8; usize::from(count[0])];
    stream.read_exact(&mut types).unwrap();
    (stream, types)
}

/// The security types the server offers and, when it offers VeNCrypt,
/// the subtypes.
fn offered_security(port: u16) -> (Vec<u8>, Vec<u32>) {
    let (mut stream, types) = security_types(port);
    let mut count = [0u8];
    if !types.contains(&VENCRYPT) {
        return (types, Vec::new());
    }
    stream.write_all(&[VENCRYPT]).unwrap();
    let mut version = [0u8; 2];
    stream.read_exact(&mut version).unwrap();
    assert_eq!(version, [0, 2], "VeNCrypt 0.2");
    stream.write_all(&[0, 2]).unwrap();
    let mut ack = [0u8];
    stream.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0], "the server takes VeNCrypt 0.2");
    stream.read_exact(&mut count).unwrap();
    let mut subtypes = vec![0u8; 4 * usize::from(count[0])];
    stream.read_exact(&mut subtypes).unwrap();
    let subtypes = subtypes
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect();
    (types, subtypes)
}

/// Whether VNC authentication with `password` lets a viewer in: the
/// server's challenge encrypted with DES under the password, each key
/// byte's bits reversed as VNC does (DES from `openssl`, whose legacy
/// provider still has it).
fn vnc_auth_accepts(port: u16, password: &str) -> bool {
    let (mut stream, types) = security_types(port);
    assert_eq!(types, [VNC_AUTH]);
    stream.write_all(&[VNC_AUTH]).unwrap();
    let mut challenge = [0u8; 16];
    stream.read_exact(&mut challenge).unwrap();
    let mut key = [0u8; 8];
    for (k, b) in key.iter_mut().zip(password.bytes()) {
        *k = b.reverse_bits();
    }
    let key: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut des = Command::new("openssl")
        .args(["enc", "-des-ecb", "-nopad", "-K", &key])
        .args(["-provider", "legacy", "-provider", "default"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl must be installed");
    des.stdin.take().unwrap().write_all(&challenge).unwrap();
    let response = des.wait_with_output().unwrap();
    assert!(response.status.success(), "openssl: {response:?}");
    stream.write_all(&response.stdout).unwrap();
    let mut result = [0u8; 4];
    stream.read_exact(&mut result).unwrap();
    u32::from_be_bytes(result) == 0
}

/// A CA and a node certificate made by `kvm-agent tls`: ca.pem,
/// node1.pem and node1-key.pem in the directory returned.
fn node_certificate(scratch: &Path) -> std::path::PathBuf {
    let ca = scratch.join("ca");
    for args in [vec!["tls", "init-ca"], vec!["tls", "issue", "node1"]] {
        let out = Command::new(agent_binary())
            .args(&args)
            .arg("--dir")
            .arg(&ca)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    ca
}

/// An x509 directory as QEMU wants it, from [`node_certificate`].
fn x509_dir(scratch: &Path) -> std::path::PathBuf {
    let ca = node_certificate(scratch);
    let dir = scratch.join("x509");
    std::fs::create_dir(&dir).unwrap();
    for (from, to) in [
        ("ca.pem", "ca-cert.pem"),
        ("node1.pem", "server-cert.pem"),
        ("node1-key.pem", "server-key.pem"),
    ] {
        std::fs::copy(ca.join(from), dir.join(to)).unwrap();
    }
    dir
}

fn vnc_spec(port: u16, password: bool, tls: Option<pb::VncTls>) -> pb::VncSpec {
    pb::VncSpec {
        display: u32::from(port) - 5900,
        password,
        tls,
        ..Default::default()
    }
}

async fn set_password(agent: &TestAgent, name: &str) -> Result<(), tonic::Status> {
    agent
        .client()
        .await
        .set_display_password(pb::SetDisplayPasswordRequest {
            name: name.into(),
            password: "s3cret".into(),
        })
        .await
        .map(drop)
}

#[tokio::test]
async fn vnc_offers_tls_and_a_password_that_only_qemu_keeps() {
    let agent = TestAgent::start().await;

    // A password and no TLS: VNC authentication, and no viewer gets in
    // before the password is set.
    let plain = free_port();
    let mut spec = agent.spec("locked", 64);
    spec.vnc = Some(vnc_spec(plain, true, None));
    agent.start_spec(spec).await;
    assert_eq!(offered_security(plain), (vec![VNC_AUTH], vec![]));
    let mut qmp = operator_qmp(&agent, "locked");
    assert_eq!(qmp.execute("query-vnc", json!({}))["auth"], "vnc");
    drop(qmp);
    assert!(!vnc_auth_accepts(plain, "s3cret"), "locked until set");
    set_password(&agent, "locked").await.unwrap();
    assert!(vnc_auth_accepts(plain, "s3cret"));
    assert!(!vnc_auth_accepts(plain, "wrong"));
    // A soft reboot is a new QEMU: the agent gives it the password.
    agent
        .client()
        .await
        .reboot_instance(pb::RebootInstanceRequest {
            name: "locked".into(),
            mode: pb::RebootMode::Soft as i32,
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(vnc_auth_accepts(plain, "s3cret"));
    let runtime = agent.runtime_json("locked").await;
    assert!(
        !runtime.to_string().contains("s3cret"),
        "the runtime keeps no password: {runtime}"
    );
    let record = std::fs::read_to_string(agent.record_path("locked")).unwrap();
    assert!(!record.contains("s3cret"), "nor does the record");

    // Anonymous TLS around VNC authentication.
    let anonymous = free_port();
    let mut spec = agent.spec("anonymous", 64);
    spec.vnc = Some(vnc_spec(anonymous, true, Some(pb::VncTls::default())));
    agent.start_spec(spec).await;
    assert_eq!(offered_security(anonymous), (vec![VENCRYPT], vec![TLS_VNC]));

    // The node's certificate, from a copy only the instance's QEMU reads.
    let dir = x509_dir(&agent.scratch());
    let x509 = free_port();
    let mut spec = agent.spec("x509", 64);
    spec.vnc = Some(vnc_spec(
        x509,
        true,
        Some(pb::VncTls {
            x509_dir: dir.display().to_string(),
            verify_client: true,
        }),
    ));
    let info = agent.start_spec(spec).await;
    assert_eq!(offered_security(x509), (vec![VENCRYPT], vec![X509_VNC]));
    let qemu_uid = std::fs::metadata(format!("/proc/{}", info.pid))
        .unwrap()
        .uid();
    let copy = agent.run_dir("x509").join("vnc-x509");
    let key = std::fs::metadata(copy.join("server-key.pem")).unwrap();
    assert_eq!((key.uid(), key.mode() & 0o777), (qemu_uid, 0o400));
    assert_eq!(
        std::fs::read(copy.join("server-key.pem")).unwrap(),
        std::fs::read(dir.join("server-key.pem")).unwrap()
    );
    agent
        .client()
        .await
        .stop_instance(pb::StopInstanceRequest {
            name: "x509".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
    agent.settled("x509").await;
    assert!(!copy.exists(), "the key's copy goes with its QEMU");

    // Without a password asked for, none can be set.
    let open = free_port();
    let mut spec = agent.spec("open", 64);
    spec.vnc = Some(vnc_spec(open, false, None));
    agent.start_spec(spec).await;
    let refused = set_password(&agent, "open").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // An x509 directory without the node's key starts nothing.
    std::fs::remove_file(dir.join("server-key.pem")).unwrap();
    let mut spec = agent.spec("keyless", 64);
    spec.vnc = Some(vnc_spec(
        free_port(),
        false,
        Some(pb::VncTls {
            x509_dir: dir.display().to_string(),
            verify_client: false,
        }),
    ));
    let refused = agent.start_refused(spec).await;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("server-key.pem"), "{refused:?}");
}

/// QEMU's `query-spice` of a running instance.
fn query_spice(agent: &TestAgent, name: &str) -> serde_json::Value {
    operator_qmp(agent, name).execute("query-spice", json!({}))
}

#[tokio::test]
async fn spice_takes_tls_on_its_port_its_settings_and_an_agent_channel() {
    let agent = TestAgent::start().await;
    let ca = node_certificate(&agent.scratch());
    let file = |name: &str| ca.join(name).display().to_string();
    let port = free_port();
    let mut spec = agent.spec("spice", 64);
    spec.spice = Some(pb::SpiceSpec {
        port: port.into(),
        password: true,
        tls: Some(pb::SpiceTls {
            cert: file("node1.pem"),
            key: file("node1-key.pem"),
            ca: file("ca.pem"),
            ciphers: "HIGH:-DES".into(),
        }),
        image_compression: "quic".into(),
        streaming_video: "filter".into(),
        no_playback_compression: true,
        vdagent: true,
        ..Default::default()
    });
    let info = agent.start_spec(spec).await;
    let spice = query_spice(&agent, "spice");
    assert_eq!(spice["enabled"], true, "{spice}");
    assert_eq!(spice["tls-port"], port, "only TLS: {spice}");
    assert!(spice.get("port").is_none(), "{spice}");
    assert_eq!(spice["auth"], "spice", "a ticket is needed: {spice}");
    set_password(&agent, "spice").await.unwrap();
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", info.pid)).unwrap();
    for setting in [
        "image-compression=quic",
        "streaming-video=filter",
        "playback-compression=off",
        "tls-ciphers=HIGH:-DES",
    ] {
        assert!(cmdline.contains(setting), "{setting}: {cmdline:?}");
    }
    // The agent channel's controller in the slot the runtime gives it.
    let runtime = agent.runtime_json("spice").await;
    let slot = runtime["spice_agent_slot"].as_u64().expect("a slot");
    let pci = operator_qmp(&agent, "spice").pci_devices();
    assert!(
        pci.iter().any(|(s, id, _)| *s == slot && id == "spice"),
        "{pci:?}"
    );
    let qemu_uid = std::fs::metadata(format!("/proc/{}", info.pid))
        .unwrap()
        .uid();
    let key = agent.run_dir("spice").join("spice-x509/server-key.pem");
    assert_eq!(std::fs::metadata(&key).unwrap().uid(), qemu_uid);
    let consoles = agent
        .client()
        .await
        .get_console_info(pb::GetConsoleInfoRequest {
            name: "spice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(consoles.spice_address, format!("127.0.0.1:{port}"));
    assert_eq!(consoles.vnc_address, "");

    // Plain SPICE without a password asks for none.
    let plain = free_port();
    let mut spec = agent.spec("plain", 64);
    spec.spice = Some(pb::SpiceSpec {
        port: plain.into(),
        ..Default::default()
    });
    agent.start_spec(spec).await;
    let spice = query_spice(&agent, "plain");
    assert_eq!(
        (&spice["port"], &spice["auth"]),
        (&json!(plain), &json!("none"))
    );
    let refused = set_password(&agent, "plain").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // VNC and SPICE at once, or a setting SPICE doesn't have, are refused.
    let mut both = agent.spec("both", 64);
    both.vnc = Some(vnc_spec(free_port(), false, None));
    both.spice = Some(pb::SpiceSpec {
        port: free_port().into(),
        ..Default::default()
    });
    let mut odd = agent.spec("odd", 64);
    odd.spice = Some(pb::SpiceSpec {
        port: free_port().into(),
        jpeg_wan_compression: "sometimes".into(),
        ..Default::default()
    });
    for spec in [both, odd] {
        let refused = agent.start_refused(spec).await;
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
}
