//! The unprivileged identity a confined QEMU runs as, and what it may
//! open itself.
//!
//! QEMU gets its disks, taps and sockets as fds from the agent, so the only
//! device it opens by path is `/dev/kvm`. Whether it can is decided here
//! from the device's owner and mode, purely, so the answer and the advice
//! that goes with it can be tested without a device.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// The uid and gid QEMU runs as. Never root: the runtime refuses 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QemuUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl fmt::Display for QemuUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} gid {}", self.uid, self.gid)
    }
}

/// The processes of the host by their uids. Kernel threads are left out,
/// as is a process that exits during the scan.
///
/// A start scans the host, so this stays cheap: the owner of a
/// `/proc/<pid>` directory is the process's effective uid, which costs a
/// `stat`, where generating its `status` costs tens of microseconds. Only
/// a process running as root is read from `status`, for a real uid that
/// may be another's (a set-user-ID program that user started). A process
/// whose real uid differs from an effective uid other than root is listed
/// under the effective one alone.
pub fn processes_by_uid() -> std::collections::HashMap<u32, Vec<u32>> {
    let mut by_uid = std::collections::HashMap::<u32, Vec<u32>>::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return by_uid;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let uids = match meta.uid() {
            0 => root_owned_process_uids(&entry.path()),
            owner => vec![owner],
        };
        for uid in uids {
            by_uid.entry(uid).or_default().push(pid);
        }
    }
    by_uid
}

/// The real and effective uid of a process running as root, whose `/proc`
/// directory is `dir`; none for a kernel thread (or a zombie).
fn root_owned_process_uids(dir: &Path) -> Vec<u32> {
    use std::io::Read;
    // Only a process with memory has an executable; a host has many kernel
    // threads, and this is cheaper than their `status`.
    if std::fs::read_link(dir.join("exe")).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    {
        return Vec::new();
    }
    // The uids come early in the text: one read is enough.
    let mut head = [0u8; 4096];
    let Ok(len) = std::fs::File::open(dir.join("status")).and_then(|mut f| f.read(&mut head))
    else {
        return Vec::new();
    };
    status_uids(&String::from_utf8_lossy(&head[..len]))
}

/// The real and effective uid of a `/proc/<pid>/status` text. Pure.
fn status_uids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|ids| {
            ids.split_whitespace()
                .take(2)
                .filter_map(|id| id.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Owner, group and permission bits of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    /// Owning user.
    pub uid: u32,
    /// Owning group.
    pub gid: u32,
    /// Permission bits (the low 12 bits of `st_mode`).
    pub mode: u32,
}

impl Ownership {
    /// Reads them from a file's metadata (following symlinks).
    pub fn of(path: &Path) -> std::io::Result<Ownership> {
        let meta = std::fs::metadata(path)?;
        Ok(Ownership::from_metadata(&meta))
    }

    /// Takes them from metadata already read.
    pub fn from_metadata(meta: &std::fs::Metadata) -> Ownership {
        Ownership {
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
        }
    }

    /// Whether `user`, with supplementary `groups`, has every permission
    /// in `wanted` (a mask of `r`=4, `w`=2, `x`=1) by the mode bits.
    pub fn grants(&self, user: QemuUser, groups: &[u32], wanted: u32) -> bool {
        let class = if self.uid == user.uid {
            6
        } else if self.gid == user.gid || groups.contains(&self.gid) {
            3
        } else {
            0
        };
        (self.mode >> class) & wanted == wanted
    }
}

/// Why QEMU's user can't open `/dev/kvm`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "QEMU runs as {user} and can't open {KVM_DEVICE} (owner {}, group {}, mode {:04o}); \
     let a group use it, e.g. `groupadd -f kvm && chgrp kvm {KVM_DEVICE} && chmod 0660 {KVM_DEVICE}` \
     (QEMU is given the device's group), or make it 0666 as most distributions do",
    device.uid, device.gid, device.mode
)]
pub struct KvmAccessError {
    /// Who QEMU runs as.
    pub user: QemuUser,
    /// The device's ownership.
    pub device: Ownership,
}

/// The supplementary groups `user` needs to open `/dev/kvm` read-write,
/// or why no group can help. Root's group is never handed out: a device
/// only root's group may use stays closed. Pure.
pub fn kvm_groups(user: QemuUser, device: Ownership) -> Result<Vec<u32>, KvmAccessError> {
    const READ_WRITE: u32 = 0o6;
    if device.grants(user, &[], READ_WRITE) {
        return Ok(Vec::new());
    }
    if device.gid != 0 && device.grants(user, &[device.gid], READ_WRITE) {
        return Ok(vec![device.gid]);
    }
    Err(KvmAccessError { user, device })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_gives_its_real_and_effective_uid() {
        let status =
            "Name:\tqemu\nUmask:\t0022\nUid:\t70001\t70002\t70003\t70004\nGid:\t5\t5\t5\t5\n";
        assert_eq!(status_uids(status), [70001, 70002]);
        assert_eq!(status_uids("Name:\tgone\n"), Vec::<u32>::new());
    }

    /// Pids of the kernel's own threads, from the `PF_KTHREAD` flag in
    /// `/proc/<pid>/stat`.
    fn kernel_threads() -> Vec<u32> {
        const PF_KTHREAD: u64 = 0x0020_0000;
        let flags = |stat: &str| -> Option<u64> {
            // The fields after the parenthesised name; flags is the 9th
            // field, the 7th after the name.
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(6)?
                .parse()
                .ok()
        };
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| flags(&s))
                    .is_some_and(|f| f & PF_KTHREAD != 0)
            })
            .collect()
    }

    #[test]
    fn the_process_scan_finds_this_process_and_no_kernel_thread() {
        let by_uid = processes_by_uid();
        let me = std::process::id();
        let uid = nix::unistd::getuid().as_raw();
        assert!(by_uid[&uid].contains(&me), "{me} not under uid {uid}");
        let listed: std::collections::HashSet<u32> = by_uid.values().flatten().copied().collect();
        let threads = kernel_threads();
        let listed_threads: Vec<_> = threads.iter().filter(|p| listed.contains(p)).collect();
        assert!(listed_threads.is_empty(), "{listed_threads:?}");
    }

    /// Waits until the scan lists `pid` under `uid`, or gives up.
    fn scan_lists(pid: u32, uid: u32) -> bool {
        (0..200).any(|_| {
            let found = processes_by_uid()
                .get(&uid)
                .is_some_and(|p| p.contains(&pid));
            if !found {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            found
        })
    }

    #[test]
    fn the_process_scan_finds_effective_and_real_uids() {
        use std::os::unix::process::CommandExt;
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test starts processes under other uids: run it as root"
        );
        let mut effective = std::process::Command::new("sleep")
            .arg("10")
            .uid(64_991)
            .gid(64_991)
            .spawn()
            .expect("start sleep");
        // Root by its effective uid, as a set-user-ID program is.
        let mut real = std::process::Command::new("python3")
            .args([
                "-c",
                "import os, time; os.setresuid(64992, 0, 0); time.sleep(10)",
            ])
            .spawn()
            .expect("start python3");
        let found = (
            scan_lists(effective.id(), 64_991),
            scan_lists(real.id(), 64_992),
        );
        for child in [&mut effective, &mut real] {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert_eq!(found, (true, true));
    }

    const NOBODY: QemuUser = QemuUser {
        uid: 65534,
        gid: 65534,
    };

    fn device(uid: u32, gid: u32, mode: u32) -> Ownership {
        Ownership { uid, gid, mode }
    }

    #[test]
    fn a_world_usable_device_needs_no_group() {
        assert_eq!(kvm_groups(NOBODY, device(0, 104, 0o666)), Ok(vec![]));
    }

    #[test]
    fn a_group_usable_device_lends_its_group() {
        assert_eq!(kvm_groups(NOBODY, device(0, 104, 0o660)), Ok(vec![104]));
    }

    #[test]
    fn a_read_only_group_is_not_enough() {
        assert!(kvm_groups(NOBODY, device(0, 104, 0o640)).is_err());
    }

    #[test]
    fn roots_group_is_never_lent() {
        assert!(kvm_groups(NOBODY, device(0, 0, 0o660)).is_err());
    }

    #[test]
    fn a_root_only_device_says_what_to_change() {
        let err = kvm_groups(NOBODY, device(0, 0, 0o600)).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("uid 65534"), "{message}");
        assert!(message.contains("mode 0600"), "{message}");
        assert!(message.contains("chmod 0660 /dev/kvm"), "{message}");
    }

    #[test]
    fn the_owner_class_decides_for_the_owner() {
        // Owner bits apply to the owner even when the group bits would
        // grant more, as the kernel decides.
        let file = device(65534, 0, 0o060);
        assert!(!file.grants(NOBODY, &[0], 0o4));
        assert!(device(65534, 0, 0o400).grants(NOBODY, &[], 0o4));
        assert!(device(0, 65534, 0o040).grants(NOBODY, &[], 0o4));
        assert!(!device(0, 0, 0o640).grants(NOBODY, &[], 0o4));
    }
}
