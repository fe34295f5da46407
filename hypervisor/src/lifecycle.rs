//! Turning a runtime into a running QEMU, and stopping it.
//!
//! Launch opens the taps and the monitor sockets itself and passes them as
//! fds, spawns QEMU in its own session and waits for the QMP greeting while
//! watching for an early exit. Stop escalates: ACPI powerdown, then QMP
//! `quit`, then SIGKILL, each with its own timeout.

use crate::cgroup::CgroupLayout;
use crate::pinning::{PinError, pin_vcpus};
use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use crate::Runtime;
use crate::argv::{self, ExecutionFds};
use crate::process::{self, PidFd};
use crate::qmp::{QmpClient, QmpConfig, QmpError};
use crate::tap::{self, Tap, TapError};

/// File names inside an instance's run directory.
pub mod files {
    /// The agent's QMP socket.
    pub const QMP: &str = "qmp.sock";
    /// The serial console socket.
    pub const SERIAL: &str = "serial.sock";
    /// The operators' QMP socket (when enabled).
    pub const OPERATOR_QMP: &str = "qmp-operator.sock";
    /// QEMU's pid.
    pub const PIDFILE: &str = "pid";
    /// QEMU's stdout and stderr.
    pub const LOG: &str = "qemu.log";
    /// The cgroup directories made for QEMU, one per line, to remove
    /// after it.
    pub const CGROUPS: &str = "cgroups";
}

/// Settings of a launch.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// QMP timeouts.
    pub qmp: QmpConfig,
    /// Also expose a second QMP monitor for operators.
    pub operator_qmp: bool,
    /// Tap name template; `%d` is filled in by the kernel.
    pub tap_template: String,
    /// Rotate qemu.log past this size at launch.
    pub log_max_bytes: u64,
    /// Rotated logs kept.
    pub log_keep: u32,
    /// Where instance cgroups go; none when the node has no usable cgroups
    /// or instances aren't confined.
    pub cgroups: Option<CgroupLayout>,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        Self {
            qmp: QmpConfig::default(),
            operator_qmp: false,
            tap_template: "kvmtap%d".into(),
            log_max_bytes: 1024 * 1024,
            log_keep: 3,
            cgroups: None,
        }
    }
}

/// How much of QEMU's log goes into an error.
pub const LOG_TAIL_BYTES: u64 = 2048;

/// Why a launch failed. Whatever it had created is gone again.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The QEMU binary is missing.
    #[error("QEMU binary {} not found; install the qemu-system-x86 package or set --qemu-binary", .0.display())]
    QemuMissing(PathBuf),
    /// The run directory or a file in it can't be made.
    #[error("can't prepare {}", path.display())]
    RunDir {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A tap couldn't be set up.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// fork/exec failed.
    #[error("can't start {}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before it was ready.
    #[error("QEMU exited during start-up ({status}); its output ends with:\n{log_tail}")]
    ExitedEarly {
        /// Exit status as text.
        status: String,
        /// The end of qemu.log.
        log_tail: String,
    },
    /// QEMU runs but QMP didn't come up.
    #[error("QEMU started but its QMP monitor did not become ready")]
    Qmp(#[source] QmpError),
    /// The vCPU threads couldn't be pinned as the runtime asks.
    #[error(transparent)]
    Pinning(#[from] PinError),
    /// The paused guest wouldn't continue after pinning.
    #[error("QEMU did not continue after its vCPUs were pinned")]
    Continue(#[source] QmpError),
    /// QEMU couldn't be put in its cgroup.
    #[error("can't put QEMU in its cgroup")]
    Cgroup(#[source] std::io::Error),
}

/// A freshly launched QEMU.
#[derive(Debug)]
pub struct Launched {
    /// Process id.
    pub pid: u32,
    /// Its pidfd.
    pub pidfd: Arc<PidFd>,
    /// The child handle, for reaping its exit status.
    pub child: Child,
    /// The connected QMP client.
    pub qmp: QmpClient,
    /// Host tap names, one per NIC in runtime order.
    pub taps: Vec<String>,
}

/// Sockets and taps that exist only for one launch; dropped once QEMU holds
/// its own copies.
struct ExecutionResources {
    qmp: UnixListener,
    serial: Option<UnixListener>,
    taps: Vec<Tap>,
    vhost: Vec<Vec<std::fs::File>>,
}

fn run_dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError + '_ {
    move |source| LaunchError::RunDir {
        path: path.to_owned(),
        source,
    }
}

/// Creates the run directory (mode 0700) and clears stale sockets in it.
pub fn prepare_run_dir(run_dir: &Path) -> Result<(), LaunchError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .map_err(run_dir_error(run_dir))?;
    fs::set_permissions(run_dir, fs::Permissions::from_mode(0o700))
        .map_err(run_dir_error(run_dir))?;
    remove_run_files(run_dir);
    Ok(())
}

/// Removes the sockets and the pidfile of a run directory, keeping the log.
pub fn remove_run_files(run_dir: &Path) {
    for name in [
        files::QMP,
        files::SERIAL,
        files::OPERATOR_QMP,
        files::PIDFILE,
    ] {
        let _ = fs::remove_file(run_dir.join(name));
    }
    let cgroups = run_dir.join(files::CGROUPS);
    if let Ok(list) = fs::read_to_string(&cgroups) {
        let dirs: Vec<PathBuf> = list.lines().map(PathBuf::from).collect();
        crate::cgroup::remove(&dirs);
        let _ = fs::remove_file(cgroups);
    }
}

fn listen(path: &Path) -> Result<UnixListener, LaunchError> {
    UnixListener::bind(path).map_err(run_dir_error(path))
}

fn open_resources(
    rt: &Runtime,
    run_dir: &Path,
    cfg: &LaunchConfig,
) -> Result<ExecutionResources, LaunchError> {
    let mut taps = Vec::with_capacity(rt.nics.len());
    for nic in &rt.nics {
        let tap = Tap::create(&cfg.tap_template, nic.spec.queues)?;
        tap.set_up()?;
        if let Some(bridge) = &nic.spec.bridge {
            tap.attach_to_bridge(bridge)?;
        }
        tracing::debug!(instance = %rt.name, nic = %nic.spec.name, tap = tap.name(), "tap ready");
        taps.push(tap);
    }
    let vhost = rt
        .nics
        .iter()
        .map(|n| {
            let queues = if n.spec.vhost { n.spec.queues } else { 0 };
            (0..queues).map(|_| tap::open_vhost_net()).collect()
        })
        .collect::<Result<Vec<Vec<_>>, TapError>>()?;
    Ok(ExecutionResources {
        vhost,
        qmp: listen(&run_dir.join(files::QMP))?,
        serial: if rt.serial_console {
            Some(listen(&run_dir.join(files::SERIAL))?)
        } else {
            None
        },
        taps,
    })
}

/// How a launched guest begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchMode {
    /// Boot it.
    Boot,
    /// Wait, paused, for its state from a migration or a save file.
    Incoming,
}

/// Launches QEMU for `rt` and waits until its QMP monitor is ready.
pub async fn launch(
    rt: &Runtime,
    run_dir: &Path,
    cfg: &LaunchConfig,
    mode: LaunchMode,
) -> Result<Launched, LaunchError> {
    if !rt.qemu.binary.is_file() {
        return Err(LaunchError::QemuMissing(rt.qemu.binary.clone()));
    }
    prepare_run_dir(run_dir)?;
    let log_path = run_dir.join(files::LOG);
    let result = launch_in(rt, run_dir, &log_path, cfg, mode).await;
    if result.is_err() {
        remove_run_files(run_dir);
    }
    result
}

async fn launch_in(
    rt: &Runtime,
    run_dir: &Path,
    log_path: &Path,
    cfg: &LaunchConfig,
    mode: LaunchMode,
) -> Result<Launched, LaunchError> {
    let resources = open_resources(rt, run_dir, cfg)?;
    let operator_qmp = run_dir.join(files::OPERATOR_QMP);
    let fds = ExecutionFds {
        qmp: resources.qmp.as_raw_fd(),
        serial: resources.serial.as_ref().map(AsRawFd::as_raw_fd),
        taps: resources
            .taps
            .iter()
            .map(|t| t.queue_fds().map(|fd| fd.as_raw_fd()).collect())
            .collect(),
        vhost: resources
            .vhost
            .iter()
            .map(|v| v.iter().map(AsRawFd::as_raw_fd).collect())
            .collect(),
        operator_qmp: cfg.operator_qmp.then_some(operator_qmp.as_path()),
        incoming: mode == LaunchMode::Incoming,
    };
    let args = argv::render_execution(rt, &fds);
    let mut inherit = vec![fds.qmp];
    inherit.extend(fds.serial);
    inherit.extend(fds.taps.iter().flatten());
    inherit.extend(fds.vhost.iter().flatten());

    let _ = process::rotate_log(log_path, cfg.log_max_bytes, cfg.log_keep);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(run_dir_error(log_path))?;
    tracing::info!(instance = %rt.name, argv = ?args, "starting QEMU");
    let mut child = process::spawn_detached(&rt.qemu.binary, &args, &inherit, log, rt.confined())
        .map_err(|source| LaunchError::Spawn {
        binary: rt.qemu.binary.clone(),
        source,
    })?;
    let pid = child.id();
    if let (Some(layout), Some(limits)) = (&cfg.cgroups, &rt.cgroup) {
        let confined = layout.confine(&rt.name, limits, pid).and_then(|dirs| {
            let list: String = dirs.iter().map(|d| format!("{}\n", d.display())).collect();
            fs::write(run_dir.join(files::CGROUPS), list)
        });
        if let Err(source) = confined {
            kill_and_reap(&mut child);
            return Err(LaunchError::Cgroup(source));
        }
    }
    let taps: Vec<String> = resources.taps.iter().map(|t| t.name().to_owned()).collect();
    // QEMU holds its own copies now. Ours must go, or a QEMU that dies early
    // would leave the QMP connection hanging instead of closing it.
    drop(resources);

    let pidfd = match PidFd::open(pid) {
        Ok(p) => Arc::new(p),
        Err(source) => {
            kill_and_reap(&mut child);
            return Err(LaunchError::Spawn {
                binary: rt.qemu.binary.clone(),
                source,
            });
        }
    };
    if let Err(source) = process::write_pidfile(&run_dir.join(files::PIDFILE), pid) {
        kill_and_reap(&mut child);
        return Err(LaunchError::RunDir {
            path: run_dir.join(files::PIDFILE),
            source,
        });
    }

    let qmp_path = run_dir.join(files::QMP);
    let connect = QmpClient::connect(&qmp_path, cfg.qmp);
    let qmp = tokio::select! {
        biased;
        result = connect => result,
        () = pidfd.exited() => Err(QmpError::Disconnected { reason: Some("QEMU exited".into()) }),
    };
    match qmp {
        Ok(qmp) => {
            if let Err(e) = pin_and_continue(rt, &qmp, mode).await {
                kill_and_reap(&mut child);
                return Err(e);
            }
            Ok(Launched {
                pid,
                pidfd,
                child,
                qmp,
                taps,
            })
        }
        Err(qmp_error) => {
            // Distinguish "QEMU died" (show why) from "QMP is broken". A
            // hang-up may come a moment before the exit; silence doesn't.
            let grace = match qmp_error {
                QmpError::NoGreeting(_) => Duration::ZERO,
                _ => Duration::from_secs(2),
            };
            let exited = tokio::time::timeout(grace, pidfd.exited()).await.is_ok();
            if exited {
                let status = child
                    .wait()
                    .map_or_else(|e| e.to_string(), |s| s.to_string());
                Err(LaunchError::ExitedEarly {
                    status,
                    log_tail: process::log_tail(log_path, LOG_TAIL_BYTES),
                })
            } else {
                kill_and_reap(&mut child);
                Err(LaunchError::Qmp(qmp_error))
            }
        }
    }
}

/// Pins the vCPUs of a QEMU that [`argv::render_execution`] started
/// paused for it, then lets a booting guest run. An incoming guest stays
/// paused: its migration or restore decides when it runs.
async fn pin_and_continue(
    rt: &Runtime,
    qmp: &QmpClient,
    mode: LaunchMode,
) -> Result<(), LaunchError> {
    let Some(pinning) = rt.cpu_pinning.as_ref().filter(|p| p.restricts()) else {
        return Ok(());
    };
    pin_vcpus(qmp, pinning).await?;
    if mode == LaunchMode::Boot {
        qmp.execute("cont", None)
            .await
            .map_err(LaunchError::Continue)?;
    }
    tracing::info!(instance = %rt.name, mask = %pinning, "vCPUs pinned");
    Ok(())
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Timeouts of each stop step.
#[derive(Debug, Clone, Copy)]
pub struct StopTimeouts {
    /// Wait after `system_powerdown` for the guest to power off.
    pub powerdown: Duration,
    /// Wait after `quit`.
    pub quit: Duration,
    /// Wait after SIGKILL.
    pub kill: Duration,
}

impl Default for StopTimeouts {
    fn default() -> Self {
        Self {
            powerdown: Duration::from_secs(60),
            quit: Duration::from_secs(5),
            kill: Duration::from_secs(5),
        }
    }
}

/// Which step ended QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMethod {
    /// The guest powered off after the ACPI request.
    Powerdown,
    /// QMP `quit`.
    Quit,
    /// SIGKILL.
    Kill,
}

/// Why a stop failed.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// Even SIGKILL didn't end it (a process stuck in the kernel).
    #[error(
        "QEMU (pid {pid}) is still alive {after:?} after SIGKILL; it is probably stuck in the kernel (D state)"
    )]
    Unkillable {
        /// The pid.
        pid: u32,
        /// How long we waited.
        after: Duration,
    },
    /// SIGKILL couldn't be sent.
    #[error("can't send SIGKILL to QEMU (pid {pid})")]
    Signal {
        /// The pid.
        pid: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

async fn exits_within(pidfd: &PidFd, limit: Duration) -> bool {
    tokio::time::timeout(limit, pidfd.exited()).await.is_ok()
}

/// Stops QEMU: powerdown, quit, SIGKILL; `force` goes straight to SIGKILL.
/// A broken QMP connection just moves on to the next step.
pub async fn stop(
    qmp: Option<&QmpClient>,
    pidfd: &PidFd,
    timeouts: StopTimeouts,
    force: bool,
) -> Result<StopMethod, StopError> {
    if !force && let Some(qmp) = qmp {
        match qmp
            .execute_with_timeout("system_powerdown", None, timeouts.powerdown)
            .await
        {
            Ok(_) if exits_within(pidfd, timeouts.powerdown).await => {
                return Ok(StopMethod::Powerdown);
            }
            Ok(_) => {
                tracing::info!(pid = pidfd.pid(), "guest ignored powerdown; quitting QEMU")
            }
            Err(e) => {
                tracing::warn!(pid = pidfd.pid(), error = %e, "powerdown failed; quitting QEMU")
            }
        }
    }
    quit(qmp.filter(|_| !force), pidfd, timeouts).await
}

/// Ends QEMU without asking the guest: QMP `quit` (when a connection is
/// given), then SIGKILL.
pub async fn quit(
    qmp: Option<&QmpClient>,
    pidfd: &PidFd,
    timeouts: StopTimeouts,
) -> Result<StopMethod, StopError> {
    if let Some(qmp) = qmp {
        match qmp.execute_with_timeout("quit", None, timeouts.quit).await {
            // QEMU may close the socket before its reply arrives.
            Ok(_) | Err(QmpError::Disconnected { .. })
                if exits_within(pidfd, timeouts.quit).await =>
            {
                return Ok(StopMethod::Quit);
            }
            Ok(_) | Err(QmpError::Disconnected { .. }) => {
                tracing::warn!(pid = pidfd.pid(), "QEMU didn't exit after quit; killing it")
            }
            Err(e) => {
                tracing::warn!(pid = pidfd.pid(), error = %e, "quit failed; killing QEMU")
            }
        }
        // It may have gone in the moment between the timeout and here.
        if pidfd.has_exited() {
            return Ok(StopMethod::Quit);
        }
    }
    pidfd
        .signal(libc::SIGKILL)
        .map_err(|source| StopError::Signal {
            pid: pidfd.pid(),
            source,
        })?;
    if exits_within(pidfd, timeouts.kill).await {
        Ok(StopMethod::Kill)
    } else {
        Err(StopError::Unkillable {
            pid: pidfd.pid(),
            after: timeouts.kill,
        })
    }
}

/// Resets the guest with `system_reset` and waits for QEMU's RESET event.
pub async fn reset(qmp: &QmpClient, timeout: Duration) -> Result<(), QmpError> {
    let mut events = qmp.subscribe();
    qmp.execute("system_reset", None).await?;
    tokio::time::timeout(timeout, async {
        loop {
            match events.recv().await {
                Ok(e) if e.name == "RESET" => return Ok(()),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err(QmpError::Disconnected { reason: None });
                }
            }
        }
    })
    .await
    .map_err(|_| QmpError::Timeout {
        command: "system_reset (waiting for RESET)".into(),
        after: timeout,
    })?
}
