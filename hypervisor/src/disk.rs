//! Disks as a spec asks for them: image, format, cache and I/O mode, and
//! the bus the guest sees them on, with the SCSI controller that SCSI
//! disks share. Pure: the rules here are checked without touching a file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw image or block device.
    #[default]
    Raw,
    /// QCOW2 image.
    Qcow2,
}

/// Host cache mode of a disk, with QEMU's `cache=` meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// O_DIRECT, guest flushes honoured.
    #[default]
    None,
    /// Host page cache, guest flushes honoured.
    Writeback,
    /// Host page cache, every write flushed.
    Writethrough,
    /// O_DIRECT, every write flushed.
    Directsync,
    /// Host page cache, flushes ignored.
    Unsafe,
}

impl DiskCache {
    /// Whether the image is opened with `O_DIRECT`, past the host's page
    /// cache.
    pub fn bypasses_host_cache(self) -> bool {
        matches!(self, DiskCache::None | DiskCache::Directsync)
    }
}

/// A disk as the spec asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Unique among the instance's devices.
    pub name: String,
    /// Stable identity; QEMU ids derive from it.
    pub uuid: Uuid,
    /// Absolute path of the image or block device.
    pub path: PathBuf,
    /// Image format.
    pub format: DiskFormat,
    /// Attach read-only.
    pub read_only: bool,
    /// Host cache mode.
    pub cache: DiskCache,
    /// How QEMU submits the disk's I/O.
    #[serde(default, skip_serializing_if = "DiskAio::is_threads")]
    pub aio: DiskAio,
    /// The guest's discards free the image's blocks (`discard=unmap`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discard: bool,
    /// The bus the guest sees the disk on.
    #[serde(default, skip_serializing_if = "DiskBus::is_virtio")]
    pub bus: DiskBus,
}

/// The bus a disk sits on and, on SCSI, the device it is there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskBus {
    /// virtio-blk, in a PCI slot of its own; hot-pluggable.
    #[default]
    Virtio,
    /// An IDE hard disk on the primary channel, for guests without virtio
    /// drivers; two at most, and never hot-plugged.
    Ide,
    /// An emulated SCSI disk (`scsi-hd`) on the SCSI controller.
    ScsiHd,
    /// An emulated SCSI CD-ROM (`scsi-cd`) holding the image.
    ScsiCd,
    /// A host SCSI disk whose commands pass through (`scsi-block`); the
    /// path must be a SCSI block device.
    ScsiBlock,
    /// A host SCSI device behind its `/dev/sgN` (`scsi-generic`).
    ScsiGeneric,
}

impl DiskBus {
    /// Whether it is virtio, the default.
    pub fn is_virtio(&self) -> bool {
        *self == DiskBus::Virtio
    }

    /// Whether the disk sits on the SCSI controller.
    pub fn is_scsi(self) -> bool {
        self.scsi_device().is_some()
    }

    /// QEMU's device of a disk on SCSI.
    pub fn scsi_device(self) -> Option<&'static str> {
        match self {
            DiskBus::Virtio | DiskBus::Ide => None,
            DiskBus::ScsiHd => Some("scsi-hd"),
            DiskBus::ScsiCd => Some("scsi-cd"),
            DiskBus::ScsiBlock => Some("scsi-block"),
            DiskBus::ScsiGeneric => Some("scsi-generic"),
        }
    }

    /// Whether the guest's SCSI commands reach a host device, which then
    /// has to be one.
    pub fn passes_through(self) -> bool {
        matches!(self, DiskBus::ScsiBlock | DiskBus::ScsiGeneric)
    }
}

/// How many IDE disks an instance can have: the primary channel's master
/// and slave (the secondary is the CD-ROMs').
pub const MAX_IDE_DISKS: usize = 2;

/// How QEMU submits a disk's I/O.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskAio {
    /// A pool of threads: QEMU's default.
    #[default]
    Threads,
    /// Linux native AIO; needs the host cache bypassed.
    Native,
    /// io_uring.
    IoUring,
}

impl DiskAio {
    /// QEMU's name of it.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskAio::Threads => "threads",
            DiskAio::Native => "native",
            DiskAio::IoUring => "io_uring",
        }
    }

    /// Whether it is QEMU's default.
    pub fn is_threads(&self) -> bool {
        *self == DiskAio::Threads
    }
}

/// What a disk's image is on the host, which decides QEMU's protocol
/// driver: `file` refuses anything but a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// A regular file.
    File,
    /// A block device (LVM, DRBD, a loop device) or a SCSI generic device.
    Device,
}

impl ImageKind {
    /// QEMU's protocol driver for it.
    pub fn protocol_driver(self) -> &'static str {
        match self {
            ImageKind::File => "file",
            ImageKind::Device => "host_device",
        }
    }
}

/// The SCSI controller an instance's SCSI disks share, Ganeti's
/// `scsi_controller_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScsiController {
    /// virtio-scsi: the fastest, and the one current guests carry a driver
    /// for.
    #[default]
    VirtioScsi,
    /// LSI Logic 53C895A, for guests of its time.
    Lsi,
    /// LSI MegaRAID SAS 1078, which older Windows guests drive.
    Megasas,
}

impl ScsiController {
    /// QEMU's device.
    pub fn device(self) -> &'static str {
        match self {
            ScsiController::VirtioScsi => "virtio-scsi-pci",
            ScsiController::Lsi => "lsi53c895a",
            ScsiController::Megasas => "megasas",
        }
    }

    /// How many disks it takes, one per SCSI target from 0 (the LSI's
    /// target 7 is the controller itself).
    pub fn max_targets(self) -> u8 {
        match self {
            ScsiController::Lsi => 7,
            ScsiController::VirtioScsi | ScsiController::Megasas => 16,
        }
    }
}

/// The controller's QEMU id. Ganeti's driver names it the same, so its
/// disks sit on `scsi.0` either way.
pub const SCSI_CONTROLLER_ID: &str = "scsi";

/// Why a spec's disks were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    /// More IDE disks than the primary channel holds.
    #[error("{0} IDE disks asked for; an instance can have at most {MAX_IDE_DISKS}")]
    IdeDisks(usize),
    /// Native AIO on a disk that goes through the host's page cache.
    #[error("disk {0:?}: native AIO needs the host cache bypassed; use cache none or directsync")]
    NativeAioCache(String),
    /// More SCSI disks than the controller has targets.
    #[error("{count} SCSI disks asked for; the {} controller takes at most {}", .controller.device(), .controller.max_targets())]
    ScsiDisks {
        /// Disks on SCSI.
        count: usize,
        /// Their controller.
        controller: ScsiController,
    },
    /// A SCSI pass-through disk with an image format on top.
    #[error(
        "disk {0:?}: SCSI pass-through hands the guest the device itself; its format must be raw"
    )]
    PassThroughFormat(String),
}

/// Checks the disks' bus rules: how many each bus holds, native AIO's cache
/// mode, raw pass-through. `controller` is the SCSI controller the disks
/// would get.
pub fn check_disks(disks: &[DiskSpec], controller: ScsiController) -> Result<(), DiskError> {
    let ide = disks.iter().filter(|d| d.bus == DiskBus::Ide).count();
    if ide > MAX_IDE_DISKS {
        return Err(DiskError::IdeDisks(ide));
    }
    let scsi = disks.iter().filter(|d| d.bus.is_scsi()).count();
    if scsi > usize::from(controller.max_targets()) {
        return Err(DiskError::ScsiDisks {
            count: scsi,
            controller,
        });
    }
    for disk in disks {
        if disk.aio == DiskAio::Native && !disk.cache.bypasses_host_cache() {
            return Err(DiskError::NativeAioCache(disk.name.clone()));
        }
        if disk.bus.passes_through() && disk.format != DiskFormat::Raw {
            return Err(DiskError::PassThroughFormat(disk.name.clone()));
        }
    }
    Ok(())
}

/// The lowest SCSI target none of `taken` holds, below `controller`'s
/// limit.
pub fn free_scsi_target(
    taken: impl IntoIterator<Item = u8>,
    controller: ScsiController,
) -> Option<u8> {
    let taken: Vec<u8> = taken.into_iter().collect();
    (0..controller.max_targets()).find(|t| !taken.contains(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, bus: DiskBus) -> DiskSpec {
        DiskSpec {
            name: name.into(),
            uuid: Uuid::new_v4(),
            path: format!("/srv/{name}.img").into(),
            format: DiskFormat::Raw,
            read_only: false,
            cache: DiskCache::None,
            aio: DiskAio::Threads,
            discard: false,
            bus,
        }
    }

    #[test]
    fn a_controller_takes_as_many_disks_as_it_has_targets() {
        let lsi = ScsiController::Lsi;
        let seven: Vec<_> = (0..7)
            .map(|i| disk(&format!("d{i}"), DiskBus::ScsiHd))
            .collect();
        assert_eq!(check_disks(&seven, lsi), Ok(()));
        let mut eight = seven.clone();
        eight.push(disk("d7", DiskBus::ScsiCd));
        assert_eq!(
            check_disks(&eight, lsi),
            Err(DiskError::ScsiDisks {
                count: 8,
                controller: lsi
            })
        );
        assert_eq!(check_disks(&eight, ScsiController::VirtioScsi), Ok(()));
        assert_eq!(free_scsi_target([0, 1, 3], lsi), Some(2));
        assert_eq!(free_scsi_target(0..7, lsi), None);
    }

    #[test]
    fn pass_through_needs_a_raw_disk() {
        let mut generic = disk("sg", DiskBus::ScsiGeneric);
        assert_eq!(check_disks(&[generic.clone()], ScsiController::Lsi), Ok(()));
        generic.format = DiskFormat::Qcow2;
        assert_eq!(
            check_disks(&[generic], ScsiController::Lsi),
            Err(DiskError::PassThroughFormat("sg".into()))
        );
        assert!(DiskBus::ScsiBlock.passes_through() && !DiskBus::ScsiHd.passes_through());
    }
}
