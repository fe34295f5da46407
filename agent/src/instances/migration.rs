//! Live migration, agent to agent.
//!
//! Ownership moves at one point only: when the target persists the
//! instance's record in FinalizeMigration. Before that the source owns the
//! instance and every failure ends with the source running it; after it,
//! the target does and the source quits its QEMU. The one case where the
//! source can't tell is a FinalizeMigration that was delivered but never
//! answered: the source then keeps its QEMU paused and says so, because
//! resuming could run the guest twice. ARCHITECTURE.md draws the states.

use crate::config::{Confinement, FaultPoint};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hypervisor::lifecycle::{self, LaunchMode, files};
use hypervisor::migration::{self as qemu_migration, MigrationParameters, MigrationStatus};
use hypervisor::qmp::QmpError;
use hypervisor::runtime;
use hypervisor::{Runtime, process};
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;

use super::{
    Agent, Instance, InstanceRecord, InstanceView, OutgoingMigration, Process, RecordedState,
    State, lock,
};
use crate::error::AgentError;
use crate::events::EventKind;
use crate::model::{MigrationReport, ReportPhase};
use crate::peer::{self, AgentAddress, ConnectError};

/// How often a migration's progress is read.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often the source checks that the target agent still waits.
const TARGET_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long that check may take.
const TARGET_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a target waits for its QEMU to confirm the stream it was told
/// is complete.
const FINALIZE_WAIT: Duration = Duration::from_secs(30);

/// An unfinished migration into this node.
#[derive(Debug, Clone)]
pub(crate) struct Incoming {
    /// The port QEMU listens on.
    port: u16,
    /// What the record was before (an old stopped record of the same
    /// instance), to put back if the migration doesn't finish.
    previous: Option<InstanceRecord>,
}

/// Per-call settings of a migration.
#[derive(Debug, Clone, Copy, Default)]
pub struct MigrateOptions {
    /// Pause the guest before sending anything.
    pub offline: bool,
    /// Overrides the agent's default parameters.
    pub max_bandwidth: Option<u64>,
    /// Overrides the agent's default downtime limit.
    pub downtime_limit: Option<Duration>,
    /// Overrides the agent's default for auto-converge.
    pub auto_converge: Option<bool>,
}

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

    /// The target's side of AcceptMigration: starts a QEMU from the
    /// source's runtime, waiting for the stream, and returns its address.
    pub async fn accept_migration(
        self: &Arc<Self>,
        runtime_json: &str,
        source: &str,
    ) -> Result<String, AgentError> {
        let foreign: Runtime = serde_json::from_str(runtime_json)
            .map_err(|e| AgentError::BadRequest(format!("the runtime is not valid: {e}")))?;
        let runtime = self.adopt_runtime(&foreign).await?;
        self.check_host_files(&runtime.to_spec())?;
        let inst = self.register_incoming(&runtime)?;
        // Before the lock: a source migrating this instance to its own
        // agent holds that lock until this call returns.
        if let (Some(_), Some(record)) = inst.process_and_record()
            && record.runtime.uuid == runtime.uuid
        {
            return Err(AgentError::MigrationToItself(inst.name.clone()));
        }
        let _op = self.lock_incoming(&inst).await?;
        let previous = self.check_incoming(&inst, &runtime)?;
        let (_, process) = self
            .launch_incoming(&inst, runtime, format!("incoming from {source}"), &previous)
            .await?;
        match self.listen_for_migration(&inst, &process).await {
            Ok(port) => {
                lock(&inst.status).incoming = Some(Incoming { port, previous });
                let address = format!("tcp:{}:{port}", self.migration_host());
                tracing::info!(instance = %inst.name, %source, %address, "waiting for an incoming migration");
                Ok(address)
            }
            Err(e) => {
                self.end_incoming_qemu(&inst, &process).await;
                self.forget_incoming(&inst, previous).await;
                Err(e)
            }
        }
    }

    /// The migration address as QEMU's `tcp:` URIs want it.
    fn migration_host(&self) -> String {
        let address = &self.cfg.migration.address;
        if address.contains(':') {
            format!("[{address}]")
        } else {
            address.clone()
        }
    }

    /// Makes a runtime from another node (or a save file) runnable here.
    /// Its confinement is this node's: the sender's sandbox, cgroup, user
    /// and chroot are replaced by what this node gives its own instances,
    /// keeping the sender's uid only where this node's pool has it free.
    pub(super) async fn adopt_runtime(&self, foreign: &Runtime) -> Result<Runtime, AgentError> {
        let qemu = self.qemu_info().await?;
        let kvm = hypervisor::probe::kvm_usable();
        let run_dir = self.cfg.run_dir(&foreign.name);
        let qemu_user = self.pick_qemu_user(&foreign.name, foreign.uuid, foreign.qemu_user)?;
        let host = runtime::HostFacts {
            qemu: &qemu,
            kvm: kvm.as_ref().map(|_| ()).map_err(String::as_str),
            run_dir: &run_dir,
            vhost_net: hypervisor::tap::vhost_net_available(),
            cpus: hypervisor::pinning::host_cpu_count(),
            confine: self.cfg.confinement == Confinement::Strict,
            qemu_user,
        };
        Ok(runtime::adopt_on_host(foreign, host)?)
    }

    /// Records an instance as incoming and starts its QEMU paused, waiting
    /// for the guest's state. On failure the previous record is back.
    pub(super) async fn launch_incoming(
        self: &Arc<Self>,
        inst: &Arc<Instance>,
        runtime: Runtime,
        detail: String,
        previous: &Option<InstanceRecord>,
    ) -> Result<(InstanceRecord, Arc<Process>), AgentError> {
        let record = InstanceRecord {
            runtime,
            state: RecordedState::Incoming,
            detail: detail.clone(),
            outgoing: None,
        };
        let launched = match self.write_record(inst, &record).await {
            Ok(()) => {
                inst.set_state(State::Incoming, detail);
                self.launch(inst, &record.runtime, LaunchMode::Incoming)
                    .await
            }
            Err(e) => Err(e),
        };
        match launched {
            Ok(process) => Ok((record, process)),
            Err(e) => {
                self.forget_incoming(inst, previous.clone()).await;
                Err(e)
            }
        }
    }

    /// Finds or creates the registry entry for an instance coming in.
    pub(super) fn register_incoming(&self, runtime: &Runtime) -> Result<Arc<Instance>, AgentError> {
        let mut registry = self.registry_mut();
        if let Some(inst) = registry.get(&runtime.name) {
            return Ok(inst.clone());
        }
        let inst = Instance::new(
            &runtime.name,
            None,
            State::Incoming,
            String::new(),
            self.events.clone(),
        );
        registry.insert(runtime.name.clone(), inst.clone());
        Ok(inst)
    }

    /// An instance may come in when this node has no QEMU for it and no
    /// record of another instance by that name. Returns the old record; a
    /// refused instance that had none leaves no registry entry behind.
    pub(super) fn check_incoming(
        &self,
        inst: &Instance,
        runtime: &Runtime,
    ) -> Result<Option<InstanceRecord>, AgentError> {
        let checked = self.check_incoming_inner(inst, runtime);
        if checked.is_err() {
            self.forget_if_unrecorded(inst);
        }
        checked
    }

    /// Takes the operation lock of an instance `register_incoming` gave;
    /// if the caller leaves first, an entry it made is dropped again.
    pub(super) async fn lock_incoming<'a>(
        &self,
        inst: &'a Instance,
    ) -> Result<tokio::sync::MutexGuard<'a, ()>, AgentError> {
        let locked = inst.lock_ops().await;
        if locked.is_err() {
            self.forget_if_unrecorded(inst);
        }
        locked
    }

    fn check_incoming_inner(
        &self,
        inst: &Instance,
        runtime: &Runtime,
    ) -> Result<Option<InstanceRecord>, AgentError> {
        let (process, previous) = inst.process_and_record();
        if let Some(p) = process {
            return Err(AgentError::AlreadyRunning {
                name: inst.name.clone(),
                pid: p.pid,
            });
        }
        if let Some(prev) = &previous
            && prev.runtime.uuid != runtime.uuid
        {
            return Err(AgentError::UuidMismatch {
                instance: inst.name.clone(),
                recorded: prev.runtime.uuid.to_string(),
                offered: runtime.uuid.to_string(),
            });
        }
        let run_dir = self.cfg.run_dir(&inst.name);
        if let Some(pid) = process::live_instance_pid(&run_dir.join(files::PIDFILE), runtime.uuid) {
            return Err(AgentError::AlreadyRunning {
                name: inst.name.clone(),
                pid,
            });
        }
        Ok(previous.filter(|p| p.state != RecordedState::Incoming))
    }

    async fn listen_for_migration(
        &self,
        inst: &Instance,
        process: &Process,
    ) -> Result<u16, AgentError> {
        let ports = self.cfg.migration.ports.clone();
        for port in ports.clone() {
            if !lock(&self.incoming_ports).insert(port) {
                continue;
            }
            let uri = format!("tcp:{}:{port}", self.migration_host());
            match qemu_migration::start_incoming(&process.qmp, &uri).await {
                Ok(()) => return Ok(port),
                Err(QmpError::Qemu { ref desc, .. }) if desc.contains("in use") => {
                    lock(&self.incoming_ports).remove(&port);
                }
                Err(source) => {
                    lock(&self.incoming_ports).remove(&port);
                    return Err(AgentError::Qmp {
                        instance: inst.name.clone(),
                        source,
                    });
                }
            }
        }
        Err(AgentError::NoMigrationPort {
            first: *ports.start(),
            last: *ports.end(),
        })
    }

    /// Kills an incoming QEMU (its guest never ran here).
    pub(super) async fn end_incoming_qemu(&self, inst: &Instance, process: &Process) {
        process.stop_requested.store(true, Ordering::SeqCst);
        if let Err(e) = lifecycle::quit(None, &process.pidfd, self.cfg.stop).await {
            tracing::error!(instance = %inst.name, error = %e, "can't kill the incoming QEMU");
        }
        process.reap();
        lifecycle::remove_run_files(&self.cfg.run_dir(&inst.name));
        lock(&inst.status).process = None;
    }

    /// Puts back what was there before an incoming instance: the old
    /// record, or nothing at all.
    pub(super) async fn forget_incoming(&self, inst: &Instance, previous: Option<InstanceRecord>) {
        let result = match &previous {
            Some(prev) => self.save_record(&inst.name, prev).await,
            None => self.remove_record(&inst.name).await,
        };
        if let Err(e) = result {
            tracing::error!(instance = %inst.name, error = %e, "can't undo the record of an unfinished incoming instance");
        }
        let (state, detail) = match &previous {
            Some(prev) => (super::resting_state(prev.state), prev.detail.clone()),
            None => (State::Stopped, "incoming instance dropped".to_owned()),
        };
        let forget = previous.is_none();
        {
            let mut st = lock(&inst.status);
            st.record = previous;
            st.incoming = None;
        }
        inst.set_state(state, detail);
        if forget {
            self.registry_mut().remove(&inst.name);
            let _ = std::fs::remove_dir_all(self.cfg.run_dir(&inst.name));
        }
    }

    /// Drops an incoming instance that wasn't finalized.
    pub(super) async fn abort_incoming(&self, inst: &Instance) {
        let incoming = lock(&inst.status).incoming.take();
        if let Some(port) = incoming.as_ref().map(|i| i.port) {
            lock(&self.incoming_ports).remove(&port);
        }
        if let Some(process) = inst.process() {
            self.end_incoming_qemu(inst, &process).await;
        }
        self.forget_incoming(inst, incoming.and_then(|i| i.previous))
            .await;
        tracing::info!(instance = %inst.name, "incoming migration dropped");
    }

    /// The target's side of FinalizeMigration: once its QEMU has the whole
    /// stream, the instance becomes this node's.
    pub async fn finalize_migration(
        self: &Arc<Self>,
        name: &str,
        uuid: &str,
        resume: bool,
    ) -> Result<InstanceView, AgentError> {
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        let (process, record) = inst.process_and_record();
        let Some(mut record) = record.filter(|r| r.state == RecordedState::Incoming) else {
            return Err(AgentError::NoMigration(name.to_owned()));
        };
        if record.runtime.uuid.to_string() != uuid {
            return Err(AgentError::UuidMismatch {
                instance: name.to_owned(),
                recorded: record.runtime.uuid.to_string(),
                offered: uuid.to_owned(),
            });
        }
        let Some(process) = process else {
            self.abort_incoming(&inst).await;
            return Err(AgentError::MigrationFailed {
                instance: name.to_owned(),
                reason: "the incoming QEMU exited before the migration finished".into(),
            });
        };
        if let Err(e) = self.wait_incoming_complete(&inst, &process).await {
            self.abort_incoming(&inst).await;
            return Err(e);
        }
        // The point where the instance becomes this node's.
        record.state = RecordedState::Running;
        record.detail = String::new();
        self.write_record(&inst, &record).await?;
        if let Some(port) = lock(&inst.status).incoming.take().map(|i| i.port) {
            lock(&self.incoming_ports).remove(&port);
        }
        // The instance is this node's now, whatever `cont` says: failing
        // here would make the source resume it too.
        let (state, detail) = match resume {
            false => (State::Paused, String::new()),
            true => match qemu_migration::resume(&process.qmp).await {
                Ok(()) => (State::Running, String::new()),
                Err(e) => {
                    tracing::error!(instance = %name, error = %e, "migrated instance can't be resumed");
                    (
                        State::Paused,
                        format!("migrated here, but QEMU refused to resume it: {e}"),
                    )
                }
            },
        };
        inst.set_state(state, detail);
        tracing::info!(instance = %name, ?state, "incoming migration finalized");
        Ok(inst.view())
    }

    async fn wait_incoming_complete(
        &self,
        inst: &Instance,
        process: &Process,
    ) -> Result<(), AgentError> {
        let deadline = Instant::now() + FINALIZE_WAIT;
        loop {
            let status = qemu_migration::query(&process.qmp)
                .await
                .map_err(|source| AgentError::Qmp {
                    instance: inst.name.clone(),
                    source,
                })?;
            match status.phase {
                qemu_migration::MigrationPhase::Completed => return Ok(()),
                qemu_migration::MigrationPhase::Failed
                | qemu_migration::MigrationPhase::Cancelled => {
                    return Err(AgentError::MigrationFailed {
                        instance: inst.name.clone(),
                        reason: status.error.unwrap_or_else(|| {
                            format!("the incoming stream ended {}", status.status)
                        }),
                    });
                }
                _ if Instant::now() > deadline => {
                    return Err(AgentError::MigrationFailed {
                        instance: inst.name.clone(),
                        reason: format!(
                            "the incoming stream is not complete after {FINALIZE_WAIT:?} (QEMU says {})",
                            status.status
                        ),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// CancelMigration: on the source, cancels the outgoing migration; on
    /// the target, drops the incoming instance.
    pub async fn cancel_migration(&self, name: &str) -> Result<&'static str, AgentError> {
        let inst = self.instance(name)?;
        if let Some(cancel) = lock(&inst.status).outgoing.clone() {
            cancel.notify_one();
            return Ok("outgoing");
        }
        let _op = inst.lock_ops().await?;
        if inst.is_incoming() {
            self.abort_incoming(&inst).await;
            return Ok("incoming");
        }
        Err(AgentError::NoMigration(name.to_owned()))
    }

    /// At startup: an incoming instance that was never finalized isn't
    /// this node's. Its QEMU (still paused, waiting) is killed.
    pub(super) async fn drop_unfinished_incoming(&self, name: &str, record: &InstanceRecord) {
        let run_dir = self.cfg.run_dir(name);
        if let Some(pid) =
            process::live_instance_pid(&run_dir.join(files::PIDFILE), record.runtime.uuid)
            && let Ok(pidfd) = process::PidFd::open(pid)
            && let Err(e) = lifecycle::quit(None, &pidfd, self.cfg.stop).await
        {
            tracing::error!(instance = %name, pid, error = %e, "can't kill an unfinished incoming QEMU");
            return;
        }
        lifecycle::remove_run_files(&run_dir);
        let _ = std::fs::remove_dir_all(&run_dir);
        if let Err(e) = self.remove_record(name).await {
            tracing::error!(instance = %name, error = %e, "can't remove the record of an unfinished incoming instance");
        }
        tracing::warn!(instance = %name, "dropped an incoming migration or restore that never finished");
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
