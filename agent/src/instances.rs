//! Instances and their operations: start, stop, reboot, supervision and
//! recovery after an agent restart.
//!
//! Each instance has an operation lock that serializes start, stop and
//! reboot, and a status that readers copy without waiting behind an
//! operation (the lock on it is never held across an await).

use crate::config::Confinement;
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use hypervisor::identity::QemuUser;
use hypervisor::lifecycle::{self, LaunchMode, StopMethod, StopTimeouts, files};
use hypervisor::probe::{self, QemuInfo};
use hypervisor::process::{self, PidFd};
use hypervisor::qmp::{QmpClient, QmpEvent};
use hypervisor::runtime::{self, HostFacts};
use hypervisor::{InstanceSpec, Runtime};
use runtime_store::{IntentJournal, RecordStore, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::events::{EventBus, EventKind, Watch, WatchError};

mod memory;
mod migration;
mod quarantine;
mod saves;

pub use memory::MemoryReport;

pub use crate::model::{MigrationReport, ReportPhase, State};
pub use migration::MigrateOptions;
pub use saves::SaveOutcome;

/// What the record says about an instance, beside its runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedState {
    /// Should be running.
    Running,
    /// Stopped on request.
    Stopped,
    /// The guest powered itself off.
    StoppedByGuest,
    /// QEMU exited unasked.
    Crashed,
    /// Saved to a file (the detail says where); QEMU is gone.
    Saved,
    /// A QEMU waits for the instance's state from a migration or a
    /// restore. Until that is finalized the instance isn't this node's, so
    /// a restarted agent kills such a QEMU and drops the record.
    Incoming,
}

/// The durable record of an instance: its runtime and how it last ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The runtime to replay.
    pub runtime: Runtime,
    /// Last known state.
    pub state: RecordedState,
    /// Why it is in that state.
    #[serde(default)]
    pub detail: String,
    /// A migration away from this node under way: set before the target
    /// is asked to take the instance, cleared once the migration ends
    /// either way, so an agent that restarts in between knows to settle
    /// it with the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outgoing: Option<OutgoingMigration>,
}

/// A migration a source started, as its record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingMigration {
    /// The target agent, as the caller named it.
    pub target: String,
    /// Whether the guest ran before the migration, to resume it if it
    /// stays here.
    pub was_running: bool,
}

/// A read-only copy of an instance's status.
#[derive(Debug, Clone)]
pub struct InstanceView {
    /// Name.
    pub name: String,
    /// State.
    pub state: State,
    /// Why it is in that state.
    pub detail: String,
    /// QEMU's pid while running.
    pub pid: Option<u32>,
    /// Time since QEMU started.
    pub uptime: Option<Duration>,
    /// The runtime in the record.
    pub runtime: Option<Runtime>,
    /// Host tap names by NIC order, while running.
    pub taps: Vec<String>,
    /// Set after an agent restart until the instance's QEMU has been found
    /// and its devices compared; operations on it wait until then.
    pub reconciling: bool,
}

/// A running QEMU that the agent supervises.
#[derive(Debug)]
pub(crate) struct Process {
    pid: u32,
    pidfd: Arc<PidFd>,
    qmp: QmpClient,
    /// Host taps in the runtime's NIC order.
    taps: Mutex<Vec<String>>,
    /// Present when the agent itself spawned QEMU, for reaping.
    child: Mutex<Option<Child>>,
    /// Set before the agent stops QEMU, so its exit isn't taken for a crash.
    stop_requested: AtomicBool,
    started_at: SystemTime,
}

impl Process {
    /// The QMP connection.
    pub(crate) fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// Records the tap of a hot-added NIC (the last one).
    pub(crate) fn push_tap(&self, tap: String) {
        lock(&self.taps).push(tap);
    }

    /// Forgets the tap of a removed NIC.
    pub(crate) fn remove_tap(&self, index: usize) -> String {
        let mut taps = lock(&self.taps);
        if index < taps.len() {
            taps.remove(index)
        } else {
            String::new()
        }
    }

    fn reap(&self) -> Option<String> {
        let mut child = lock(&self.child).take()?;
        Some(
            child
                .wait()
                .map_or_else(|e| e.to_string(), |s| s.to_string()),
        )
    }
}

#[derive(Debug)]
struct Status {
    state: State,
    detail: String,
    record: Option<InstanceRecord>,
    process: Option<Arc<Process>>,
    /// Set while the instance is migrating away; notified to cancel.
    outgoing: Option<Arc<tokio::sync::Notify>>,
    /// Set while a migration into this node waits to be finalized.
    incoming: Option<migration::Incoming>,
    /// Set while recovery after an agent restart works on the instance.
    reconciling: bool,
    /// The pid of a QEMU that runs without a readable record.
    quarantined_pid: Option<u32>,
}

/// One instance: an operation lock and a status.
#[derive(Debug)]
pub struct Instance {
    name: String,
    /// Shared so recovery can hold it from registration until done.
    ops: Arc<tokio::sync::Mutex<()>>,
    /// How many forced stops wait for `ops`. A graceful stop that holds
    /// it gives way to them, the way `virsh destroy` ends a `shutdown`.
    forced_stops: tokio::sync::watch::Sender<u32>,
    status: Mutex<Status>,
    events: Arc<EventBus>,
}

tokio::task_local! {
    /// Present while an operation runs for a caller; closed once the
    /// caller is gone.
    static CALLER: tokio::sync::watch::Receiver<()>;
}

/// Runs `work` as the operation of a caller who keeps the sender of
/// `presence` for as long as it waits.
pub(crate) fn for_caller<F: Future>(
    presence: tokio::sync::watch::Receiver<()>,
    work: F,
) -> impl Future<Output = F::Output> {
    CALLER.scope(presence, work)
}

/// Resolves when the caller of the current operation is gone; never for
/// work nobody called for (supervision, recovery).
async fn caller_gone() {
    match CALLER.try_with(Clone::clone) {
        Ok(mut presence) => while presence.changed().await.is_ok() {},
        Err(_) => std::future::pending().await,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Instance {
    fn new(
        name: &str,
        record: Option<InstanceRecord>,
        state: State,
        detail: String,
        events: Arc<EventBus>,
    ) -> Arc<Self> {
        Arc::new(Instance {
            name: name.to_owned(),
            events,
            ops: Arc::new(tokio::sync::Mutex::new(())),
            forced_stops: tokio::sync::watch::Sender::new(0),
            status: Mutex::new(Status {
                state,
                detail,
                record,
                process: None,
                outgoing: None,
                incoming: None,
                reconciling: false,
                quarantined_pid: None,
            }),
        })
    }

    pub(crate) fn view(&self) -> InstanceView {
        let st = lock(&self.status);
        InstanceView {
            name: self.name.clone(),
            state: st.state,
            detail: st.detail.clone(),
            pid: st.process.as_ref().map(|p| p.pid).or(st.quarantined_pid),
            uptime: st
                .process
                .as_ref()
                .and_then(|p| p.started_at.elapsed().ok()),
            runtime: st.record.as_ref().map(|r| r.runtime.clone()),
            taps: st
                .process
                .as_ref()
                .map(|p| lock(&p.taps).clone())
                .unwrap_or_default(),
            reconciling: st.reconciling,
        }
    }

    fn process(&self) -> Option<Arc<Process>> {
        lock(&self.status).process.clone()
    }

    /// The instance name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Takes the operation lock, unless the caller of the operation goes
    /// away first: an operation that hasn't begun when its caller's
    /// deadline passes is dropped, while one that has begun runs to its
    /// end.
    pub(crate) async fn lock_ops(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, AgentError> {
        tokio::select! {
            biased;
            guard = self.ops.lock() => Ok(guard),
            () = caller_gone() => Err(AgentError::CallerGone),
        }
    }

    /// The running process (if any) and the record, copied together.
    pub(crate) fn process_and_record(&self) -> (Option<Arc<Process>>, Option<InstanceRecord>) {
        let st = lock(&self.status);
        (st.process.clone(), st.record.clone())
    }

    fn set_state(&self, state: State, detail: impl Into<String>) {
        let detail = detail.into();
        {
            let mut st = lock(&self.status);
            st.state = state;
            st.detail = detail.clone();
        }
        self.announce_state(state, detail, false);
    }

    /// Publishes a state change. Called after the status lock is released.
    fn announce_state(&self, state: State, detail: String, guest_initiated: bool) {
        self.events.publish(
            &self.name,
            EventKind::State {
                state,
                detail,
                guest_initiated,
            },
        );
    }

    /// Whether the record says a migration or restore into this node is
    /// unfinished.
    fn is_incoming(&self) -> bool {
        lock(&self.status)
            .record
            .as_ref()
            .is_some_and(|r| r.state == RecordedState::Incoming)
    }

    /// Publishes any other event about this instance.
    pub(crate) fn announce(&self, kind: EventKind) {
        self.events.publish(&self.name, kind);
    }
}

/// How a reboot is done.
#[derive(Debug, Clone)]
pub enum RebootMode {
    /// Stop, then replay the saved runtime.
    Soft,
    /// Stop, then start from a runtime generated from this spec.
    Hard(Box<InstanceSpec>),
    /// `system_reset` in the same QEMU.
    Reset,
}

/// Identifies one build of the QEMU binary, so the probe cache notices an
/// upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BinaryStamp {
    path: PathBuf,
    inode: u64,
    size: u64,
    mtime: i64,
}

fn stamp(path: &Path) -> Option<BinaryStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(BinaryStamp {
        path: path.to_owned(),
        inode: m.ino(),
        size: m.size(),
        mtime: m.mtime(),
    })
}

/// Facts about the node.
#[derive(Debug)]
pub struct NodeFacts {
    /// Host name.
    pub hostname: String,
    /// QEMU binary as configured.
    pub qemu_binary: PathBuf,
    /// Probe result.
    pub qemu: Result<Arc<QemuInfo>, String>,
    /// KVM usability.
    pub kvm: Result<(), String>,
    /// MemTotal in MiB.
    pub memory_total_mib: u64,
    /// MemAvailable in MiB.
    pub memory_available_mib: u64,
    /// Online CPUs.
    pub cpus: u32,
    /// Instances with a record.
    pub instance_count: u32,
}

/// The agent: configuration, records and the instances.
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    store: Arc<RecordStore>,
    journal: Arc<IntentJournal>,
    events: Arc<EventBus>,
    qemu_cache: tokio::sync::Mutex<Option<(BinaryStamp, Arc<QemuInfo>)>>,
    instances: RwLock<BTreeMap<String, Arc<Instance>>>,
    /// Ports of incoming migrations that aren't finished yet.
    incoming_ports: Mutex<std::collections::BTreeSet<u16>>,
    /// Held from picking a pool uid for a start until the instance is
    /// Starting, so two starts don't pick the same one.
    qemu_user_pick: tokio::sync::Mutex<()>,
}

/// Creates the state directory, or tightens an existing one, to 0700:
/// records, sockets and QEMU's monitors inside are the node's keys.
fn private_dir(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io_error = |op: &'static str| {
        move |source| {
            AgentError::Store(StoreError::Io {
                op,
                path: dir.to_owned(),
                source,
            })
        }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("create directory"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error("set the mode of"))
}

/// Says who QEMU will run as, and warns when that user can't open
/// /dev/kvm although the agent can, since guests that need KVM would then
/// be refused.
fn check_qemu_users(users: &crate::config::QemuUsers) {
    use hypervisor::identity::{self, Ownership};
    let user = users.pick(None, &HashSet::new()).unwrap_or(users.fixed);
    match &users.pool {
        Some(pool) => tracing::info!(
            "each QEMU runs as a uid of its own from {}-{}",
            pool.start(),
            pool.end()
        ),
        None => tracing::warn!("{}", users.shared_user_warning().unwrap_or_default()),
    }
    if probe::kvm_usable().is_err() {
        return;
    }
    if let Ok(device) = Ownership::of(Path::new(identity::KVM_DEVICE))
        && let Err(e) = identity::kvm_groups(user, device)
    {
        tracing::warn!("{e}; until then, instances that need KVM are refused");
    }
}

impl Agent {
    /// Opens the state directory.
    pub fn open(mut cfg: AgentConfig) -> Result<Arc<Self>, AgentError> {
        private_dir(&cfg.state_dir)?;
        match cfg.confinement {
            Confinement::Strict => {
                match hypervisor::cgroup::detect(&cfg.cgroup_root, &cfg.cgroup_parent) {
                    Ok(layout) => {
                        tracing::info!(?layout, "instances get cgroups");
                        cfg.launch.cgroups = Some(layout);
                    }
                    Err(e) => tracing::warn!("{e}"),
                }
                check_qemu_users(&cfg.qemu_users);
            }
            Confinement::Off => tracing::warn!(
                "confinement is off: QEMU runs as root, without its seccomp sandbox and without a cgroup; use it only for debugging"
            ),
        }
        let store = RecordStore::open(&cfg.state_dir, "runtime")?;
        let journal = IntentJournal::open(&cfg.state_dir, "journal")?;
        let event_buffer = cfg.event_buffer;
        Ok(Arc::new(Agent {
            cfg,
            store: Arc::new(store),
            journal: Arc::new(journal),
            events: Arc::new(EventBus::new(event_buffer)),
            qemu_cache: tokio::sync::Mutex::new(None),
            instances: RwLock::new(BTreeMap::new()),
            incoming_ports: Mutex::new(Default::default()),
            qemu_user_pick: tokio::sync::Mutex::new(()),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// Events after `after` (only new ones for `None`) and a receiver for
    /// the ones to come.
    pub fn watch_events(&self, after: Option<u64>) -> Result<Watch, WatchError> {
        self.events.watch(after)
    }

    /// The hotplug intent journal.
    pub(crate) fn journal_store(&self) -> Arc<IntentJournal> {
        self.journal.clone()
    }

    fn registry(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Instance>>> {
        self.instances.read().unwrap_or_else(|p| p.into_inner())
    }

    fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Instance>>> {
        self.instances.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn instance(&self, name: &str) -> Result<Arc<Instance>, AgentError> {
        if name.len() > hypervisor::spec::MAX_INSTANCE_NAME {
            // Never a known name; and not worth echoing back in full.
            return Err(AgentError::BadRequest(format!(
                "an instance name is at most {} bytes; this one is {}",
                hypervisor::spec::MAX_INSTANCE_NAME,
                name.len()
            )));
        }
        self.registry()
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(name.to_owned()))
    }

    /// Probes the QEMU binary once per build of it.
    pub async fn qemu_info(&self) -> Result<Arc<QemuInfo>, AgentError> {
        let path = probe::resolve_binary(&self.cfg.qemu_binary)?;
        let current = stamp(&path).ok_or_else(|| probe::ProbeError::Missing(path.clone()))?;
        let mut cache = self.qemu_cache.lock().await;
        if let Some((cached_stamp, info)) = cache.as_ref()
            && *cached_stamp == current
        {
            return Ok(info.clone());
        }
        let info = Arc::new(probe::probe(&path).await?);
        tracing::info!(binary = %path.display(), version = %info.version, "probed QEMU");
        if self.cfg.confinement == Confinement::Strict && !info.sandbox {
            tracing::warn!(
                binary = %path.display(),
                "this QEMU has no seccomp sandbox (it refuses -sandbox), so its instances run without one; install a QEMU built with seccomp"
            );
        }
        *cache = Some((current, info.clone()));
        Ok(info)
    }

    /// Facts about this node for GetNodeInfo.
    pub async fn node_facts(&self) -> NodeFacts {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem = |key: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kib| kib / 1024)
        };
        NodeFacts {
            hostname: hostname(),
            qemu_binary: self.cfg.qemu_binary.clone(),
            qemu: self.qemu_info().await.map_err(|e| e.to_string()),
            kvm: probe::kvm_usable(),
            memory_total_mib: mem("MemTotal:"),
            memory_available_mib: mem("MemAvailable:"),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            instance_count: self.registry().len() as u32,
        }
    }

    /// Every instance, by name.
    pub fn list(&self) -> Vec<InstanceView> {
        self.registry().values().map(|i| i.view()).collect()
    }

    /// One instance.
    pub fn get(&self, name: &str) -> Result<InstanceView, AgentError> {
        Ok(self.instance(name)?.view())
    }

    /// Where the serial console socket and the VNC display of a running
    /// instance are.
    pub fn console_info(
        &self,
        name: &str,
    ) -> Result<(Option<PathBuf>, Option<String>), AgentError> {
        let view = self.get(name)?;
        let runtime = match (view.state, view.runtime) {
            (State::Running, Some(rt)) => rt,
            _ => return Err(AgentError::NotRunning(name.to_owned())),
        };
        let serial = runtime
            .serial_console
            .then(|| self.cfg.run_dir(name).join(files::SERIAL));
        let vnc = runtime
            .vnc_display
            .map(|d| format!("127.0.0.1:{}", 5900 + d));
        Ok((serial, vnc))
    }

    /// The persisted record of an instance, as stored.
    pub async fn record(&self, name: &str) -> Result<(InstanceRecord, u64), AgentError> {
        self.instance(name)?;
        let store = self.store.clone();
        let owned = name.to_owned();
        let loaded = tokio::task::spawn_blocking(move || store.load::<InstanceRecord>(&owned))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??;
        let rec = loaded.ok_or_else(|| AgentError::NotFound(name.to_owned()))?;
        Ok((rec.value, rec.revision))
    }

    async fn save_record(&self, name: &str, record: &InstanceRecord) -> Result<(), AgentError> {
        let store = self.store.clone();
        let (name, record) = (name.to_owned(), record.clone());
        tokio::task::spawn_blocking(move || store.save(&name, &record))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??;
        Ok(())
    }

    /// Saves a record and makes it the instance's current one.
    pub(crate) async fn write_record(
        &self,
        inst: &Instance,
        record: &InstanceRecord,
    ) -> Result<(), AgentError> {
        self.save_record(&inst.name, record).await?;
        lock(&inst.status).record = Some(record.clone());
        Ok(())
    }

    async fn remove_record(&self, name: &str) -> Result<(), AgentError> {
        let store = self.store.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || store.remove(&name))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??;
        Ok(())
    }

    /// Updates the state in an instance's record.
    async fn persist_state(
        &self,
        inst: &Instance,
        state: RecordedState,
        detail: &str,
    ) -> Result<(), AgentError> {
        let record = {
            let mut st = lock(&inst.status);
            let Some(record) = st.record.as_mut() else {
                return Ok(());
            };
            record.state = state;
            record.detail = detail.to_owned();
            record.clone()
        };
        self.save_record(&inst.name, &record).await
    }

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
            taken.extend(
                hypervisor::identity::processes_by_uid()
                    .into_iter()
                    .filter(|(uid, pids)| {
                        pool.contains(uid)
                            && pids.iter().any(|&pid| !process::runs_instance(pid, uuid))
                    })
                    .map(|(uid, _)| uid),
            );
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
            if !(meta.is_file() || meta.file_type().is_block_device()) {
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

    /// Starts an instance from a spec.
    pub async fn start(
        self: &Arc<Self>,
        mut spec: InstanceSpec,
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
            Ok(_) => self.start_locked(&inst, &mut spec).await,
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
    ) -> Result<(), AgentError> {
        let previous = lock(&inst.status).record.clone();
        Self::fill_identity(spec, previous.as_ref().map(|r| &r.runtime));
        spec.validate()?;
        if let Some(p) = inst.process() {
            return Err(AgentError::AlreadyRunning {
                name: inst.name.clone(),
                pid: p.pid,
            });
        }
        let run_dir = self.cfg.run_dir(&spec.name);
        if let Some(pid) = process::live_instance_pid(&run_dir.join(files::PIDFILE), spec.uuid) {
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
        self.check_host_files(spec)?;
        let generation = previous.as_ref().map_or(0, |r| r.runtime.generation) + 1;
        let picking = self.qemu_user_pick.lock().await;
        let runtime = self
            .generate(spec, generation, previous.as_ref().map(|r| &r.runtime))
            .await?;
        if let Some(prev) = &previous
            && prev.runtime.uuid != runtime.uuid
        {
            tracing::warn!(instance = %inst.name, old = %prev.runtime.uuid, new = %runtime.uuid, "replacing a stopped instance's record with a new uuid");
        }

        let record = InstanceRecord {
            runtime,
            state: RecordedState::Running,
            detail: String::new(),
            outgoing: None,
        };
        self.save_record(&inst.name, &record).await?;
        lock(&inst.status).record = Some(record.clone());
        inst.set_state(State::Starting, "");
        drop(picking);

        if let Err(e) = self.launch(inst, &record.runtime, LaunchMode::Boot).await {
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

    /// Launches QEMU for a runtime and starts supervising it.
    async fn launch(
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
        if runtime.chroot {
            launch.option_rom_dirs = self.qemu_info().await?.data_dirs.clone();
        }
        let launched = lifecycle::launch(runtime, &run_dir, &launch, mode)
            .await
            .map_err(|source| AgentError::Launch {
                instance: inst.name.clone(),
                source,
            })?;
        let events = launched.qmp.subscribe();
        let process = Arc::new(Process {
            pid: launched.pid,
            pidfd: launched.pidfd,
            qmp: launched.qmp,
            taps: Mutex::new(launched.taps),
            child: Mutex::new(Some(launched.child)),
            stop_requested: AtomicBool::new(false),
            started_at: SystemTime::now(),
        });
        let state = match mode {
            LaunchMode::Boot => State::Running,
            LaunchMode::Incoming => State::Incoming,
        };
        self.supervise(inst, process.clone(), events, state);
        Ok(process)
    }

    /// Installs a process as the instance's and watches for its exit.
    fn supervise(
        self: &Arc<Self>,
        inst: &Arc<Instance>,
        process: Arc<Process>,
        events: broadcast::Receiver<QmpEvent>,
        state: State,
    ) {
        let detail = {
            let mut st = lock(&inst.status);
            st.process = Some(process.clone());
            st.state = state;
            if state != State::Incoming {
                st.detail.clear();
            }
            st.detail.clone()
        };
        inst.announce_state(state, detail, false);
        tokio::spawn(watch_guest_resets(inst.clone(), process.qmp.subscribe()));
        tokio::spawn(self.clone().watch_exit(inst.clone(), process, events));
    }

    async fn watch_exit(
        self: Arc<Self>,
        inst: Arc<Instance>,
        process: Arc<Process>,
        mut events: broadcast::Receiver<QmpEvent>,
    ) {
        process.pidfd.exited().await;
        let exit_status = process
            .reap()
            .unwrap_or_else(|| "exit status unknown".into());
        if process.stop_requested.load(Ordering::SeqCst) {
            return;
        }
        // QEMU announces a guest's own power-off with SHUTDOWN guest=true
        // before exiting; let the reader deliver it before deciding.
        let _ = tokio::time::timeout(self.cfg.exit_drain_timeout, process.qmp.closed()).await;
        let mut guest_shutdown = false;
        while let Ok(event) = events.try_recv() {
            if event.name == "SHUTDOWN"
                && event.data.get("guest").and_then(|g| g.as_bool()) == Some(true)
            {
                guest_shutdown = true;
            }
        }
        let run_dir = self.cfg.run_dir(&inst.name);
        let (state, recorded, detail) = if guest_shutdown {
            (
                State::Stopped,
                RecordedState::StoppedByGuest,
                "the guest powered itself off".to_owned(),
            )
        } else if lifecycle::oom_kills(&run_dir) > 0 {
            let limit = lock(&inst.status)
                .record
                .as_ref()
                .and_then(|r| r.runtime.cgroup)
                .map_or_else(String::new, |c| format!(" of {} MiB", c.memory_limit_mib));
            (
                State::Crashed,
                RecordedState::Crashed,
                format!(
                    "QEMU was killed by the kernel's OOM killer ({exit_status}): its cgroup's memory \
                     limit{limit} was reached; start it with less memory, or find what grew in QEMU"
                ),
            )
        } else {
            let tail = process::log_tail(&run_dir.join(files::LOG), lifecycle::LOG_TAIL_BYTES);
            (
                State::Crashed,
                RecordedState::Crashed,
                format!("QEMU exited unexpectedly ({exit_status}); its log ends with:\n{tail}"),
            )
        };
        {
            let mut st = lock(&inst.status);
            if !st
                .process
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, &process))
            {
                return;
            }
            st.process = None;
            st.state = state;
            st.detail = detail.clone();
        }
        inst.announce_state(state, detail.clone(), guest_shutdown);
        lifecycle::remove_run_files(&run_dir);
        if guest_shutdown {
            tracing::info!(instance = %inst.name, "guest powered off");
        } else {
            tracing::warn!(instance = %inst.name, pid = process.pid, %exit_status, "QEMU crashed");
        }
        // Persist under the operation lock so this write can't interleave
        // with an operation's own, unless an operation already moved on.
        // An incoming instance isn't this node's: whoever finalizes or
        // cancels it decides what its record becomes.
        let _op = inst.ops.lock().await;
        if inst.process().is_none()
            && !inst.is_incoming()
            && lock(&inst.status).state == state
            && let Err(e) = self.persist_state(&inst, recorded, &detail).await
        {
            tracing::error!(instance = %inst.name, error = %e, "can't record the instance's exit");
        }
    }

    /// Stops QEMU if it runs. The caller holds the operation lock.
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
            result = graceful => result,
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
        process.reap();
        lifecycle::remove_run_files(&self.cfg.run_dir(&inst.name));
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
        let _op = if force {
            inst.forced_stops.send_modify(|waiting| *waiting += 1);
            let locked = inst.lock_ops().await;
            inst.forced_stops.send_modify(|waiting| *waiting -= 1);
            locked?
        } else {
            inst.lock_ops().await?
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
        let mut timeouts = self.cfg.stop;
        if let Some(t) = powerdown_timeout {
            timeouts.powerdown = t;
        }
        if force && inst.process().is_some() {
            // A forced stop can only end one way, so the record can say so
            // while QEMU is being killed rather than after.
            let detail = format!("stopped by {}", stop_method_text(StopMethod::Kill));
            let (stopped, persisted) = tokio::join!(
                self.stop_locked(&inst, true, timeouts),
                self.persist_state(&inst, RecordedState::Stopped, &detail)
            );
            return match stopped {
                Ok(method) => {
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
            self.persist_state(
                &inst,
                RecordedState::Stopped,
                &format!("stopped by {}", stop_method_text(method)),
            )
            .await?;
        }
        Ok((inst.view(), method))
    }

    /// Reboots an instance.
    pub async fn reboot(
        self: &Arc<Self>,
        name: &str,
        mode: RebootMode,
    ) -> Result<InstanceView, AgentError> {
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
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
                self.stop_locked(&inst, false, self.cfg.stop).await?;
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
                let previous_runtime = previous.as_ref().map(|r| &r.runtime);
                Self::fill_identity(&mut spec, previous_runtime);
                spec.validate()?;
                self.check_host_files(&spec)?;
                let generation = previous_runtime.map_or(0, |r| r.generation) + 1;
                // Generate before stopping: a spec that can't run must not
                // cost the running instance.
                let runtime = self.generate(&spec, generation, previous_runtime).await?;
                self.stop_locked(&inst, false, self.cfg.stop).await?;
                let record = InstanceRecord {
                    runtime,
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

    async fn relaunch(
        self: &Arc<Self>,
        inst: &Arc<Instance>,
        record: InstanceRecord,
    ) -> Result<(), AgentError> {
        inst.set_state(State::Starting, "");
        match self.launch(inst, &record.runtime, LaunchMode::Boot).await {
            Ok(_) => {
                lock(&inst.status).record = Some(record);
                self.persist_state(inst, RecordedState::Running, "").await
            }
            Err(e) => {
                let detail = format!("restart failed: {e}");
                inst.set_state(State::Crashed, detail.clone());
                lock(&inst.status).record = Some(record);
                self.persist_state(inst, RecordedState::Crashed, &detail)
                    .await?;
                Err(e)
            }
        }
    }

    /// Loads every record and registers its instance, so that calls can
    /// name it at once, then starts reconciling in the background: finding
    /// the QEMUs that kept running while the agent was away, in parallel.
    /// An instance whose record says running is marked reconciling, and its
    /// operations wait, until its QEMU is adopted or found gone. The
    /// returned task ends when all are done.
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
        for e in errors {
            tracing::error!(error = %e, "instance record unusable");
        }
        // Set aside now or by an agent before: either way, a QEMU of that
        // name that still runs must stay in sight.
        let recorded: HashSet<&str> = records.iter().map(|r| r.name.as_str()).collect();
        for name in self.store.quarantined_names() {
            if !recorded.contains(name.as_str()) {
                self.register_quarantined(&name);
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for rec in records {
            if let Some(work) = self.register_recorded(rec.name, rec.value) {
                tasks.spawn(work);
            }
        }
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

    /// Registers a recorded instance; returns the recovery work it needs.
    fn register_recorded(
        self: &Arc<Self>,
        name: String,
        record: InstanceRecord,
    ) -> Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>> {
        let agent = self.clone();
        if record.state == RecordedState::Incoming {
            return Some(Box::pin(async move {
                agent.drop_unfinished_incoming(&name, &record).await
            }));
        }
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
        lifecycle::remove_run_files(&run_dir);
    }

    /// Finds a recorded-running instance's QEMU and adopts it, or records
    /// that it died while the agent was away. The caller holds the
    /// operation lock.
    async fn reconcile(self: &Arc<Self>, inst: &Arc<Instance>, record: &InstanceRecord) {
        let name = &inst.name;
        let run_dir = self.cfg.run_dir(name);
        let Some(pid) =
            process::live_instance_pid(&run_dir.join(files::PIDFILE), record.runtime.uuid)
        else {
            let detail = "QEMU exited while the agent was not running".to_owned();
            tracing::warn!(instance = %name, "{detail}");
            lifecycle::remove_run_files(&run_dir);
            inst.set_state(State::Crashed, detail.clone());
            if let Err(e) = self
                .persist_state(inst, RecordedState::Crashed, &detail)
                .await
            {
                tracing::error!(instance = %name, error = %e, "can't record the crash");
            }
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
            Err(e) => {
                let detail =
                    format!("QEMU (pid {pid}) runs but can't be reached: {e}; stop it by hand");
                tracing::error!(instance = %name, pid, error = %e, "can't adopt running instance");
                inst.set_state(State::Crashed, detail);
            }
        }
    }

    async fn adopt(
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
        Ok((
            Arc::new(Process {
                pid,
                pidfd: Arc::new(pidfd),
                qmp,
                taps: Mutex::new(taps),
                child: Mutex::new(None),
                stop_requested: AtomicBool::new(false),
                started_at,
            }),
            events,
        ))
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
            fds.get(&hypervisor::argv::netdev_id(nic.spec.uuid))
                .and_then(|&fd| process::tap_name_of_fd(pid, fd))
                .unwrap_or_default()
        })
        .collect()
}

/// What a recorded state means for an instance whose QEMU isn't running.
fn resting_state(recorded: RecordedState) -> State {
    match recorded {
        RecordedState::Crashed => State::Crashed,
        RecordedState::Saved => State::Saved,
        RecordedState::Incoming => State::Incoming,
        RecordedState::Running | RecordedState::Stopped | RecordedState::StoppedByGuest => {
            State::Stopped
        }
    }
}

/// This node's host name.
pub(crate) fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Publishes the resets a guest does by itself (QEMU's RESET with
/// `guest: true`); the same QEMU keeps running. Ends with the connection.
async fn watch_guest_resets(inst: Arc<Instance>, mut events: broadcast::Receiver<QmpEvent>) {
    loop {
        match events.recv().await {
            Ok(e)
                if e.name == "RESET"
                    && e.data.get("guest").and_then(|g| g.as_bool()) == Some(true) =>
            {
                tracing::info!(instance = %inst.name, "guest rebooted itself");
                inst.announce(EventKind::Rebooted {
                    how: "guest",
                    guest_initiated: true,
                });
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
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
