//! Why a runtime can't be made, or can't run on this host.

use std::path::PathBuf;

use super::{MAX_UNIX_SOCKET_PATH, RUNTIME_FORMAT_VERSION, inherited};
use crate::cgroup::CgroupLimits;
use crate::identity::QemuUser;
use crate::pinning::PinningError;
use crate::qemu_info::QemuVersion;
use crate::spec::SpecError;

/// Why a runtime couldn't be generated or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The spec (or the spec part of a runtime) is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// QEMU doesn't know the machine type.
    #[error("machine type {requested:?} is not offered by this QEMU; it offers: {offered}")]
    UnknownMachineType {
        /// As asked.
        requested: String,
        /// A short list of what is offered.
        offered: String,
    },
    /// A runtime made elsewhere has a machine type this node's QEMU lacks:
    /// QEMU moves guests to its own or a newer version only.
    #[error(
        "this node's QEMU {here} has no machine type {machine_type}, which the instance was made with on QEMU {made_on}; QEMU can't move a guest to a version older than its machine type, so choose a node whose QEMU has it"
    )]
    MachineTypeMissing {
        /// The runtime's machine type.
        machine_type: String,
        /// The QEMU the runtime was made on.
        made_on: QemuVersion,
        /// This node's QEMU.
        here: QemuVersion,
    },
    /// A runtime made elsewhere has a device this node's QEMU lacks.
    #[error(
        "this node's QEMU {here} has no device {device}, which the instance has from QEMU {made_on}; choose a node whose QEMU has it"
    )]
    DeviceMissing {
        /// The device driver.
        device: String,
        /// The QEMU the runtime was made on.
        made_on: QemuVersion,
        /// This node's QEMU.
        here: QemuVersion,
    },
    /// KVM was asked for explicitly but can't be used.
    #[error(
        "KVM was requested but is not usable ({0}); fix access to /dev/kvm or ask for accelerator tcg or auto"
    )]
    KvmUnavailable(String),
    /// A NIC on ISA with a slot, or one on PCI without.
    #[error("NIC {0:?} has a PCI slot on ISA, or none on PCI")]
    NicPlace(String),
    /// Extra QEMU options the node doesn't allow.
    #[error(transparent)]
    ExtraArgs(crate::extra::ExtraArgsError),
    /// A disk without the place its bus gives it, or in another's.
    #[error("disk {0:?} is not where its bus puts it (a PCI slot, a free SCSI target or neither)")]
    DiskPlace(String),
    /// More devices than slots.
    #[error("instance {instance:?}: no free PCI slot ({used} of {total} usable slots needed)")]
    NoFreeSlot {
        /// Instance name.
        instance: String,
        /// Slots the spec needs.
        used: usize,
        /// Slots there are.
        total: usize,
    },
    /// A socket path would not fit in `sun_path`.
    #[error("socket path {} is {len} bytes, over the kernel's limit of {MAX_UNIX_SOCKET_PATH}; use a shorter state directory", path.display())]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// A foreign runtime has another layout version.
    #[error(
        "runtime format version {0} is not supported (this agent reads {RUNTIME_FORMAT_VERSION})"
    )]
    FormatVersion(u32),
    /// A foreign runtime puts a device in a reserved, out-of-range or used slot.
    #[error("device {device:?} has PCI slot {slot}, which is reserved, out of range or used twice")]
    BadSlot {
        /// Device name.
        device: String,
        /// Its slot.
        slot: u8,
    },
    /// A q35 runtime whose devices don't each have a root port, or root
    /// ports on a machine without PCIe.
    #[error("runtime root ports are inconsistent: {0}")]
    RootPorts(String),
    /// A foreign runtime's argv doesn't match its structured part.
    #[error("runtime argv does not match its structured part; refusing to execute foreign options")]
    ArgvMismatch,
    /// A NIC asks for vhost but the node has no /dev/vhost-net.
    #[error(
        "NIC {0:?} asks for vhost, but /dev/vhost-net is missing on this node; load the vhost_net module or turn vhost off"
    )]
    VhostUnavailable(String),
    /// A foreign runtime's generation is zero.
    #[error("runtime generation must be at least 1")]
    Generation,
    /// The CPU mask names CPUs this host doesn't have.
    #[error(transparent)]
    CpuPinning(#[from] PinningError),
    /// The runtime runs QEMU sandboxed, and this node's QEMU has no sandbox.
    #[error(
        "the runtime runs QEMU with its seccomp sandbox, which this node's QEMU lacks; use a QEMU built with seccomp"
    )]
    SandboxUnavailable,
    /// Cgroup limits that don't fit the guest.
    #[error(
        "cgroup limits {0:?} don't fit the guest: the memory limit must cover its memory and the CPU weight lie in 1..=10000"
    )]
    CgroupLimits(CgroupLimits),
    /// A QEMU user that is root in all but name.
    #[error("QEMU's user must not be root ({0})")]
    RootQemuUser(QemuUser),
    /// A chroot for a QEMU that would run as root.
    #[error("a runtime that runs QEMU in a chroot must also give it a user of its own")]
    ChrootWithoutUser,
    /// Hardware kept from an adopted QEMU that the agent won't replay.
    #[error("the runtime's inherited machine is refused: {0}")]
    Inherited(#[from] inherited::InheritedError),
    /// A kept device id that isn't a plain id of its kind, or is used twice.
    #[error(
        "device {device:?} has QEMU id {id:?}, which isn't a plain {prefix}… id or is used twice"
    )]
    BadDeviceId {
        /// Device name.
        device: String,
        /// The id.
        id: String,
        /// The prefix ids of its kind have.
        prefix: &'static str,
    },
}
