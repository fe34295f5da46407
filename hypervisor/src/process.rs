//! QEMU as an OS process: spawning it in its own session, pidfiles,
//! liveness that survives pid reuse, and pidfds for supervision.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use uuid::Uuid;

/// Writes a file into a run directory, which may belong to QEMU's user,
/// so nothing there is followed: whatever is at `path` is removed (a
/// symlink itself, not its target) and the file is created anew, mode
/// 0600.
pub fn write_own_file(path: &Path, contents: &str) -> io::Result<()> {
    create_own_file(path)?.write_all(contents.as_bytes())
}

/// Creates a file the way [`write_own_file`] does, empty, for writing.
pub fn create_own_file(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// `n` in decimal with a newline, as a pidfile holds it, in `buf`.
/// Allocates nothing, for use between fork and exec. Pure.
pub(crate) fn pid_line(n: u32, buf: &mut [u8; 11]) -> &[u8] {
    let mut at = buf.len() - 1;
    buf[at] = b'\n';
    let mut n = n;
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Reads a file the agent wrote into a run directory, if it is still the
/// agent's: not a symlink, and owned by the agent's user rather than by a
/// QEMU that may write to that directory.
pub fn read_own_file(path: &Path) -> Option<String> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    if file.metadata().ok()?.uid() != rustix::process::geteuid().as_raw() {
        tracing::warn!(path = %path.display(), "ignoring a file the agent didn't write");
        return None;
    }
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Reads a pidfile; `None` when missing, unreadable or not the agent's.
pub fn read_pidfile(path: &Path) -> Option<u32> {
    read_own_file(path)?.trim().parse().ok()
}

/// True when the arguments carry `-uuid <uuid>`. Pure.
pub fn cmdline_has_uuid(cmdline: &[u8], uuid: Uuid) -> bool {
    let wanted = uuid.to_string();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"-uuid" && w[1] == wanted.as_bytes())
}

/// True when `pid` is alive and is the QEMU of the instance `uuid`.
///
/// A pid alone proves nothing after a reboot or a wrap-around; the uuid on
/// the command line does. A zombie has an empty command line and so counts
/// as dead.
pub fn runs_instance(pid: u32, uuid: Uuid) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| cmdline_has_uuid(&c, uuid))
}

/// True when the arguments carry `-name guest=<name>,…`, as every QEMU
/// the agent starts does. Pure.
pub fn cmdline_has_name(cmdline: &[u8], name: &str) -> bool {
    let wanted = format!("guest={name},");
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == b"-name" && w[1].starts_with(wanted.as_bytes()))
}

/// True when `pid` is alive and is a QEMU of the instance called `name`,
/// whatever its uuid.
pub fn runs_instance_named(pid: u32, name: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| cmdline_has_name(&c, name))
}

/// The pid in `pidfile` if that process is the instance's QEMU.
pub fn live_instance_pid(pidfile: &Path, uuid: Uuid) -> Option<u32> {
    read_pidfile(pidfile).filter(|&pid| runs_instance(pid, uuid))
}

/// Names of the tap interfaces that `pid` holds open, in fd order. The
/// kernel shows them in fdinfo as `iff:`, which lets an agent that
/// restarted under a running QEMU find its taps again.
pub fn tap_names(pid: u32) -> Vec<String> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut taps: Vec<(u32, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            let info = fs::read_to_string(e.path()).ok()?;
            let name = info.lines().find_map(|l| l.strip_prefix("iff:"))?;
            Some((fd, name.trim().to_owned()))
        })
        .collect();
    taps.sort();
    let mut names: Vec<String> = taps.into_iter().map(|(_, name)| name).collect();
    // A multiqueue tap holds one fd per queue, opened one after another.
    names.dedup();
    names
}

/// The tap interface behind fd `fd` of process `pid`, from the `iff:`
/// line the kernel shows in its fdinfo.
pub fn tap_name_of_fd(pid: u32, fd: u32) -> Option<String> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("iff:"))
        .map(|name| name.trim().to_owned())
}

/// The fd of each tap netdev's first queue, by netdev id, from the text of
/// QEMU's `info network` (lines like ` \ net-…: index=0,type=tap,fd=11`).
/// QEMU has no QMP command that says which fd a netdev uses. Pure.
pub fn netdev_tap_fds(info_network: &str) -> std::collections::BTreeMap<String, u32> {
    info_network
        .lines()
        .filter_map(|line| {
            let (id, options) = line.trim_start_matches([' ', '\\']).split_once(": ")?;
            let mut fields = options.trim().split(',');
            let first_queue = fields.clone().any(|f| f == "index=0");
            let tap = fields.clone().any(|f| f == "type=tap");
            let fd = fields.find_map(|f| f.strip_prefix("fd="))?.parse().ok()?;
            (first_queue && tap).then(|| (id.to_owned(), fd))
        })
        .collect()
}

/// Returns the last `max_bytes` of a log file, lossily decoded.
pub fn log_tail(path: &Path, max_bytes: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_owned()
}

/// Rotates `path` to `path.1` .. `path.keep` when it is over `max_bytes`.
pub fn rotate_log(path: &Path, max_bytes: u64, keep: u32) -> io::Result<()> {
    if fs::metadata(path).map_or(true, |m| m.len() <= max_bytes) {
        return Ok(());
    }
    let numbered = |n: u32| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        std::path::PathBuf::from(p)
    };
    for n in (1..keep).rev() {
        let from = numbered(n);
        if from.exists() {
            fs::rename(&from, numbered(n + 1))?;
        }
    }
    fs::rename(path, numbered(1))
}

/// A pidfd: a handle on one process that can't be confused by pid reuse.
/// Readable once the process has exited.
#[derive(Debug)]
pub struct PidFd {
    fd: AsyncFd<OwnedFd>,
    pid: u32,
}

impl PidFd {
    /// Opens a pidfd for `pid`. Must be called inside a tokio runtime.
    pub fn open(pid: u32) -> io::Result<PidFd> {
        let target = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let owned = pidfd_open(target, PidfdFlags::empty())?;
        // SAFETY: `OwnedFd` always returns the fd it owns, and the AsyncFd
        // owns the `OwnedFd` for its whole life, so the fd stays open and the
        // same.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(PidFd { fd, pid })
    }

    /// The pid it refers to.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Resolves once the process has exited. Any number of tasks may wait;
    /// readiness is never cleared, so it stays resolved.
    pub async fn exited(&self) {
        // An error here means the fd is unusable; treat it as exited rather
        // than waiting forever.
        let _ = self.fd.readable().await;
    }

    /// True if the process has already exited.
    pub fn has_exited(&self) -> bool {
        let mut fds = [PollFd::new(self.fd.get_ref(), PollFlags::IN)];
        poll(&mut fds, Some(&Timespec::default())).is_ok_and(|ready| ready > 0)
    }

    /// Sends a signal through the pidfd, so it can't hit a reused pid.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        let signal = Signal::from_named_raw(signal)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        match pidfd_send_signal(self.fd.get_ref(), signal) {
            // Already gone: the signal's purpose is served.
            Err(Errno::SRCH) => Ok(()),
            other => other.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_lines_are_decimal_with_a_newline() {
        let mut buf = [0u8; 11];
        assert_eq!(pid_line(0, &mut buf), b"0\n");
        assert_eq!(pid_line(4194304, &mut buf), b"4194304\n");
        assert_eq!(pid_line(u32::MAX, &mut buf), b"4294967295\n");
    }
    use std::time::Duration;

    #[test]
    fn uuid_must_follow_the_uuid_flag() {
        let id = Uuid::from_u128(42);
        let good = format!("qemu\0-name\0x\0-uuid\0{id}\0");
        let elsewhere = format!("qemu\0-name\0{id}\0");
        let other = format!("qemu\0-uuid\0{}\0", Uuid::from_u128(43));

        assert!(cmdline_has_uuid(good.as_bytes(), id));
        assert!(!cmdline_has_uuid(elsewhere.as_bytes(), id));
        assert!(!cmdline_has_uuid(other.as_bytes(), id));
        assert!(!cmdline_has_uuid(b"", id));
    }

    #[test]
    fn info_network_gives_each_tap_netdevs_first_fd() {
        let text = "nic-a: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:01\r\n \\ net-a: index=0,type=tap,fd=11\r\nnic-b: index=0,type=nic\r\n \\ net-b: index=0,type=tap,fd=19\r\nnic-b: index=1,type=nic,\r\n \\ net-b: index=1,type=tap,fd=20\r\n";

        let fds = netdev_tap_fds(text);

        assert_eq!(fds.len(), 2, "{fds:?}");
        assert_eq!(fds["net-a"], 11);
        assert_eq!(fds["net-b"], 19);
    }

    #[test]
    fn a_name_is_the_guest_option_of_the_name_flag_in_full() {
        let line = "qemu\0-name\0guest=web1,debug-threads=on\0-uuid\0x\0";

        assert!(cmdline_has_name(line.as_bytes(), "web1"));
        assert!(!cmdline_has_name(line.as_bytes(), "web"));
        assert!(!cmdline_has_name(b"qemu\0-uuid\0guest=web1,\0", "web1"));
    }

    #[test]
    fn a_pid_of_another_process_is_not_the_instance() {
        let me = std::process::id();

        assert!(!runs_instance(me, Uuid::from_u128(42)));
    }

    #[test]
    fn log_rotation_keeps_numbered_copies() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("qemu.log");
        for round in 0..4 {
            fs::write(&log, format!("round {round} {}", "x".repeat(100))).unwrap();
            rotate_log(&log, 10, 2).unwrap();
        }

        assert!(!log.exists());
        assert!(
            fs::read_to_string(dir.path().join("qemu.log.1"))
                .unwrap()
                .starts_with("round 3")
        );
        assert!(
            fs::read_to_string(dir.path().join("qemu.log.2"))
                .unwrap()
                .starts_with("round 2")
        );
        assert!(!dir.path().join("qemu.log.3").exists());
    }

    #[tokio::test]
    async fn pidfd_resolves_when_the_process_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();
        assert!(!pidfd.has_exited());

        pidfd.signal(libc::SIGKILL).unwrap();

        tokio::time::timeout(Duration::from_secs(5), pidfd.exited())
            .await
            .unwrap();
        assert!(pidfd.has_exited());
        child.wait().unwrap();
    }
}
