//! What the agent runs with: the resolved configuration its operations
//! read (directories, QEMU, confinement, timeouts, migration). The
//! `settings` module builds it from the file, the environment and flags.

use std::collections::HashSet;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

pub use hypervisor::host_files::AllowedRoots;
use hypervisor::identity::QemuUser;
use hypervisor::lifecycle::{LaunchConfig, StopTimeouts};
use hypervisor::migration::MigrationParameters;
use hypervisor::migration::stream_tls::StreamCredentials;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kvm-agent";
/// Where cgroups are mounted.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The agent's cgroup under each hierarchy.
pub const DEFAULT_CGROUP_PARENT: &str = "kvm-agent";
/// The user every confined QEMU runs as when the operator chooses one
/// user for all of them instead of a pool.
pub const DEFAULT_QEMU_USER: &str = "nobody";
/// The uids confined QEMUs get one each from, unless the operator chooses
/// otherwise. Above 65535, where distributions allocate no accounts, and
/// below 100000, where `/etc/subuid` ranges start by default.
pub const DEFAULT_UID_POOL: RangeInclusive<u32> = 70000..=70999;
/// Events kept for watchers that resume.
pub const DEFAULT_EVENT_BUFFER: usize = 4096;
/// Name of the agent's unix socket inside the state directory.
pub const SOCKET_NAME: &str = "agent.sock";

/// Everything the agent needs to know to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Records, run directories and the socket live here.
    pub state_dir: PathBuf,
    /// QEMU binary name or path.
    pub qemu_binary: PathBuf,
    /// Launch settings (QMP timeouts, operator monitor, tap names, logs).
    pub launch: LaunchConfig,
    /// Stop escalation timeouts.
    pub stop: StopTimeouts,
    /// How long a reset waits for QEMU's RESET event.
    pub reset_timeout: Duration,
    /// How long a device removal waits for the guest to release the device.
    pub unplug_timeout: Duration,
    /// Events kept for watchers that resume.
    pub event_buffer: usize,
    /// How long the supervisor waits for QMP to drain after QEMU exits, to
    /// see whether the guest itself asked for the power-off.
    pub exit_drain_timeout: Duration,
    /// Migration settings.
    pub migration: MigrationConfig,
    /// Where to stop dead, for tests that kill the agent at that moment.
    pub fault_point: Option<FaultPoint>,
    /// Directories that disk images, kernels, memory files and save files
    /// must lie in.
    pub allowed_roots: AllowedRoots,
    /// Extra QEMU options (each with its value) specs may ask for; none by
    /// default.
    pub allowed_extra_options: Vec<String>,
    /// Whether QEMUs run confined.
    pub confinement: Confinement,
    /// The cgroup mount.
    pub cgroup_root: PathBuf,
    /// The agent's cgroup, under which each instance gets its own.
    pub cgroup_parent: String,
    /// Who confined QEMUs run as.
    pub qemu_users: QemuUsers,
}

/// Who confined QEMUs run as: one user for all, or a uid of its own for
/// each instance from a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuUsers {
    /// The user as configured: a name, a uid, or `uid:gid`.
    pub name: String,
    /// That user, resolved. Every instance runs as it when there is no
    /// pool.
    pub fixed: QemuUser,
    /// Uids handed out one per running instance, each with the group of
    /// the same number.
    pub pool: Option<RangeInclusive<u32>>,
}

impl Default for QemuUsers {
    fn default() -> Self {
        // Where nobody's entry can't be read, its conventional ids.
        Self {
            name: DEFAULT_QEMU_USER.into(),
            fixed: QemuUser {
                uid: 65534,
                gid: 65534,
            },
            pool: Some(DEFAULT_UID_POOL),
        }
    }
}

impl QemuUsers {
    /// The user for an instance. Without a pool, the fixed user. With one,
    /// the instance's previous uid if it is still free, else the lowest
    /// free one; `None` when `taken` holds them all. Pure.
    pub fn pick(&self, previous: Option<QemuUser>, taken: &HashSet<u32>) -> Option<QemuUser> {
        let Some(pool) = &self.pool else {
            return Some(self.fixed);
        };
        let free = |uid: &u32| pool.contains(uid) && !taken.contains(uid);
        let uid = previous
            .map(|p| p.uid)
            .filter(free)
            .or_else(|| pool.clone().find(free))?;
        Some(QemuUser { uid, gid: uid })
    }

    /// Says why one user for every QEMU is a risk, when it is the choice.
    pub fn shared_user_warning(&self) -> Option<String> {
        self.pool.is_none().then(|| {
            format!(
                "every QEMU runs as {:?} ({}): a QEMU taken over by its guest can signal the \
                 others and reach their files; set [qemu_user] uid_pool for a uid per instance",
                self.name, self.fixed
            )
        })
    }

    /// Whether `uid` is one instance's alone: the pool's uids are, the
    /// fixed user and uids that came with other nodes' runtimes aren't.
    pub fn exclusive(&self, uid: u32) -> bool {
        self.pool.as_ref().is_some_and(|p| p.contains(&uid))
    }
}

/// How far each QEMU is boxed in.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Confinement {
    /// QEMU's seccomp sandbox where the binary has one, no new privileges,
    /// and a cgroup with a memory limit and a CPU weight.
    #[default]
    Strict,
    /// None of it, for debugging.
    Off,
}

/// A moment at which the agent can be told to stop making progress, so a
/// test can kill it there and check what the next agent makes of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// A hot-add has journaled its intent and QEMU is not yet touched.
    HotplugBeforeQemu,
    /// A migration's stream is complete and the target not yet told to
    /// take the instance.
    MigrationBeforeFinalize,
    /// The target has taken the instance and the source's QEMU still
    /// runs, paused.
    MigrationAfterFinalize,
}

impl std::str::FromStr for FaultPoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hotplug-before-qemu" => Ok(FaultPoint::HotplugBeforeQemu),
            "migration-before-finalize" => Ok(FaultPoint::MigrationBeforeFinalize),
            "migration-after-finalize" => Ok(FaultPoint::MigrationAfterFinalize),
            other => Err(format!(
                "unknown fault point {other:?}; there are hotplug-before-qemu, \
                 migration-before-finalize and migration-after-finalize"
            )),
        }
    }
}

/// Where incoming migrations listen, and the defaults of outgoing ones.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// The address this node's QEMUs receive migrations on; the source's
    /// QEMU connects to it, so it must be reachable from other nodes.
    pub address: String,
    /// Ports an incoming migration may listen on.
    pub ports: RangeInclusive<u16>,
    /// Defaults of outgoing migrations; a call can override each.
    pub parameters: MigrationParameters,
    /// How long a call to the other agent may take.
    pub peer_timeout: Duration,
    /// The newest protocol spoken to other agents: lower than this
    /// release's while older agents must still migrate here and from here
    /// under its rules.
    pub peer_protocol: u32,
    /// This node's certificate, shown to `https://` targets.
    pub peer_tls: Option<crate::tls::TlsMaterial>,
    /// What this node's QEMUs encrypt migration streams with: its own
    /// files, else the node's TLS files.
    pub stream_tls: Option<StreamCredentials>,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1".into(),
            ports: 49152..=49215,
            parameters: MigrationParameters::default(),
            peer_timeout: Duration::from_secs(30),
            peer_protocol: crate::peer::PEER_PROTOCOL,
            peer_tls: None,
            stream_tls: None,
        }
    }
}

impl AgentConfig {
    /// Defaults for a state directory.
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            qemu_binary: "qemu-system-x86_64".into(),
            launch: LaunchConfig::default(),
            stop: StopTimeouts::default(),
            reset_timeout: Duration::from_secs(5),
            unplug_timeout: Duration::from_secs(10),
            event_buffer: DEFAULT_EVENT_BUFFER,
            exit_drain_timeout: Duration::from_millis(500),
            migration: MigrationConfig::default(),
            fault_point: None,
            allowed_roots: AllowedRoots::default(),
            allowed_extra_options: Vec::new(),
            confinement: Confinement::Strict,
            cgroup_root: DEFAULT_CGROUP_ROOT.into(),
            cgroup_parent: DEFAULT_CGROUP_PARENT.into(),
            qemu_users: QemuUsers::default(),
        }
    }

    /// The default listening socket.
    pub fn socket_path(&self) -> PathBuf {
        self.state_dir.join(SOCKET_NAME)
    }

    /// The run directory of an instance.
    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("run").join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> QemuUsers {
        QemuUsers {
            pool: Some(64000..=64002),
            ..QemuUsers::default()
        }
    }

    fn user(uid: u32) -> QemuUser {
        QemuUser { uid, gid: uid }
    }

    #[test]
    fn without_a_pool_everyone_is_the_fixed_user() {
        let users = QemuUsers {
            pool: None,
            ..QemuUsers::default()
        };
        assert!(users.shared_user_warning().is_some());
        let taken = HashSet::from([65534]);
        assert_eq!(users.pick(Some(user(64001)), &taken), Some(users.fixed));
        assert!(!users.exclusive(65534));
    }

    #[test]
    fn a_pool_keeps_an_instances_uid_while_it_is_free() {
        let users = pool();
        assert_eq!(users.pick(None, &HashSet::new()), Some(user(64000)));
        assert_eq!(
            users.pick(Some(user(64002)), &HashSet::new()),
            Some(user(64002))
        );
        let taken = HashSet::from([64000, 64002]);
        assert_eq!(users.pick(Some(user(64002)), &taken), Some(user(64001)));
        // A uid from outside the pool is not kept.
        assert_eq!(
            users.pick(Some(user(70000)), &HashSet::new()),
            Some(user(64000))
        );
    }

    #[test]
    fn by_default_each_instance_has_a_uid_of_its_own() {
        let users = QemuUsers::default();
        assert_eq!(users.pick(None, &HashSet::new()), Some(user(70000)));
        assert_eq!(users.shared_user_warning(), None);
    }

    #[test]
    fn an_exhausted_pool_gives_nobody() {
        let taken = HashSet::from([64000, 64001, 64002]);
        assert_eq!(pool().pick(None, &taken), None);
        assert!(pool().exclusive(64001));
        assert!(!pool().exclusive(65534));
    }
}
