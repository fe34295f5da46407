//! The instance spec: what the cluster asks for, and its validation.
//!
//! Validation is pure and total: every field is checked before anything is
//! created, so a bad request leaves no runtime, process or tap behind.

use std::collections::HashSet;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::disk::DiskError;
pub use crate::disk::{
    DiskAio, DiskBus, DiskCache, DiskFormat, DiskSpec, MAX_IDE_DISKS, ScsiController,
};
use crate::media::MediaError;
pub use crate::media::{MediaDrive, MediaKind};
use crate::pcie::{MAX_HOTPLUG_PORTS, is_q35};
pub use crate::peripherals::{DisplayAdapter, SoundCard, UsbDevice, UsbPointer};
use crate::pinning::{CpuPinning, PinningError};
pub use crate::spice::{SpiceSpec, SpiceTls};
pub use crate::vnc::VncTls;

/// Smallest memory size accepted, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest memory size accepted, in MiB (4 TiB).
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;
/// Largest vCPU count accepted (the i440fx and q35 limit without x2apic).
pub const MAX_VCPUS: u32 = 255;
/// Longest instance name.
pub const MAX_INSTANCE_NAME: usize = 63;
/// Longest device name.
pub const MAX_DEVICE_NAME: usize = 32;
/// Longest path accepted for a disk, kernel or initrd.
pub const MAX_PATH: usize = 4096;
/// Longest kernel command line accepted.
pub const MAX_CMDLINE: usize = 4096;
/// Highest VNC display number: port 5900 + display, and ports end at 65535.
/// Ganeti hands out ports from 11000 up, displays from 5100.
pub const MAX_VNC_DISPLAY: u32 = 65535 - 5900;
/// Most queue pairs a NIC may have.
pub const MAX_NIC_QUEUES: u32 = 16;
/// Longest Linux interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// KVM when /dev/kvm opens, TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// Emulated NIC model: every one Ganeti's KVM driver offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// virtio-net-pci.
    #[default]
    Virtio,
    /// Intel e1000.
    E1000,
    /// Realtek RTL8139.
    Rtl8139,
    /// NE2000 on PCI.
    #[serde(rename = "ne2k_pci")]
    Ne2kPci,
    /// Intel i82551 (eepro100).
    I82551,
    /// Intel i82557B (eepro100).
    I82557b,
    /// Intel i82559ER (eepro100).
    I82559er,
    /// AMD PCnet.
    Pcnet,
    /// NE2000 on ISA, at QEMU's I/O port 0x300 and IRQ 9: no PCI slot, so
    /// one per instance, and never hot-plugged.
    #[serde(rename = "ne2k_isa")]
    Ne2kIsa,
}

impl NicModel {
    /// Every model on PCI.
    pub const ON_PCI: [NicModel; 8] = [
        NicModel::Virtio,
        NicModel::E1000,
        NicModel::Rtl8139,
        NicModel::Ne2kPci,
        NicModel::I82551,
        NicModel::I82557b,
        NicModel::I82559er,
        NicModel::Pcnet,
    ];

    /// QEMU's device for the model.
    pub fn qemu_device(self) -> &'static str {
        match self {
            NicModel::Virtio => "virtio-net-pci",
            NicModel::E1000 => "e1000",
            NicModel::Rtl8139 => "rtl8139",
            NicModel::Ne2kPci => "ne2k_pci",
            NicModel::I82551 => "i82551",
            NicModel::I82557b => "i82557b",
            NicModel::I82559er => "i82559er",
            NicModel::Pcnet => "pcnet",
            NicModel::Ne2kIsa => "ne2k_isa",
        }
    }

    /// Whether the NIC sits on ISA rather than in a PCI slot.
    pub fn on_isa(self) -> bool {
        self == NicModel::Ne2kIsa
    }
}

/// How many ISA NICs an instance can have: the one at QEMU's default
/// I/O port and IRQ.
pub const MAX_ISA_NICS: usize = 1;

/// A unicast Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// True when the group bit is set (multicast or broadcast).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or(())?;
            if part.len() != 2 {
                return Err(());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ())?;
        }
        if parts.next().is_some() {
            return Err(());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|()| serde::de::Error::custom(format!("invalid MAC address {s:?}")))
    }
}

/// A NIC as the spec asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// Unique among the instance's devices.
    pub name: String,
    /// Stable identity; QEMU ids derive from it.
    pub uuid: Uuid,
    /// Guest-visible MAC.
    pub mac: MacAddr,
    /// Emulated model.
    pub model: NicModel,
    /// Bridge to attach the tap to.
    pub bridge: Option<String>,
    /// Use in-kernel vhost-net (needs /dev/vhost-net on the node).
    #[serde(default)]
    pub vhost: bool,
    /// Queue pairs; more than one makes a multiqueue tap and virtio device.
    #[serde(default = "one_queue")]
    pub queues: u32,
    /// The VLANs of the tap's bridge port; the bridge must filter VLANs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<Vlan>,
}

/// The VLANs a NIC's bridge port carries: one untagged (the port's PVID,
/// what the guest sends and receives without a tag) and any number of
/// tagged ones. Nothing else reaches the guest, not even the bridge's
/// default VLAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Vlan {
    /// The access VLAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub untagged: Option<u16>,
    /// Trunked VLANs, in the order given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tagged: Vec<u16>,
}

/// The highest VLAN id; 0 and 4095 are reserved.
pub const MAX_VLAN_ID: u16 = 4094;

impl Vlan {
    /// Every id, the untagged one first.
    pub fn ids(&self) -> impl Iterator<Item = u16> + '_ {
        self.untagged.iter().chain(&self.tagged).copied()
    }

    /// Checks ids are in 1-4094, none repeats, and there is at least one.
    pub fn check(&self) -> Result<(), String> {
        if self.untagged.is_none() && self.tagged.is_empty() {
            return Err("no VLAN id".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for id in self.ids() {
            if !(1..=MAX_VLAN_ID).contains(&id) {
                return Err(format!("VLAN id {id} is outside 1-{MAX_VLAN_ID}"));
            }
            if !seen.insert(id) {
                return Err(format!("VLAN id {id} is given twice"));
            }
        }
        Ok(())
    }
}

/// Ganeti's `vlan` syntax: `.100` (untagged), `:100:200` (tagged), or
/// `.100:200:300` (100 untagged, the rest tagged). A bare `100` is taken as
/// `.100`, as Ganeti's KVM driver does.
impl std::str::FromStr for Vlan {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let id = |part: &str| {
            part.parse::<u16>()
                .map_err(|_| format!("{part:?} is not a VLAN id in {text:?}"))
        };
        let (untagged, trunk) = match text.strip_prefix(':') {
            Some(trunk) => (None, Some(trunk)),
            None => {
                let text = text.strip_prefix('.').unwrap_or(text);
                let (first, rest) = text
                    .split_once(':')
                    .map_or((text, None), |(f, r)| (f, Some(r)));
                (Some(id(first)?), rest)
            }
        };
        let tagged = trunk
            .map(|t| t.split(':').map(id).collect::<Result<Vec<_>, _>>())
            .transpose()?
            .unwrap_or_default();
        let vlan = Vlan { untagged, tagged };
        vlan.check().map_err(|e| format!("{e} in {text:?}"))?;
        Ok(vlan)
    }
}

impl std::fmt::Display for Vlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(id) = self.untagged {
            write!(f, ".{id}")?;
        }
        for id in &self.tagged {
            write!(f, ":{id}")?;
        }
        Ok(())
    }
}

fn one_queue() -> u32 {
    1
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Boot {
    /// From the first disk.
    #[default]
    Disk,
    /// From the first CD-ROM, then the first disk: once the CD-ROM holds
    /// no bootable medium, the guest boots from its disk.
    Cdrom,
    /// From the floppy, then the first disk.
    Floppy,
    /// From the first NIC's option ROM (PXE), then the first disk.
    Network,
    /// Direct kernel boot.
    Kernel {
        /// Kernel image.
        kernel: PathBuf,
        /// Optional initrd.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
}

impl Boot {
    /// The kind of drive the guest boots from, if it boots from one.
    pub fn media_kind(&self) -> Option<MediaKind> {
        match self {
            Boot::Cdrom => Some(MediaKind::Cdrom),
            Boot::Floppy => Some(MediaKind::Floppy),
            _ => None,
        }
    }
}

/// Where guest RAM comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum MemoryBacking {
    /// Anonymous memory, QEMU's default.
    #[default]
    Anonymous,
    /// A file or a directory (QEMU makes a file in it), on tmpfs or disk.
    /// `share` maps it shared, so what the guest writes lands in the file.
    File {
        /// The file or directory.
        path: PathBuf,
        /// Map shared rather than private.
        share: bool,
    },
    /// Huge pages from a hugetlbfs mount, all taken at start, so a node
    /// without enough free huge pages refuses the start instead of the
    /// guest failing later.
    HugePages {
        /// The hugetlbfs mount, e.g. `/dev/hugepages`.
        path: PathBuf,
    },
}

/// What the cluster asks this node to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Instance name, unique on the node.
    pub name: String,
    /// Instance uuid, unique in the cluster.
    pub uuid: Uuid,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Disks, in guest order.
    pub disks: Vec<DiskSpec>,
    /// NICs, in guest order.
    pub nics: Vec<NicSpec>,
    /// Boot settings.
    pub boot: Boot,
    /// Machine type or alias, e.g. `pc`.
    pub machine_type: String,
    /// Accelerator wish.
    pub accelerator: Accelerator,
    /// Serial console on a unix socket.
    pub serial_console: bool,
    /// VNC display on loopback.
    pub vnc_display: Option<u32>,
    /// The address VNC listens on; unset is 127.0.0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_address: Option<std::net::IpAddr>,
    /// CPU model.
    pub cpu_model: String,
    /// Where guest RAM comes from.
    pub memory_backing: MemoryBacking,
    /// Host CPUs each vCPU thread may run on; unset leaves them unpinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pinning: Option<CpuPinning>,
    /// Share of CPU time against other instances (cgroup `cpu.weight`,
    /// 1-10000); unset is the default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// How the guest sees its vCPUs grouped; unset is QEMU's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_topology: Option<CpuTopology>,
    /// The real-time clock in the node's local time instead of UTC.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rtc_localtime: bool,
    /// A guest reboot ends QEMU (`-no-reboot`), so the instance stops
    /// instead of rebooting, as Ganeti's `reboot_behavior=exit`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exit_on_reboot: bool,
    /// The keymap VNC assumes (`-k`); unset is QEMU's (en-us).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_keymap: Option<String>,
    /// VNC asks viewers for the password set on the running instance, and
    /// lets nobody in before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vnc_password: bool,
    /// VNC speaks TLS (VeNCrypt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_tls: Option<VncTls>,
    /// A SPICE display, instead of VNC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spice: Option<SpiceSpec>,
    /// A pointing device on USB, with the USB controller it needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb_pointer: Option<UsbPointer>,
    /// The display adapter; unset is the standard VGA with VNC, and none
    /// without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_adapter: Option<DisplayAdapter>,
    /// CD-ROM and floppy drives, with their media.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub media: Vec<MediaDrive>,
    /// USB input devices beside the pointer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usb_devices: Vec<UsbDevice>,
    /// A sound card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sound_card: Option<SoundCard>,
    /// A virtio-serial channel for the QEMU guest agent in the guest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_agent: bool,
    /// The guest must never be at the mercy of one link: a migration of it
    /// may not switch to postcopy, after which a broken connection loses
    /// it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub never_lose: bool,
    /// On q35, the spare root ports hot-adds take; unset is the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_ports: Option<u32>,
    /// The slot disks and NICs start from, cold or hot-added; the slots
    /// below it are left to the machine's own devices (Ganeti's
    /// `kvm_pci_reservations`). Unset: right after the reserved slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_device_slot: Option<u8>,
    /// The SCSI controller, present from the start so SCSI disks can be
    /// hot-added; a SCSI disk implies virtio-scsi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scsi_controller: Option<ScsiController>,
    /// Extra QEMU arguments, each option followed by its values; only the
    /// options the node allows run (see [`crate::extra`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
}

/// A VNC keymap name such as `en-us` or `de`.
pub fn is_keymap(value: &str) -> bool {
    (2..=8).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
}

/// Sockets, cores per socket and threads per core; 0 leaves one to QEMU,
/// which derives it from the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CpuTopology {
    /// Sockets.
    #[serde(default)]
    pub sockets: u32,
    /// Cores per socket.
    #[serde(default)]
    pub cores: u32,
    /// Threads per core.
    #[serde(default)]
    pub threads: u32,
}

impl CpuTopology {
    /// Checks the topology can hold `vcpus`: the parts given divide it,
    /// and all three, when given, multiply to it.
    pub fn check(&self, vcpus: u32) -> Result<(), SpecError> {
        let given = [self.sockets, self.cores, self.threads];
        let product = given
            .iter()
            .filter(|&&n| n != 0)
            .try_fold(1u32, |p, &n| p.checked_mul(n));
        let fits = match product {
            Some(p) if given.contains(&0) => vcpus.is_multiple_of(p),
            Some(p) => p == vcpus,
            None => false,
        };
        if fits {
            Ok(())
        } else {
            Err(SpecError::CpuTopology {
                topology: *self,
                vcpus,
            })
        }
    }

    /// QEMU's `-smp` suffix: `,sockets=S,cores=C,threads=T` for the parts
    /// given.
    pub fn smp_suffix(&self) -> String {
        [
            ("sockets", self.sockets),
            ("cores", self.cores),
            ("threads", self.threads),
        ]
        .iter()
        .filter(|(_, n)| *n != 0)
        .map(|(name, n)| format!(",{name}={n}"))
        .collect()
    }
}

impl std::fmt::Display for CpuTopology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sockets, {} cores, {} threads",
            self.sockets, self.cores, self.threads
        )
    }
}

/// Why a spec was refused. Each message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The CPU mask doesn't fit the instance.
    #[error(transparent)]
    CpuPinning(#[from] PinningError),
    /// CPU weight out of range.
    #[error("cpu weight {0} is out of range: use 1..=10000 (100 is the default)")]
    CpuWeight(u32),
    /// Bad instance name.
    #[error(
        "instance name {0:?} is invalid: use 1-{MAX_INSTANCE_NAME} letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    InstanceName(String),
    /// The nil uuid.
    #[error("instance uuid must not be the nil uuid")]
    NilUuid,
    /// Memory out of bounds.
    #[error("memory {0} MiB is out of range: use {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB")]
    Memory(u64),
    /// vCPUs out of bounds.
    #[error("vcpus {0} is out of range: use 1..={MAX_VCPUS}")]
    Vcpus(u32),
    /// A CPU topology that can't hold the vCPUs.
    #[error(
        "cpu topology ({topology}) doesn't fit {vcpus} vCPUs: the parts given must divide it, and all three must multiply to it (0 leaves a part to QEMU)"
    )]
    CpuTopology {
        /// As given.
        topology: CpuTopology,
        /// The spec's vCPUs.
        vcpus: u32,
    },
    /// Bad device name.
    #[error(
        "device name {0:?} is invalid: use 1-{MAX_DEVICE_NAME} letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    DeviceName(String),
    /// Two devices share a name.
    #[error("device name {0:?} is used twice")]
    DuplicateDeviceName(String),
    /// Two devices share a uuid.
    #[error("device uuid {0} is used twice")]
    DuplicateDeviceUuid(Uuid),
    /// A device uuid is nil.
    #[error("device {0:?} has the nil uuid")]
    NilDeviceUuid(String),
    /// A path isn't acceptable.
    #[error("{what} path {path:?} is invalid: {reason}")]
    Path {
        /// Which path (e.g. `disk "data"`).
        what: String,
        /// The path as given.
        path: PathBuf,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A path lies outside the directories the node allows.
    #[error(
        "{what} path {path:?} is outside the directories this node allows ({roots}); use a file under one of them"
    )]
    OutsideRoots {
        /// Which path (e.g. `disk "data"`).
        what: String,
        /// The path as given, or where its symlinks lead.
        path: PathBuf,
        /// The allowed directories, comma-separated.
        roots: String,
    },
    /// MAC can't be parsed.
    #[error("NIC {nic:?}: MAC {mac:?} is not of the form aa:bb:cc:dd:ee:ff")]
    MacSyntax {
        /// NIC name.
        nic: String,
        /// As given.
        mac: String,
    },
    /// MAC isn't unicast.
    #[error(
        "NIC {nic:?}: MAC {mac} is multicast or broadcast; use a unicast address (even first octet)"
    )]
    MacNotUnicast {
        /// NIC name.
        nic: String,
        /// As given.
        mac: MacAddr,
    },
    /// MAC is all zeros.
    #[error("NIC {nic:?}: MAC 00:00:00:00:00:00 is not a usable address")]
    MacZero {
        /// NIC name.
        nic: String,
    },
    /// A queue count out of range, or multiqueue on a model without it.
    #[error(
        "NIC {nic:?}: {queues} queues is not possible; use 1..={MAX_NIC_QUEUES}, and more than 1 only with the virtio model"
    )]
    Queues {
        /// NIC name.
        nic: String,
        /// As given.
        queues: u32,
    },
    /// Two NICs share a MAC.
    #[error("MAC {0} is used by two NICs")]
    DuplicateMac(MacAddr),
    /// Bad bridge name.
    #[error(
        "NIC {nic:?}: bridge {bridge:?} is not a valid interface name (1-{MAX_IFNAME} letters, digits, '-', '_' or '.')"
    )]
    Bridge {
        /// NIC name.
        nic: String,
        /// As given.
        bridge: String,
    },
    /// Bad VLANs, or VLANs without a bridge.
    #[error("NIC {nic:?}: {message}")]
    Vlan {
        /// NIC name.
        nic: String,
        /// What is wrong.
        message: String,
    },
    /// Bad kernel command line.
    #[error("kernel command line is invalid: {0}")]
    Cmdline(&'static str),
    /// Bad machine type.
    #[error("machine type {0:?} is invalid: use letters, digits, '-', '_' or '.'")]
    MachineType(String),
    /// Bad CPU model.
    #[error(
        "CPU model {0:?} is invalid: use letters, digits, '-', '_' or '.' (CPU flags are not accepted)"
    )]
    CpuModel(String),
    /// VNC display out of range.
    #[error("VNC display {0} is out of range: use 0..={MAX_VNC_DISPLAY}")]
    VncDisplay(u32),
    /// CD-ROM or floppy drives the machine can't hold, or a boot device
    /// the instance lacks.
    #[error(transparent)]
    Media(#[from] MediaError),
    /// Extra arguments that aren't options with their values.
    #[error(transparent)]
    ExtraArgs(#[from] crate::extra::ExtraArgsError),
    /// Spare root ports on a machine without them, or too many.
    #[error(
        "{0} hotplug ports asked for: spare root ports are for q35 machines, at most {MAX_HOTPLUG_PORTS}"
    )]
    HotplugPorts(u32),
    /// Disks a bus can't take.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A first device slot in the reserved ones, or past the bus.
    #[error("first device slot {0} is out of range: use 3..=31")]
    FirstDeviceSlot(u8),
    /// More ISA NICs than ISA has room for.
    #[error(
        "{0} ne2k_isa NICs asked for; ISA takes {MAX_ISA_NICS}, at QEMU's I/O port and IRQ; give the others a PCI model"
    )]
    IsaNics(usize),
    /// Viewers' certificates to verify, without a CA to verify them by.
    #[error("verifying VNC viewers' certificates needs the CA: give an x509 directory")]
    VncVerifyWithoutCa,
    /// Both VNC and SPICE.
    #[error("an instance has VNC or SPICE, not both")]
    VncAndSpice,
    /// SPICE settings outside their values.
    #[error(transparent)]
    Spice(#[from] crate::spice::SpiceError),
    /// A VNC address, password or TLS with no display to serve.
    #[error("a VNC address, password or TLS needs a VNC display")]
    VncAddressWithoutDisplay,
    /// A keymap that isn't a keymap's name, or one without VNC.
    #[error(
        "VNC keymap {0:?} is not a keymap's name (like en-us or de), or there is no VNC display"
    )]
    VncKeymap(String),
}

/// True for `[A-Za-z0-9][A-Za-z0-9_.-]*` of at most `max` bytes.
pub fn is_safe_identifier(s: &str, max: usize) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(first) if first.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    s.len() <= max && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Checks that `path` lies inside one of `roots`; with no roots, every
/// path does. Lexical, on normalized absolute paths: the caller checks
/// again where symlinks lead.
pub fn check_under_roots(what: &str, path: &Path, roots: &[PathBuf]) -> Result<(), SpecError> {
    if roots.is_empty() || roots.iter().any(|root| path.starts_with(root)) {
        return Ok(());
    }
    Err(SpecError::OutsideRoots {
        what: what.to_owned(),
        path: path.to_owned(),
        roots: roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Checks an absolute, normalized path without control characters, and
/// without the characters QEMU's option syntax gives a meaning to.
pub fn check_absolute_path(what: &str, path: &Path) -> Result<(), SpecError> {
    let fail = |reason| {
        Err(SpecError::Path {
            what: what.to_owned(),
            path: path.to_owned(),
            reason,
        })
    };
    let Some(text) = path.to_str() else {
        return fail("it is not valid UTF-8");
    };
    if text.is_empty() {
        return fail("it is empty");
    }
    if !path.is_absolute() {
        return fail("it must be absolute");
    }
    if text.len() > MAX_PATH {
        return fail("it is too long");
    }
    if text.bytes().any(|b| b == 0 || b.is_ascii_control()) {
        return fail("it contains control characters");
    }
    // Escaping would make them safe for QEMU, but every tool that later
    // pastes such a path into an option string would have to as well.
    if text.contains([',', '=']) {
        return fail(
            "it contains ',' or '=', which QEMU options treat as syntax; rename the file or point a symlink without them at it",
        );
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return fail("it must not contain '.' or '..' components");
    }
    Ok(())
}

impl InstanceSpec {
    /// Checks every field. Pure.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !is_safe_identifier(&self.name, MAX_INSTANCE_NAME) {
            return Err(SpecError::InstanceName(self.name.clone()));
        }
        if self.uuid.is_nil() {
            return Err(SpecError::NilUuid);
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(SpecError::Memory(self.memory_mib));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(SpecError::Vcpus(self.vcpus));
        }
        if let Some(pinning) = &self.cpu_pinning {
            pinning.check_vcpus(self.vcpus)?;
        }
        if let Some(topology) = &self.cpu_topology {
            topology.check(self.vcpus)?;
        }
        if let Some(weight) = self
            .cpu_weight
            .filter(|w| !crate::cgroup::CPU_WEIGHTS.contains(w))
        {
            return Err(SpecError::CpuWeight(weight));
        }
        if !is_safe_identifier(&self.machine_type, 64) {
            return Err(SpecError::MachineType(self.machine_type.clone()));
        }
        if !is_safe_identifier(&self.cpu_model, 64) {
            return Err(SpecError::CpuModel(self.cpu_model.clone()));
        }
        self.validate_displays()?;
        if let Some(ports) = self.hotplug_ports
            && (ports > MAX_HOTPLUG_PORTS || !is_q35(&self.machine_type))
        {
            return Err(SpecError::HotplugPorts(ports));
        }
        if let Some(slot) = self.first_device_slot
            && !(3..=31).contains(&slot)
        {
            return Err(SpecError::FirstDeviceSlot(slot));
        }
        self.validate_boot()?;
        crate::extra::options(&self.extra_args)?;
        crate::media::check(&self.media, self.boot.media_kind())?;
        if self.boot == Boot::Network && self.nics.is_empty() {
            return Err(MediaError::NoBootNic.into());
        }
        match &self.memory_backing {
            MemoryBacking::Anonymous => {}
            MemoryBacking::File { path, .. } | MemoryBacking::HugePages { path } => {
                check_absolute_path("memory backing", path)?;
            }
        }
        self.validate_devices()
    }

    /// Checks the disks and NICs: names, uuids and MACs unique, paths
    /// absolute, each NIC sound.
    fn validate_devices(&self) -> Result<(), SpecError> {
        let mut names = HashSet::new();
        let mut uuids = HashSet::new();
        let mut device_ids = self
            .disks
            .iter()
            .map(|d| (&d.name, d.uuid))
            .chain(self.nics.iter().map(|n| (&n.name, n.uuid)));
        device_ids.try_for_each(|(name, uuid)| {
            if !is_safe_identifier(name, MAX_DEVICE_NAME) {
                return Err(SpecError::DeviceName(name.clone()));
            }
            if uuid.is_nil() {
                return Err(SpecError::NilDeviceUuid(name.clone()));
            }
            if !names.insert(name.as_str()) {
                return Err(SpecError::DuplicateDeviceName(name.clone()));
            }
            if !uuids.insert(uuid) {
                return Err(SpecError::DuplicateDeviceUuid(uuid));
            }
            Ok(())
        })?;

        crate::disk::check_disks(&self.disks, self.scsi_controller.unwrap_or_default())?;
        for disk in &self.disks {
            check_absolute_path(&format!("disk {:?}", disk.name), &disk.path)?;
        }
        for drive in &self.media {
            if !is_safe_identifier(&drive.name, MAX_DEVICE_NAME) {
                return Err(SpecError::DeviceName(drive.name.clone()));
            }
            if !names.insert(drive.name.as_str()) {
                return Err(SpecError::DuplicateDeviceName(drive.name.clone()));
            }
            if let Some(image) = &drive.image {
                check_absolute_path(&drive.what(), image)?;
            }
        }
        let isa = self.nics.iter().filter(|n| n.model.on_isa()).count();
        if isa > MAX_ISA_NICS {
            return Err(SpecError::IsaNics(isa));
        }
        let mut macs = HashSet::new();
        for nic in &self.nics {
            check_nic(nic)?;
            if !macs.insert(nic.mac) {
                return Err(SpecError::DuplicateMac(nic.mac));
            }
        }
        Ok(())
    }

    /// Every host file the spec points QEMU at, with what it is: disk
    /// images, kernel and initrd, and the memory backing.
    pub fn host_paths(&self) -> Vec<(String, &Path)> {
        let mut paths: Vec<(String, &Path)> = self
            .disks
            .iter()
            .map(|d| (format!("disk {:?}", d.name), d.path.as_path()))
            .chain(
                self.media
                    .iter()
                    .filter_map(|d| Some((d.what(), d.image.as_deref()?))),
            )
            .collect();
        if let Boot::Kernel { kernel, initrd, .. } = &self.boot {
            paths.push(("kernel".into(), kernel));
            if let Some(initrd) = initrd {
                paths.push(("initrd".into(), initrd));
            }
        }
        if let MemoryBacking::File { path, .. } | MemoryBacking::HugePages { path } =
            &self.memory_backing
        {
            paths.push(("memory backing".into(), path));
        }
        if let Some(dir) = self.vnc_tls.as_ref().and_then(|t| t.x509_dir.as_ref()) {
            paths.push(("VNC x509 directory".into(), dir));
        }
        if let Some(tls) = self.spice.as_ref().and_then(|s| s.tls.as_ref()) {
            for file in [&tls.cert, &tls.key, &tls.ca] {
                paths.push(("SPICE TLS file".into(), file));
            }
        }
        paths
    }

    /// VNC's display, address, keymap and TLS, or SPICE's settings.
    fn validate_displays(&self) -> Result<(), SpecError> {
        if let Some(d) = self.vnc_display
            && d > MAX_VNC_DISPLAY
        {
            return Err(SpecError::VncDisplay(d));
        }
        if (self.vnc_address.is_some() || self.vnc_password || self.vnc_tls.is_some())
            && self.vnc_display.is_none()
        {
            return Err(SpecError::VncAddressWithoutDisplay);
        }
        match &self.vnc_tls {
            Some(VncTls {
                x509_dir: Some(dir),
                ..
            }) => check_absolute_path("VNC x509 directory", dir)?,
            Some(VncTls {
                verify_client: true,
                ..
            }) => return Err(SpecError::VncVerifyWithoutCa),
            _ => {}
        }
        if let Some(spice) = &self.spice {
            if self.vnc_display.is_some() {
                return Err(SpecError::VncAndSpice);
            }
            crate::spice::check(spice)?;
            if let Some(tls) = &spice.tls {
                for file in [&tls.cert, &tls.key, &tls.ca] {
                    check_absolute_path("SPICE TLS file", file)?;
                }
            }
        }
        if let Some(keymap) = &self.vnc_keymap
            && (!is_keymap(keymap) || self.vnc_display.is_none())
        {
            return Err(SpecError::VncKeymap(keymap.clone()));
        }
        Ok(())
    }

    fn validate_boot(&self) -> Result<(), SpecError> {
        let Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } = &self.boot
        else {
            return Ok(());
        };
        check_absolute_path("kernel", kernel)?;
        if let Some(initrd) = initrd {
            check_absolute_path("initrd", initrd)?;
        }
        if cmdline.len() > MAX_CMDLINE {
            return Err(SpecError::Cmdline("it is longer than 4096 bytes"));
        }
        if cmdline.bytes().any(|b| b == 0 || b == b'\n') {
            return Err(SpecError::Cmdline("it contains NUL or newline"));
        }
        Ok(())
    }
}

/// Checks one NIC's MAC and bridge.
pub fn check_nic(nic: &NicSpec) -> Result<(), SpecError> {
    if nic.mac.0 == [0; 6] {
        return Err(SpecError::MacZero {
            nic: nic.name.clone(),
        });
    }
    if nic.mac.is_multicast() {
        return Err(SpecError::MacNotUnicast {
            nic: nic.name.clone(),
            mac: nic.mac,
        });
    }
    let queues_ok = (1..=MAX_NIC_QUEUES).contains(&nic.queues)
        && (nic.queues == 1 || nic.model == NicModel::Virtio);
    if !queues_ok {
        return Err(SpecError::Queues {
            nic: nic.name.clone(),
            queues: nic.queues,
        });
    }
    if let Some(bridge) = &nic.bridge
        && !is_safe_identifier(bridge, MAX_IFNAME)
    {
        return Err(SpecError::Bridge {
            nic: nic.name.clone(),
            bridge: bridge.clone(),
        });
    }
    if let Some(vlan) = &nic.vlan {
        let vlan_error = |message| SpecError::Vlan {
            nic: nic.name.clone(),
            message,
        };
        if nic.bridge.is_none() {
            return Err(vlan_error(
                "VLANs need a bridge that filters them; name one".into(),
            ));
        }
        vlan.check().map_err(vlan_error)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_spec() -> InstanceSpec {
        InstanceSpec {
            name: "web1".into(),
            uuid: Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0),
            memory_mib: 128,
            vcpus: 1,
            disks: vec![DiskSpec {
                aio: DiskAio::Threads,
                discard: false,
                bus: DiskBus::Virtio,
                name: "root".into(),
                uuid: Uuid::from_u128(0xd15c_0000_0000_0000_0000_0000_0000_0001),
                path: "/srv/images/web1.img".into(),
                format: DiskFormat::Raw,
                read_only: false,
                cache: DiskCache::None,
            }],
            nics: vec![NicSpec {
                name: "eth0".into(),
                uuid: Uuid::from_u128(0x41c0_0000_0000_0000_0000_0000_0000_0001),
                mac: "52:54:00:12:34:56".parse().unwrap(),
                model: NicModel::Virtio,
                bridge: Some("br0".into()),
                vhost: false,
                queues: 1,
                vlan: None,
            }],
            boot: Boot::Disk,
            machine_type: "pc".into(),
            accelerator: Accelerator::Auto,
            serial_console: true,
            vnc_display: None,
            vnc_address: None,
            cpu_model: "qemu64".into(),
            memory_backing: MemoryBacking::Anonymous,
            cpu_pinning: None,
            cpu_weight: None,
            cpu_topology: None,
            rtc_localtime: false,
            exit_on_reboot: false,
            vnc_keymap: None,
            vnc_password: false,
            vnc_tls: None,
            spice: None,
            usb_pointer: None,
            display_adapter: None,
            media: vec![],
            usb_devices: vec![],
            sound_card: None,
            guest_agent: false,
            never_lose: false,
            hotplug_ports: None,
            first_device_slot: None,
            scsi_controller: None,
            extra_args: vec![],
        }
    }

    #[test]
    fn drives_are_checked_like_the_other_devices() {
        let cdrom = |name: &str, image: &str| MediaDrive {
            name: name.into(),
            kind: MediaKind::Cdrom,
            image: Some(image.into()),
        };
        let mut spec = sample_spec();
        spec.media = vec![cdrom("install", "/srv/iso/debian.iso")];
        spec.boot = Boot::Cdrom;
        assert!(spec.validate().is_ok());
        spec.media = vec![cdrom("install", "debian.iso")];
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("CD-ROM \"install\" path"), "{err}");
        spec.media = vec![cdrom("root", "/srv/iso/debian.iso")];
        assert_eq!(
            spec.validate(),
            Err(SpecError::DuplicateDeviceName("root".into()))
        );
        spec.media.clear();
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("no CD-ROM drive"), "{err}");
        spec.boot = Boot::Network;
        spec.nics.clear();
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("no NIC"), "{err}");
    }

    #[test]
    fn paths_must_lie_under_a_root_when_roots_are_given() {
        let roots = [PathBuf::from("/srv/images"), PathBuf::from("/boot")];
        let check = |p: &str| check_under_roots("disk", Path::new(p), &roots);

        assert_eq!(check("/srv/images/web1.img"), Ok(()));
        assert_eq!(check("/boot/vmlinuz"), Ok(()));
        assert!(matches!(
            check("/srv/images-other/x.img"),
            Err(SpecError::OutsideRoots { .. })
        ));
        assert!(matches!(
            check("/etc/shadow"),
            Err(SpecError::OutsideRoots { .. })
        ));
        assert_eq!(
            check_under_roots("disk", Path::new("/anywhere"), &[]),
            Ok(())
        );
    }

    #[test]
    fn host_paths_list_every_file_qemu_opens() {
        let mut spec = sample_spec();
        spec.boot = Boot::Kernel {
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/boot/initrd".into()),
            cmdline: String::new(),
        };
        spec.memory_backing = MemoryBacking::File {
            path: "/dev/shm/web1".into(),
            share: true,
        };

        let paths: Vec<&Path> = spec.host_paths().into_iter().map(|(_, p)| p).collect();

        assert_eq!(
            paths,
            [
                "/srv/images/web1.img",
                "/boot/vmlinuz",
                "/boot/initrd",
                "/dev/shm/web1"
            ]
            .map(Path::new)
        );
    }

    #[test]
    fn sample_spec_is_valid() {
        assert_eq!(sample_spec().validate(), Ok(()));
    }

    #[test]
    fn names_with_slash_or_dots_are_refused() {
        for bad in ["a/b", "..", "../etc", ".hidden", "", "a b", "x,y"] {
            let spec = InstanceSpec {
                name: bad.into(),
                ..sample_spec()
            };
            assert_eq!(
                spec.validate(),
                Err(SpecError::InstanceName(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn memory_and_vcpu_bounds_are_enforced() {
        let zero_mem = InstanceSpec {
            memory_mib: 0,
            ..sample_spec()
        };
        let huge_mem = InstanceSpec {
            memory_mib: u64::MAX,
            ..sample_spec()
        };
        let zero_cpu = InstanceSpec {
            vcpus: 0,
            ..sample_spec()
        };
        let many_cpu = InstanceSpec {
            vcpus: 10_000,
            ..sample_spec()
        };

        assert_eq!(zero_mem.validate(), Err(SpecError::Memory(0)));
        assert_eq!(huge_mem.validate(), Err(SpecError::Memory(u64::MAX)));
        assert_eq!(zero_cpu.validate(), Err(SpecError::Vcpus(0)));
        assert_eq!(many_cpu.validate(), Err(SpecError::Vcpus(10_000)));
    }

    #[test]
    fn relative_and_dotted_disk_paths_are_refused() {
        for bad in ["disk.img", "./disk.img", "/srv/../etc/shadow", "/srv/\nx"] {
            let mut spec = sample_spec();
            spec.disks[0].path = bad.into();
            assert!(
                matches!(spec.validate(), Err(SpecError::Path { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn paths_with_option_syntax_are_refused() {
        for path in [
            "/srv/a,b/disk",
            "/srv/disk,file=/etc/shadow",
            "/srv/x=y.img",
        ] {
            let mut spec = sample_spec();
            spec.disks[0].path = path.into();

            assert!(
                matches!(spec.validate(), Err(SpecError::Path { reason, .. }) if reason.contains("symlink")),
                "{path}"
            );
        }
    }

    #[test]
    fn multicast_broadcast_and_zero_macs_are_refused() {
        for (bad, zero) in [
            ("01:00:5e:00:00:01", false),
            ("ff:ff:ff:ff:ff:ff", false),
            ("00:00:00:00:00:00", true),
        ] {
            let mut spec = sample_spec();
            spec.nics[0].mac = bad.parse().unwrap();
            let err = spec.validate().unwrap_err();
            if zero {
                assert!(matches!(err, SpecError::MacZero { .. }));
            } else {
                assert!(matches!(err, SpecError::MacNotUnicast { .. }));
            }
        }
    }

    #[test]
    fn mac_parsing_is_strict() {
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5254.0012.3456",
            "52:54:00:12:34:5g",
            "52:54:0:12:34:56",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(
            "52:54:00:AB:cd:EF".parse::<MacAddr>().unwrap().to_string(),
            "52:54:00:ab:cd:ef"
        );
    }

    #[test]
    fn duplicate_device_names_and_uuids_are_refused() {
        let mut same_name = sample_spec();
        same_name.nics[0].name = "root".into();
        let mut same_uuid = sample_spec();
        same_uuid.nics[0].uuid = same_uuid.disks[0].uuid;

        assert_eq!(
            same_name.validate(),
            Err(SpecError::DuplicateDeviceName("root".into()))
        );
        assert_eq!(
            same_uuid.validate(),
            Err(SpecError::DuplicateDeviceUuid(same_uuid.disks[0].uuid))
        );
    }

    #[test]
    fn cpu_model_cannot_carry_flags() {
        let spec = InstanceSpec {
            cpu_model: "host,+vmx".into(),
            ..sample_spec()
        };

        assert!(matches!(spec.validate(), Err(SpecError::CpuModel(_))));
    }

    #[test]
    fn queue_counts_are_bounded_and_need_virtio_for_more_than_one() {
        let mut zero = sample_spec();
        zero.nics[0].queues = 0;
        let mut many = sample_spec();
        many.nics[0].queues = 64;
        let mut e1000 = sample_spec();
        e1000.nics[0].queues = 2;
        e1000.nics[0].model = NicModel::E1000;
        let mut four = sample_spec();
        four.nics[0].queues = 4;

        assert!(matches!(
            zero.validate(),
            Err(SpecError::Queues { queues: 0, .. })
        ));
        assert!(matches!(
            many.validate(),
            Err(SpecError::Queues { queues: 64, .. })
        ));
        assert!(matches!(
            e1000.validate(),
            Err(SpecError::Queues { queues: 2, .. })
        ));
        assert_eq!(four.validate(), Ok(()));
    }

    #[test]
    fn vlans_are_read_in_ganetis_syntax_and_written_back_the_same() {
        for (text, untagged, tagged) in [
            (".100", Some(100), vec![]),
            (":100:200", None, vec![100, 200]),
            (".100:200:300", Some(100), vec![200, 300]),
        ] {
            let vlan: Vlan = text.parse().unwrap();
            assert_eq!(vlan, Vlan { untagged, tagged }, "{text}");
            assert_eq!(vlan.to_string(), text);
        }
        assert_eq!("100".parse::<Vlan>().unwrap().to_string(), ".100");
        for bad in [
            ":",
            "",
            ".0",
            ".4095",
            ":100:100",
            ".x",
            ".100::200",
            ":70000",
        ] {
            assert!(bad.parse::<Vlan>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vlans_need_a_bridge_and_good_ids() {
        let mut spec = sample_spec();
        spec.nics[0].vlan = Some(".100:200".parse().unwrap());
        assert!(spec.validate().is_ok());
        spec.nics[0].vlan = Some(Vlan {
            untagged: Some(7),
            tagged: vec![7],
        });
        assert!(matches!(spec.validate(), Err(SpecError::Vlan { .. })));
        spec.nics[0].vlan = Some(Vlan::default());
        assert!(matches!(spec.validate(), Err(SpecError::Vlan { .. })));
        spec.nics[0].vlan = Some(".100".parse().unwrap());
        spec.nics[0].bridge = None;
        let err = spec.validate().unwrap_err();
        assert!(err.to_string().contains("need a bridge"), "{err}");
    }

    #[test]
    fn a_cpu_topology_must_hold_the_vcpus() {
        let topology = |sockets, cores, threads| CpuTopology {
            sockets,
            cores,
            threads,
        };
        for (t, vcpus) in [
            (topology(1, 2, 2), 4),
            (topology(0, 2, 0), 4),
            (topology(0, 0, 2), 6),
            (topology(2, 0, 0), 2),
            (topology(0, 0, 0), 3),
        ] {
            assert_eq!(t.check(vcpus), Ok(()), "{t} for {vcpus}");
        }
        for (t, vcpus) in [
            (topology(1, 2, 2), 2),
            (topology(0, 4, 0), 6),
            (topology(3, 0, 1), 4),
            (topology(u32::MAX, u32::MAX, 2), 4),
        ] {
            assert!(t.check(vcpus).is_err(), "{t} for {vcpus}");
        }
        assert_eq!(topology(1, 2, 0).smp_suffix(), ",sockets=1,cores=2");
        assert_eq!(topology(0, 0, 0).smp_suffix(), "");
        let mut spec = sample_spec();
        spec.vcpus = 4;
        spec.cpu_topology = Some(topology(2, 3, 1));
        assert!(matches!(
            spec.validate(),
            Err(SpecError::CpuTopology { vcpus: 4, .. })
        ));
    }

    #[test]
    fn bridge_names_are_interface_names() {
        let mut spec = sample_spec();
        spec.nics[0].bridge = Some("bridge-name-too-long".into());

        assert!(matches!(spec.validate(), Err(SpecError::Bridge { .. })));
    }
}
