//! Instances coming into this node: the target's side of a migration,
//! and what a restore shares with it (adopting a foreign runtime,
//! launching a QEMU that waits for the guest's state, and undoing it
//! when the state never comes).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hypervisor::Runtime;
use hypervisor::lifecycle::{self, LaunchMode, files};
use hypervisor::migration::stream_tls::{self, Endpoint};
use hypervisor::migration::{self as qemu_migration};
use hypervisor::process;
use hypervisor::qmp::QmpError;
use hypervisor::runtime;
use tracing::{Instrument, debug_span};

use super::{Agent, Instance, Process, lock};
use crate::config::Confinement;
use crate::error::AgentError;
use crate::model::{InstanceRecord, InstanceView, RecordedState, State};

/// How long a target waits for its QEMU to confirm the stream it was told
/// is complete.
const FINALIZE_WAIT: Duration = Duration::from_secs(30);
/// How often it asks meanwhile, when QEMU's events don't wake it first.
const STREAM_END_POLL: Duration = Duration::from_millis(10);

/// An address as QEMU's `tcp:` URIs want it: IPv6 in brackets.
fn uri_host(address: &str) -> String {
    if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_owned()
    }
}

/// Whether a listener could take `port` on `host` (as [`uri_host`] gives
/// it) now. QEMU 10 can't try another port after `migrate-incoming`
/// failed on one taken (its incoming state stays `setup`), so a port
/// another process holds is skipped before QEMU is asked. A host that is
/// a name, not an address, is left to QEMU.
fn port_is_free(host: &str, port: u16) -> bool {
    let address = host.trim_start_matches('[').trim_end_matches(']');
    match address.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::TcpListener::bind((ip, port)).is_ok(),
        Err(_) => true,
    }
}

/// An unfinished migration into this node.
#[derive(Debug, Clone)]
pub(crate) struct Incoming {
    /// The port QEMU listens on.
    port: u16,
    /// What the record was before (an old stopped record of the same
    /// instance), to put back if the migration doesn't finish.
    previous: Option<InstanceRecord>,
}

/// Where an incoming QEMU listens for the stream.
#[derive(Debug, Clone)]
pub(super) enum Listen {
    /// A port of the agent's migration range, on its migration address,
    /// for an agent's stream, which may come with multifd connections and
    /// be encrypted.
    Range(crate::model::StreamRequest),
    /// Where the sender will send: Ganeti's KVM driver sends to its own
    /// migration port on the address Ganeti gives.
    At {
        /// Address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl Agent {
    /// The target's side of AcceptMigration: starts a QEMU from the
    /// source's runtime, waiting for the stream, and returns its address.
    /// `protocol` is the peer protocol the source speaks, as on the wire.
    pub async fn accept_migration(
        self: &Arc<Self>,
        runtime_json: &str,
        source: &str,
        protocol: u32,
        stream: crate::model::StreamRequest,
    ) -> Result<String, AgentError> {
        crate::peer::check_spoken(
            crate::peer::stated_protocol(protocol),
            self.cfg.migration.peer_protocol,
        )
        .map_err(AgentError::PeerVersion)?;
        let stored: serde_json::Value = serde_json::from_str(runtime_json)
            .map_err(|e| AgentError::BadRequest(format!("the runtime is not valid JSON: {e}")))?;
        let format = runtime::format::stored_version(&stored).ok();
        tracing::info!(%source, protocol = crate::peer::stated_protocol(protocol), runtime_format = ?format, "a peer sends a runtime");
        let foreign = runtime::format::read(stored).map_err(|e| match e {
            runtime::format::FormatError::TooNew { .. }
            | runtime::format::FormatError::TooOld { .. } => AgentError::PeerVersion(e.to_string()),
            _ => AgentError::BadRequest(format!("the runtime is not valid: {e}")),
        })?;
        let listen = Listen::Range(stream);
        self.accept_runtime(&foreign, source, listen).await
    }

    /// Starts a QEMU from a runtime made elsewhere, waiting for the stream
    /// where `listen` says, and returns that address.
    pub(super) async fn accept_runtime(
        self: &Arc<Self>,
        foreign: &Runtime,
        source: &str,
        listen: Listen,
    ) -> Result<String, AgentError> {
        let runtime = self
            .adopt_runtime(foreign)
            .instrument(debug_span!("step", step = "runtime"))
            .await?;
        debug_span!("step", step = "host files check")
            .in_scope(|| self.check_host_files(&runtime.to_spec()))?;
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
        let (record, process) = self
            .launch_incoming(&inst, runtime, format!("incoming from {source}"), &previous)
            .await?;
        match self
            .listen_for_migration(&inst, &process, &record.runtime, &listen)
            .instrument(debug_span!("step", step = "listen"))
            .await
        {
            Ok((host, port)) => {
                lock(&inst.status).incoming = Some(Incoming { port, previous });
                let address = format!("tcp:{host}:{port}");
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
    pub(super) fn migration_host(&self) -> String {
        uri_host(&self.cfg.migration.address)
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
            allowed_extra_options: &self.cfg.allowed_extra_options,
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
            runtime: Arc::new(runtime),
            state: RecordedState::Incoming,
            detail: detail.clone(),
            outgoing: None,
        };
        let written = self
            .write_record(inst, &record)
            .instrument(debug_span!("step", step = "record"))
            .await;
        let launched = match written {
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

    /// Has the incoming QEMU listen; returns the host and port it listens
    /// on, the host as QEMU's URIs write it.
    async fn listen_for_migration(
        &self,
        inst: &Instance,
        process: &Process,
        runtime: &Runtime,
        listen: &Listen,
    ) -> Result<(String, u16), AgentError> {
        let (host, ports) = match listen {
            Listen::Range(stream) => {
                let qmp_error = |source| AgentError::Qmp {
                    instance: inst.name.clone(),
                    source,
                };
                if stream.postcopy
                    && let Some(why) =
                        qemu_migration::postcopy_blocker_here(runtime.qemu_user.is_some())
                {
                    return Err(AgentError::PostcopyUnavailable(why));
                }
                if stream.encrypted {
                    self.load_stream_tls(process, runtime, Endpoint::Receiver)
                        .await?;
                    stream_tls::receive_encrypted(&process.qmp)
                        .await
                        .map_err(qmp_error)?;
                }
                qemu_migration::prepare_incoming(
                    &process.qmp,
                    stream.multifd_channels,
                    stream.postcopy,
                )
                .await
                .map_err(qmp_error)?;
                (self.migration_host(), self.cfg.migration.ports.clone())
            }
            Listen::At { host, port } => (uri_host(host), *port..=*port),
        };
        self.listen_on(inst, process, &host, ports, false)
            .await
            .map(|port| (host, port))
    }

    /// Has the incoming QEMU listen on a free port of `ports`, for a new
    /// stream, or with `recover` for the rest of one in postcopy.
    pub(super) async fn listen_on(
        &self,
        inst: &Instance,
        process: &Process,
        host: &str,
        ports: std::ops::RangeInclusive<u16>,
        recover: bool,
    ) -> Result<u16, AgentError> {
        for port in ports.clone() {
            if !lock(&self.incoming_ports).insert(port) {
                continue;
            }
            if !port_is_free(host, port) {
                lock(&self.incoming_ports).remove(&port);
                continue;
            }
            let uri = format!("tcp:{host}:{port}");
            let listening = match recover {
                true => qemu_migration::recover_incoming(&process.qmp, &uri).await,
                false => qemu_migration::start_incoming(&process.qmp, &uri).await,
            };
            match listening {
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

    /// Gives an instance's QEMU this node's credentials for `endpoint` of
    /// an encrypted stream.
    pub(super) async fn load_stream_tls(
        &self,
        process: &Process,
        runtime: &Runtime,
        endpoint: Endpoint,
    ) -> Result<(), AgentError> {
        let Some(credentials) = &self.cfg.migration.stream_tls else {
            return Err(AgentError::NoStreamCredentials);
        };
        let run_dir = self.cfg.run_dir(&runtime.name);
        let chroot = run_dir.join(files::CHROOT);
        stream_tls::load(
            &process.qmp,
            credentials,
            endpoint,
            &run_dir,
            runtime.chroot.then_some(chroot.as_path()),
            runtime.qemu_user,
        )
        .await
        .map_err(|source| AgentError::StreamTls {
            instance: runtime.name.clone(),
            source,
        })
    }

    /// Kills an incoming QEMU (its guest never ran here).
    pub(super) async fn end_incoming_qemu(&self, inst: &Instance, process: &Process) {
        process.stop_requested.store(true, Ordering::SeqCst);
        if let Err(e) = lifecycle::quit(None, &process.pidfd, self.cfg.stop).await {
            tracing::error!(instance = %inst.name, error = %e, "can't kill the incoming QEMU");
        }
        process.reap();
        lifecycle::remove_run_files(&self.cfg.run_dir(&inst.name)).await;
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
            Some(prev) => (
                super::recovery::resting_state(prev.state),
                prev.detail.clone(),
            ),
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
        // Before the stream can reach postcopy, so no event of it is missed.
        let events = process.qmp.subscribe();
        let postcopy = match self
            .wait_incoming_complete(&inst, &process)
            .instrument(debug_span!("step", step = "stream end"))
            .await
        {
            Ok(postcopy) => postcopy,
            Err(e) => {
                self.abort_incoming(&inst).await;
                return Err(e);
            }
        };
        // The point where the instance becomes this node's.
        record.state = RecordedState::Running;
        record.detail = String::new();
        self.write_record(&inst, &record)
            .instrument(debug_span!("step", step = "record"))
            .await?;
        process.read_balloon().await;
        if let Some(port) = lock(&inst.status).incoming.take().map(|i| i.port) {
            lock(&self.incoming_ports).remove(&port);
        }
        // The instance is this node's now, whatever `cont` says: failing
        // here would make the source resume it too.
        let (state, detail) = match resume {
            false => (State::Paused, String::new()),
            true => match qemu_migration::resume(&process.qmp)
                .instrument(debug_span!("step", step = "resume"))
                .await
            {
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
        tracing::info!(instance = %name, ?state, postcopy, "incoming migration finalized");
        if postcopy {
            tokio::spawn(super::postcopy::watch(inst.clone(), process, events));
        }
        Ok(inst.view())
    }

    /// Waits until the incoming QEMU has the whole stream, or, in
    /// postcopy, the guest's devices: true for postcopy, where the rest of
    /// its memory still comes.
    async fn wait_incoming_complete(
        &self,
        inst: &Instance,
        process: &Process,
    ) -> Result<bool, AgentError> {
        let deadline = Instant::now() + FINALIZE_WAIT;
        let mut stream = qemu_migration::StreamWatch::new(&process.qmp);
        loop {
            let status = qemu_migration::query(&process.qmp)
                .await
                .map_err(|source| AgentError::Qmp {
                    instance: inst.name.clone(),
                    source,
                })?;
            match status.phase {
                qemu_migration::MigrationPhase::Completed => return Ok(false),
                qemu_migration::MigrationPhase::Postcopy => return Ok(true),
                qemu_migration::MigrationPhase::Failed
                | qemu_migration::MigrationPhase::Cancelled
                | qemu_migration::MigrationPhase::PostcopyPaused => {
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
                _ => stream.next(STREAM_END_POLL).await,
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

    /// SwitchToPostcopy: has an outgoing migration that allows postcopy
    /// switch to it now.
    pub fn switch_to_postcopy(&self, name: &str) -> Result<(), AgentError> {
        let inst = self.instance(name)?;
        let st = lock(&inst.status);
        match (&st.outgoing, &st.postcopy_switch) {
            (Some(_), Some(switch)) => {
                switch.notify_one();
                Ok(())
            }
            (Some(_), None) => Err(AgentError::PostcopyNotAllowed(name.to_owned())),
            (None, _) => Err(AgentError::NoMigration(name.to_owned())),
        }
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
        lifecycle::remove_run_files(&run_dir).await;
        let _ = std::fs::remove_dir_all(&run_dir);
        if let Err(e) = self.remove_record(name).await {
            tracing::error!(instance = %name, error = %e, "can't remove the record of an unfinished incoming instance");
        }
        tracing::warn!(instance = %name, "dropped an incoming migration or restore that never finished");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_port_someone_listens_on_is_not_free() {
        let held = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(!super::port_is_free("127.0.0.1", port));
        drop(held);
        assert!(super::port_is_free("127.0.0.1", port));
        assert!(super::port_is_free("node.example", port));
    }
}
