//! The host files a QEMU uses, opened by the agent and handed over as fds.
//!
//! A confined QEMU runs as a user that may not even see the directories
//! these files live in, so it never opens them by path: disk images go
//! through an fd set (`/dev/fdset/N`), and boot files and RAM files
//! through `/proc/self/fd/N`, which skips the directories on the way.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, fchown};
use std::path::{Path, PathBuf};

use crate::identity::{Ownership, QemuUser};
use crate::spec::DiskSpec;

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

/// Opens a disk image the way QEMU will use it: read-only or read-write as
/// the disk asks. A regular file or a block device, nothing else.
pub fn open_disk_image(disk: &DiskSpec) -> Result<File, HostFileError> {
    let unusable = |reason: String| HostFileError::Disk {
        disk: disk.name.clone(),
        path: disk.path.clone(),
        reason,
    };
    let meta = std::fs::metadata(&disk.path).map_err(|e| unusable(e.to_string()))?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(unusable("not a regular file or block device".into()));
    }
    OpenOptions::new()
        .read(true)
        .write(!disk.read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(&disk.path)
        .map_err(|e| unusable(e.to_string()))
}

/// Opens a kernel or initrd for QEMU to read through `/proc/self/fd/N`.
/// The directories on the way don't matter, but reopening a file checks
/// its own mode, so under `user` the file itself must be readable.
pub fn open_boot_file(
    what: &'static str,
    path: &Path,
    user: Option<QemuUser>,
) -> Result<File, HostFileError> {
    let unreadable = |reason: String| HostFileError::Boot {
        what,
        path: path.to_owned(),
        reason,
    };
    let file = File::open(path).map_err(|e| unreadable(e.to_string()))?;
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
    Ok(file)
}

/// Makes the file guest RAM lives in, owned by `user`, for QEMU to open
/// through `/proc/self/fd/N`. A directory (a tmpfs or hugetlbfs mount)
/// gets a new file that is unlinked at once, as QEMU itself would do; a
/// file path is created when missing and handed to `user` either way,
/// since QEMU maps it read-write.
pub fn open_memory_file(
    path: &Path,
    user: QemuUser,
    instance: &str,
) -> Result<File, HostFileError> {
    let failed = |source: io::Error| HostFileError::Memory {
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW);
    let file = if path.is_dir() {
        let name = path.join(format!(".kvm-agent-{instance}.ram"));
        // Left over only by an agent that died in the moment between
        // creating it and unlinking it.
        match std::fs::remove_file(&name) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(failed(e)),
            _ => {}
        }
        let file = options.create_new(true).open(&name).map_err(failed)?;
        std::fs::remove_file(&name).map_err(failed)?;
        file
    } else {
        options.create(true).open(path).map_err(failed)?
    };
    fchown(&file, Some(user.uid), Some(user.gid)).map_err(failed)?;
    Ok(file)
}

/// Links the option ROM of every NIC model into the root of `chroot`, so
/// a NIC can still be hot-added once QEMU has shut itself in (it is then
/// told the ROM's path, see [`crate::argv::hot_added_romfile`]). The
/// chroot holds files only: QEMU keeps `CAP_SYS_CHROOT`, and a directory
/// inside its root would let it chroot again into that directory and walk
/// out through `..`. A hard link where the filesystem allows, a copy
/// otherwise.
pub fn stage_option_roms(chroot: &Path, data_dirs: &[PathBuf]) -> io::Result<()> {
    for model in [crate::spec::NicModel::Virtio, crate::spec::NicModel::E1000] {
        let rom = crate::argv::option_rom(model);
        let Some(dir) = data_dirs.iter().find(|d| d.join(rom).is_file()) else {
            continue;
        };
        let source = std::fs::canonicalize(dir.join(rom))?;
        let target = chroot.join(rom);
        if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target)?;
        }
    }
    Ok(())
}

/// The path through which a process reaches its own fd `fd`.
pub fn proc_fd_path(fd: std::os::fd::RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}
