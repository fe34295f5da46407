//! Starting QEMU without copying the agent. The child is made with
//! `clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` makes one: it shares
//! the agent's memory until its exec, while the calling thread waits. A
//! fork would copy the page tables of everything the agent has touched,
//! milliseconds on a virtual machine, and leave the agent's other threads
//! taking copy-on-write faults while the child confines itself.
//!
//! The child confines itself before exec (its session, pidfile, cgroups,
//! credentials, capabilities) and may only make system calls on memory
//! built before the clone: no allocation, no lock, no panic, and no glibc
//! wrapper that acts on the whole process. glibc's `set*id` wrappers
//! signal every thread of the process, and the child would find the
//! agent's threads in the memory it shares, so ids change through
//! rustix's calls for the calling thread, which are raw system calls.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sched::CloneFlags;
use rustix::io::{Errno, FdFlags, fcntl_setfd};
use rustix::process::{Pid, Signal, WaitOptions, kill_process, waitpid};
use rustix::thread::{
    CapabilitySet, CapabilitySets, set_capabilities, set_keep_capabilities, set_no_new_privs,
    set_thread_groups, set_thread_res_gid, set_thread_res_uid,
};

/// Who a spawned process becomes before exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id (real, effective and saved).
    pub uid: u32,
    /// Group id (real, effective and saved).
    pub gid: u32,
    /// Supplementary groups; every other group is dropped.
    pub groups: Vec<u32>,
    /// Keep `CAP_SYS_CHROOT`, and no other capability, across exec, so
    /// that QEMU can enter its chroot.
    pub keep_chroot: bool,
}

/// How a spawned QEMU is confined before exec.
#[derive(Debug, Clone, Default)]
pub struct SpawnConfinement {
    /// Set `no_new_privs`, so no setuid binary or file capability can give
    /// it more.
    pub no_new_privs: bool,
    /// Drop to this user; `None` keeps the agent's.
    pub credentials: Option<Credentials>,
    /// Cgroup files to write `0` to (`cgroup.procs`, or v1's `tasks`),
    /// while still privileged, so the program runs inside its cgroups from
    /// the start.
    pub cgroup_procs: Vec<RawFd>,
}

/// A process [`spawn_detached`] started; its parent reaps it.
#[derive(Debug)]
pub struct Spawned {
    pid: Pid,
    status: Option<ExitStatus>,
}

impl Spawned {
    /// Its pid.
    pub fn id(&self) -> u32 {
        self.pid.as_raw_pid().unsigned_abs()
    }

    /// Sends SIGKILL, unless it has been reaped.
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_none() {
            kill_process(self.pid, Signal::KILL)?;
        }
        Ok(())
    }

    /// Waits for it to end and reaps it.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = loop {
            match waitpid(Some(self.pid), WaitOptions::empty()) {
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(reaped) => break reaped.map_or(0, |(_, status)| status.as_raw()),
            }
        };
        let status = ExitStatus::from_raw(status);
        self.status = Some(status);
        Ok(status)
    }
}

/// Stack for the child until its exec: it runs [`confine_and_exec`] alone.
const CHILD_STACK_BYTES: usize = 256 << 10;

/// Everything the child touches, built before the clone.
struct ChildPlan<'a> {
    program: &'a CString,
    /// Null-terminated.
    argv: &'a [*const libc::c_char],
    /// Null-terminated.
    envp: &'a [*const libc::c_char],
    stdin: BorrowedFd<'a>,
    log: BorrowedFd<'a>,
    pidfile: Option<BorrowedFd<'a>>,
    cgroup_procs: &'a [BorrowedFd<'a>],
    inherit: &'a [BorrowedFd<'a>],
    credentials: Option<&'a Credentials>,
    groups: &'a [rustix::process::Gid],
    no_new_privs: bool,
}

/// Spawns `binary` with `args` and the agent's environment plus `env` in
/// a new session, with stdout and stderr appended to `log`, and with
/// `inherit` (and only those, besides 0-2) passed across exec. The child
/// writes its own pid into `pidfile`, so that no QEMU ever runs without
/// one, even when the agent dies right after the clone.
///
/// Privileges are dropped here, before exec, rather than by QEMU's
/// `-runas`: QEMU's sandbox forbids the calls `-runas` makes.
pub fn spawn_detached(
    binary: &Path,
    args: &[impl AsRef<OsStr>],
    env: &[(&str, &OsStr)],
    inherit: &[RawFd],
    log: File,
    pidfile: Option<&File>,
    confinement: &SpawnConfinement,
) -> io::Result<Spawned> {
    let program = c_string(binary.as_os_str().to_owned())?;
    let args = std::iter::once(Ok(program.clone()))
        .chain(args.iter().map(|a| c_string(a.as_ref().to_owned())))
        .collect::<io::Result<Vec<_>>>()?;
    let environment = environment(env)?;
    let argv = null_terminated(&args);
    let envp = null_terminated(&environment);
    let stdin = File::open("/dev/null")?;
    let groups: Vec<rustix::process::Gid> = confinement
        .credentials
        .iter()
        .flat_map(|c| c.groups.iter().copied())
        .map(rustix::process::Gid::from_raw)
        .collect();
    let borrow = |fds: &[RawFd]| -> Vec<BorrowedFd<'_>> {
        fds.iter()
            // SAFETY: the fds are the caller's, open until this returns; a
            // wrong one only fails a call with EBADF.
            .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
            .collect()
    };
    let (cgroup_procs, inherit) = (borrow(&confinement.cgroup_procs), borrow(inherit));
    let plan = ChildPlan {
        program: &program,
        argv: &argv,
        envp: &envp,
        stdin: stdin.as_fd(),
        log: log.as_fd(),
        pidfile: pidfile.map(AsFd::as_fd),
        cgroup_procs: &cgroup_procs,
        inherit: &inherit,
        credentials: confinement.credentials.as_ref(),
        groups: &groups,
        no_new_privs: confinement.no_new_privs,
    };
    start(&plan)
}

/// Clones the child that carries out `plan`, and returns once it has
/// exec'd, or with why it couldn't.
fn start(plan: &ChildPlan) -> io::Result<Spawned> {
    let failure = AtomicI32::new(0);
    let mut stack = vec![0u8; CHILD_STACK_BYTES];
    let pid = {
        // No handler of the agent's may run in the child, on its memory:
        // every signal stays blocked until the child has reset them.
        let _blocked = BlockedSignals::all()?;
        let child = Box::new(|| {
            let Err(errno) = confine_and_exec(plan);
            failure.store(errno.raw_os_error(), Ordering::SeqCst);
            // SAFETY: ends the child without running anything of the
            // agent's (atexit handlers, buffers) on the shared memory.
            unsafe { libc::_exit(127) }
        });
        // SAFETY: the child runs `confine_and_exec` on its own stack and
        // on `plan`, which outlive it: CLONE_VFORK holds this thread until
        // the child has exec'd or exited.
        unsafe {
            nix::sched::clone(
                child,
                &mut stack,
                CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK,
                Some(libc::SIGCHLD),
            )
        }
        .map_err(io::Error::from)?
    };
    let mut spawned = Spawned {
        pid: Pid::from_raw(pid.as_raw()).ok_or_else(|| io::Error::other("clone gave pid 0"))?,
        status: None,
    };
    match failure.load(Ordering::SeqCst) {
        0 => Ok(spawned),
        errno => {
            let _ = spawned.wait();
            Err(io::Error::from_raw_os_error(errno))
        }
    }
}

fn c_string(s: OsString) -> io::Result<CString> {
    CString::new(s.into_vec()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// The agent's environment, with `env` set over it, as `KEY=value`.
fn environment(env: &[(&str, &OsStr)]) -> io::Result<Vec<CString>> {
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(key, _)| !env.iter().any(|(k, _)| OsStr::new(k) == key))
        .collect();
    vars.extend(
        env.iter()
            .map(|(k, v)| (OsString::from(k), v.to_os_string())),
    );
    vars.into_iter()
        .map(|(key, value)| {
            let mut pair = key;
            pair.push("=");
            pair.push(value);
            c_string(pair)
        })
        .collect()
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The calling thread's signal mask, all blocked until dropped.
struct BlockedSignals(libc::sigset_t);

impl BlockedSignals {
    fn all() -> io::Result<Self> {
        // SAFETY: the sets are locals the calls initialize.
        unsafe {
            let mut all = std::mem::zeroed();
            let mut previous = std::mem::zeroed();
            libc::sigfillset(&mut all);
            match libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous) {
                0 => Ok(BlockedSignals(previous)),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        }
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: puts back the mask `all` saved.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// The child's side: confines itself as `plan` says and execs; returns
/// only on failure, with the errno. Runs in the memory of the agent,
/// whose calling thread waits: see the module's rules.
fn confine_and_exec(plan: &ChildPlan) -> Result<std::convert::Infallible, Errno> {
    reset_signal_handlers()?;
    confine(plan)?;
    // SAFETY: an empty set, then the mask QEMU starts with; the strings
    // and arrays outlive the exec.
    unsafe {
        let mut none = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
    }
    Err(last_errno())
}

/// The errno a libc call left, as rustix's type.
fn last_errno() -> Errno {
    Errno::from_raw_os_error(
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

/// What the child does before exec, in raw system calls.
fn confine(plan: &ChildPlan) -> Result<(), Errno> {
    // Its own session: QEMU outlives the agent and no terminal signal
    // aimed at the agent reaches it.
    rustix::process::setsid()?;
    if let Some(fd) = plan.pidfile {
        let mut line = [0u8; 11];
        let pid = rustix::process::getpid().as_raw_pid().unsigned_abs();
        write_all(fd, crate::process::pid_line(pid, &mut line))?;
    }
    // "0" is the writer itself.
    for &fd in plan.cgroup_procs {
        write_all(fd, b"0")?;
    }
    for &fd in plan.inherit {
        fcntl_setfd(fd, FdFlags::empty())?;
    }
    onto_stdio(plan.stdin, 0, rustix::stdio::dup2_stdin)?;
    onto_stdio(plan.log, 1, rustix::stdio::dup2_stdout)?;
    onto_stdio(plan.log, 2, rustix::stdio::dup2_stderr)?;
    if let Some(credentials) = plan.credentials {
        drop_credentials(credentials, plan.groups)?;
    }
    if plan.no_new_privs {
        set_no_new_privs(true)?;
    }
    Ok(())
}

/// Makes `fd` the standard fd `number` with `dup2`, or, where it already
/// is (an agent started with that fd closed), clears its close-on-exec,
/// which `dup2` onto itself would leave.
fn onto_stdio<'a>(
    fd: BorrowedFd<'a>,
    number: RawFd,
    dup2: impl FnOnce(BorrowedFd<'a>) -> Result<(), Errno>,
) -> Result<(), Errno> {
    match fd.as_raw_fd() == number {
        true => fcntl_setfd(fd, FdFlags::empty()),
        false => dup2(fd),
    }
}

/// Every handled signal back to its default, and SIGPIPE too (the agent,
/// as any Rust program, ignores it; QEMU expects the default). Other
/// ignored signals stay ignored, as across a fork.
fn reset_signal_handlers() -> Result<(), Errno> {
    for signal in 1..=libc::SIGRTMAX() {
        if matches!(signal, libc::SIGKILL | libc::SIGSTOP) {
            continue;
        }
        // SAFETY: `action` is a local the calls read and write; glibc's
        // sigaction is the system call alone.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut action) != 0 {
                continue;
            }
            let handled = !matches!(action.sa_sigaction, libc::SIG_DFL | libc::SIG_IGN);
            if handled || signal == libc::SIGPIPE {
                action.sa_sigaction = libc::SIG_DFL;
                action.sa_flags = 0;
                if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                    return Err(last_errno());
                }
            }
        }
    }
    Ok(())
}

/// Becomes `credentials`, keeping `CAP_SYS_CHROOT` alone across exec
/// when asked.
fn drop_credentials(
    credentials: &Credentials,
    groups: &[rustix::process::Gid],
) -> Result<(), Errno> {
    let uid = rustix::process::Uid::from_raw(credentials.uid);
    let gid = rustix::process::Gid::from_raw(credentials.gid);
    // Capabilities survive the change of uid only if asked.
    if credentials.keep_chroot {
        set_keep_capabilities(true)?;
    }
    // Groups first: once the uid is gone, so is the right to change them.
    set_thread_groups(groups)?;
    set_thread_res_gid(gid, gid, gid)?;
    set_thread_res_uid(uid, uid, uid)?;
    if credentials.keep_chroot {
        let chroot = CapabilitySet::SYS_CHROOT;
        set_capabilities(
            None,
            CapabilitySets {
                effective: chroot,
                permitted: chroot,
                inheritable: chroot,
            },
        )?;
        rustix::thread::configure_capability_in_ambient_set(chroot, true)?;
    }
    Ok(())
}

fn write_all(fd: BorrowedFd, mut bytes: &[u8]) -> Result<(), Errno> {
    while !bytes.is_empty() {
        let n = rustix::io::write(fd, bytes)?;
        bytes = bytes.get(n..).unwrap_or_default();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `cat /proc/self/status` spawned with `confinement` and returns
    /// its status lines.
    fn status_of_child(confinement: &SpawnConfinement) -> String {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = spawn_detached(
            Path::new("/bin/cat"),
            &["/proc/self/status"],
            &[],
            &[],
            log.reopen().unwrap(),
            None,
            confinement,
        )
        .unwrap();
        assert!(child.wait().unwrap().success());
        std::fs::read_to_string(log.path()).unwrap()
    }

    /// Runs `cat /proc/self/status` as nobody under `keep_chroot` and
    /// returns its status lines. Needs root, as the agent does.
    fn confined_status(keep_chroot: bool) -> String {
        let may = |c| caps::has_cap(None, caps::CapSet::Effective, c).unwrap_or(false);
        assert!(
            may(caps::Capability::CAP_SETUID) && may(caps::Capability::CAP_SYS_CHROOT),
            "this test drops privileges the way the agent does, so it runs as root \
             (CAP_SETUID and CAP_SYS_CHROOT); run the suite with scripts/test as root"
        );
        status_of_child(&SpawnConfinement {
            no_new_privs: true,
            credentials: Some(Credentials {
                uid: 65534,
                gid: 65534,
                groups: Vec::new(),
                keep_chroot,
            }),
            cgroup_procs: Vec::new(),
        })
    }

    fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
    }

    #[test]
    fn a_confined_child_keeps_cap_sys_chroot_alone() {
        let status = confined_status(true);

        for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(status_field(&status, set), "0000000000040000", "{set}");
        }
        assert_eq!(status_field(&status, "Uid"), "65534\t65534\t65534\t65534");
        assert_eq!(status_field(&status, "Gid"), "65534\t65534\t65534\t65534");
        assert_eq!(status_field(&status, "Groups"), "");
        assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    }

    #[test]
    fn a_confined_child_without_chroot_keeps_no_capability() {
        let status = confined_status(false);

        for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(status_field(&status, set), "0000000000000000", "{set}");
        }
    }

    #[test]
    fn a_child_starts_in_a_session_of_its_own_with_no_signal_blocked_and_sigpipe_default() {
        let status = status_of_child(&SpawnConfinement::default());

        assert_eq!(status_field(&status, "SigBlk"), "0000000000000000");
        let ignored = u64::from_str_radix(status_field(&status, "SigIgn"), 16).unwrap();
        let sigpipe = 1 << (libc::SIGPIPE - 1);
        assert_eq!(ignored & sigpipe, 0, "SIGPIPE is ignored: {ignored:x}");
        let pid = status_field(&status, "Pid");
        assert_eq!(status_field(&status, "NSsid"), pid, "its own session");
    }

    #[test]
    fn a_child_gets_the_environment_and_its_pidfile_and_passed_fds() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = File::create(dir.path().join("pid")).unwrap();
        let passed = File::open("/dev/null").unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let script = format!(
            "echo \"$KVMA_SPAWN_TEST\"; test -e /proc/self/fd/{} && echo passed",
            passed.as_raw_fd()
        );
        let mut child = spawn_detached(
            Path::new("/bin/sh"),
            &["-c", &script],
            &[("KVMA_SPAWN_TEST", OsStr::new("given"))],
            &[passed.as_raw_fd()],
            log.reopen().unwrap(),
            Some(&pidfile),
            &SpawnConfinement::default(),
        )
        .unwrap();
        let pid = child.id();
        assert!(child.wait().unwrap().success());

        assert_eq!(
            std::fs::read_to_string(log.path()).unwrap(),
            "given\npassed\n"
        );
        let written = std::fs::read_to_string(dir.path().join("pid")).unwrap();
        assert_eq!(written, format!("{pid}\n"));
    }

    #[test]
    fn a_child_that_cannot_exec_reports_why() {
        let log = tempfile::NamedTempFile::new().unwrap();
        let error = spawn_detached(
            Path::new("/nonexistent/qemu"),
            &["-version"],
            &[],
            &[],
            log.reopen().unwrap(),
            None,
            &SpawnConfinement::default(),
        )
        .unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::NotFound, "{error}");
    }
}
