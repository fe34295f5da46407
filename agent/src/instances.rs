//! Instances and their operations: start, stop, reboot, supervision and
//! recovery after an agent restart.
//!
//! Each instance has an operation lock that serializes start, stop and
//! reboot, and a status that readers copy without waiting behind an
//! operation (the lock on it is never held across an await).

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use hypervisor::lifecycle::files;
use hypervisor::probe::{self, QemuInfo};
use hypervisor::process::PidFd;
use hypervisor::qmp::QmpClient;
use hypervisor::spawn::Spawned;
use runtime_store::{IntentJournal, RecordStore, StoreError};

use crate::config::AgentConfig;
use crate::config::Confinement;
use crate::error::AgentError;
use crate::events::{EventBus, EventKind, Watch, WatchError};

mod console;
mod guest_agent;
mod handback;
mod hotplug;
mod incoming;
mod lifecycle;
mod media;
mod memory;
mod migration;
mod postcopy;
mod quarantine;
mod records;
mod recovery;
mod saves;
mod slots;
mod supervision;
mod takeover;

pub use guest_agent::GuestAgentCall;
pub use hotplug::HotplugIntent;
pub use lifecycle::stop_method_text;

pub use crate::model::{
    ChangedDevice, InstanceRecord, InstanceView, MemoryReport, MigrateOptions, MigrationReport,
    NodeFacts, OutgoingMigration, RebootMode, RecordedState, ReportPhase, SaveOutcome, State,
    Takeover, TakeoverOutcome,
};

/// A running QEMU that the agent supervises.
#[derive(Debug)]
pub(crate) struct Process {
    pid: u32,
    pidfd: Arc<PidFd>,
    qmp: QmpClient,
    /// Host taps in the runtime's NIC order.
    taps: Mutex<Vec<String>>,
    /// Present when the agent itself spawned QEMU, for reaping.
    child: Mutex<Option<Spawned>>,
    /// Set before the agent stops QEMU, so its exit isn't taken for a crash.
    stop_requested: AtomicBool,
    started_at: SystemTime,
    /// The guest's memory in MiB as the balloon last reported it; 0 until
    /// QEMU has said.
    balloon_mib: AtomicU64,
    /// Why this QEMU runs outside the confinement its runtime gives it: one
    /// the agent adopted from another manager, until its next launch.
    unconfined: Option<String>,
    /// The bus-0 PCI slots QEMU has taken, as its `query-pci` showed them
    /// plus the agent's hot-adds since; `None` until asked, and again once
    /// a device leaves or a hot-add fails. See `slots`.
    pci_slots: Mutex<Option<Vec<u8>>>,
    /// The NIC models whose option ROM a hot-add has put in the chroot.
    staged_roms: Mutex<Vec<hypervisor::spec::NicModel>>,
}

impl Process {
    /// A QEMU the agent spawned (`child` to reap) or adopted after a
    /// restart (`child` is `None`, `started_at` from its pidfile).
    fn new(
        pid: u32,
        pidfd: Arc<PidFd>,
        qmp: QmpClient,
        taps: Vec<String>,
        child: Option<Spawned>,
        started_at: SystemTime,
    ) -> Self {
        Self {
            pid,
            pidfd,
            qmp,
            taps: Mutex::new(taps),
            child: Mutex::new(child),
            stop_requested: AtomicBool::new(false),
            started_at,
            balloon_mib: AtomicU64::new(0),
            unconfined: None,
            pci_slots: Mutex::new(None),
            staged_roms: Mutex::new(Vec::new()),
        }
    }

    /// Whether a hot-add has put `model`'s option ROM in the chroot.
    pub(crate) fn rom_staged(&self, model: hypervisor::spec::NicModel) -> bool {
        lock(&self.staged_roms).contains(&model)
    }

    /// Remembers that `model`'s option ROM is in the chroot.
    pub(crate) fn set_rom_staged(&self, model: hypervisor::spec::NicModel) {
        lock(&self.staged_roms).push(model);
    }

    /// Records the guest's memory as the balloon reported it.
    pub(crate) fn set_balloon_mib(&self, mib: u64) {
        self.balloon_mib.store(mib, Ordering::Relaxed);
    }

    fn balloon_mib(&self) -> Option<u64> {
        Some(self.balloon_mib.load(Ordering::Relaxed)).filter(|&mib| mib > 0)
    }

    /// Asks QEMU how much memory the guest has, for a guest that came from
    /// elsewhere (adopted, migrated in, restored) and may have given some
    /// back before. A QEMU without a balloon leaves it unknown.
    pub(crate) async fn read_balloon(&self) {
        if let Ok(mib) = hypervisor::balloon::actual_mib(&self.qmp).await {
            self.set_balloon_mib(mib);
        }
    }

    /// Whether this QEMU runs in the chroot `runtime` gives it: not one
    /// the agent adopted from another manager, which started it without.
    pub(crate) fn chrooted(&self, runtime: &hypervisor::Runtime) -> bool {
        runtime.chroot && self.unconfined.is_none()
    }

    /// The bus-0 slots QEMU has taken, if the agent knows them.
    pub(crate) fn pci_slots(&self) -> Option<Vec<u8>> {
        lock(&self.pci_slots).clone()
    }

    /// Remembers the slots a `query-pci` showed, unless newer ones are
    /// known: one asked before a hot-add may answer after it.
    pub(crate) fn learn_pci_slots(&self, slots: Vec<u8>) {
        lock(&self.pci_slots).get_or_insert(slots);
    }

    /// Adds the slot of a device the agent hot-added.
    pub(crate) fn take_pci_slot(&self, slot: u8) {
        if let Some(slots) = lock(&self.pci_slots).as_mut() {
            slots.push(slot);
        }
    }

    /// Replaces the slots; `None` has the next hot-add ask QEMU.
    pub(crate) fn set_pci_slots(&self, slots: Option<Vec<u8>>) {
        *lock(&self.pci_slots) = slots;
    }

    /// The QMP connection.
    pub(crate) fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// The host tap of the NIC at `index` in the runtime.
    pub(crate) fn tap(&self, index: usize) -> String {
        lock(&self.taps).get(index).cloned().unwrap_or_default()
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
    /// Set while a migration away may switch to postcopy; notified to
    /// switch now.
    postcopy_switch: Option<Arc<tokio::sync::Notify>>,
    /// Set while a migration into this node waits to be finalized.
    incoming: Option<incoming::Incoming>,
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
    /// The display password last set, given again to each QEMU this
    /// agent launches for the instance; kept in memory only.
    display_password: Mutex<Option<console::Secret>>,
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
                postcopy_switch: None,
                incoming: None,
                reconciling: false,
                quarantined_pid: None,
            }),
            display_password: Mutex::new(None),
        })
    }

    pub(crate) fn view(&self) -> InstanceView {
        let st = lock(&self.status);
        InstanceView {
            name: self.name.clone(),
            state: st.state,
            detail: st.detail.clone(),
            pid: st.process.as_ref().map(|p| p.pid).or(st.quarantined_pid),
            started_at: st.process.as_ref().map(|p| p.started_at),
            runtime: st.record.as_ref().map(|r| r.runtime.clone()),
            taps: st
                .process
                .as_ref()
                .map(|p| lock(&p.taps).clone())
                .unwrap_or_default(),
            reconciling: st.reconciling,
            balloon_mib: st.process.as_ref().and_then(|p| p.balloon_mib()),
            unconfined: st.process.as_ref().and_then(|p| p.unconfined.clone()),
            stopped_by_guest: st.state == State::Stopped
                && st
                    .record
                    .as_ref()
                    .is_some_and(|r| r.state == RecordedState::StoppedByGuest),
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

    /// [`Instance::lock_ops`], for a guard an operation can hand to work
    /// that goes on after its reply.
    pub(crate) async fn lock_ops_owned(
        &self,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, AgentError> {
        tokio::select! {
            biased;
            guard = self.ops.clone().lock_owned() => Ok(guard),
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
            peer_protocol: self.cfg.migration.peer_protocol,
        }
    }

    /// Every instance, by name.
    pub fn list(&self) -> Vec<InstanceView> {
        self.registry().values().map(|i| i.view()).collect()
    }

    /// Each instance's state and whether its QEMU runs unconfined: what
    /// the metrics count, without the copy of a runtime a view makes.
    pub fn tally(&self) -> Vec<crate::telemetry::Counted> {
        self.registry()
            .values()
            .map(|i| {
                let st = lock(&i.status);
                crate::telemetry::Counted {
                    state: st.state,
                    unconfined: st.process.as_ref().is_some_and(|p| p.unconfined.is_some()),
                }
            })
            .collect()
    }

    /// One instance.
    pub fn get(&self, name: &str) -> Result<InstanceView, AgentError> {
        Ok(self.instance(name)?.view())
    }

    /// Where the serial console socket and the VNC or SPICE display of a
    /// running instance are.
    pub fn console_info(&self, name: &str) -> Result<ConsoleEndpoints, AgentError> {
        let view = self.get(name)?;
        // A paused guest's QEMU runs, and so do its consoles: attaching is
        // how an operator watches a guest started paused begin.
        let runtime = match (view.state, view.runtime) {
            (State::Running | State::Paused, Some(rt)) => rt,
            _ => return Err(AgentError::NotRunning(name.to_owned())),
        };
        let serial = runtime
            .serial_console
            .then(|| self.cfg.run_dir(name).join(files::SERIAL));
        let vnc = runtime
            .vnc_display
            .map(|d| display_endpoint(runtime.vnc_address, 5900 + d));
        let spice = runtime
            .spice
            .as_ref()
            .map(|s| display_endpoint(s.address, u32::from(s.port)));
        Ok(ConsoleEndpoints { serial, vnc, spice })
    }
}

/// Where a running instance's consoles are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleEndpoints {
    /// The serial console's socket on the node.
    pub serial: Option<PathBuf>,
    /// `host:port` of VNC.
    pub vnc: Option<String>,
    /// `host:port` of SPICE.
    pub spice: Option<String>,
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

/// Where a caller reaches a display on `port` listening on `address`:
/// the address itself, or the node's own name when it listens on every
/// address (the caller may be another node, such as Ganeti's master).
fn display_endpoint(address: Option<std::net::IpAddr>, port: u32) -> String {
    let ip = address.unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
    // Validation keeps the port within 16 bits.
    let port = u16::try_from(port).unwrap_or(u16::MAX);
    if ip.is_unspecified() {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        return format!("{host}:{port}");
    }
    std::net::SocketAddr::new(ip, port).to_string()
}
