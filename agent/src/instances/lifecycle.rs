//! Start, stop and reboot: generating a runtime from a spec and
//! replaying it, and ending QEMU by escalating from ACPI to a kill.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use hypervisor::identity::QemuUser;
use hypervisor::lifecycle::{self, LaunchMode, StopMethod, StopTimeouts, files};
use hypervisor::probe;
use hypervisor::process;
use hypervisor::runtime::{self, HostFacts};
use hypervisor::{InstanceSpec, Runtime};
use tokio::sync::OwnedMutexGuard;
use tracing::{Instrument, debug_span};
use uuid::Uuid;

use super::{Agent, Instance, Process, lock};
use crate::config::Confinement;
use crate::error::AgentError;
use crate::events::EventKind;
use crate::model::{InstanceRecord, InstanceView, RebootMode, RebootStop, RecordedState, State};

impl Agent {
    /// Gives the spec's missing uuids: the instance's and its devices' from
    /// the previous runtime when it has them (so ids stay stable), fresh
    /// ones otherwise.
    fn fill_identity(spec: &mut InstanceSpec, previous: Option<&Runtime>) {
        if spec.uuid.is_nil() {
            spec.uuid = previous.map_or_else(Uuid::new_v4, |r| r.uuid);
        }
        for disk in &mut spec.disks {
            if disk.uuid.is_nil() {
                disk.uuid = previous
                    .and_then(|r| r.disks.iter().find(|d| d.spec.name == disk.name))
                    .map_or_else(Uuid::new_v4, |d| d.spec.uuid);
            }
        }
        for nic in &mut spec.nics {
            if nic.uuid.is_nil() {
                nic.uuid = previous
                    .and_then(|r| r.nics.iter().find(|n| n.spec.name == nic.name))
                    .map_or_else(Uuid::new_v4, |n| n.spec.uuid);
            }
        }
    }

    /// The user a confined QEMU of instance `name` runs as: its
    /// `previous` one where it is free, else the pool's lowest free uid.
    /// `None` when QEMUs aren't confined.
    pub(crate) fn pick_qemu_user(
        &self,
        name: &str,
        uuid: Uuid,
        previous: Option<QemuUser>,
    ) -> Result<Option<QemuUser>, AgentError> {
        if self.cfg.confinement != Confinement::Strict {
            return Ok(None);
        }
        let users = &self.cfg.qemu_users;
        let mut taken = self.exclusive_uids_in_use(name);
        if let Some(pool) = &users.pool {
            // Another agent's QEMUs, or anything else running as a pool
            // uid, would share it with this instance; the instance's own
            // QEMU (a hard reboot's, a migration's source on this host)
            // would not.
            let others: Vec<u32> = hypervisor::identity::processes_by_uid()
                .into_iter()
                .filter(|(uid, pids)| {
                    pool.contains(uid)
                        && !taken.contains(uid)
                        && pids.iter().any(|&pid| !process::runs_instance(pid, uuid))
                })
                .map(|(uid, _)| uid)
                .collect();
            taken.extend(others);
        }
        let picked = users.pick(previous, &taken).ok_or_else(|| {
            let pool = users.pool.clone().unwrap_or(0..=0);
            AgentError::QemuUsersExhausted {
                instance: name.to_owned(),
                first: *pool.start(),
                last: *pool.end(),
            }
        })?;
        Ok(Some(picked))
    }

    /// Generates a runtime for a validated spec (probing QEMU if needed).
    /// A confined instance keeps the QEMU user of its `previous` runtime
    /// where it can.
    async fn generate(
        &self,
        spec: &InstanceSpec,
        generation: u64,
        previous: Option<&Runtime>,
    ) -> Result<Runtime, AgentError> {
        let qemu = self.qemu_info().await?;
        let kvm = probe::kvm_usable();
        let run_dir = self.cfg.run_dir(&spec.name);
        let confine = self.cfg.confinement == Confinement::Strict;
        let qemu_user =
            self.pick_qemu_user(&spec.name, spec.uuid, previous.and_then(|r| r.qemu_user))?;
        let host = HostFacts {
            qemu: &qemu,
            kvm: kvm.as_ref().map(|_| ()).map_err(String::as_str),
            run_dir: &run_dir,
            vhost_net: hypervisor::tap::vhost_net_available(),
            cpus: hypervisor::pinning::host_cpu_count(),
            confine,
            qemu_user,
            allowed_extra_options: &self.cfg.allowed_extra_options,
        };
        Ok(runtime::generate(spec, host, generation)?)
    }

    /// The instances other than `except` whose QEMU runs, or is about to,
    /// as the uid each holds alone, by uid.
    fn exclusive_uids_held(&self, except: &str) -> BTreeMap<u32, String> {
        self.registry()
            .values()
            .filter(|inst| inst.name != except)
            .filter_map(|inst| {
                let st = lock(&inst.status);
                let holds = !matches!(st.state, State::Stopped | State::Crashed | State::Saved);
                let user = st.record.as_ref()?.runtime.qemu_user?;
                (holds && self.cfg.qemu_users.exclusive(user.uid))
                    .then(|| (user.uid, inst.name.clone()))
            })
            .collect()
    }

    fn exclusive_uids_in_use(&self, except: &str) -> HashSet<u32> {
        self.exclusive_uids_held(except).into_keys().collect()
    }

    /// Checks the host files a spec points QEMU at: inside the allowed
    /// roots, the disk images present, and each of a kind QEMU can use (a
    /// FIFO would hold the launch that opens it). Only a first check, for
    /// a clear error: the launch opens each file beneath its root.
    pub(crate) fn check_host_files(&self, spec: &InstanceSpec) -> Result<(), AgentError> {
        use std::os::unix::fs::FileTypeExt;
        for (what, path) in spec.host_paths() {
            self.cfg.allowed_roots.check(&what, path)?;
        }
        for disk in &spec.disks {
            let Ok(meta) = std::fs::metadata(&disk.path) else {
                return Err(AgentError::DiskMissing {
                    instance: spec.name.clone(),
                    disk: disk.name.clone(),
                    path: disk.path.display().to_string(),
                });
            };
            let kind = meta.file_type();
            let sg = disk.bus == hypervisor::spec::DiskBus::ScsiGeneric && kind.is_char_device();
            if !(meta.is_file() || kind.is_block_device() || sg) {
                return Err(AgentError::DiskUnusable {
                    instance: spec.name.clone(),
                    disk: disk.name.clone(),
                    path: disk.path.display().to_string(),
                    reason: "not a regular file or block device".into(),
                });
            }
        }
        if let hypervisor::spec::Boot::Kernel { kernel, initrd, .. } = &spec.boot {
            for (what, path) in
                std::iter::once(("kernel", kernel)).chain(initrd.iter().map(|i| ("initrd", i)))
            {
                match std::fs::metadata(path) {
                    Ok(meta) if meta.is_file() => {}
                    Ok(_) => {
                        return Err(AgentError::BadRequest(format!(
                            "{what} {} is not a regular file",
                            path.display()
                        )));
                    }
                    Err(e) => {
                        return Err(AgentError::BadRequest(format!(
                            "{what} {}: {e}",
                            path.display()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts an instance from a spec, its guest running or, with
    /// [`LaunchMode::BootPaused`], stopped before its first instruction.
    pub async fn start(
        self: &Arc<Self>,
        mut spec: InstanceSpec,
        mode: LaunchMode,
    ) -> Result<InstanceView, AgentError> {
        // Validate the name before it is used as a registry key or a path.
        if !hypervisor::spec::is_safe_identifier(&spec.name, hypervisor::spec::MAX_INSTANCE_NAME) {
            return Err(hypervisor::spec::SpecError::InstanceName(spec.name).into());
        }
        let (inst, fresh) = {
            let mut registry = self.registry_mut();
            match registry.get(&spec.name) {
                Some(i) => (i.clone(), false),
                None => {
                    let i = Instance::new(
                        &spec.name,
                        None,
                        State::Stopped,
                        String::new(),
                        self.events.clone(),
                    );
                    registry.insert(spec.name.clone(), i.clone());
                    (i, true)
                }
            }
        };
        let op = inst.lock_ops().await;
        let result = match &op {
            Ok(_) => self.start_locked(&inst, &mut spec, mode).await,
            Err(_) => Err(AgentError::CallerGone),
        };
        if result.is_err() && fresh {
            self.forget_if_unrecorded(&inst);
        }
        result?;
        Ok(inst.view())
    }

    /// Drops a registry entry that never got a record, after the operation
    /// that made it failed.
    pub(crate) fn forget_if_unrecorded(&self, inst: &Instance) {
        if lock(&inst.status).record.is_none() {
            self.registry_mut().remove(&inst.name);
        }
    }

    async fn start_locked(
        self: &Arc<Self>,
        inst: &Arc<Instance>,
        spec: &mut InstanceSpec,
        mode: LaunchMode,
    ) -> Result<(), AgentError> {
        let previous = lock(&inst.status).record.clone();
        debug_span!("step", step = "checks")
            .in_scope(|| self.check_start(inst, spec, previous.as_ref()))?;
        let run_dir = self.cfg.run_dir(&spec.name);
        let generation = previous.as_ref().map_or(0, |r| r.runtime.generation) + 1;
        let picking = self.qemu_user_pick.lock().await;
        let runtime = self
            .generate(spec, generation, previous.as_ref().map(|r| &*r.runtime))
            .instrument(debug_span!("step", step = "runtime"))
            .await?;
        if let Some(prev) = &previous
            && prev.runtime.uuid != runtime.uuid
        {
            tracing::warn!(instance = %inst.name, old = %prev.runtime.uuid, new = %runtime.uuid, "replacing a stopped instance's record with a new uuid");
        }

        let record = InstanceRecord {
            runtime: Arc::new(runtime),
            state: RecordedState::Running,
            detail: String::new(),
            outgoing: None,
        };
        self.save_record(&inst.name, &record)
            .instrument(debug_span!("step", step = "record"))
            .await?;
        lock(&inst.status).record = Some(record.clone());
        inst.set_state(State::Starting, "");
        drop(picking);

        let launched = self
            .launch(inst, &record.runtime, mode)
            .instrument(debug_span!("step", step = "launch"))
            .await;
        if let Err(e) = launched {
            // Leave things as they were before the call.
            match previous {
                Some(prev) => {
                    self.save_record(&inst.name, &prev).await?;
                    lock(&inst.status).record = Some(prev);
                    inst.set_state(State::Stopped, e.to_string());
                }
                None => {
                    self.remove_record(&inst.name).await?;
                    lock(&inst.status).record = None;
                    let _ = std::fs::remove_dir_all(&run_dir);
                }
            }
            return Err(e);
        }
        tracing::info!(instance = %inst.name, generation = record.runtime.generation, "instance started");
        Ok(())
    }

    /// Fills in the spec's identity from the `previous` record and checks
    /// that it can start: valid, no QEMU of its own or of its name
    /// running, host files allowed.
    fn check_start(
        &self,
        inst: &Instance,
        spec: &mut InstanceSpec,
        previous: Option<&InstanceRecord>,
    ) -> Result<(), AgentError> {
        Self::fill_identity(spec, previous.map(|r| &*r.runtime));
        spec.validate()?;
        if let Some(p) = inst.process() {
            return Err(AgentError::AlreadyRunning {
                name: inst.name.clone(),
                pid: p.pid,
            });
        }
        let pidfile = self.cfg.run_dir(&spec.name).join(files::PIDFILE);
        if let Some(pid) = process::live_instance_pid(&pidfile, spec.uuid) {
            return Err(AgentError::AlreadyRunning {
                name: inst.name.clone(),
                pid,
            });
        }
        // A QEMU of that name under another uuid: one whose record was
        // set aside, say. Its disks may be these.
        if let Some(pid) = self.live_qemu_by_name(&spec.name) {
            return Err(AgentError::Quarantined {
                name: inst.name.clone(),
                pid,
            });
        }
        self.check_host_files(spec)
    }

    /// Launches QEMU for a runtime and starts supervising it.
    pub(super) async fn launch(
        self: &Arc<Self>,
        inst: &Arc<Instance>,
        runtime: &Runtime,
        mode: LaunchMode,
    ) -> Result<Arc<Process>, AgentError> {
        if let Some(user) = runtime.qemu_user
            && let Some(holder) = self.exclusive_uids_held(&inst.name).remove(&user.uid)
        {
            return Err(AgentError::QemuUserTaken {
                instance: inst.name.clone(),
                uid: user.uid,
                holder,
            });
        }
        let run_dir = self.cfg.run_dir(&inst.name);
        let mut launch = self.cfg.launch.clone();
        launch.allowed_roots = self.cfg.allowed_roots.clone();
        let qemu = self.qemu_info().await?;
        let launched = lifecycle::launch(runtime, &qemu, &run_dir, &launch, mode)
            .await
            .map_err(|source| AgentError::Launch {
                instance: inst.name.clone(),
                source,
            })?;
        let events = launched.qmp.subscribe();
        let process = Arc::new(Process::new(
            launched.pid,
            launched.pidfd,
            launched.qmp,
            launched.taps,
            Some(launched.child),
            SystemTime::now(),
        ));
        // A booting guest starts with all its memory; an incoming one has
        // what its source had, read once its state is here.
        if mode != LaunchMode::Incoming && runtime.balloon_slot.is_some() {
            process.set_balloon_mib(runtime.memory_mib);
        }
        let state = match mode {
            LaunchMode::Boot => State::Running,
            LaunchMode::BootPaused => State::Paused,
            LaunchMode::Incoming => State::Incoming,
        };
        self.supervise(inst, process.clone(), events, state);
        super::slots::learn_pci_slots_soon(&process);
        Self::give_display_password(inst, &process, runtime).await;
        Ok(process)
    }

    /// The agent's stop timeouts, with the caller's powerdown timeout.
    fn stop_timeouts(&self, powerdown: Option<Duration>) -> StopTimeouts {
        let mut timeouts = self.cfg.stop;
        if let Some(t) = powerdown {
            timeouts.powerdown = t;
        }
        timeouts
    }

    /// Stops QEMU if it runs. The caller holds the operation lock, and
    /// removes QEMU's run files (sockets, pidfile, chroot, cgroups) or
    /// leaves them to the next launch, which removes leftovers first.
    async fn stop_locked(
        &self,
        inst: &Instance,
        force: bool,
        timeouts: StopTimeouts,
    ) -> Result<Option<StopMethod>, AgentError> {
        let Some(process) = inst.process() else {
            return Ok(None);
        };
        // A paused guest can't answer a powerdown request.
        let paused = matches!(lock(&inst.status).state, State::Paused | State::Incoming);
        process.stop_requested.store(true, Ordering::SeqCst);
        inst.set_state(State::Stopping, "");
        let graceful = async {
            if paused && !force {
                lifecycle::quit(Some(&process.qmp), &process.pidfd, timeouts).await
            } else {
                lifecycle::stop(Some(&process.qmp), &process.pidfd, timeouts, force).await
            }
        };
        let mut forced_stops = inst.forced_stops.subscribe();
        let result = tokio::select! {
            result = graceful.instrument(debug_span!("step", step = "QEMU")) => result,
            // A forced stop waiting behind this one: kill now, rather
            // than make it wait out the guest.
            _ = async { drop(forced_stops.wait_for(|waiting| *waiting > 0).await) }, if !force => {
                tracing::info!(instance = %inst.name, "a forced stop preempts the graceful one");
                lifecycle::stop(None, &process.pidfd, timeouts, true).await
            }
        };
        let method = match result {
            Ok(m) => m,
            Err(source) => {
                process.stop_requested.store(false, Ordering::SeqCst);
                inst.set_state(State::Running, source.to_string());
                return Err(AgentError::Stop {
                    instance: inst.name.clone(),
                    source,
                });
            }
        };
        debug_span!("step", step = "reap").in_scope(|| process.reap());
        {
            let mut st = lock(&inst.status);
            st.process = None;
            st.state = State::Stopped;
            st.detail = format!("stopped by {}", stop_method_text(method));
        }
        inst.announce_state(
            State::Stopped,
            format!("stopped by {}", stop_method_text(method)),
            false,
        );
        tracing::info!(instance = %inst.name, method = stop_method_text(method), "instance stopped");
        Ok(Some(method))
    }

    /// Stops an instance. Returns `None` as the method when it wasn't running.
    pub async fn stop(
        &self,
        name: &str,
        force: bool,
        powerdown_timeout: Option<Duration>,
    ) -> Result<(InstanceView, Option<StopMethod>), AgentError> {
        let inst = self.instance(name)?;
        let op = if force {
            inst.forced_stops.send_modify(|waiting| *waiting += 1);
            let locked = inst.lock_ops_owned().await;
            inst.forced_stops.send_modify(|waiting| *waiting -= 1);
            locked?
        } else {
            inst.lock_ops_owned().await?
        };
        if lock(&inst.status).state == State::Quarantined {
            let method = self.stop_quarantined(&inst).await?;
            return Ok((inst.view(), method));
        }
        if inst.is_incoming() {
            // Nothing of the guest ran here yet; stopping means dropping it.
            self.abort_incoming(&inst).await;
            return Ok((inst.view(), Some(StopMethod::Kill)));
        }
        let timeouts = self.stop_timeouts(powerdown_timeout);
        if force && inst.process().is_some() {
            // A forced stop can only end one way, so the record can say so
            // while QEMU is being killed rather than after.
            let detail = format!("stopped by {}", stop_method_text(StopMethod::Kill));
            let (stopped, persisted) = tokio::join!(
                self.stop_locked(&inst, true, timeouts),
                self.persist_state(&inst, RecordedState::Stopped, &detail)
                    .instrument(debug_span!("step", step = "record"))
            );
            return match stopped {
                Ok(method) => {
                    self.remove_run_files_after_reply(&inst, op);
                    persisted?;
                    Ok((inst.view(), method))
                }
                Err(e) => {
                    // QEMU survived SIGKILL; the record must not say otherwise.
                    if let Err(undo) = self.persist_state(&inst, RecordedState::Running, "").await {
                        tracing::error!(instance = %name, error = %undo, "can't restore the record after a failed stop");
                    }
                    Err(e)
                }
            };
        }
        let method = self.stop_locked(&inst, force, timeouts).await?;
        if let Some(method) = method {
            let persisted = self
                .persist_state(
                    &inst,
                    RecordedState::Stopped,
                    &format!("stopped by {}", stop_method_text(method)),
                )
                .instrument(debug_span!("step", step = "record"))
                .await;
            self.remove_run_files_after_reply(&inst, op);
            persisted?;
        }
        Ok((inst.view(), method))
    }

    /// Removes a stopped QEMU's run files once the stop has replied: the
    /// caller's answer waits only for QEMU's end and the record. `op`, the
    /// instance's operation lock, is held until they are gone, so that the
    /// instance's next operation (a start, a delete) begins after them.
    fn remove_run_files_after_reply(&self, inst: &Instance, op: OwnedMutexGuard<()>) {
        let run_dir = self.cfg.run_dir(&inst.name);
        let removal = async move {
            lifecycle::remove_run_files(&run_dir).await;
            drop(op);
        };
        tokio::spawn(removal.instrument(debug_span!("step", step = "run files")));
    }

    /// Reboots an instance.
    pub async fn reboot(
        self: &Arc<Self>,
        name: &str,
        mode: RebootMode,
        stop: RebootStop,
    ) -> Result<InstanceView, AgentError> {
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        let timeouts = self.stop_timeouts(stop.powerdown_timeout);
        let Some(process) = inst.process() else {
            return Err(AgentError::NotRunning(name.to_owned()));
        };
        match mode {
            RebootMode::Reset => {
                lifecycle::reset(&process.qmp, self.cfg.reset_timeout)
                    .await
                    .map_err(|source| AgentError::Qmp {
                        instance: name.to_owned(),
                        source,
                    })?;
                tracing::info!(instance = %name, "instance reset");
                inst.announce(EventKind::Rebooted {
                    how: "reset",
                    guest_initiated: false,
                });
            }
            RebootMode::Soft => {
                // Replay what is on disk: the runtime is the source of truth,
                // so spec changes since the start stay out until a hard reboot.
                let (record, _) = self.record(name).await?;
                record.runtime.validate()?;
                // Before the guest goes: an image that now leads outside
                // the allowed roots must not cost it its run.
                self.check_host_files(&record.runtime.to_spec())?;
                self.stop_locked(&inst, stop.force, timeouts).await?;
                self.relaunch(&inst, record).await?;
                tracing::info!(instance = %name, "instance soft-rebooted");
                inst.announce(EventKind::Rebooted {
                    how: "soft",
                    guest_initiated: false,
                });
            }
            RebootMode::Hard(spec) => {
                let mut spec = *spec;
                if spec.name != name {
                    return Err(AgentError::BadRequest(format!(
                        "hard reboot of {name:?} was given a spec for {:?}",
                        spec.name
                    )));
                }
                let previous = lock(&inst.status).record.clone();
                let previous_runtime = previous.as_ref().map(|r| &*r.runtime);
                Self::fill_identity(&mut spec, previous_runtime);
                spec.validate()?;
                self.check_host_files(&spec)?;
                let generation = previous_runtime.map_or(0, |r| r.generation) + 1;
                // Generate before stopping: a spec that can't run must not
                // cost the running instance.
                let runtime = self.generate(&spec, generation, previous_runtime).await?;
                self.stop_locked(&inst, stop.force, timeouts).await?;
                let record = InstanceRecord {
                    runtime: Arc::new(runtime),
                    state: RecordedState::Running,
                    detail: String::new(),
                    outgoing: None,
                };
                self.save_record(name, &record).await?;
                lock(&inst.status).record = Some(record.clone());
                self.relaunch(&inst, record).await?;
                tracing::info!(instance = %name, generation, "instance hard-rebooted");
                inst.announce(EventKind::Rebooted {
                    how: "hard",
                    guest_initiated: false,
                });
            }
        }
        Ok(inst.view())
    }

    /// Launches a stopped instance's QEMU again from `record`, which is
    /// the record on disk. The launch removes the run files the stopped
    /// QEMU left.
    async fn relaunch(
        self: &Arc<Self>,
        inst: &Arc<Instance>,
        record: InstanceRecord,
    ) -> Result<(), AgentError> {
        inst.set_state(State::Starting, "");
        match self.launch(inst, &record.runtime, LaunchMode::Boot).await {
            Ok(_) => {
                // A reboot leaves a running instance's record as it was:
                // then there is nothing to write.
                let unchanged = record.state == RecordedState::Running && record.detail.is_empty();
                lock(&inst.status).record = Some(record);
                match unchanged {
                    true => Ok(()),
                    false => self.persist_state(inst, RecordedState::Running, "").await,
                }
            }
            Err(e) => {
                // A launch refused before it began leaves the stopped
                // QEMU's run files.
                lifecycle::remove_run_files(&self.cfg.run_dir(&inst.name)).await;
                let detail = format!("restart failed: {e}");
                inst.set_state(State::Crashed, detail.clone());
                lock(&inst.status).record = Some(record);
                self.persist_state(inst, RecordedState::Crashed, &detail)
                    .await?;
                Err(e)
            }
        }
    }
}

/// How a stop method is shown to people.
pub fn stop_method_text(method: StopMethod) -> &'static str {
    match method {
        StopMethod::Powerdown => "guest powerdown",
        StopMethod::Quit => "QMP quit",
        StopMethod::Kill => "SIGKILL",
    }
}
