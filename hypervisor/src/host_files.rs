//! The host files a QEMU uses, opened by the agent and handed over as fds.
//!
//! A confined QEMU runs as a user that may not even see the directories
//! these files live in, so it never opens them by path: disk images go
//! through an fd set (`/dev/fdset/N`), and boot files and RAM files
//! through `/proc/self/fd/N`, which skips the directories on the way.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt, fchown};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::disk::ImageKind;
use crate::identity::{Ownership, QemuUser};
use crate::spec::{DiskBus, DiskSpec, MediaDrive};
use crate::tls_files::TlsFile;

/// Why a host file can't be handed to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    /// A disk image can't be used.
    #[error("disk {disk:?} at {}: {reason}", path.display())]
    Disk {
        /// The disk's name.
        disk: String,
        /// Its image.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A kernel or initrd can't be read.
    #[error("{what} {}: {reason}", path.display())]
    Boot {
        /// `kernel` or `initrd`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A CD-ROM or floppy image can't be read.
    #[error("{drive} medium {}: {reason}", path.display())]
    Medium {
        /// The drive, e.g. `CD-ROM "install"`.
        drive: String,
        /// The image.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A display's TLS files can't be handed to QEMU.
    #[error("{what} {}: {reason}", path.display())]
    Credentials {
        /// Whose files, e.g. `VNC x509 file`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file or directory for guest RAM can't be prepared.
    #[error("guest RAM at {}: {source}", path.display())]
    Memory {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Directories the host files of requests must lie in; none allows any.
///
/// A path is checked where it is given ([`check`](Self::check), for a clear
/// error before anything starts), and then opened beneath its root
/// ([`open`](Self::open)) with `openat2(RESOLVE_BENEATH)`, so a symlink
/// swapped in between the two can't lead the open elsewhere.
#[derive(Debug, Clone, Default)]
pub struct AllowedRoots {
    given: Vec<PathBuf>,
    /// The same with symlinks resolved, for paths given through them.
    resolved: Vec<PathBuf>,
}

impl AllowedRoots {
    /// Roots that must be absolute, existing directories.
    pub fn new(given: Vec<PathBuf>) -> Result<Self, String> {
        let mut resolved = Vec::with_capacity(given.len());
        for root in &given {
            crate::spec::check_absolute_path("allowed root", root).map_err(|e| e.to_string())?;
            let real = std::fs::canonicalize(root)
                .map_err(|e| format!("allowed root {}: {e}", root.display()))?;
            if !real.is_dir() {
                return Err(format!(
                    "allowed root {} is not a directory",
                    root.display()
                ));
            }
            resolved.push(real);
        }
        Ok(Self { given, resolved })
    }

    /// The roots as configured.
    pub fn given(&self) -> &[PathBuf] {
        &self.given
    }

    /// Checks `path` as given and where its symlinks lead; a file that
    /// doesn't exist yet (a save) is judged by its directory.
    pub fn check(&self, what: &str, path: &Path) -> Result<(), crate::spec::SpecError> {
        use crate::spec::check_under_roots;
        check_under_roots(what, path, &self.given)?;
        if self.given.is_empty() {
            return Ok(());
        }
        let real = std::fs::canonicalize(path).or_else(|e| {
            let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
                return Err(e);
            };
            std::fs::canonicalize(dir).map(|d| d.join(file))
        });
        match real {
            Ok(real) => check_under_roots(what, &real, &self.resolved),
            // Nothing there to lead elsewhere; the caller reports it missing.
            Err(_) => Ok(()),
        }
    }

    /// Opens `path` with `flags` (and `mode`, for a file it creates),
    /// never resolving anything outside the allowed root it lies under: a
    /// symlink that leads out, `..` past the root and `/proc` magic links
    /// all fail. Without roots, a plain open. Always `O_CLOEXEC`, and
    /// `O_NONBLOCK`, so a FIFO can't hold the caller; the callers check
    /// the type of what they got and [`blocking`] it.
    pub fn open(&self, path: &Path, flags: OFlag, mode: Mode) -> io::Result<File> {
        let flags = flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
        if self.given.is_empty() {
            return Ok(nix::fcntl::open(path, flags, mode)?.into());
        }
        let Some((root, inner)) = self
            .given
            .iter()
            .chain(&self.resolved)
            .find_map(|root| Some((root, path.strip_prefix(root).ok()?)))
        else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "not under an allowed root",
            ));
        };
        let root = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let inner = if inner.as_os_str().is_empty() {
            Path::new(".")
        } else {
            inner
        };
        let how = OpenHow::new()
            .flags(flags)
            .mode(mode)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        match nix::fcntl::openat2(&root, inner, how) {
            Ok(fd) => Ok(fd.into()),
            Err(nix::errno::Errno::EXDEV) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "it leads outside the allowed roots (through a symlink or ..)",
            )),
            Err(e) => Err(e.into()),
        }
    }
}

/// Makes an fd that [`AllowedRoots::open`] opened non-blocking block
/// again, once its type is known, for QEMU's sake.
pub fn blocking(file: &File) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(nix::fcntl::fcntl(file, FcntlArg::F_GETFL)?);
    nix::fcntl::fcntl(file, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A disk image opened for QEMU, and what it is.
#[derive(Debug)]
pub struct DiskImage {
    /// The open image.
    pub file: File,
    /// A file or a device.
    pub kind: ImageKind,
}

/// Opens a disk image the way QEMU will use it: read-only or read-write as
/// the disk asks, and with `O_DIRECT` where its cache mode bypasses the
/// host's page cache (QEMU 9.1 and later only take an fd from a set whose
/// flags match), beneath the allowed roots. A regular file or a block
/// device; a disk that passes SCSI commands through needs a SCSI device
/// (for `scsi-generic`, its character device).
pub fn open_disk_image(disk: &DiskSpec, roots: &AllowedRoots) -> Result<DiskImage, HostFileError> {
    let mut access = if disk.read_only {
        OFlag::O_RDONLY
    } else {
        OFlag::O_RDWR
    };
    if disk.cache.bypasses_host_cache() {
        access |= OFlag::O_DIRECT;
    }
    let failed = |reason: String| HostFileError::Disk {
        disk: disk.name.clone(),
        path: disk.path.clone(),
        reason,
    };
    let file = open_blocking(&disk.path, access, roots).map_err(|reason| {
        match access.contains(OFlag::O_DIRECT) && reason.contains("Invalid argument") {
            true => failed(format!(
                "{reason}: its file system can't bypass the page cache, as cache none and directsync do; choose writeback or writethrough"
            )),
            false => failed(reason),
        }
    })?;
    let file_type = file
        .metadata()
        .map_err(|e| failed(e.to_string()))?
        .file_type();
    let kind = if file_type.is_file() {
        ImageKind::File
    } else if file_type.is_block_device()
        || (file_type.is_char_device() && disk.bus == DiskBus::ScsiGeneric)
    {
        ImageKind::Device
    } else {
        return Err(failed("not a regular file or block device".into()));
    };
    if let Some(device) = disk.bus.scsi_device().filter(|_| disk.bus.passes_through()) {
        scsi_generic_version(&file).map_err(|e| {
            failed(format!(
                "{device} passes the guest's SCSI commands to the device, so it must be a SCSI device, and this isn't one ({e})"
            ))
        })?;
    }
    Ok(DiskImage { file, kind })
}

nix::ioctl_read_bad!(
    /// `SG_GET_VERSION_NUM`.
    sg_get_version_num, 0x2282, libc::c_int);

/// The SCSI generic driver's version, which only a SCSI device answers
/// (`SG_GET_VERSION_NUM`, QEMU's own test).
fn scsi_generic_version(file: &File) -> nix::Result<libc::c_int> {
    let mut version = 0;
    // SAFETY: the fd is open for the call and the ioctl writes one int.
    unsafe { sg_get_version_num(file.as_raw_fd(), &mut version) }?;
    Ok(version)
}

/// Opens an image beneath the allowed roots with `access`: a regular file
/// or a block device, nothing else, blocking again for QEMU.
fn open_image(path: &Path, access: OFlag, roots: &AllowedRoots) -> Result<File, String> {
    let file = open_blocking(path, access, roots)?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err("not a regular file or block device".into());
    }
    Ok(file)
}

/// Opens `path` beneath the allowed roots with `access`, blocking again
/// for QEMU.
fn open_blocking(path: &Path, access: OFlag, roots: &AllowedRoots) -> Result<File, String> {
    let file = roots
        .open(path, access, Mode::empty())
        .map_err(|e| e.to_string())?;
    blocking(&file).map_err(|e| e.to_string())?;
    Ok(file)
}

/// Opens the medium of a CD-ROM or floppy drive, read-only, beneath the
/// allowed roots: an image file or a block device.
pub fn open_medium(
    drive: &MediaDrive,
    path: &Path,
    roots: &AllowedRoots,
) -> Result<File, HostFileError> {
    open_image(path, OFlag::O_RDONLY, roots).map_err(|reason| HostFileError::Medium {
        drive: drive.what(),
        path: path.to_owned(),
        reason,
    })
}

/// Opens a kernel or initrd for QEMU to read through `/proc/self/fd/N`,
/// beneath the allowed roots. The directories on the way don't matter,
/// but reopening a file checks its own mode, so under `user` the file
/// itself must be readable.
pub fn open_boot_file(
    what: &'static str,
    path: &Path,
    user: Option<QemuUser>,
    roots: &AllowedRoots,
) -> Result<File, HostFileError> {
    let unreadable = |reason: String| HostFileError::Boot {
        what,
        path: path.to_owned(),
        reason,
    };
    let file = roots
        .open(path, OFlag::O_RDONLY, Mode::empty())
        .map_err(|e| unreadable(e.to_string()))?;
    let meta = file.metadata().map_err(|e| unreadable(e.to_string()))?;
    if !meta.is_file() {
        return Err(unreadable("not a regular file".into()));
    }
    if let Some(user) = user {
        let owner = Ownership::from_metadata(&meta);
        if !owner.grants(user, &[], 0o4) {
            return Err(unreadable(format!(
                "QEMU runs as {user} and can't read it (owner {}, group {}, mode {:04o}); \
                 make it readable, e.g. `chmod 0644`",
                owner.uid, owner.gid, owner.mode
            )));
        }
    }
    blocking(&file).map_err(|e| unreadable(e.to_string()))?;
    Ok(file)
}

/// Makes the file guest RAM lives in, owned by `user`, for QEMU to open
/// through `/proc/self/fd/N`, beneath the allowed roots. A directory (a
/// tmpfs or hugetlbfs mount) gets a new file that is unlinked at once, as
/// QEMU itself would do; a file path is created when missing and handed
/// to `user` either way, since QEMU maps it read-write.
pub fn open_memory_file(
    path: &Path,
    user: QemuUser,
    instance: &str,
    roots: &AllowedRoots,
) -> Result<File, HostFileError> {
    let failed = |source: io::Error| HostFileError::Memory {
        path: path.to_owned(),
        source,
    };
    let read_write = OFlag::O_RDWR | OFlag::O_NOFOLLOW;
    let private = Mode::from_bits_truncate(0o600);
    let file = if path.is_dir() {
        let dir = roots
            .open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
            .map_err(failed)?;
        let name = format!(".kvm-agent-{instance}.ram");
        // Left over only by an agent that died in the moment between
        // creating it and unlinking it.
        match unlinkat(&dir, name.as_str(), UnlinkatFlags::NoRemoveDir) {
            Err(e) if e != nix::errno::Errno::ENOENT => return Err(failed(e.into())),
            _ => {}
        }
        let fd = nix::fcntl::openat(
            &dir,
            name.as_str(),
            read_write | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
            private,
        )
        .map_err(|e| failed(e.into()))?;
        unlinkat(&dir, name.as_str(), UnlinkatFlags::NoRemoveDir).map_err(|e| failed(e.into()))?;
        File::from(fd)
    } else {
        let file = roots
            .open(path, read_write | OFlag::O_CREAT, private)
            .map_err(failed)?;
        if !file.metadata().map_err(failed)?.is_file() {
            return Err(failed(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a directory",
            )));
        }
        blocking(&file).map_err(failed)?;
        file
    };
    fchown(&file, Some(user.uid), Some(user.gid)).map_err(failed)?;
    Ok(file)
}

/// Copies a display's TLS files (`what`, for errors) into `staged`, a new
/// directory of `user`'s that only it can read, under the names QEMU
/// looks for, and opens that directory for QEMU to reach as
/// `/proc/self/fd/N`: a QEMU of its own user can't read the node's key
/// where it lies, and must not see anything beside it.
pub fn stage_credentials(
    what: &'static str,
    files: &[TlsFile<'_>],
    staged: &Path,
    user: Option<QemuUser>,
    roots: &AllowedRoots,
) -> Result<File, HostFileError> {
    let failed = |path: &Path, reason: String| HostFileError::Credentials {
        what,
        path: path.to_owned(),
        reason,
    };
    let _ = std::fs::remove_dir_all(staged);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(staged)
        .map_err(|e| failed(staged, e.to_string()))?;
    copy_credentials(what, files, staged, user, roots)?;
    let owner = user.map(|u| (u.uid, u.gid));
    let restricted = || -> io::Result<File> {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(staged, Some(uid), Some(gid))?;
        }
        std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o500))?;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(staged)
    };
    restricted().map_err(|e| failed(staged, e.to_string()))
}

/// Copies `files` into the existing directory `into`, each readable by
/// `user` only (mode 0400, owned by it); a copy never replaces a file.
/// Returns the copies made, for the caller to remove.
pub fn copy_credentials(
    what: &'static str,
    files: &[TlsFile<'_>],
    into: &Path,
    user: Option<QemuUser>,
    roots: &AllowedRoots,
) -> Result<Vec<PathBuf>, HostFileError> {
    let failed = |path: &Path, reason: String| HostFileError::Credentials {
        what,
        path: path.to_owned(),
        reason,
    };
    let mut copies = Vec::with_capacity(files.len());
    let result = files.iter().try_for_each(|credential| {
        let source = &credential.source;
        let file = match roots.open(source, OFlag::O_RDONLY, Mode::empty()) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !credential.required => return Ok(()),
            Err(e) => return Err(failed(source, e.to_string())),
        };
        blocking(&file).map_err(|e| failed(source, e.to_string()))?;
        let copy = into.join(credential.name);
        let mut target = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&copy)
            .map_err(|e| failed(&copy, e.to_string()))?;
        copies.push(copy.clone());
        io::copy(&mut &file, &mut target).map_err(|e| failed(source, e.to_string()))?;
        if let Some(user) = user {
            fchown(&target, Some(user.uid), Some(user.gid))
                .map_err(|e| failed(&copy, e.to_string()))?;
        }
        Ok(())
    });
    match result {
        Ok(()) => Ok(copies),
        Err(e) => {
            copies
                .iter()
                .for_each(|copy| drop(std::fs::remove_file(copy)));
            Err(e)
        }
    }
}

/// Links the option ROMs of the NIC models `models` into the root of
/// `chroot`, so a NIC can still be hot-added once QEMU has shut itself in:
/// QEMU tries a ROM's name relative to its working directory before its
/// data directories, and a chrooted QEMU works in its new root. A ROM
/// already there is kept. The chroot holds files only: QEMU keeps
/// `CAP_SYS_CHROOT`, and a directory inside its root would let it chroot
/// again into that directory and walk out through `..`. A hard link where
/// the filesystem allows, a copy otherwise.
pub fn stage_option_roms(
    chroot: &Path,
    data_dirs: &[PathBuf],
    models: impl IntoIterator<Item = crate::spec::NicModel>,
) -> io::Result<()> {
    let roms: std::collections::BTreeSet<&str> = models
        .into_iter()
        .filter_map(crate::runtime::argv::option_rom)
        .collect();
    for rom in roms {
        let target = chroot.join(rom);
        if target.exists() {
            continue;
        }
        let Some(dir) = data_dirs.iter().find(|d| d.join(rom).is_file()) else {
            continue;
        };
        let source = std::fs::canonicalize(dir.join(rom))?;
        if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target)?;
        }
    }
    Ok(())
}
