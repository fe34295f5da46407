//! Live migration, agent to agent.
//!
//! Ownership moves at one point only: when the target persists the
//! instance's record in FinalizeMigration. Before that the source owns the
//! instance and every failure ends with the source running it; after it,
//! the target does and the source quits its QEMU. The one case where the
//! source can't tell is a FinalizeMigration that was delivered but never
//! answered: the source then keeps its QEMU paused and says so, because
//! resuming could run the guest twice. ARCHITECTURE.md draws the states.

use crate::config::FaultPoint;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hypervisor::Runtime;
use hypervisor::lifecycle::{self};
use hypervisor::migration::{self as qemu_migration, MigrationParameters, MigrationStatus};
use hypervisor::qmp::QmpError;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;

use super::{Agent, Instance, InstanceRecord, OutgoingMigration, Process, State, lock};
use crate::error::AgentError;
use crate::events::EventKind;
use crate::model::MigrateOptions;
use crate::model::{MigrationReport, ReportPhase};
use crate::peer::{self, AgentAddress, ConnectError};

/// How often a migration's progress is read.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often the source checks that the target agent still waits.
const TARGET_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long that check may take.
const TARGET_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes reports as events and to the caller's stream. A slow caller
/// misses intermediate reports, never the outcome.
struct Reporter<'a> {
    inst: &'a Instance,
    sink: mpsc::Sender<MigrationReport>,
    started: Instant,
    address: String,
}

impl Reporter<'_> {
    fn report(&self, phase: ReportPhase, status: Option<MigrationStatus>) {
        let report = MigrationReport {
            phase,
            status,
            address: self.address.clone(),
            elapsed: self.started.elapsed(),
        };
        self.inst
            .announce(EventKind::MigrationProgress(report.clone()));
        let _ = self.sink.try_send(report);
    }
}

/// Whether a target's answer shows the instance `uuid` as its own: only a
/// finalized copy runs (or is paused) there. An incoming one, or one
/// whose QEMU died with the stream, never ran the guest.
fn took_over(info: &pb::InstanceInfo, uuid: &str) -> bool {
    info.uuid == uuid
        && [pb::InstanceState::Running, pb::InstanceState::Paused]
            .map(|s| s as i32)
            .contains(&info.state)
}

/// Why the target refused or failed, told apart by whether it answered.
fn peer_error(target: &AgentAddress, what: &str, status: tonic::Status) -> AgentError {
    AgentError::Peer {
        target: target.to_string(),
        message: format!("{what}: {}", status.message()),
        code: status.code(),
    }
}

fn unreachable(target: &AgentAddress, e: ConnectError) -> AgentError {
    AgentError::Peer {
        target: target.to_string(),
        message: format!("can't reach the target agent: {e}"),
        code: Code::Unavailable,
    }
}

impl Agent {
    async fn connect_peer(
        &self,
        target: &AgentAddress,
    ) -> Result<NodeAgentClient<Channel>, ConnectError> {
        let migration = &self.cfg.migration;
        peer::connect(
            target,
            Some(migration.peer_timeout),
            migration.peer_tls.as_ref(),
        )
        .await
    }

    fn migration_parameters(&self, options: &MigrateOptions) -> MigrationParameters {
        let defaults = self.cfg.migration.parameters;
        MigrationParameters {
            max_bandwidth: options.max_bandwidth.unwrap_or(defaults.max_bandwidth),
            downtime_limit: options.downtime_limit.unwrap_or(defaults.downtime_limit),
            auto_converge: options.auto_converge.unwrap_or(defaults.auto_converge),
        }
    }

    /// Moves a running instance to the agent at `target`, reporting
    /// progress into `progress`. Ok means the target owns it now.
    pub async fn migrate(
        self: &Arc<Self>,
        name: &str,
        target: &str,
        options: MigrateOptions,
        progress: mpsc::Sender<MigrationReport>,
    ) -> Result<MigrationReport, AgentError> {
        let target = AgentAddress::parse(target).map_err(AgentError::BadRequest)?;
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        let (process, record) = inst.process_and_record();
        let (Some(process), Some(record)) = (process, record) else {
            return Err(AgentError::NotRunning(name.to_owned()));
        };
        let before = lock(&inst.status).state;
        if !matches!(before, State::Running | State::Paused) {
            return Err(AgentError::NotRunning(name.to_owned()));
        }
        let cancel = Arc::new(tokio::sync::Notify::new());
        lock(&inst.status).outgoing = Some(cancel.clone());
        inst.set_state(State::Migrating, format!("migrating to {target}"));
        let mut reporter = Reporter {
            inst: &inst,
            sink: progress,
            started: Instant::now(),
            address: String::new(),
        };
        let result = self
            .migrate_locked(
                &inst,
                &process,
                &record,
                &target,
                options,
                &cancel,
                &mut reporter,
            )
            .await;
        lock(&inst.status).outgoing = None;
        match result {
            Ok(report) => Ok(report),
            Err((e, keep_paused)) => {
                // The migration is over unless the target may have taken
                // the instance; then the mark stays for the next look.
                if !keep_paused {
                    self.clear_outgoing(&inst).await;
                }
                // A QEMU that died meanwhile is the supervisor's to report.
                if !process.pidfd.has_exited() {
                    let state = if keep_paused { State::Paused } else { before };
                    inst.set_state(state, format!("migration to {target} failed: {e}"));
                }
                tracing::warn!(instance = %name, %target, error = %e, "migration failed");
                Err(e)
            }
        }
    }

    /// Drops the mark of a migration that ended with the instance here.
    async fn clear_outgoing(&self, inst: &Instance) {
        let record = {
            let mut st = lock(&inst.status);
            let Some(record) = st.record.as_mut().filter(|r| r.outgoing.is_some()) else {
                return;
            };
            record.outgoing = None;
            record.clone()
        };
        if let Err(e) = self.save_record(&inst.name, &record).await {
            tracing::error!(instance = %inst.name, error = %e, "can't record the end of a migration");
        }
    }

    /// Settles a migration this node was the source of when the agent
    /// stopped, with the target, so that the guest runs on exactly one
    /// node: if the target took the instance, this QEMU goes; if it
    /// didn't, its copy is dropped and the guest runs on here; if the
    /// target can't be asked, the guest stays paused here and the state
    /// says why. `process` is the adopted QEMU; returns the state the
    /// instance is left in and why, `None` once it has gone to the target.
    pub(super) async fn settle_outgoing(
        &self,
        inst: &Arc<Instance>,
        process: &Arc<Process>,
        outgoing: &OutgoingMigration,
    ) -> Option<(State, String)> {
        let qmp = &process.qmp;
        let name = &inst.name;
        let Ok(target) = AgentAddress::parse(&outgoing.target) else {
            let detail = format!(
                "a migration to {:?} was under way, and that address can't be parsed",
                outgoing.target
            );
            tracing::error!(instance = %name, "{detail}");
            return Some((State::Paused, detail));
        };
        // A stream still flowing goes no further: the outcome is decided
        // here, not by whichever side finishes first.
        if let Ok(status) = qemu_migration::query(qmp).await
            && !status.phase.is_final()
            && status.phase != qemu_migration::MigrationPhase::None
        {
            let _ = qemu_migration::cancel(qmp).await;
            for _ in 0..100 {
                match qemu_migration::query(qmp).await {
                    Ok(s) if !s.phase.is_final() => {
                        tokio::time::sleep(POLL_INTERVAL).await;
                    }
                    _ => break,
                }
            }
        }
        let owner = self.incoming_state_on(&target, &inst.name).await;
        let uuid = lock(&inst.status)
            .record
            .as_ref()
            .map(|r| r.runtime.uuid.to_string());
        match owner {
            Ok(Some(info)) if uuid.is_some_and(|u| took_over(&info, &u)) => {
                tracing::info!(instance = %name, %target, "the target took the instance before the agent stopped; ending the source's QEMU");
                process.stop_requested.store(true, Ordering::SeqCst);
                if let Err(e) = lifecycle::quit(Some(qmp), &process.pidfd, self.cfg.stop).await {
                    tracing::error!(instance = %name, error = %e, "can't end the source QEMU after a migration");
                }
                process.reap();
                let run_dir = self.cfg.run_dir(name);
                lifecycle::remove_run_files(&run_dir);
                if let Err(e) = self.remove_record(name).await {
                    tracing::error!(instance = %name, error = %e, "can't remove the record of a migrated instance");
                }
                {
                    let mut st = lock(&inst.status);
                    st.process = None;
                    st.record = None;
                }
                self.registry_mut().remove(name);
                let _ = std::fs::remove_dir_all(&run_dir);
                None
            }
            Ok(_) => {
                tracing::info!(instance = %name, %target, "the target never took the instance; it runs on here");
                self.cancel_on_target(&target, name).await;
                if outgoing.was_running
                    && let Err(e) = qemu_migration::resume(qmp).await
                {
                    tracing::error!(instance = %name, error = %e, "can't resume after settling a migration");
                }
                self.clear_outgoing(inst).await;
                let state = if outgoing.was_running {
                    State::Running
                } else {
                    State::Paused
                };
                Some((
                    state,
                    format!("a migration to {target} was cancelled when the agent restarted"),
                ))
            }
            Err(e) => {
                let detail = format!(
                    "a migration to {target} was under way when the agent stopped, and the target \
                     can't be asked whether it took the instance ({e}); the guest stays paused here: \
                     resume it only if {target} doesn't run it"
                );
                tracing::error!(instance = %name, "{detail}");
                Some((State::Paused, detail))
            }
        }
    }

    /// What the agent at `target` says of `name`: `None` when it has no
    /// such instance.
    async fn incoming_state_on(
        &self,
        target: &AgentAddress,
        name: &str,
    ) -> Result<Option<pb::InstanceInfo>, AgentError> {
        let mut peer = self
            .connect_peer(target)
            .await
            .map_err(|e| unreachable(target, e))?;
        match peer
            .get_instance(pb::GetInstanceRequest { name: name.into() })
            .await
        {
            Ok(info) => Ok(Some(info.into_inner())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(peer_error(target, "can't ask the target", s)),
        }
    }

    /// The source's side. An error comes with whether the guest must stay
    /// paused (the target may have taken over).
    #[allow(clippy::too_many_arguments)]
    async fn migrate_locked(
        &self,
        inst: &Arc<Instance>,
        process: &Arc<Process>,
        record: &InstanceRecord,
        target: &AgentAddress,
        options: MigrateOptions,
        cancel: &tokio::sync::Notify,
        reporter: &mut Reporter<'_>,
    ) -> Result<MigrationReport, (AgentError, bool)> {
        let qmp = &process.qmp;
        let name = inst.name.clone();
        let qmp_error = |source: QmpError| AgentError::Qmp {
            instance: name.clone(),
            source,
        };
        let was_running = qemu_migration::guest_running(qmp)
            .await
            .map_err(|e| (qmp_error(e), false))?;
        reporter.report(ReportPhase::Preparing, None);
        let runtime_json = serde_json::to_string(&record.runtime)
            .map_err(|e| (AgentError::Internal(e.to_string()), false))?;
        // From here a target may hold a copy: an agent that restarts
        // before the end must settle it with the target.
        let marked = InstanceRecord {
            outgoing: Some(OutgoingMigration {
                target: target.to_string(),
                was_running,
            }),
            ..record.clone()
        };
        self.write_record(inst, &marked)
            .await
            .map_err(|e| (e, false))?;
        let mut peer = self
            .connect_peer(target)
            .await
            .map_err(|e| (unreachable(target, e), false))?;
        let source = crate::instances::hostname();
        let address = peer
            .accept_migration(pb::AcceptMigrationRequest {
                runtime_json,
                source,
            })
            .await
            .map_err(|s| {
                (
                    peer_error(target, "the target refused the migration", s),
                    false,
                )
            })?
            .into_inner()
            .address;
        reporter.address = address.clone();
        tracing::info!(instance = %inst.name, %target, %address, "target ready; sending the guest's state");

        let sent = self
            .send_state(
                qmp,
                (&mut peer, target),
                &address,
                options,
                was_running,
                cancel,
                reporter,
            )
            .await;
        let status = match sent {
            Ok(status) => status,
            Err(e) => {
                self.cancel_on_target(target, &inst.name).await;
                if !process.pidfd.has_exited()
                    && was_running
                    && let Err(resume) = qemu_migration::resume(qmp).await
                {
                    tracing::error!(instance = %inst.name, error = %resume, "can't resume after a failed migration");
                }
                return Err((e, false));
            }
        };

        reporter.report(ReportPhase::Finalizing, Some(status.clone()));
        self.reach(FaultPoint::MigrationBeforeFinalize).await;
        match self
            .finalize_on_target(target, &record.runtime, was_running)
            .await
        {
            FinalizeOutcome::Taken => {}
            FinalizeOutcome::Refused(e) => {
                self.cancel_on_target(target, &inst.name).await;
                if was_running && let Err(resume) = qemu_migration::resume(qmp).await {
                    tracing::error!(instance = %inst.name, error = %resume, "can't resume after a refused finalize");
                }
                return Err((e, false));
            }
            FinalizeOutcome::Unknown(e) => return Err((e, true)),
        }

        self.reach(FaultPoint::MigrationAfterFinalize).await;
        // The target owns the instance: this node lets go of it.
        process.stop_requested.store(true, Ordering::SeqCst);
        if let Err(e) = lifecycle::quit(Some(qmp), &process.pidfd, self.cfg.stop).await {
            tracing::error!(instance = %inst.name, error = %e, "can't end the source QEMU after a migration");
        }
        process.reap();
        let run_dir = self.cfg.run_dir(&inst.name);
        lifecycle::remove_run_files(&run_dir);
        if let Err(e) = self.remove_record(&inst.name).await {
            tracing::error!(instance = %inst.name, error = %e, "can't remove the record of a migrated instance");
        }
        {
            let mut st = lock(&inst.status);
            st.process = None;
            st.record = None;
        }
        self.registry_mut().remove(&inst.name);
        let _ = std::fs::remove_dir_all(&run_dir);
        inst.set_state(State::Stopped, format!("migrated to {target}"));
        tracing::info!(instance = %inst.name, %target, "migration completed");
        crate::telemetry::record_migrated_bytes(status.transferred_bytes);
        reporter.report(ReportPhase::Completed, Some(status.clone()));
        Ok(MigrationReport {
            phase: ReportPhase::Completed,
            status: Some(status),
            address: reporter.address.clone(),
            elapsed: reporter.started.elapsed(),
        })
    }

    /// Runs QEMU's migration to `address` until it completes.
    #[allow(clippy::too_many_arguments)]
    async fn send_state(
        &self,
        qmp: &hypervisor::qmp::QmpClient,
        (peer, target): (&mut NodeAgentClient<Channel>, &AgentAddress),
        address: &str,
        options: MigrateOptions,
        was_running: bool,
        cancel: &tokio::sync::Notify,
        reporter: &Reporter<'_>,
    ) -> Result<MigrationStatus, AgentError> {
        let name = reporter.inst.name.clone();
        let qmp_error = |source: QmpError| AgentError::Qmp {
            instance: name.clone(),
            source,
        };
        qemu_migration::configure(qmp, &self.migration_parameters(&options))
            .await
            .map_err(qmp_error)?;
        if options.offline && was_running {
            qemu_migration::pause(qmp).await.map_err(qmp_error)?;
        }
        qemu_migration::start_outgoing(qmp, address)
            .await
            .map_err(qmp_error)?;
        let mut cancelled = false;
        let mut abort: Option<AgentError> = None;
        let mut next_target_check = Instant::now() + TARGET_CHECK_INTERVAL;
        loop {
            let status = qemu_migration::query(qmp).await.map_err(qmp_error)?;
            reporter.report(ReportPhase::Active, Some(status.clone()));
            match status.phase {
                qemu_migration::MigrationPhase::Completed => return Ok(status),
                qemu_migration::MigrationPhase::Failed => {
                    return Err(AgentError::MigrationFailed {
                        instance: name.clone(),
                        reason: status.error.unwrap_or_else(|| "QEMU gave no reason".into()),
                    });
                }
                qemu_migration::MigrationPhase::Cancelled => {
                    return Err(abort.unwrap_or(AgentError::MigrationCancelled(name.clone())));
                }
                _ => {}
            }
            // A target agent that went away can't finalize: stop sending
            // rather than finish a stream nobody will take over.
            if !cancelled && Instant::now() >= next_target_check {
                next_target_check = Instant::now() + TARGET_CHECK_INTERVAL;
                if let Some(problem) = check_target(peer, target, &name).await {
                    tracing::warn!(instance = %name, %target, error = %problem, "cancelling the migration");
                    qemu_migration::cancel(qmp).await.map_err(qmp_error)?;
                    abort = Some(problem);
                    cancelled = true;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(POLL_INTERVAL) => {}
                () = cancel.notified(), if !cancelled => {
                    tracing::info!(instance = %name, "cancelling the migration");
                    qemu_migration::cancel(qmp).await.map_err(qmp_error)?;
                    cancelled = true;
                }
            }
        }
    }

    async fn cancel_on_target(&self, target: &AgentAddress, name: &str) {
        let result = match self.connect_peer(target).await {
            Ok(mut peer) => peer
                .cancel_migration(pb::CancelMigrationRequest { name: name.into() })
                .await
                .map(drop)
                .map_err(|s| s.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            // A target that is gone drops its half when it restarts.
            tracing::warn!(instance = %name, %target, error = %e, "can't tell the target to drop its incoming QEMU");
        }
    }

    async fn finalize_on_target(
        &self,
        target: &AgentAddress,
        runtime: &Runtime,
        resume: bool,
    ) -> FinalizeOutcome {
        // A fresh connection: if it can't be made, the request was never
        // sent, so the target can't have taken the instance.
        let mut peer = match self.connect_peer(target).await {
            Ok(p) => p,
            Err(e) => return FinalizeOutcome::Refused(unreachable(target, e)),
        };
        let request = pb::FinalizeMigrationRequest {
            name: runtime.name.clone(),
            uuid: runtime.uuid.to_string(),
            resume,
        };
        let status = match peer.finalize_migration(request).await {
            Ok(_) => return FinalizeOutcome::Taken,
            Err(status) => status,
        };
        // An answer from the target's service (it tags every answer with a
        // request id) is definite; a broken connection leaves it open
        // whether the target took over.
        if peer::answered_by_agent(&status) {
            return FinalizeOutcome::Refused(peer_error(
                target,
                "the target could not finalize",
                status,
            ));
        }
        // Ask again who owns it.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Ok(mut peer) = self.connect_peer(target).await else {
                continue;
            };
            match peer
                .get_instance(pb::GetInstanceRequest {
                    name: runtime.name.clone(),
                })
                .await
            {
                Ok(info) => {
                    return if took_over(&info.into_inner(), &runtime.uuid.to_string()) {
                        FinalizeOutcome::Taken
                    } else {
                        FinalizeOutcome::Refused(peer_error(
                            target,
                            "the target did not finalize",
                            status,
                        ))
                    };
                }
                Err(s) if s.code() == Code::NotFound => {
                    return FinalizeOutcome::Refused(peer_error(
                        target,
                        "the target did not finalize",
                        status,
                    ));
                }
                Err(_) => {}
            }
        }
        FinalizeOutcome::Unknown(AgentError::MigrationOutcomeUnknown {
            instance: runtime.name.clone(),
            target: target.to_string(),
            reason: status.message().to_owned(),
        })
    }
}

/// Whether the target still waits for the instance; `Some` says why not.
async fn check_target(
    peer: &mut NodeAgentClient<Channel>,
    target: &AgentAddress,
    name: &str,
) -> Option<AgentError> {
    let request = pb::GetInstanceRequest { name: name.into() };
    let gone = |message: String| {
        Some(AgentError::Peer {
            target: target.to_string(),
            message,
            code: Code::Unavailable,
        })
    };
    match tokio::time::timeout(TARGET_CHECK_TIMEOUT, peer.get_instance(request)).await {
        Ok(Ok(info)) if info.get_ref().state == pb::InstanceState::Incoming as i32 => None,
        Ok(Ok(info)) => gone(format!(
            "the target's instance is no longer incoming ({})",
            info.get_ref().state_detail
        )),
        Ok(Err(status)) if status.code() == Code::NotFound => {
            gone("the target dropped the incoming instance".into())
        }
        Ok(Err(status)) => gone(format!(
            "the target agent went away during the migration: {}",
            status.message()
        )),
        Err(_) => gone(format!(
            "the target agent did not answer within {TARGET_CHECK_TIMEOUT:?}"
        )),
    }
}

/// What a FinalizeMigration came to.
enum FinalizeOutcome {
    /// The target owns the instance.
    Taken,
    /// The target doesn't own it, and won't.
    Refused(AgentError),
    /// Nobody can tell; the source must not resume.
    Unknown(AgentError),
}
