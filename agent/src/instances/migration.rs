//! Live migration, agent to agent: the source's side.
//!
//! Ownership moves at one point only: when the target persists the
//! instance's record in FinalizeMigration. Before that the source owns the
//! instance and every failure ends with the source running it; after it,
//! the target does and the source quits its QEMU. The one case where the
//! source can't tell is a FinalizeMigration that was delivered but never
//! answered: the source then keeps its QEMU paused and says so, because
//! resuming could run the guest twice. ARCHITECTURE.md draws the states.
//! The target's side is in `incoming`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hypervisor::Runtime;
use hypervisor::lifecycle;
use hypervisor::migration::convergence::{ConvergenceWatch, DEFAULT_STALLED_PASSES, Stall};
use hypervisor::migration::stream_tls::{self, Endpoint};
use hypervisor::migration::{
    self as qemu_migration, MigrationParameters, MigrationPhase, MigrationStatus, StreamWatch,
};
use hypervisor::qmp::{QmpClient, QmpError};
use tokio::sync::{Notify, mpsc};
use tonic::Code;
use tracing::{Instrument, debug_span};

use super::{Agent, Instance, InstanceRecord, OutgoingMigration, Process, State, lock};
use crate::config::FaultPoint;
use crate::error::AgentError;
use crate::events::EventKind;
use crate::model::{MigrateOptions, MigrationReport, ReportPhase, StreamRequest};
use crate::peer::{self, AgentAddress, ConnectError, PeerInstance, TargetAgent};

/// How often a migration's progress is read while QEMU says nothing; its
/// `MIGRATION` events bring the next read forward.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a broken postcopy stream is retried by default.
const POSTCOPY_RECOVERY_WINDOW: Duration = Duration::from_secs(30);
/// The pause between two attempts.
const POSTCOPY_RECOVERY_RETRY: Duration = Duration::from_secs(1);
/// How often the source checks that the target agent still waits.
const TARGET_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long that check may take.
const TARGET_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes reports as events and to the caller's stream. A slow caller
/// misses intermediate reports, never the outcome.
pub(super) struct Reporter<'a> {
    pub(super) inst: &'a Instance,
    pub(super) sink: mpsc::Sender<MigrationReport>,
    pub(super) started: Instant,
    pub(super) address: String,
    pub(super) encrypted: bool,
}

impl Reporter<'_> {
    pub(super) fn report(&self, phase: ReportPhase, status: Option<MigrationStatus>) {
        let report = self.current(phase, status);
        self.inst
            .announce(EventKind::MigrationProgress(report.clone()));
        let _ = self.sink.try_send(report);
    }

    pub(super) fn current(
        &self,
        phase: ReportPhase,
        status: Option<MigrationStatus>,
    ) -> MigrationReport {
        MigrationReport {
            phase,
            status,
            address: self.address.clone(),
            encrypted: self.encrypted,
            elapsed: self.started.elapsed(),
        }
    }
}

/// One migration away from this node, for as long as the source holds
/// the instance's operation lock.
struct Outgoing<'a> {
    inst: &'a Arc<Instance>,
    process: &'a Arc<Process>,
    record: &'a InstanceRecord,
    target: AgentAddress,
    options: MigrateOptions,
    /// For an encrypted stream: the name the target's certificate must
    /// bear.
    tls_host: Option<String>,
    /// Set when the migration may switch to postcopy; notified to switch.
    postcopy_switch: Option<Arc<Notify>>,
    /// Whether it has: from then on the source can't take the guest back.
    switched: AtomicBool,
    cancel: Arc<Notify>,
    reporter: Reporter<'a>,
}

impl Outgoing<'_> {
    fn qmp(&self) -> &QmpClient {
        &self.process.qmp
    }

    fn switched(&self) -> bool {
        self.switched.load(Ordering::SeqCst)
    }

    /// The failure of a migration past the switch to postcopy.
    fn split(&self, reason: String) -> Failure {
        Failure {
            error: AgentError::PostcopyInterrupted {
                instance: self.inst.name.clone(),
                target: self.target.to_string(),
                reason,
            },
            maybe_taken: true,
        }
    }

    fn qmp_error(&self) -> impl Fn(QmpError) -> AgentError + '_ {
        |source| AgentError::Qmp {
            instance: self.inst.name.clone(),
            source,
        }
    }
}

/// Why a migration failed, and whether the target may have taken the
/// instance: then the guest must stay paused here.
struct Failure {
    error: AgentError,
    maybe_taken: bool,
}

impl From<AgentError> for Failure {
    fn from(error: AgentError) -> Self {
        Self {
            error,
            maybe_taken: false,
        }
    }
}

/// Whether a target's answer shows the instance `uuid` as its own: only a
/// finalized copy runs (or is paused) there. An incoming one, or one
/// whose QEMU died with the stream, never ran the guest.
fn took_over(info: &PeerInstance, uuid: &str) -> bool {
    info.uuid == uuid && matches!(info.state, Some(State::Running | State::Paused))
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
    async fn connect_peer(&self, target: &AgentAddress) -> Result<TargetAgent, ConnectError> {
        let migration = &self.cfg.migration;
        TargetAgent::connect(
            target,
            Some(migration.peer_timeout),
            migration.peer_tls.as_ref(),
        )
        .await
    }

    pub(super) fn migration_parameters(&self, options: &MigrateOptions) -> MigrationParameters {
        let defaults = self.cfg.migration.parameters;
        MigrationParameters {
            max_bandwidth: options.max_bandwidth.unwrap_or(defaults.max_bandwidth),
            downtime_limit: options.downtime_limit.unwrap_or(defaults.downtime_limit),
            auto_converge: options.auto_converge.unwrap_or(defaults.auto_converge),
            throttle_initial: options
                .throttle_initial
                .unwrap_or(defaults.throttle_initial),
            throttle_increment: options
                .throttle_increment
                .unwrap_or(defaults.throttle_increment),
            xbzrle_cache: options.xbzrle_cache,
            multifd_channels: options.multifd_channels,
            postcopy: options.postcopy,
        }
    }

    /// Moves a running instance to the agent at `target` (or to a QEMU
    /// that waits at `tcp:HOST:PORT`), reporting progress into `progress`.
    /// Ok means the target owns it now.
    pub async fn migrate(
        self: &Arc<Self>,
        name: &str,
        target: &str,
        options: MigrateOptions,
        progress: mpsc::Sender<MigrationReport>,
    ) -> Result<MigrationReport, AgentError> {
        if target.starts_with(super::handback::QEMU_TARGET) {
            // That QEMU was started by another manager, which didn't ask
            // it to expect channels or allow postcopy.
            if options.multifd_channels.is_some() || options.postcopy {
                return Err(AgentError::BadRequest(format!(
                    "multifd channels and postcopy need an agent on the target; {target} is a QEMU"
                )));
            }
            return self.migrate_to_qemu(name, target, options, progress).await;
        }
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
        if options.postcopy && record.runtime.never_lose {
            return Err(AgentError::NeverLose(name.to_owned()));
        }
        let (cancel, postcopy_switch) = steer_outgoing(&inst, options.postcopy);
        inst.set_state(State::Migrating, format!("migrating to {target}"));
        // To another node; one on this machine has no cluster identity.
        let tls_host = target
            .tls_host()
            .filter(|_| !options.unencrypted)
            .map(str::to_owned);
        let mut outgoing = Outgoing {
            reporter: Reporter {
                inst: &inst,
                sink: progress,
                started: Instant::now(),
                address: String::new(),
                encrypted: tls_host.is_some(),
            },
            tls_host,
            postcopy_switch,
            switched: AtomicBool::new(false),
            inst: &inst,
            process: &process,
            record: &record,
            target: target.clone(),
            options,
            cancel,
        };
        let result = self.migrate_locked(&mut outgoing).await;
        steer_outgoing_done(&inst);
        let Failure { error, maybe_taken } = match result {
            Ok(report) => return Ok(report),
            Err(failure) => failure,
        };
        if outgoing.tls_host.is_some() && !process.pidfd.has_exited() {
            // QEMU keeps the node's key in memory while the object lives.
            let _ = stream_tls::unload(&process.qmp, Endpoint::Sender).await;
        }
        // The migration is over unless the target may have taken the
        // instance; then the mark stays for the next look.
        if !maybe_taken {
            self.clear_outgoing(&inst).await;
        }
        // A QEMU that died meanwhile is the supervisor's to report.
        if !process.pidfd.has_exited() {
            let state = if maybe_taken { State::Paused } else { before };
            inst.set_state(state, format!("migration to {target} failed: {error}"));
        }
        tracing::warn!(instance = %name, %target, %error, "migration failed");
        Err(error)
    }

    /// Drops the mark of a migration that ended with the instance here.
    pub(super) async fn clear_outgoing(&self, inst: &Instance) {
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

    /// Lets go of an instance the target owns now: quits this QEMU and
    /// forgets the instance here.
    pub(super) async fn release_to_target(&self, inst: &Instance, process: &Process) {
        let name = &inst.name;
        process.stop_requested.store(true, Ordering::SeqCst);
        let quit = lifecycle::quit(Some(&process.qmp), &process.pidfd, self.cfg.stop)
            .instrument(debug_span!("step", step = "QEMU"))
            .await;
        if let Err(e) = quit {
            tracing::error!(instance = %name, error = %e, "can't end the source QEMU after a migration");
        }
        process.reap();
        self.forget_migrated(inst)
            .instrument(debug_span!("step", step = "records"))
            .await;
    }

    /// Forgets an instance the target owns, once its QEMU here is gone.
    async fn forget_migrated(&self, inst: &Instance) {
        let name = &inst.name;
        let run_dir = self.cfg.run_dir(name);
        lifecycle::remove_run_files(&run_dir).await;
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
    }

    /// Settles a migration this node was the source of when the agent
    /// stopped, for a source QEMU found gone: an agent killed while it
    /// let go of the instance ends it before forgetting it. True if the
    /// target runs the guest and this node forgot it.
    pub(super) async fn settle_outgoing_without_qemu(
        &self,
        inst: &Instance,
        outgoing: &OutgoingMigration,
    ) -> bool {
        let Ok(target) = AgentAddress::parse(&outgoing.target) else {
            return false;
        };
        let uuid = lock(&inst.status)
            .record
            .as_ref()
            .map(|r| r.runtime.uuid.to_string());
        match self.instance_on(&target, &inst.name).await {
            Ok(Some(info)) if uuid.is_some_and(|u| took_over(&info, &u)) => {
                tracing::info!(instance = %inst.name, %target, "the target took the instance before the agent stopped");
                self.forget_migrated(inst).await;
                true
            }
            _ => false,
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
        let name = &inst.name;
        if outgoing.target.starts_with(super::handback::QEMU_TARGET) {
            return self.settle_handback(inst, process, outgoing).await;
        }
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
        stop_stream(&process.qmp).await;
        let owner = self.instance_on(&target, name).await;
        let uuid = lock(&inst.status)
            .record
            .as_ref()
            .map(|r| r.runtime.uuid.to_string());
        match owner {
            Ok(Some(info)) if uuid.is_some_and(|u| took_over(&info, &u)) => {
                if in_postcopy(&process.qmp).await {
                    // Ending this QEMU would lose the memory the target
                    // still fetches from it.
                    let detail = format!(
                        "the guest runs on {target}, which still fetches memory from this QEMU \
                         (postcopy); it must keep running until the stream completes"
                    );
                    tracing::warn!(instance = %name, "{detail}");
                    return Some((State::Paused, detail));
                }
                tracing::info!(instance = %name, %target, "the target took the instance before the agent stopped; ending the source's QEMU");
                self.release_to_target(inst, process).await;
                None
            }
            Ok(_) => {
                tracing::info!(instance = %name, %target, "the target never took the instance; it runs on here");
                self.cancel_on_target(&target, name).await;
                Some(self.stay_after_restart(inst, process, outgoing).await)
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

    /// Keeps a guest whose migration an agent restart cut short on this
    /// node: resumed if it ran before, the mark dropped. Returns the state
    /// it is left in and why.
    pub(super) async fn stay_after_restart(
        &self,
        inst: &Instance,
        process: &Process,
        outgoing: &OutgoingMigration,
    ) -> (State, String) {
        if outgoing.was_running
            && let Err(e) = qemu_migration::resume(&process.qmp).await
        {
            tracing::error!(instance = %inst.name, error = %e, "can't resume after settling a migration");
        }
        self.clear_outgoing(inst).await;
        let state = if outgoing.was_running {
            State::Running
        } else {
            State::Paused
        };
        let detail = format!(
            "a migration to {} was cancelled when the agent restarted",
            outgoing.target
        );
        (state, detail)
    }

    /// What the agent at `target` says of `name`: `None` when it has no
    /// such instance.
    async fn instance_on(
        &self,
        target: &AgentAddress,
        name: &str,
    ) -> Result<Option<PeerInstance>, AgentError> {
        let mut peer = self
            .connect_peer(target)
            .await
            .map_err(|e| unreachable(target, e))?;
        peer.instance(name)
            .await
            .map_err(|s| peer_error(target, "can't ask the target", s))
    }

    /// The source's side, in order: the target prepares, the state
    /// streams, the target takes over, this node lets go.
    async fn migrate_locked(&self, m: &mut Outgoing<'_>) -> Result<MigrationReport, Failure> {
        let was_running = qemu_migration::guest_running(m.qmp())
            .await
            .map_err(m.qmp_error())?;
        let mut peer = self
            .prepare_target(m, was_running)
            .instrument(debug_span!("step", step = "target ready"))
            .await?;
        let status = match self
            .send_state(m, &mut peer, was_running)
            .instrument(debug_span!("step", step = "stream"))
            .await
        {
            Ok(status) => status,
            // The target has the guest's devices and some of its memory.
            Err(e) if m.switched() => return Err(m.split(e.to_string())),
            Err(e) => {
                self.stay_here(m, was_running).await;
                return Err(e.into());
            }
        };

        m.reporter
            .report(ReportPhase::Finalizing, Some(status.clone()));
        self.reach(FaultPoint::MigrationBeforeFinalize).await;
        match self
            .finalize_on_target(&m.target, &m.record.runtime, was_running)
            .instrument(debug_span!("step", step = "target takes over"))
            .await
        {
            FinalizeOutcome::Taken => {}
            FinalizeOutcome::Refused(e) if m.switched() => return Err(m.split(e.to_string())),
            FinalizeOutcome::Refused(e) => {
                self.stay_here(m, was_running).await;
                return Err(e.into());
            }
            FinalizeOutcome::Unknown(error) => {
                // Past the switch the stream decides what is left to say:
                // if it breaks for good, the guest is split whoever owns it.
                if m.switched() {
                    self.finish_postcopy(m).await?;
                }
                return Err(Failure {
                    error,
                    maybe_taken: true,
                });
            }
        }

        self.reach(FaultPoint::MigrationAfterFinalize).await;
        let status = match m.switched() {
            true => self.finish_postcopy(m).await?,
            false => status,
        };
        self.release_to_target(m.inst, m.process)
            .instrument(debug_span!("step", step = "source let go"))
            .await;
        m.inst
            .set_state(State::Stopped, format!("migrated to {}", m.target));
        tracing::info!(instance = %m.inst.name, target = %m.target, "migration completed");
        crate::telemetry::record_migrated_bytes(status.transferred_bytes);
        m.reporter
            .report(ReportPhase::Completed, Some(status.clone()));
        Ok(m.reporter.current(ReportPhase::Completed, Some(status)))
    }

    /// Marks the record (from here a target may hold a copy, and an agent
    /// that restarts before the end must settle it with the target), then
    /// has the target start a QEMU that waits for the state.
    async fn prepare_target(
        &self,
        m: &mut Outgoing<'_>,
        was_running: bool,
    ) -> Result<TargetAgent, AgentError> {
        m.reporter.report(ReportPhase::Preparing, None);
        if m.tls_host.is_some() {
            // Before the target starts anything: a source that can't
            // encrypt refuses on its own.
            self.load_stream_tls(m.process, &m.record.runtime, Endpoint::Sender)
                .await?;
        }
        let marked = InstanceRecord {
            outgoing: Some(OutgoingMigration {
                target: m.target.to_string(),
                was_running,
            }),
            ..m.record.clone()
        };
        self.write_record(m.inst, &marked)
            .instrument(debug_span!("step", step = "record"))
            .await?;
        let mut peer = self
            .connect_peer(&m.target)
            .instrument(debug_span!("step", step = "connect"))
            .await
            .map_err(|e| unreachable(&m.target, e))?;
        let address = peer
            .accept_migration(
                &m.record.runtime,
                super::hostname(),
                self.cfg.migration.peer_protocol,
                StreamRequest {
                    multifd_channels: m.options.multifd_channels,
                    encrypted: m.tls_host.is_some(),
                    postcopy: m.options.postcopy,
                },
            )
            .await
            .map_err(|s| peer_error(&m.target, "the target refused the migration", s))?;
        m.reporter.address = address;
        tracing::info!(instance = %m.inst.name, target = %m.target, address = %m.reporter.address, "target ready; sending the guest's state");
        Ok(peer)
    }

    /// After a failure the target can't have taken: drops its copy and
    /// runs the guest on here.
    async fn stay_here(&self, m: &Outgoing<'_>, was_running: bool) {
        self.cancel_on_target(&m.target, &m.inst.name).await;
        if !m.process.pidfd.has_exited()
            && was_running
            && let Err(e) = qemu_migration::resume(m.qmp()).await
        {
            tracing::error!(instance = %m.inst.name, error = %e, "can't resume after a failed migration");
        }
    }

    /// Runs QEMU's migration to the target's address until it completes.
    async fn send_state(
        &self,
        m: &Outgoing<'_>,
        peer: &mut TargetAgent,
        was_running: bool,
    ) -> Result<MigrationStatus, AgentError> {
        let (qmp, name) = (m.qmp(), &m.inst.name);
        let qmp_error = m.qmp_error();
        let params = self.migration_parameters(&m.options);
        qemu_migration::configure(qmp, &params, m.tls_host.as_deref())
            .await
            .map_err(&qmp_error)?;
        if m.options.offline && was_running {
            qemu_migration::pause(qmp).await.map_err(&qmp_error)?;
        }
        let stream = StreamWatch::new(qmp);
        qemu_migration::start_outgoing(qmp, &m.reporter.address)
            .await
            .map_err(&qmp_error)?;
        let mut watch = Watch {
            stream,
            cancelled: false,
            abort: None,
            next_target_check: Instant::now() + TARGET_CHECK_INTERVAL,
            convergence: ConvergenceWatch::new(
                m.options.stalled_passes.unwrap_or(DEFAULT_STALLED_PASSES),
                params.auto_converge,
            ),
        };
        loop {
            let status = qemu_migration::query(qmp).await.map_err(&qmp_error)?;
            m.reporter.report(ReportPhase::Active, Some(status.clone()));
            let stall = watch.convergence.observe(&status);
            if let Some(stall) = stall.filter(|_| !watch.cancelled && !m.switched()) {
                match m.postcopy_switch {
                    Some(_) => self.start_postcopy(m, "precopy stopped converging").await?,
                    None => watch.stop(m, stalled(name, &params, stall)).await?,
                }
            }
            match status.phase {
                MigrationPhase::Completed | MigrationPhase::Postcopy => return Ok(status),
                MigrationPhase::Failed | MigrationPhase::PostcopyPaused => {
                    return Err(AgentError::MigrationFailed {
                        instance: name.clone(),
                        reason: status.error.unwrap_or(status.status),
                    });
                }
                MigrationPhase::Cancelled => {
                    return Err(watch
                        .abort
                        .unwrap_or(AgentError::MigrationCancelled(name.clone())));
                }
                _ => {}
            }
            // A target agent that went away can't finalize: stop sending
            // rather than finish a stream nobody will take over.
            if !watch.cancelled && !m.switched() && Instant::now() >= watch.next_target_check {
                watch.next_target_check = Instant::now() + TARGET_CHECK_INTERVAL;
                if let Some(problem) = check_target(peer, &m.target, name).await {
                    watch.stop(m, problem).await?;
                }
            }
            self.wait_or_steer(m, &mut watch).await?;
        }
    }

    /// Waits for the next look at the stream, unless the caller cancels it
    /// or switches it to postcopy first.
    async fn wait_or_steer(&self, m: &Outgoing<'_>, watch: &mut Watch) -> Result<(), AgentError> {
        let switch = m.postcopy_switch.clone();
        let asked = async move {
            match switch {
                Some(switch) => switch.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = watch.stream.next(POLL_INTERVAL) => {}
            () = m.cancel.notified(), if !watch.cancelled => {
                if m.switched() {
                    tracing::warn!(instance = %m.inst.name, "a migration in postcopy can't be cancelled");
                } else {
                    tracing::info!(instance = %m.inst.name, "cancelling the migration");
                    qemu_migration::cancel(m.qmp()).await.map_err(m.qmp_error())?;
                    watch.cancelled = true;
                }
            }
            () = asked, if !watch.cancelled && !m.switched() => {
                self.start_postcopy(m, "asked to").await?;
            }
        }
        Ok(())
    }

    /// Resumes a broken postcopy stream where the target listens again,
    /// retrying until the migration's recovery window is over.
    async fn resume_postcopy(&self, m: &Outgoing<'_>) -> Result<(), String> {
        let window = m
            .options
            .postcopy_recovery_window
            .unwrap_or(POSTCOPY_RECOVERY_WINDOW);
        let deadline = Instant::now() + window;
        let mut why = String::from("no attempt");
        while Instant::now() < deadline {
            match self.try_resume_postcopy(m).await {
                Ok(()) => return Ok(()),
                Err(e) => why = e,
            }
            tokio::time::sleep(POSTCOPY_RECOVERY_RETRY).await;
        }
        Err(format!("it could not be resumed within {window:?}: {why}"))
    }

    async fn try_resume_postcopy(&self, m: &Outgoing<'_>) -> Result<(), String> {
        let mut peer = self
            .connect_peer(&m.target)
            .await
            .map_err(|e| format!("can't reach the target agent: {e}"))?;
        let address = peer
            .recover_postcopy(&m.inst.name)
            .await
            .map_err(|s| format!("the target can't take the rest: {}", s.message()))?;
        qemu_migration::resume_outgoing(m.qmp(), &address)
            .await
            .map_err(|e| e.to_string())?;
        for _ in 0..50 {
            let status = qemu_migration::query(m.qmp())
                .await
                .map_err(|e| e.to_string())?;
            if matches!(
                status.phase,
                MigrationPhase::Postcopy | MigrationPhase::Completed
            ) {
                return Ok(());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Err(format!("the stream to {address} did not resume"))
    }

    /// Switches to postcopy: from here the guest goes on on the target.
    async fn start_postcopy(&self, m: &Outgoing<'_>, why: &str) -> Result<(), AgentError> {
        tracing::info!(instance = %m.inst.name, target = %m.target, why, "switching to postcopy");
        qemu_migration::start_postcopy(m.qmp())
            .await
            .map_err(m.qmp_error())?;
        m.switched.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// After the target took over a guest in postcopy: sends the rest of
    /// its memory, which this QEMU alone holds, until the stream completes.
    async fn finish_postcopy(&self, m: &Outgoing<'_>) -> Result<MigrationStatus, Failure> {
        let mut stream = StreamWatch::new(m.qmp());
        loop {
            let status = match qemu_migration::query(m.qmp()).await {
                Ok(status) => status,
                Err(e) => return Err(m.split(e.to_string())),
            };
            m.reporter.report(ReportPhase::Active, Some(status.clone()));
            match status.phase {
                MigrationPhase::Completed => return Ok(status),
                MigrationPhase::Postcopy => stream.next(POLL_INTERVAL).await,
                MigrationPhase::PostcopyPaused => {
                    let broke = status.error.unwrap_or(status.status);
                    tracing::warn!(instance = %m.inst.name, target = %m.target, %broke, "the postcopy stream broke; resuming it");
                    if let Err(why) = self.resume_postcopy(m).await {
                        return Err(m.split(format!("{broke}; {why}")));
                    }
                    tracing::info!(instance = %m.inst.name, target = %m.target, "the postcopy stream resumed");
                }
                _ => return Err(m.split(status.error.unwrap_or(status.status))),
            }
        }
    }

    async fn cancel_on_target(&self, target: &AgentAddress, name: &str) {
        let result = match self.connect_peer(target).await {
            Ok(mut peer) => peer.cancel_migration(name).await.map_err(|s| s.to_string()),
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
        let uuid = runtime.uuid.to_string();
        let status = match peer.finalize_migration(&runtime.name, &uuid, resume).await {
            Ok(()) => return FinalizeOutcome::Taken,
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
            match peer.instance(&runtime.name).await {
                Ok(Some(info)) if took_over(&info, &uuid) => return FinalizeOutcome::Taken,
                Ok(_) => {
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

/// Cancels a stream that is still flowing and waits, briefly, for QEMU to
/// say it has ended.
pub(super) async fn stop_stream(qmp: &QmpClient) {
    let Ok(status) = qemu_migration::query(qmp).await else {
        return;
    };
    // Past the switch to postcopy, cancelling would lose the guest.
    if status.phase.is_final()
        || matches!(
            status.phase,
            MigrationPhase::None | MigrationPhase::Postcopy | MigrationPhase::PostcopyPaused
        )
    {
        return;
    }
    let _ = qemu_migration::cancel(qmp).await;
    for _ in 0..100 {
        match qemu_migration::query(qmp).await {
            Ok(s) if !s.phase.is_final() => tokio::time::sleep(POLL_INTERVAL).await,
            _ => break,
        }
    }
}

/// The handles that cancel an outgoing migration of `inst` and, if it
/// allows `postcopy`, switch it; kept in its status for other calls.
fn steer_outgoing(inst: &Instance, postcopy: bool) -> (Arc<Notify>, Option<Arc<Notify>>) {
    let cancel = Arc::new(Notify::new());
    let switch = postcopy.then(|| Arc::new(Notify::new()));
    let mut st = lock(&inst.status);
    st.outgoing = Some(cancel.clone());
    st.postcopy_switch = switch.clone();
    (cancel, switch)
}

/// Drops the handles of [`steer_outgoing`] once the migration is over.
fn steer_outgoing_done(inst: &Instance) {
    let mut st = lock(&inst.status);
    st.outgoing = None;
    st.postcopy_switch = None;
}

/// How a stream being sent is followed.
struct Watch {
    stream: StreamWatch,
    cancelled: bool,
    /// Why the agent cancelled it, if it did.
    abort: Option<AgentError>,
    next_target_check: Instant,
    convergence: ConvergenceWatch,
}

impl Watch {
    /// Cancels the stream for `problem`.
    async fn stop(&mut self, m: &Outgoing<'_>, problem: AgentError) -> Result<(), AgentError> {
        tracing::warn!(instance = %m.inst.name, target = %m.target, error = %problem, "cancelling the migration");
        qemu_migration::cancel(m.qmp())
            .await
            .map_err(m.qmp_error())?;
        self.abort = Some(problem);
        self.cancelled = true;
        Ok(())
    }
}

/// The error of a migration whose precopy stopped converging.
fn stalled(name: &str, params: &MigrationParameters, stall: Stall) -> AgentError {
    AgentError::MigrationStalled {
        instance: name.to_owned(),
        passes: stall.passes,
        remaining_mib: stall.remaining_bytes >> 20,
        dirty_mib_per_second: stall.dirty_rate_bytes_per_second >> 20,
        bandwidth_mib_per_second: (params.max_bandwidth < qemu_migration::UNCAPPED_BANDWIDTH)
            .then_some(params.max_bandwidth >> 20),
        throttle_percent: stall.throttle_percent,
    }
}

/// Whether `qmp`'s QEMU is past the switch to postcopy with memory still
/// to send.
async fn in_postcopy(qmp: &QmpClient) -> bool {
    qemu_migration::query(qmp).await.is_ok_and(|s| {
        matches!(
            s.phase,
            MigrationPhase::Postcopy | MigrationPhase::PostcopyPaused
        )
    })
}

/// Whether the target still waits for the instance; `Some` says why not.
async fn check_target(
    peer: &mut TargetAgent,
    target: &AgentAddress,
    name: &str,
) -> Option<AgentError> {
    let gone = |message: String| {
        Some(AgentError::Peer {
            target: target.to_string(),
            message,
            code: Code::Unavailable,
        })
    };
    match tokio::time::timeout(TARGET_CHECK_TIMEOUT, peer.instance(name)).await {
        Ok(Ok(Some(info))) if info.state == Some(State::Incoming) => None,
        Ok(Ok(Some(info))) => gone(format!(
            "the target's instance is no longer incoming ({})",
            info.detail
        )),
        Ok(Ok(None)) => gone("the target dropped the incoming instance".into()),
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
