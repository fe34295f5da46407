//! A cgroup per QEMU, under a parent the agent owns: a memory limit from
//! the runtime and a CPU weight. cgroup v2 where the unified hierarchy has
//! the memory controller, else the v1 memory (and cpu) hierarchies, as on
//! hosts still on the hybrid layout.

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Headroom over guest RAM for QEMU itself (device emulation, TCG's
/// translation cache, I/O buffers): the larger of this and a quarter of
/// guest RAM.
pub const MIN_HEADROOM_MIB: u64 = 512;
/// The CPU weight of an instance that doesn't ask for one (cgroup v2's
/// default).
pub const DEFAULT_CPU_WEIGHT: u32 = 100;
/// cgroup v2's range of `cpu.weight`.
pub const CPU_WEIGHTS: std::ops::RangeInclusive<u32> = 1..=10_000;

/// The box a runtime asks for, whatever the node's cgroup layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupLimits {
    /// `memory.max` (v2) or `memory.limit_in_bytes` (v1), in MiB.
    pub memory_limit_mib: u64,
    /// `cpu.weight` (v2); v1's `cpu.shares` is derived from it.
    pub cpu_weight: u32,
}

impl CgroupLimits {
    /// Limits for a guest with `memory_mib` of RAM. Pure.
    pub fn for_guest(memory_mib: u64, cpu_weight: u32) -> Self {
        Self {
            memory_limit_mib: memory_mib + (memory_mib / 4).max(MIN_HEADROOM_MIB),
            cpu_weight,
        }
    }
}

/// v1's `cpu.shares` for a v2 weight: 100 is the default 1024. Pure.
pub fn v1_shares(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).max(2)
}

/// Where the node's instance cgroups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// One directory in the unified hierarchy.
    V2 {
        /// `<root>/<parent>`.
        parent: PathBuf,
    },
    /// A directory in the v1 memory hierarchy, and one in the cpu
    /// hierarchy when that can be written too.
    V1 {
        /// `<root>/memory/<parent>`.
        memory: PathBuf,
        /// `<root>/cpu/<parent>`.
        cpu: Option<PathBuf>,
    },
}

/// Why instances won't get cgroups on this node.
#[derive(Debug, thiserror::Error)]
#[error(
    "no writable cgroup hierarchy with a memory controller under {root}: {reason}; instances run without a cgroup"
)]
pub struct CgroupUnavailable {
    /// The cgroup mount looked at.
    pub root: PathBuf,
    /// What was tried.
    pub reason: String,
}

fn make_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    // A directory that exists but can't be written is no use either.
    let probe = dir.join("cgroup.procs");
    fs::OpenOptions::new().write(true).open(probe).map(drop)
}

/// Finds the layout and creates the parent in it.
pub fn detect(root: &Path, parent: &str) -> Result<CgroupLayout, CgroupUnavailable> {
    let controllers = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let mut tried = Vec::new();
    if controllers.split_whitespace().any(|c| c == "memory") {
        let dir = root.join(parent);
        match make_dir(&dir) {
            Ok(()) => {
                // Children get memory and cpu only if the parent passes them on.
                let _ = fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu");
                return Ok(CgroupLayout::V2 { parent: dir });
            }
            Err(e) => tried.push(format!("{}: {e}", dir.display())),
        }
    } else {
        tried.push(format!("{} has no memory controller", root.display()));
    }
    let memory = root.join("memory").join(parent);
    match make_dir(&memory) {
        Ok(()) => {
            let cpu = root.join("cpu").join(parent);
            Ok(CgroupLayout::V1 {
                memory,
                cpu: make_dir(&cpu).is_ok().then_some(cpu),
            })
        }
        Err(e) => {
            tried.push(format!("{}: {e}", memory.display()));
            Err(CgroupUnavailable {
                root: root.to_owned(),
                reason: tried.join("; "),
            })
        }
    }
}

/// An instance's cgroups, made and limited, waiting for its QEMU.
#[derive(Debug)]
pub struct PreparedCgroups {
    /// The directories made, for removal once QEMU is gone.
    pub dirs: Vec<PathBuf>,
    /// The files a process writes `0` to to enter them, open for writing.
    procs: Vec<fs::File>,
}

impl PreparedCgroups {
    /// The fds of the files to enter through (`cgroup.procs`, or v1's
    /// `tasks`). A process that writes `0` to each, between fork and exec,
    /// runs its program inside the cgroups from the first instruction.
    pub fn procs_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.procs
            .iter()
            .map(std::os::fd::AsRawFd::as_raw_fd)
            .collect()
    }
}

impl CgroupLayout {
    /// The directories [`CgroupLayout::prepare`] makes for `instance`.
    pub fn instance_dirs(&self, instance: &str) -> Vec<PathBuf> {
        match self {
            CgroupLayout::V2 { parent } => vec![parent.join(instance)],
            CgroupLayout::V1 { memory, cpu } => std::iter::once(memory)
                .chain(cpu)
                .map(|dir| dir.join(instance))
                .collect(),
        }
    }

    /// Creates an instance's cgroups and sets their limits, ready for its
    /// QEMU to enter. On failure nothing made is left behind.
    pub fn prepare(&self, instance: &str, limits: &CgroupLimits) -> io::Result<PreparedCgroups> {
        let mut prepared = PreparedCgroups {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        let result = self.prepare_into(instance, limits, &mut prepared);
        if let Err(e) = result {
            // No process entered them yet, so they are empty.
            drop(prepared.procs);
            for dir in &prepared.dirs {
                let _ = fs::remove_dir(dir);
            }
            return Err(e);
        }
        Ok(prepared)
    }

    fn prepare_into(
        &self,
        instance: &str,
        limits: &CgroupLimits,
        prepared: &mut PreparedCgroups,
    ) -> io::Result<()> {
        let memory_bytes = limits.memory_limit_mib << 20;
        // v2 moves a process through `cgroup.procs`. In v1, `tasks` moves
        // the writing thread alone, which for a child between fork and exec
        // is the whole process, and skips the lock on every thread group
        // that `cgroup.procs` takes, whose RCU grace period costs a start
        // several milliseconds.
        let entry = match self {
            CgroupLayout::V2 { .. } => "cgroup.procs",
            CgroupLayout::V1 { .. } => "tasks",
        };
        let mut make = |dir: PathBuf, settings: &[(&str, String)]| -> io::Result<()> {
            fs::create_dir_all(&dir)?;
            prepared.dirs.push(dir.clone());
            for (file, value) in settings {
                fs::write(dir.join(file), value).map_err(|e| {
                    io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display()))
                })?;
            }
            let procs = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(dir.join(entry))?;
            prepared.procs.push(procs);
            Ok(())
        };
        match self {
            CgroupLayout::V2 { parent } => make(
                parent.join(instance),
                &[
                    ("memory.max", memory_bytes.to_string()),
                    ("cpu.weight", limits.cpu_weight.to_string()),
                ],
            ),
            CgroupLayout::V1 { memory, cpu } => {
                make(
                    memory.join(instance),
                    &[("memory.limit_in_bytes", memory_bytes.to_string())],
                )?;
                match cpu {
                    Some(cpu) => make(
                        cpu.join(instance),
                        &[("cpu.shares", v1_shares(limits.cpu_weight).to_string())],
                    ),
                    None => Ok(()),
                }
            }
        }
    }
}

/// How many times the kernel's OOM killer struck in the cgroup
/// directories `dirs`: `memory.events` on cgroup v2, `memory.oom_control`
/// on the v1 memory hierarchy; both count `oom_kill`. Read before the
/// directories go.
pub fn oom_kills(dirs: &[PathBuf]) -> u64 {
    dirs.iter()
        .flat_map(|dir| ["memory.events", "memory.oom_control"].map(|f| dir.join(f)))
        .filter_map(|file| fs::read_to_string(file).ok())
        .filter_map(|text| parse_oom_kills(&text))
        .sum()
}

/// The `oom_kill` count of a `memory.events` or `memory.oom_control`
/// text. Pure.
pub fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// How long [`remove`] waits for a cgroup to empty. A QEMU that outlived
/// its agent is reaped by init, which may take seconds, and its cgroup
/// stays busy until then.
const REMOVE_PATIENCE: Duration = Duration::from_secs(10);

/// Removes cgroup directories once their processes are gone. The kernel
/// keeps a cgroup busy until its last process is reaped, not only exited.
pub async fn remove(dirs: &[PathBuf]) {
    let deadline = tokio::time::Instant::now() + REMOVE_PATIENCE;
    for dir in dirs {
        loop {
            let attempt = dir.clone();
            let removed = tokio::task::spawn_blocking(move || fs::remove_dir(attempt))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            match removed {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(cgroup = %dir.display(), "cgroup still busy; leaving it");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_dirs_name_one_directory_per_hierarchy() {
        let v2 = CgroupLayout::V2 {
            parent: "/sys/fs/cgroup/kvm-agent".into(),
        };
        assert_eq!(
            v2.instance_dirs("web"),
            [PathBuf::from("/sys/fs/cgroup/kvm-agent/web")]
        );
        let v1 = CgroupLayout::V1 {
            memory: "/sys/fs/cgroup/memory/kvm-agent".into(),
            cpu: Some("/sys/fs/cgroup/cpu/kvm-agent".into()),
        };
        assert_eq!(
            v1.instance_dirs("web"),
            [
                PathBuf::from("/sys/fs/cgroup/memory/kvm-agent/web"),
                PathBuf::from("/sys/fs/cgroup/cpu/kvm-agent/web"),
            ]
        );
    }

    #[test]
    fn oom_kills_are_read_from_either_hierarchy() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_oom_kills(v2), Some(1));
        assert_eq!(parse_oom_kills(v1), Some(3));
        assert_eq!(parse_oom_kills("oom_kill_disable 0\n"), None);
    }

    #[test]
    fn headroom_is_at_least_the_minimum_and_grows_with_the_guest() {
        assert_eq!(CgroupLimits::for_guest(64, 100).memory_limit_mib, 64 + 512);
        assert_eq!(
            CgroupLimits::for_guest(8192, 100).memory_limit_mib,
            8192 + 2048
        );
    }

    #[test]
    fn v1_shares_follow_the_v2_weight() {
        assert_eq!(v1_shares(100), 1024);
        assert_eq!(v1_shares(200), 2048);
        assert_eq!(v1_shares(1), 10);
    }

    #[test]
    fn a_root_without_cgroups_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        // A plain directory: no controllers, and a "memory" that isn't a
        // cgroup (no cgroup.procs appears in what is made).
        let err = detect(dir.path(), "kvm-agent").unwrap_err();
        assert!(err.reason.contains("no memory controller"), "{err}");
        assert!(err.to_string().contains("run without a cgroup"), "{err}");
    }
}
