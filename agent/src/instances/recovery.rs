//! After an agent restart: registering every recorded instance, then
//! finding the QEMUs that kept running and reconciling with them.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hypervisor::Runtime;
use hypervisor::lifecycle::{self, files};
use hypervisor::process::{self, PidFd};
use hypervisor::qmp::{QmpClient, QmpEvent};
use tokio::sync::broadcast;

use super::{Agent, Instance, Process, lock};
use crate::model::{InstanceRecord, RecordedState, State};

impl Agent {
    /// Loads every record and registers its instance, so that calls can
    /// name it at once, then starts reconciling in the background: finding
    /// the QEMUs that kept running while the agent was away, in parallel.
    /// An instance whose record says running is marked reconciling, and its
    /// operations wait, until its QEMU is adopted or found gone. Unfinished
    /// incoming instances and orphaned run directories are cleared before
    /// this returns. The returned task ends when all are done.
    pub async fn recover(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let began = std::time::Instant::now();
        let store = self.store.clone();
        let loaded = tokio::task::spawn_blocking(move || store.load_all::<InstanceRecord>()).await;
        let (records, errors) = match loaded {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "can't load instance records");
                return tokio::spawn(async {});
            }
        };
        let mut reasons = std::collections::HashMap::new();
        for e in errors {
            tracing::error!(error = %e, "instance record unusable");
            if let runtime_store::StoreError::Corrupt { name, reason, .. } = e {
                reasons.insert(name, reason);
            }
        }
        // Set aside now or by an agent before: either way, a QEMU of that
        // name that still runs must stay in sight.
        let recorded: HashSet<String> = records.iter().map(|r| r.name.clone()).collect();
        for name in self.store.quarantined_names() {
            if !recorded.contains(&name) {
                self.register_quarantined(&name, reasons.get(&name).map(String::as_str));
            }
        }
        // An unfinished incoming instance was never this node's. Its QEMU,
        // paused and waiting, goes before the agent answers, so that no
        // caller ever sees a second QEMU of a guest that runs elsewhere.
        let (incoming, records): (Vec<_>, Vec<_>) = records
            .into_iter()
            .partition(|r| r.value.state == RecordedState::Incoming);
        for rec in incoming {
            self.drop_unfinished_incoming(&rec.name, &rec.value).await;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for rec in records {
            if let Some(work) = self.register_recorded(rec.name, rec.value) {
                tasks.spawn(work);
            }
        }
        self.remove_orphaned_run_dirs(&recorded).await;
        let count = tasks.len();
        tokio::spawn(async move {
            while tasks.join_next().await.is_some() {}
            if count > 0 {
                tracing::info!(
                    instances = count,
                    elapsed_ms = began.elapsed().as_millis() as u64,
                    "reconciliation done"
                );
            }
        })
    }

    /// Removes run directories no instance has: an agent killed while it
    /// let go of one (after its record went, before its directory did)
    /// leaves one behind. One whose pidfile names a live QEMU of that name
    /// stays; that QEMU isn't the agent's to clean up after.
    async fn remove_orphaned_run_dirs(&self, recorded: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(self.cfg.state_dir.join("run")) else {
            return;
        };
        let orphans: Vec<(String, std::path::PathBuf)> = {
            let registry = self.registry();
            entries
                .flatten()
                .filter_map(|entry| Some((entry.file_name().into_string().ok()?, entry.path())))
                .filter(|(name, path)| {
                    !recorded.contains(name) && !registry.contains_key(name) && path.is_dir()
                })
                .filter(|(name, path)| {
                    !process::read_pidfile(&path.join(files::PIDFILE))
                        .is_some_and(|pid| process::runs_instance_named(pid, name))
                })
                .collect()
        };
        for (name, path) in orphans {
            tracing::info!(instance = %name, "removing a run directory no instance has");
            lifecycle::remove_run_files(&path).await;
            let _ = std::fs::remove_dir_all(&path);
        }
    }

    /// Registers a recorded instance; returns the recovery work it needs.
    fn register_recorded(
        self: &Arc<Self>,
        name: String,
        record: InstanceRecord,
    ) -> Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>> {
        let agent = self.clone();
        let (state, detail) = match record.state {
            RecordedState::Running => (State::Running, String::new()),
            other => (resting_state(other), record.detail.clone()),
        };
        let inst = Instance::new(
            &name,
            Some(record.clone()),
            state,
            detail,
            self.events.clone(),
        );
        let running = record.state == RecordedState::Running;
        lock(&inst.status).reconciling = running;
        // Taken before anyone can see the instance, so no call slips in
        // ahead of its reconciliation.
        let op = inst
            .ops
            .clone()
            .try_lock_owned()
            .expect("a new instance's lock is free");
        self.registry_mut().insert(name, inst.clone());
        Some(Box::pin(async move {
            if running {
                agent.reconcile(&inst, &record).await;
            } else {
                agent.finish_resting(&inst, &record).await;
            }
            lock(&inst.status).reconciling = false;
            drop(op);
        }))
    }

    /// Tidies up after an instance recorded as not running: a stop is
    /// recorded while QEMU is killed, so an agent that died in between
    /// leaves that QEMU, or its cgroups and chroot, behind.
    async fn finish_resting(&self, inst: &Instance, record: &InstanceRecord) {
        let run_dir = self.cfg.run_dir(&inst.name);
        if let Some(pid) =
            process::live_instance_pid(&run_dir.join(files::PIDFILE), record.runtime.uuid)
            && let Ok(pidfd) = PidFd::open(pid)
        {
            tracing::warn!(instance = %inst.name, pid, "finishing a stop the agent died in");
            if let Err(e) = lifecycle::stop(None, &pidfd, self.cfg.stop, true).await {
                tracing::error!(instance = %inst.name, pid, error = %e, "can't end a QEMU recorded as stopped");
                return;
            }
        }
        lifecycle::remove_run_files(&run_dir).await;
    }

    /// Finds a recorded-running instance's QEMU and adopts it, or records
    /// that it died while the agent was away. The caller holds the
    /// operation lock.
    async fn reconcile(self: &Arc<Self>, inst: &Arc<Instance>, record: &InstanceRecord) {
        let name = &inst.name;
        let run_dir = self.cfg.run_dir(name);
        let pidfile = run_dir.join(files::PIDFILE);
        let Some(pid) = process::live_instance_pid(&pidfile, record.runtime.uuid) else {
            self.record_gone_while_away(inst, record).await;
            return;
        };
        match self.adopt(pid, &run_dir, &record.runtime).await {
            Ok((process, events)) => {
                tracing::info!(instance = %name, pid, "adopted running instance");
                // A guest paused before the restart stays paused.
                let mut state = match hypervisor::migration::guest_running(&process.qmp).await {
                    Ok(false) => State::Paused,
                    _ => State::Running,
                };
                let mut detail = String::new();
                if let Some(outgoing) = &record.outgoing {
                    match self.settle_outgoing(inst, &process, outgoing).await {
                        Some(settled) => (state, detail) = settled,
                        None => return,
                    }
                }
                // An agent that died during a launch or a disk hot-add may
                // have left an image's fd in a set.
                hypervisor::migration::release_fdsets(&process.qmp).await;
                self.supervise(inst, process, events, state);
                if !detail.is_empty() {
                    inst.set_state(state, detail);
                }
                if let Err(e) = self.reconcile_devices(inst).await {
                    tracing::error!(instance = %name, error = %e, "can't compare the runtime's devices with QEMU's");
                }
                // A hot-add finished from the journal has a tap too.
                if let (Some(process), Some(record)) = inst.process_and_record() {
                    let taps = nic_taps(&process.qmp, process.pid, &record.runtime).await;
                    *lock(&process.taps) = taps;
                }
            }
            // It was on its way out: an agent killed just after it ended
            // QEMU, or a guest that shut down.
            Err(_) if exits_soon(pid).await => {
                self.record_gone_while_away(inst, record).await;
            }
            Err(e) => {
                let detail =
                    format!("QEMU (pid {pid}) runs but can't be reached: {e}; stop it by hand");
                tracing::error!(instance = %name, pid, error = %e, "can't adopt running instance");
                inst.set_state(State::Crashed, detail);
            }
        }
    }

    /// Records that a recorded-running instance's QEMU is gone; one that
    /// was migrating away may run on the target now, and is forgotten here
    /// if it does.
    async fn record_gone_while_away(&self, inst: &Instance, record: &InstanceRecord) {
        if let Some(outgoing) = &record.outgoing
            && self.settle_outgoing_without_qemu(inst, outgoing).await
        {
            return;
        }
        let detail = "QEMU exited while the agent was not running".to_owned();
        tracing::warn!(instance = %inst.name, "{detail}");
        lifecycle::remove_run_files(&self.cfg.run_dir(&inst.name)).await;
        inst.set_state(State::Crashed, detail.clone());
        if let Err(e) = self
            .persist_state(inst, RecordedState::Crashed, &detail)
            .await
        {
            tracing::error!(instance = %inst.name, error = %e, "can't record the crash");
        }
    }

    pub(super) async fn adopt(
        &self,
        pid: u32,
        run_dir: &Path,
        runtime: &Runtime,
    ) -> Result<(Arc<Process>, broadcast::Receiver<QmpEvent>), String> {
        let pidfd = PidFd::open(pid).map_err(|e| e.to_string())?;
        let qmp = QmpClient::connect(&run_dir.join(files::QMP), self.cfg.launch.qmp)
            .await
            .map_err(|e| e.to_string())?;
        let events = qmp.subscribe();
        let taps = nic_taps(&qmp, pid, runtime).await;
        let started_at = std::fs::metadata(run_dir.join(files::PIDFILE))
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| SystemTime::now());
        let mut process = Process::new(pid, Arc::new(pidfd), qmp, taps, None, started_at);
        process.unconfined = self.confinement_gaps(pid, runtime);
        let process = Arc::new(process);
        process.read_balloon().await;
        Ok((process, events))
    }

    /// Why the running QEMU `pid` lacks confinement its runtime gives it:
    /// one the agent adopted rather than started runs as its first manager
    /// started it until the agent launches it again.
    fn confinement_gaps(&self, pid: u32, runtime: &Runtime) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let in_own_cgroup = self.cfg.launch.cgroups.as_ref().map(|layout| {
            let dirs = layout.instance_dirs(&runtime.name);
            cgroups
                .lines()
                .filter_map(|line| line.splitn(3, ':').nth(2))
                .any(|path| {
                    let path = path.trim_start_matches('/');
                    !path.is_empty() && dirs.iter().any(|d| d.ends_with(path))
                })
        });
        confinement_gaps(&status, in_own_cgroup, runtime)
    }
}

/// The taps of a running QEMU in the runtime's NIC order, found through
/// the fd each netdev uses: fd order alone isn't NIC order once NICs were
/// hot-added into fd numbers freed before. Falls back to fd order when
/// QEMU won't say.
async fn nic_taps(qmp: &QmpClient, pid: u32, runtime: &Runtime) -> Vec<String> {
    let info = qmp
        .execute(
            "human-monitor-command",
            Some(serde_json::json!({ "command-line": "info network" })),
        )
        .await;
    let Some(fds) = info
        .ok()
        .and_then(|text| text.as_str().map(process::netdev_tap_fds))
    else {
        return process::tap_names(pid);
    };
    runtime
        .nics
        .iter()
        .map(|nic| {
            fds.get(&nic.netdev_id())
                .and_then(|&fd| process::tap_name_of_fd(pid, fd))
                .unwrap_or_default()
        })
        .collect()
}

/// What a QEMU with this `/proc/<pid>/status` lacks of the confinement
/// its runtime gives it, said for people; `None` when nothing. Pure.
/// `in_own_cgroup` is `None` on a node that gives instances no cgroups.
pub(super) fn confinement_gaps(
    status: &str,
    in_own_cgroup: Option<bool>,
    runtime: &Runtime,
) -> Option<String> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
    };
    let mut gaps = Vec::new();
    if let Some(user) = runtime.qemu_user
        && field("Uid:") != Some(user.uid)
    {
        gaps.push(format!(
            "runs as uid {} rather than {}",
            field("Uid:").map_or("?".into(), |u| u.to_string()),
            user.uid
        ));
    }
    // Seccomp mode 2 is a filter, which is what -sandbox installs.
    if runtime.sandbox && field("Seccomp:") != Some(2) {
        gaps.push("has no seccomp sandbox".to_owned());
    }
    if runtime.cgroup.is_some() && in_own_cgroup == Some(false) {
        gaps.push("is outside its cgroup".to_owned());
    }
    (!gaps.is_empty()).then(|| {
        format!(
            "QEMU {}; it is confined at its next soft reboot",
            gaps.join(", ")
        )
    })
}

/// What a recorded state means for an instance whose QEMU isn't running.
pub(super) fn resting_state(recorded: RecordedState) -> State {
    match recorded {
        RecordedState::Crashed => State::Crashed,
        RecordedState::Saved => State::Saved,
        RecordedState::Incoming => State::Incoming,
        RecordedState::Running | RecordedState::Stopped | RecordedState::StoppedByGuest => {
            State::Stopped
        }
    }
}

/// True if the process `pid` is gone, or goes within a second: QEMU
/// refuses QMP connections while it exits.
async fn exits_soon(pid: u32) -> bool {
    match PidFd::open(pid) {
        Ok(pidfd) => tokio::time::timeout(Duration::from_secs(1), pidfd.exited())
            .await
            .is_ok(),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use hypervisor::cgroup::CgroupLimits;
    use hypervisor::identity::QemuUser;

    use super::*;
    use crate::ganeti::command_line::tests::{ganeti, ganeti_cmdline, live};

    fn confined_runtime() -> Runtime {
        let mut rt =
            crate::ganeti::translate("web1", &ganeti(), &ganeti_cmdline(), &live()).unwrap();
        rt.sandbox = true;
        rt.qemu_user = Some(QemuUser {
            uid: 70001,
            gid: 70001,
        });
        rt.cgroup = Some(CgroupLimits::for_guest(rt.memory_mib, 100));
        rt
    }

    #[test]
    fn a_qemu_started_by_another_manager_is_said_to_lack_each_part() {
        let ganetis = "Name:\tqemu\nUid:\t0\t0\t0\t0\nSeccomp:\t0\n";
        let gaps = confinement_gaps(ganetis, Some(false), &confined_runtime()).unwrap();
        assert!(gaps.contains("runs as uid 0 rather than 70001"), "{gaps}");
        assert!(gaps.contains("no seccomp sandbox"), "{gaps}");
        assert!(gaps.contains("outside its cgroup"), "{gaps}");
        assert!(gaps.contains("next soft reboot"), "{gaps}");
    }

    #[test]
    fn a_qemu_the_agent_started_lacks_nothing() {
        let own = "Uid:\t70001\t70001\t70001\t70001\nSeccomp:\t2\n";
        assert_eq!(confinement_gaps(own, Some(true), &confined_runtime()), None);
        // A node that gives no cgroups can't be said to miss one.
        assert_eq!(confinement_gaps(own, None, &confined_runtime()), None);
    }
}
