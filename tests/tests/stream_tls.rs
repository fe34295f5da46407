//! The migration stream between two QEMUs on two hosts: encrypted with
//! the nodes' certificates unless the caller asks otherwise, checked by
//! what crosses the wire, and refused when the two can't trust each other.

use kvm_agent_proto::v1 as pb;
use kvm_agent_tests::capture::{Capture, Captured};
use kvm_agent_tests::guest::{BOOT_TIMEOUT, GuestConsole, in_guest, start_guest_with};
use kvm_agent_tests::hosts::Hosts;
use kvm_agent_tests::tls::TestCa;
use kvm_agent_tests::*;
use tonic::Code;
use uuid::Uuid;

/// Migrates while capturing every frame in `netns`, and says what the
/// capture saw of `pattern`.
async fn migrate_watched(
    source: &TestAgent,
    name: &str,
    target: String,
    options: pb::MigrationOptions,
    netns: &str,
    pattern: &str,
) -> (Vec<pb::MigrationProgress>, Captured) {
    let capture = Capture::start(netns, pattern.as_bytes());
    let (progress, outcome) = source.migrate_with(name, target, options).await;
    let captured = capture.finish();
    outcome.unwrap_or_else(|s| panic!("migration: {s:?}\nsource log:\n{}", source.log()));
    (progress, captured)
}

fn state(info: &pb::InstanceInfo) -> pb::InstanceState {
    pb::InstanceState::try_from(info.state).unwrap()
}

/// Has the guest write `pattern` over and over into a file of its RAM.
async fn fill_memory_with(console: GuestConsole, pattern: &str) -> GuestConsole {
    let command = format!(
        "i=0; while [ $i -lt 400 ]; do echo {pattern}; i=$((i+1)); done > /tmp/secret; wc -l < /tmp/secret"
    );
    let (console, lines) = in_guest(console, move |c| c.run(&command)).await;
    assert_eq!(lines.trim(), "400", "the guest wrote its pattern");
    console
}

async fn first_line_of_secret(agent: &TestAgent, name: &str) -> String {
    let socket = agent.run_dir(name).join("serial.sock");
    tokio::task::spawn_blocking(move || {
        GuestConsole::attach(&socket, BOOT_TIMEOUT).run("head -n 1 /tmp/secret")
    })
    .await
    .unwrap()
}

/// PEM files in the chroot of `name`'s QEMU.
fn copies_of_keys(agent: &TestAgent, name: &str) -> Vec<String> {
    let root = agent.run_dir(name).join("root");
    let entries = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("the QEMU is chrooted at {}: {e}", root.display()));
    entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".pem"))
        .collect()
}

#[tokio::test]
async fn an_encrypted_stream_hides_the_guest_memory_a_plain_one_shows() {
    let hosts = Hosts::create_or_explain();
    let a = TestAgent::start_with(hosts.agent_options(0)).await;
    let b = TestAgent::start_with(hosts.agent_options(1)).await;
    let (info, console) = start_guest_with(&a, "secret", |_| {}).await;
    let uuid: Uuid = info.uuid.parse().unwrap();
    b.track(uuid);
    let pattern = format!("SECRET-{}", Uuid::new_v4().simple());
    drop(fill_memory_with(console, &pattern).await);

    let (progress, encrypted) = migrate_watched(
        &a,
        "secret",
        hosts.api_url(1),
        Default::default(),
        hosts.netns(0),
        &pattern,
    )
    .await;

    assert!(
        encrypted.bytes > 1 << 20,
        "the capture saw the stream go by: {encrypted:?}"
    );
    assert_eq!(
        encrypted.matching_frames, 0,
        "no frame of an encrypted stream carries the guest's pattern: {encrypted:?}"
    );
    assert!(
        progress.iter().all(|p| p.encrypted),
        "every report says the stream is encrypted: {progress:?}"
    );
    assert_eq!(
        state(&b.instance("secret").await),
        pb::InstanceState::Running
    );
    assert_eq!(first_line_of_secret(&b, "secret").await, pattern);
    assert_eq!(
        copies_of_keys(&b, "secret"),
        Vec::<String>::new(),
        "QEMU read the node's files once; no copy stays in its chroot"
    );

    // The same guest back, in the clear as asked: the check can fail.
    let plain = pb::MigrationOptions {
        unencrypted: true,
        ..Default::default()
    };
    let (progress, clear) = migrate_watched(
        &b,
        "secret",
        hosts.api_url(0),
        plain,
        hosts.netns(0),
        &pattern,
    )
    .await;

    assert!(
        clear.matching_frames > 0,
        "a plain stream carries the guest's pattern: {clear:?}"
    );
    assert!(progress.iter().all(|p| !p.encrypted), "{progress:?}");
    assert!(b.absent("secret").await);
    assert_eq!(first_line_of_secret(&a, "secret").await, pattern);
}

/// The guest runs on in the same QEMU on `a`, and `b` has no copy.
async fn still_on_the_source(a: &TestAgent, b: &TestAgent, pid: u32) {
    let kept = a.instance("guarded").await;
    assert_eq!(state(&kept), pb::InstanceState::Running, "{kept:?}");
    assert_eq!(kept.pid, pid);
    assert!(b.absent("guarded").await);
}

#[tokio::test]
async fn a_target_that_cant_trust_the_source_or_load_its_credentials_refuses() {
    let hosts = Hosts::create_or_explain();
    // The target's QEMUs trust another CA than the cluster's, with a
    // certificate of that CA: the agents trust each other, the QEMUs don't.
    let other = TestCa::new("another cluster");
    let stream = other.issue("stream", &[hosts.address(1)]);
    let mut target_options = hosts.agent_options(1);
    for (flag, path) in [
        ("--migration-stream-cert", &stream.cert),
        ("--migration-stream-key", &stream.key),
        ("--migration-stream-ca", &stream.ca),
    ] {
        target_options
            .args
            .extend([flag.to_owned(), path.display().to_string()]);
    }
    let a = TestAgent::start_with(hosts.agent_options(0)).await;
    let b = TestAgent::start_with(target_options).await;
    let spec = a.spec("guarded", 128);
    b.track(spec.uuid.parse().unwrap());
    let pid = a.start_spec(spec).await.pid;

    let (_, distrusted) = a
        .migrate_with("guarded", hosts.api_url(1), Default::default())
        .await;

    let refused = distrusted.expect_err("QEMUs of different CAs can't migrate");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(
        refused.message().to_lowercase().contains("certificate"),
        "QEMU's reason is passed on: {}",
        refused.message()
    );
    still_on_the_source(&a, &b, pid).await;

    // A certificate the target can't load: refused before anything is sent.
    std::fs::write(&stream.cert, "not a certificate\n").unwrap();
    let (progress, unloadable) = a
        .migrate_with("guarded", hosts.api_url(1), Default::default())
        .await;

    let refused = unloadable.expect_err("a target without usable credentials refuses");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("TLS credentials"),
        "{}",
        refused.message()
    );
    assert!(
        progress.iter().all(|p| p.transferred_bytes == 0),
        "nothing was sent: {progress:?}"
    );
    still_on_the_source(&a, &b, pid).await;
}
