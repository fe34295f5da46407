//! Turning a runtime into a running QEMU, and stopping it.
//!
//! Launch opens the taps and the monitor sockets itself and passes them as
//! fds, spawns QEMU in its own session and waits for the QMP greeting while
//! watching for an early exit. Stop escalates: ACPI powerdown, then QMP
//! `quit`, then SIGKILL, each with its own timeout.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{getegid, geteuid};
use tracing::{Instrument, debug_span};

use crate::Runtime;
use crate::affinity::{PinError, pin_vcpus};
use crate::cgroup::{CgroupLayout, PreparedCgroups};
use crate::host_files::{self, AllowedRoots, DiskImage, HostFileError};
use crate::identity::{self, KvmAccessError, Ownership, QemuUser};
use crate::process::{self, PidFd};
use crate::qemu_info::{QemuInfo, QemuVersion};
use crate::qmp::{QmpClient, QmpConfig, QmpError};
use crate::runtime::ResolvedAccelerator;
use crate::runtime::argv::{self, ExecutionFds, ImageFd, MachineFds};
use crate::spawn::{self, Credentials, SpawnConfinement, Spawned};
use crate::spec::{Boot, MemoryBacking, NicModel};
use crate::tap::{self, Tap, TapError};

pub use crate::runtime::argv::LaunchMode;

/// File names inside an instance's run directory.
pub mod files {
    /// The agent's QMP socket.
    pub const QMP: &str = "qmp.sock";
    /// The serial console socket.
    pub const SERIAL: &str = "serial.sock";
    /// The operators' QMP socket (when enabled).
    pub const OPERATOR_QMP: &str = "qmp-operator.sock";
    /// The guest agent's channel (when the runtime has one).
    pub const GUEST_AGENT: &str = "qga.sock";
    /// QEMU's pid.
    pub const PIDFILE: &str = "pid";
    /// QEMU's stdout and stderr.
    pub const LOG: &str = "qemu.log";
    /// The cgroup directories made for QEMU, one per line, to remove
    /// after it.
    pub const CGROUPS: &str = "cgroups";
    /// The empty directory QEMU shuts itself into.
    pub const CHROOT: &str = "root";
    /// The copy of VNC's x509 files QEMU reads.
    pub const VNC_X509: &str = "vnc-x509";
    /// The copy of SPICE's TLS files QEMU reads.
    pub const SPICE_X509: &str = "spice-x509";
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
    /// Where disk images, boot files and RAM files may be opened; checked
    /// again at every launch, since a path may lead elsewhere by then.
    pub allowed_roots: AllowedRoots,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        Self {
            // QEMU's monitor reads a command one byte per turn of its
            // loop, a few microseconds a byte. With `oob` it parses a
            // pipeline's next command while it runs the one before; a
            // receiving QEMU needs it anyway for `migrate-recover`.
            qmp: QmpConfig {
                out_of_band: true,
                ..QmpConfig::default()
            },
            operator_qmp: false,
            tap_template: "kvmtap%d".into(),
            log_max_bytes: 1024 * 1024,
            log_keep: 3,
            cgroups: None,
            allowed_roots: AllowedRoots::default(),
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
    /// The node's QEMU lacks the runtime's machine type, which never
    /// changes while the instance lives.
    #[error(
        "this node's QEMU {version} has no machine type {machine_type}; run the instance on a QEMU that has it, or hard-reboot it onto a machine type this QEMU offers"
    )]
    MachineType {
        /// The runtime's machine type.
        machine_type: String,
        /// The node's QEMU version.
        version: QemuVersion,
    },
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
    /// QEMU's own user may not execute the binary.
    #[error(
        "QEMU's user (uid {uid}) can't execute {}; the binary and every directory above it must be readable and searchable by others",
        binary.display()
    )]
    QemuUnreachable {
        /// The binary.
        binary: PathBuf,
        /// QEMU's uid.
        uid: u32,
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
    /// A disk, boot or RAM file can't be handed to QEMU.
    #[error(transparent)]
    HostFile(#[from] HostFileError),
    /// QEMU's user can't open /dev/kvm, and the guest needs KVM.
    #[error(transparent)]
    KvmAccess(#[from] KvmAccessError),
}

/// A freshly launched QEMU.
#[derive(Debug)]
pub struct Launched {
    /// Process id.
    pub pid: u32,
    /// Its pidfd.
    pub pidfd: Arc<PidFd>,
    /// The child handle, for reaping its exit status.
    pub child: Spawned,
    /// The connected QMP client.
    pub qmp: QmpClient,
    /// Host tap names, one per NIC in runtime order.
    pub taps: Vec<String>,
}

/// Sockets, taps and files that exist only for one launch; dropped once
/// QEMU holds its own copies.
struct ExecutionResources {
    qmp: UnixListener,
    serial: Option<UnixListener>,
    guest_agent: Option<UnixListener>,
    operator_qmp: Option<UnixListener>,
    taps: Vec<Tap>,
    vhost: Vec<Vec<File>>,
    disks: Vec<DiskImage>,
    media: Vec<Option<File>>,
    kernel: Option<File>,
    initrd: Option<File>,
    memory: Option<File>,
    vnc_x509: Option<File>,
    spice_x509: Option<File>,
    chroot: Option<File>,
}

impl ExecutionResources {
    fn fds(&self, mode: LaunchMode) -> ExecutionFds {
        let raw = |file: &Option<File>| file.as_ref().map(AsRawFd::as_raw_fd);
        ExecutionFds {
            qmp: self.qmp.as_raw_fd(),
            serial: self.serial.as_ref().map(AsRawFd::as_raw_fd),
            guest_agent: self.guest_agent.as_ref().map(AsRawFd::as_raw_fd),
            taps: self
                .taps
                .iter()
                .map(|t| t.queue_fds().map(|fd| fd.as_raw_fd()).collect())
                .collect(),
            vhost: self
                .vhost
                .iter()
                .map(|v| v.iter().map(AsRawFd::as_raw_fd).collect())
                .collect(),
            disks: self
                .disks
                .iter()
                .map(|d| ImageFd {
                    fd: d.file.as_raw_fd(),
                    kind: d.kind,
                })
                .collect(),
            media: self.media.iter().map(raw).collect(),
            machine: MachineFds {
                kernel: raw(&self.kernel),
                initrd: raw(&self.initrd),
                memory: raw(&self.memory),
                vnc_x509: raw(&self.vnc_x509),
                spice_x509: raw(&self.spice_x509),
            },
            operator_qmp: self.operator_qmp.as_ref().map(AsRawFd::as_raw_fd),
            chroot: raw(&self.chroot),
            mode,
        }
    }
}

/// Every fd of `fds`, which QEMU must inherit.
fn inherited(fds: &ExecutionFds) -> Vec<std::os::fd::RawFd> {
    let machine = [
        fds.machine.kernel,
        fds.machine.initrd,
        fds.machine.memory,
        fds.machine.vnc_x509,
        fds.machine.spice_x509,
    ];
    std::iter::once(fds.qmp)
        .chain(fds.serial)
        .chain(fds.guest_agent)
        .chain(fds.operator_qmp)
        .chain(fds.taps.iter().flatten().copied())
        .chain(fds.vhost.iter().flatten().copied())
        .chain(fds.disks.iter().map(|d| d.fd))
        .chain(fds.media.iter().flatten().copied())
        .chain(machine.into_iter().flatten())
        .chain(fds.chroot)
        .collect()
}

/// Who QEMU becomes for `rt`: its user, with the group of /dev/kvm when
/// the guest needs KVM and only that group opens it. Never a silent
/// fallback to TCG: a guest that needs KVM and can't have it is refused.
pub fn credentials(rt: &Runtime) -> Result<Option<Credentials>, KvmAccessError> {
    let Some(user) = rt.qemu_user else {
        return Ok(None);
    };
    let groups = match (
        rt.accelerator,
        Ownership::of(Path::new(identity::KVM_DEVICE)),
    ) {
        (ResolvedAccelerator::Kvm, Ok(device)) => identity::kvm_groups(user, device)?,
        // A missing device fails the start with QEMU's own words.
        _ => Vec::new(),
    };
    Ok(Some(Credentials {
        uid: user.uid,
        gid: user.gid,
        groups,
        keep_chroot: rt.chroot,
    }))
}

fn run_dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError + '_ {
    move |source| LaunchError::RunDir {
        path: path.to_owned(),
        source,
    }
}

/// Creates the run directory (mode 0700, owned by QEMU's user when it has
/// one) and clears stale sockets in it.
pub async fn prepare_run_dir(run_dir: &Path, owner: Option<QemuUser>) -> Result<(), LaunchError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .map_err(run_dir_error(run_dir))?;
    fs::set_permissions(run_dir, fs::Permissions::from_mode(0o700))
        .map_err(run_dir_error(run_dir))?;
    // Back to the agent's user when QEMU no longer has one of its own.
    let (uid, gid) = owner.map_or_else(
        || (geteuid().as_raw(), getegid().as_raw()),
        |u| (u.uid, u.gid),
    );
    std::os::unix::fs::chown(run_dir, Some(uid), Some(gid)).map_err(run_dir_error(run_dir))?;
    remove_run_files(run_dir).await;
    Ok(())
}

/// How many times the OOM killer struck in the cgroups of the QEMU whose
/// run directory is `run_dir`; call it before [`remove_run_files`].
pub fn oom_kills(run_dir: &Path) -> u64 {
    process::read_own_file(&run_dir.join(files::CGROUPS)).map_or(0, |list| {
        let dirs: Vec<PathBuf> = list.lines().map(PathBuf::from).collect();
        crate::cgroup::oom_kills(&dirs)
    })
}

/// Removes the sockets, the pidfile and the chroot of a run directory,
/// keeping the log. The removals run on the blocking pool: when many
/// instances stop at once, they would otherwise hold up every other task.
pub async fn remove_run_files(run_dir: &Path) {
    let files = run_dir.to_owned();
    let cgroups = tokio::task::spawn_blocking(move || remove_files_of_run(&files))
        .await
        .unwrap_or_default();
    if !cgroups.is_empty() {
        crate::cgroup::remove(&cgroups).await;
        let _ = fs::remove_file(run_dir.join(files::CGROUPS));
    }
}

/// [`remove_run_files`] but for the cgroups in the run's list, which it
/// returns (with the list): the kernel may keep them busy a while longer.
fn remove_files_of_run(run_dir: &Path) -> Vec<PathBuf> {
    let _ = fs::remove_dir_all(run_dir.join(files::CHROOT));
    // Copies of the node's keys.
    let _ = fs::remove_dir_all(run_dir.join(files::VNC_X509));
    let _ = fs::remove_dir_all(run_dir.join(files::SPICE_X509));
    for name in [
        files::QMP,
        files::SERIAL,
        files::OPERATOR_QMP,
        files::GUEST_AGENT,
        files::PIDFILE,
    ] {
        let _ = fs::remove_file(run_dir.join(name));
    }
    let list = run_dir.join(files::CGROUPS);
    let cgroups: Vec<PathBuf> = process::read_own_file(&list)
        .map(|dirs| dirs.lines().map(PathBuf::from).collect())
        .unwrap_or_default();
    if cgroups.is_empty() {
        let _ = fs::remove_file(list);
    }
    cgroups
}

fn listen(path: &Path) -> Result<UnixListener, LaunchError> {
    UnixListener::bind(path).map_err(run_dir_error(path))
}

/// A listening socket at `path` when it is `wanted`.
fn listen_if(wanted: bool, path: &Path) -> Result<Option<UnixListener>, LaunchError> {
    wanted.then(|| listen(path)).transpose()
}

/// The medium of each drive, opened; none for an empty drive.
fn open_media(rt: &Runtime, cfg: &LaunchConfig) -> Result<Vec<Option<File>>, HostFileError> {
    rt.media
        .iter()
        .map(|d| {
            d.image
                .as_deref()
                .map(|image| host_files::open_medium(d, image, &cfg.allowed_roots))
                .transpose()
        })
        .collect()
}

/// A tap per NIC, up and on its bridge.
fn open_taps(rt: &Runtime, cfg: &LaunchConfig) -> Result<Vec<Tap>, TapError> {
    let mut taps = Vec::with_capacity(rt.nics.len());
    for nic in &rt.nics {
        let tap = Tap::create(&cfg.tap_template, nic.spec.queues)?;
        crate::tap::connect(tap.name(), &nic.spec)?;
        tracing::debug!(instance = %rt.name, nic = %nic.spec.name, tap = tap.name(), "tap ready");
        taps.push(tap);
    }
    Ok(taps)
}

fn open_resources(
    rt: &Runtime,
    qemu: &QemuInfo,
    run_dir: &Path,
    cfg: &LaunchConfig,
) -> Result<ExecutionResources, LaunchError> {
    let taps = debug_span!("step", step = "taps").in_scope(|| open_taps(rt, cfg))?;
    let vhost = rt
        .nics
        .iter()
        .map(|n| {
            let queues = if n.spec.vhost { n.spec.queues } else { 0 };
            (0..queues).map(|_| tap::open_vhost_net()).collect()
        })
        .collect::<Result<Vec<Vec<_>>, TapError>>()?;
    let disks = rt
        .disks
        .iter()
        .map(|d| host_files::open_disk_image(&d.spec, &cfg.allowed_roots))
        .collect::<Result<Vec<_>, _>>()?;
    let (kernel, initrd) = match &rt.boot {
        Boot::Kernel { kernel, initrd, .. } => (
            Some(host_files::open_boot_file(
                "kernel",
                kernel,
                rt.qemu_user,
                &cfg.allowed_roots,
            )?),
            initrd
                .as_deref()
                .map(|i| host_files::open_boot_file("initrd", i, rt.qemu_user, &cfg.allowed_roots))
                .transpose()?,
        ),
        _ => (None, None),
    };
    let media = open_media(rt, cfg)?;
    // Without a user of its own, QEMU opens (and creates) its RAM file
    // itself, as root.
    let memory = match (&rt.memory_backing, rt.qemu_user) {
        (MemoryBacking::File { path, .. } | MemoryBacking::HugePages { path }, Some(user)) => Some(
            host_files::open_memory_file(path, user, &rt.name, &cfg.allowed_roots)?,
        ),
        _ => None,
    };
    let (vnc_x509, spice_x509) = stage_display_credentials(rt, run_dir, cfg)?;
    Ok(ExecutionResources {
        vhost,
        vnc_x509,
        spice_x509,
        qmp: listen(&run_dir.join(files::QMP))?,
        serial: listen_if(rt.serial_console, &run_dir.join(files::SERIAL))?,
        guest_agent: listen_if(
            rt.guest_agent_slot.is_some(),
            &run_dir.join(files::GUEST_AGENT),
        )?,
        operator_qmp: listen_if(cfg.operator_qmp, &run_dir.join(files::OPERATOR_QMP))?,
        chroot: if rt.chroot {
            let _step = debug_span!("step", step = "chroot").entered();
            Some(prepare_chroot(rt, &qemu.data_dirs, run_dir)?)
        } else {
            None
        },
        taps,
        disks,
        media,
        kernel,
        initrd,
        memory,
    })
}

/// The copies of VNC's and SPICE's TLS files the displays read, each an
/// open directory.
fn stage_display_credentials(
    rt: &Runtime,
    run_dir: &Path,
    cfg: &LaunchConfig,
) -> Result<(Option<File>, Option<File>), HostFileError> {
    let vnc_x509 = match rt.vnc_tls.as_ref().and_then(|t| t.x509_dir.as_ref()) {
        Some(dir) => Some(host_files::stage_credentials(
            "VNC x509 file",
            &crate::vnc::x509_files(dir),
            &run_dir.join(files::VNC_X509),
            rt.qemu_user,
            &cfg.allowed_roots,
        )?),
        None => None,
    };
    let spice_x509 = match rt.spice.as_ref().and_then(|s| s.tls.as_ref()) {
        Some(tls) => Some(host_files::stage_credentials(
            "SPICE TLS file",
            &crate::spice::x509_files(tls),
            &run_dir.join(files::SPICE_X509),
            rt.qemu_user,
            &cfg.allowed_roots,
        )?),
        None => None,
    };
    Ok((vnc_x509, spice_x509))
}

/// A chrooted QEMU's empty root, with the option ROMs of the usual NIC
/// models and the runtime's own; any other is staged when a NIC of it is
/// hot-added.
fn prepare_chroot(
    rt: &Runtime,
    option_rom_dirs: &[PathBuf],
    run_dir: &Path,
) -> Result<File, LaunchError> {
    let root = run_dir.join(files::CHROOT);
    let dir = empty_dir(&root)?;
    let models = [NicModel::Virtio, NicModel::E1000]
        .into_iter()
        .chain(rt.nics.iter().map(|n| n.spec.model));
    host_files::stage_option_roms(&root, option_rom_dirs, models).map_err(run_dir_error(&root))?;
    Ok(dir)
}

/// Makes `path` a new empty directory that only root may change, and
/// opens it. Whatever was there goes first: the run directory may be
/// QEMU's, and what QEMU left there is not to be trusted.
fn empty_dir(path: &Path) -> Result<File, LaunchError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(run_dir_error(path)(e));
        }
        _ => {}
    }
    fs::DirBuilder::new()
        .mode(0o555)
        .create(path)
        .map_err(run_dir_error(path))?;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(run_dir_error(path))
}

/// Launches QEMU for `rt` on `qemu`, the node's binary whatever QEMU the
/// runtime was made on, and waits until its QMP monitor is ready.
pub async fn launch(
    rt: &Runtime,
    qemu: &QemuInfo,
    run_dir: &Path,
    cfg: &LaunchConfig,
    mode: LaunchMode,
) -> Result<Launched, LaunchError> {
    if !qemu.binary.is_file() {
        return Err(LaunchError::QemuMissing(qemu.binary.clone()));
    }
    if !qemu.offers_machine(&rt.machine_type) {
        return Err(LaunchError::MachineType {
            machine_type: rt.machine_type.clone(),
            version: qemu.version,
        });
    }
    let credentials = credentials(rt)?;
    prepare_run_dir(run_dir, rt.qemu_user)
        .instrument(debug_span!("step", step = "run directory"))
        .await?;
    let log_path = run_dir.join(files::LOG);
    let confinement = SpawnConfinement {
        no_new_privs: rt.confined(),
        credentials,
        cgroup_procs: Vec::new(),
    };
    let result = launch_in(rt, qemu, run_dir, &log_path, cfg, mode, &confinement).await;
    if result.is_err() {
        remove_run_files(run_dir).await;
    }
    result
}

async fn launch_in(
    rt: &Runtime,
    qemu: &QemuInfo,
    run_dir: &Path,
    log_path: &Path,
    cfg: &LaunchConfig,
    mode: LaunchMode,
    confinement: &SpawnConfinement,
) -> Result<Launched, LaunchError> {
    let resources = debug_span!("step", step = "host files")
        .in_scope(|| open_resources(rt, qemu, run_dir, cfg))?;
    let cgroups =
        debug_span!("step", step = "cgroup").in_scope(|| prepare_cgroups(rt, run_dir, cfg))?;
    let confinement = SpawnConfinement {
        cgroup_procs: cgroups.as_ref().map(|c| c.procs_fds()).unwrap_or_default(),
        ..confinement.clone()
    };
    let fds = resources.fds(mode);
    let mut child = debug_span!("step", step = "spawn")
        .in_scope(|| spawn_qemu(rt, qemu, &fds, run_dir, log_path, cfg, &confinement))?;
    drop(cgroups);
    let pid = child.id();
    let taps: Vec<String> = resources.taps.iter().map(|t| t.name().to_owned()).collect();
    // QEMU holds its own copies now. Ours must go, or a QEMU that dies early
    // would leave the QMP connection hanging instead of closing it.
    drop(resources);

    let pidfd = match PidFd::open(pid) {
        Ok(p) => Arc::new(p),
        Err(source) => {
            kill_and_reap(&mut child);
            return Err(LaunchError::Spawn {
                binary: qemu.binary.clone(),
                source,
            });
        }
    };

    let qmp_path = run_dir.join(files::QMP);
    let known_commands = qemu.qmp_commands.get().cloned();
    let connect = QmpClient::connect_knowing(&qmp_path, cfg.qmp, known_commands)
        .instrument(debug_span!("step", step = "QMP greeting"));
    let qmp = tokio::select! {
        biased;
        result = connect => result,
        () = pidfd.exited() => Err(QmpError::Disconnected { reason: Some("QEMU exited".into()) }),
    };
    match qmp {
        Ok(qmp) => {
            // Set by the first launch; a race between two first launches
            // stores either's list, and they are the same.
            let _ = qemu.qmp_commands.set(qmp.commands());
            let continued = pin_and_continue(rt, &qmp, mode)
                .instrument(debug_span!("step", step = "vCPU pinning"))
                .await;
            if let Err(e) = continued {
                kill_and_reap(&mut child);
                return Err(e);
            }
            // After `cont`: QEMU closes a removed fd only while the guest
            // runs. An incoming QEMU's go when it is resumed.
            release_disk_fdsets(rt, &qmp)
                .instrument(debug_span!("step", step = "fd sets"))
                .await;
            Ok(Launched {
                pid,
                pidfd,
                child,
                qmp,
                taps,
            })
        }
        Err(qmp_error) => Err(qmp_failure(qmp_error, &mut child, &pidfd, log_path).await),
    }
}

/// Starts QEMU on `fds`, its output appended to the log (rotated first)
/// and its pid written to the pidfile.
fn spawn_qemu(
    rt: &Runtime,
    qemu: &QemuInfo,
    fds: &ExecutionFds,
    run_dir: &Path,
    log_path: &Path,
    cfg: &LaunchConfig,
    confinement: &SpawnConfinement,
) -> Result<Spawned, LaunchError> {
    let args = argv::render_execution(rt, qemu, fds);
    let _ = process::rotate_log(log_path, cfg.log_max_bytes, cfg.log_keep);
    // The directory may be QEMU's: never follow a link planted there.
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log_path)
        .map_err(run_dir_error(log_path))?;
    let pidfile_path = run_dir.join(files::PIDFILE);
    let pidfile = process::create_own_file(&pidfile_path).map_err(run_dir_error(&pidfile_path))?;
    tracing::info!(instance = %rt.name, argv = ?args, "starting QEMU");
    let env: Vec<(&str, &std::ffi::OsStr)> = qemu
        .module_dir
        .iter()
        .map(|dir| ("QEMU_MODULE_DIR", dir.as_os_str()))
        .collect();
    spawn::spawn_detached(
        &qemu.binary,
        &args,
        &env,
        &inherited(fds),
        log,
        Some(&pidfile),
        confinement,
    )
    .map_err(|source| match rt.qemu_user {
        Some(user) if source.kind() == std::io::ErrorKind::PermissionDenied => {
            LaunchError::QemuUnreachable {
                binary: qemu.binary.clone(),
                uid: user.uid,
            }
        }
        _ => LaunchError::Spawn {
            binary: qemu.binary.clone(),
            source,
        },
    })
}

/// The cgroups of a confined QEMU, listed in the run directory and then
/// made, before QEMU exists: whatever stops the agent on the way, the
/// list names every directory there is to remove. `None` where the node
/// has no cgroup layout or the runtime no limits.
fn prepare_cgroups(
    rt: &Runtime,
    run_dir: &Path,
    cfg: &LaunchConfig,
) -> Result<Option<PreparedCgroups>, LaunchError> {
    let (Some(layout), Some(limits)) = (&cfg.cgroups, &rt.cgroup) else {
        return Ok(None);
    };
    let list: String = layout
        .instance_dirs(&rt.name)
        .iter()
        .map(|d| format!("{}\n", d.display()))
        .collect();
    process::write_own_file(&run_dir.join(files::CGROUPS), &list).map_err(LaunchError::Cgroup)?;
    let prepared = layout
        .prepare(&rt.name, limits)
        .map_err(LaunchError::Cgroup)?;
    Ok(Some(prepared))
}

/// Why QMP didn't come up: "QEMU died" (with why) or "QMP is broken", in
/// which case QEMU is killed. A hang-up may come a moment before the
/// exit; silence doesn't.
async fn qmp_failure(
    qmp_error: QmpError,
    child: &mut Spawned,
    pidfd: &PidFd,
    log_path: &Path,
) -> LaunchError {
    let grace = match qmp_error {
        QmpError::NoGreeting(_) => Duration::ZERO,
        _ => Duration::from_secs(2),
    };
    let exited = tokio::time::timeout(grace, pidfd.exited()).await.is_ok();
    if exited {
        let status = child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        LaunchError::ExitedEarly {
            status,
            log_tail: process::log_tail(log_path, LOG_TAIL_BYTES),
        }
    } else {
        kill_and_reap(child);
        LaunchError::Qmp(qmp_error)
    }
}

/// Drops the fd sets the boot disks and media came in. Their block nodes
/// hold dups of the fds, so only the sets' own copies close, and a disk
/// removed or a medium changed later releases its image completely.
async fn release_disk_fdsets(rt: &Runtime, qmp: &QmpClient) {
    let media = (0..rt.media.len())
        .filter(|&index| rt.media[index].image.is_some())
        .map(|index| argv::media_fdset(rt, index));
    let commands = (0..rt.disks.len())
        .map(argv::disk_fdset)
        .chain(media)
        .map(|fdset| {
            crate::qmp::Command::new("remove-fd", serde_json::json!({ "fdset-id": fdset }))
        })
        .collect::<Vec<_>>();
    if commands.is_empty() {
        return;
    }
    for result in qmp.pipeline(commands).await {
        if let Err(e) = result {
            // It costs an fd in QEMU, not the start.
            tracing::warn!(instance = %rt.name, error = %e, "remove-fd after start failed");
        }
    }
}

/// Pins the vCPUs of a QEMU that [`argv::render_execution`] started
/// paused for it, then lets a booting guest run. An incoming guest stays
/// paused (its migration or restore decides when it runs), and so does
/// one started paused.
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

fn kill_and_reap(child: &mut Spawned) {
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
