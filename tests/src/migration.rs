//! Migrations as tests drive and break them: one watched through its
//! progress stream, and a stream broken on the wire.

use std::process::Command;
use std::time::Duration;

use kvm_agent_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use crate::TestAgent;

/// A migration under way, watched through its progress stream.
pub struct Migration {
    /// The latest progress report.
    pub progress: watch::Receiver<Option<pb::MigrationProgress>>,
    /// The reports seen and how the call ended.
    pub outcome: JoinHandle<(Vec<pb::MigrationProgress>, Result<(), tonic::Status>)>,
}

impl Migration {
    /// Starts migrating `name` from `source` to `target`.
    pub async fn start(
        source: &TestAgent,
        name: &str,
        target: &TestAgent,
        options: pb::MigrationOptions,
    ) -> Migration {
        Self::start_to(source, name, target.address(), options).await
    }

    /// Starts a migration to the agent at `target`.
    pub async fn start_to(
        source: &TestAgent,
        name: &str,
        target: String,
        options: pb::MigrationOptions,
    ) -> Migration {
        let mut stream = source
            .client()
            .await
            .migrate_instance(pb::MigrateInstanceRequest {
                name: name.into(),
                target,
                options: Some(options),
            })
            .await
            .expect("MigrateInstance")
            .into_inner();
        let (tx, progress) = watch::channel(None);
        let outcome = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(p) => {
                        let _ = tx.send(Some(p.clone()));
                        seen.push(p);
                    }
                    Err(status) => return (seen, Err(status)),
                }
            }
            (seen, Ok(()))
        });
        Migration { progress, outcome }
    }

    /// Waits until memory is really being sent.
    pub async fn wait_sending(&mut self) {
        let sending = tokio::time::timeout(
            Duration::from_secs(30),
            self.progress.wait_for(|p| {
                p.as_ref()
                    .is_some_and(|p| p.qemu_status == "active" && p.transferred_bytes > 0)
            }),
        )
        .await;
        let got_going = matches!(sending, Ok(Ok(_)));
        drop(sending);
        assert!(
            got_going,
            "the migration never got going: {:?}",
            *self.progress.borrow()
        );
    }

    /// The port the target's QEMU takes the stream on.
    pub fn stream_port(&self) -> String {
        let progress = self.progress.borrow();
        let address = &progress.as_ref().expect("a progress report").address;
        address.rsplit(':').next().unwrap_or_default().to_owned()
    }

    /// Waits for the call to end.
    pub async fn outcome(self) -> (Vec<pb::MigrationProgress>, Result<(), tonic::Status>) {
        tokio::time::timeout(Duration::from_secs(60), self.outcome)
            .await
            .expect("the migration ends")
            .unwrap()
    }
}

/// Answers every packet sent to a local TCP port with a reset while it
/// lives: an established stream to it breaks for its sender, while the
/// receiver hears nothing, as when a link between two hosts drops it.
pub struct ResetPort(String);

impl ResetPort {
    /// Starts resetting what is sent to `port`.
    pub fn new(port: &str) -> Self {
        reset_rule("-I", port);
        ResetPort(port.to_owned())
    }
}

impl Drop for ResetPort {
    fn drop(&mut self) {
        reset_rule("-D", &self.0);
    }
}

fn reset_rule(action: &str, port: &str) {
    let status = Command::new("iptables")
        .args(["-w", action, "INPUT", "-p", "tcp", "--dport", port])
        .args(["-j", "REJECT", "--reject-with", "tcp-reset"])
        .status()
        .expect("run iptables (scripts/install-deps installs it)");
    assert!(status.success(), "iptables {action} for port {port}");
}
