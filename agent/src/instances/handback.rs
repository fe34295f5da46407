//! Migration to a QEMU that another manager already started and that
//! waits for the guest's state (`tcp:HOST:PORT`): Ganeti's own KVM driver
//! on a node switched back to it. No agent there takes part: that QEMU
//! runs the guest as soon as the stream is complete, so this node lets go
//! then, and a stream that doesn't complete leaves the guest running here.

use std::sync::Arc;
use std::time::Instant;

use hypervisor::migration::{self as qemu_migration, MigrationPhase, MigrationStatus, StreamWatch};
use tokio::sync::{Notify, mpsc};

use super::migration::{POLL_INTERVAL, Reporter};
use super::{Agent, Instance, Process, lock};
use crate::error::AgentError;
use crate::model::{
    InstanceRecord, MigrateOptions, MigrationReport, OutgoingMigration, ReportPhase, State,
};

/// The prefix of a migration target that is a waiting QEMU, not an agent.
pub const QEMU_TARGET: &str = "tcp:";

impl Agent {
    /// Sends a running instance to the QEMU waiting at `uri`, reporting
    /// progress into `progress`. Ok means that QEMU runs the guest now.
    pub(super) async fn migrate_to_qemu(
        self: &Arc<Self>,
        name: &str,
        uri: &str,
        options: MigrateOptions,
        progress: mpsc::Sender<MigrationReport>,
    ) -> Result<MigrationReport, AgentError> {
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        let (Some(process), Some(record)) = inst.process_and_record() else {
            return Err(AgentError::NotRunning(name.to_owned()));
        };
        let before = lock(&inst.status).state;
        if !matches!(before, State::Running | State::Paused) {
            return Err(AgentError::NotRunning(name.to_owned()));
        }
        let was_running = qemu_migration::guest_running(&process.qmp)
            .await
            .map_err(|source| AgentError::Qmp {
                instance: name.to_owned(),
                source,
            })?;
        let cancel = Arc::new(Notify::new());
        lock(&inst.status).outgoing = Some(cancel.clone());
        inst.set_state(State::Migrating, format!("migrating to {uri}"));
        let reporter = Reporter {
            // Another manager's QEMU has no credentials of the cluster's.
            encrypted: false,
            inst: &inst,
            sink: progress,
            started: Instant::now(),
            address: uri.to_owned(),
        };
        let sent = self
            .send_to_qemu(
                &inst,
                &process,
                &record,
                was_running,
                &options,
                &cancel,
                &reporter,
            )
            .await;
        lock(&inst.status).outgoing = None;
        match sent {
            Ok(status) => {
                self.release_to_target(&inst, &process).await;
                inst.set_state(State::Stopped, format!("migrated to {uri}"));
                tracing::info!(instance = %name, %uri, "migration to a waiting QEMU completed");
                crate::telemetry::record_migrated_bytes(status.transferred_bytes);
                reporter.report(ReportPhase::Completed, Some(status.clone()));
                Ok(reporter.current(ReportPhase::Completed, Some(status)))
            }
            Err(error) => {
                self.clear_outgoing(&inst).await;
                if was_running && let Err(e) = qemu_migration::resume(&process.qmp).await {
                    tracing::error!(instance = %name, error = %e, "can't resume after a failed migration");
                }
                if !process.pidfd.has_exited() {
                    inst.set_state(before, format!("migration to {uri} failed: {error}"));
                }
                tracing::warn!(instance = %name, %uri, %error, "migration to a waiting QEMU failed");
                Err(error)
            }
        }
    }

    /// Marks the record, then streams until QEMU says the stream is
    /// complete, failed or cancelled.
    #[allow(clippy::too_many_arguments)]
    async fn send_to_qemu(
        &self,
        inst: &Instance,
        process: &Process,
        record: &InstanceRecord,
        was_running: bool,
        options: &MigrateOptions,
        cancel: &Notify,
        reporter: &Reporter<'_>,
    ) -> Result<MigrationStatus, AgentError> {
        let name = &inst.name;
        let qmp_error = |source| AgentError::Qmp {
            instance: name.clone(),
            source,
        };
        // An agent that restarts before the end finds the mark, and
        // settles it by what its QEMU says of the stream.
        let marked = InstanceRecord {
            outgoing: Some(OutgoingMigration {
                target: reporter.address.clone(),
                was_running,
            }),
            ..record.clone()
        };
        self.write_record(inst, &marked).await?;
        reporter.report(ReportPhase::Preparing, None);
        let qmp = &process.qmp;
        qemu_migration::configure(qmp, &self.migration_parameters(options), None)
            .await
            .map_err(qmp_error)?;
        if options.offline && was_running {
            qemu_migration::pause(qmp).await.map_err(qmp_error)?;
        }
        let mut stream = StreamWatch::new(qmp);
        qemu_migration::start_outgoing(qmp, &reporter.address)
            .await
            .map_err(qmp_error)?;
        let mut cancelled = false;
        loop {
            let status = qemu_migration::query(qmp).await.map_err(qmp_error)?;
            reporter.report(ReportPhase::Active, Some(status.clone()));
            match status.phase {
                MigrationPhase::Completed => return Ok(status),
                MigrationPhase::Failed => {
                    return Err(AgentError::MigrationFailed {
                        instance: name.clone(),
                        reason: status.error.unwrap_or_else(|| "QEMU gave no reason".into()),
                    });
                }
                MigrationPhase::Cancelled => {
                    return Err(AgentError::MigrationCancelled(name.clone()));
                }
                _ => {}
            }
            tokio::select! {
                () = stream.next(POLL_INTERVAL) => {}
                () = cancel.notified(), if !cancelled => {
                    tracing::info!(instance = %name, "cancelling the migration");
                    qemu_migration::cancel(qmp).await.map_err(qmp_error)?;
                    cancelled = true;
                }
            }
        }
    }

    /// Settles a migration to a waiting QEMU that an agent restart cut
    /// short, by what this QEMU says of its stream: complete means the
    /// other QEMU runs the guest and this one goes; anything else is
    /// stopped, and the guest runs on here. Returns `None` once it has
    /// gone.
    pub(super) async fn settle_handback(
        &self,
        inst: &Arc<Instance>,
        process: &Arc<Process>,
        outgoing: &OutgoingMigration,
    ) -> Option<(State, String)> {
        let name = &inst.name;
        let target = &outgoing.target;
        // A stream still flowing goes no further; one that completed
        // stays so, and the other QEMU runs the guest.
        super::migration::stop_stream(&process.qmp).await;
        let status = qemu_migration::query(&process.qmp).await;
        if matches!(&status, Ok(s) if s.phase == MigrationPhase::Completed) {
            tracing::info!(instance = %name, %target, "the stream to the waiting QEMU was complete; ending the source's QEMU");
            self.release_to_target(inst, process).await;
            return None;
        }
        Some(self.stay_after_restart(inst, process, outgoing).await)
    }
}
