//! The runtime: everything needed to start the same machine again.
//!
//! It is generated once from a spec (at start and hard reboot), persisted
//! before execution, and replayed by soft reboot, restart, migration and
//! restore. Generation is pure: the caller passes in what it learned about
//! the host ([`QemuInfo`], whether KVM opens).

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
pub use uuid::Uuid;

use crate::cgroup::CgroupLimits;
use crate::identity::QemuUser;
use crate::pcie::{self, PciLayout};
use crate::pinning::CpuPinning;
use crate::qemu_info::{QemuInfo, QemuVersion};
use crate::spec::{
    Accelerator, Boot, CpuTopology, DiskBus, DiskSpec, DisplayAdapter, InstanceSpec, MediaDrive,
    MemoryBacking, NicSpec, ScsiController, SoundCard, SpiceSpec, UsbDevice, UsbPointer, VncTls,
};

// The command line is a function of the runtime: a runtime stores its
// machine part and is checked against it.
pub mod argv;
mod error;
pub mod format;
pub mod inherited;

pub use error::RuntimeError;
pub use format::RUNTIME_FORMAT_VERSION;

pub use inherited::InheritedMachine;

/// Highest slot on pci.0.
pub const MAX_PCI_SLOT: u8 = 31;
/// Slots never given to disks or NICs: 0 host bridge, 1 PIIX3 (ISA, IDE,
/// USB, ACPI functions), 2 the display adapter. Keeping 2 reserved even
/// without a display means turning VNC on later never moves a device.
pub const RESERVED_PCI_SLOTS: [u8; 3] = [0, 1, 2];
/// The kernel's limit for a unix socket path (sun_path is 108 bytes with NUL).
pub const MAX_UNIX_SOCKET_PATH: usize = 107;
/// Sockets created in the run directory; their paths must fit `sun_path`.
pub const RUN_DIR_SOCKETS: [&str; 4] = ["qmp.sock", "serial.sock", "qmp-operator.sock", "qga.sock"];

/// The accelerator once `auto` is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolvedAccelerator {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl ResolvedAccelerator {
    /// The `accel=` value.
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedAccelerator::Kvm => "kvm",
            ResolvedAccelerator::Tcg => "tcg",
        }
    }
}

/// A disk with its place on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeDisk {
    /// The disk as asked for.
    #[serde(flatten)]
    pub spec: DiskSpec,
    /// Its PCI slot; none for a disk on IDE, whose place follows from its
    /// order among the IDE disks, and on SCSI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u8>,
    /// Its target on the SCSI controller, for a disk on SCSI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scsi_target: Option<u8>,
    /// Its QEMU id where that isn't made from its uuid: a disk of a QEMU
    /// the agent adopted keeps the id it had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_id: Option<String>,
}

impl RuntimeDisk {
    /// A disk at a slot (none on IDE), with the id the agent gives it.
    pub fn new(spec: DiskSpec, slot: Option<u8>) -> Self {
        RuntimeDisk {
            spec,
            slot,
            scsi_target: None,
            qemu_id: None,
        }
    }

    /// A disk at a target of the SCSI controller.
    pub fn on_scsi_target(spec: DiskSpec, target: u8) -> Self {
        RuntimeDisk {
            scsi_target: Some(target),
            ..RuntimeDisk::new(spec, None)
        }
    }

    /// Its QEMU device id.
    pub fn device_id(&self) -> String {
        self.qemu_id
            .clone()
            .unwrap_or_else(|| argv::disk_device_id(self.spec.uuid))
    }
}

/// A NIC with its place on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeNic {
    /// The NIC as asked for.
    #[serde(flatten)]
    pub spec: NicSpec,
    /// Its PCI slot; none for a NIC on ISA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u8>,
    /// Its QEMU device and netdev id where that isn't made from its uuid:
    /// a NIC of a QEMU the agent adopted keeps the id it had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_id: Option<String>,
}

impl RuntimeNic {
    /// A NIC at a slot (none on ISA), with the ids the agent gives it.
    pub fn new(spec: NicSpec, slot: Option<u8>) -> Self {
        RuntimeNic {
            spec,
            slot,
            qemu_id: None,
        }
    }

    /// Its QEMU device id.
    pub fn device_id(&self) -> String {
        self.qemu_id
            .clone()
            .unwrap_or_else(|| argv::nic_device_id(self.spec.uuid))
    }

    /// Its QEMU netdev id.
    pub fn netdev_id(&self) -> String {
        self.qemu_id
            .clone()
            .unwrap_or_else(|| argv::netdev_id(self.spec.uuid))
    }
}

/// The QEMU a runtime was generated for, or last made runnable for by a
/// migration or a restore. Each node runs it on its own QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuIdentity {
    /// Its version.
    pub version: QemuVersion,
}

/// A generated runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    /// Layout version, [`RUNTIME_FORMAT_VERSION`] once read in
    /// ([`format::read`]).
    pub format_version: u32,
    /// Instance name.
    pub name: String,
    /// Instance uuid; also on QEMU's command line, for liveness checks.
    pub uuid: Uuid,
    /// Counts generations of this instance's runtime: 1 at the first start,
    /// one more at every start from a spec and every hard reboot.
    pub generation: u64,
    /// The QEMU it was generated for.
    pub qemu: QemuIdentity,
    /// Versioned machine type, e.g. `pc-i440fx-7.2`.
    pub machine_type: String,
    /// Accelerator.
    pub accelerator: ResolvedAccelerator,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// CPU model.
    pub cpu_model: String,
    /// Boot settings.
    pub boot: Boot,
    /// Serial console on a unix socket.
    pub serial_console: bool,
    /// VNC display on loopback.
    pub vnc_display: Option<u32>,
    /// The address VNC listens on; unset is 127.0.0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_address: Option<std::net::IpAddr>,
    /// Where guest RAM comes from; records from before it existed have
    /// anonymous memory.
    #[serde(default)]
    pub memory_backing: MemoryBacking,
    /// Host CPUs each vCPU thread may run on, applied at every launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pinning: Option<CpuPinning>,
    /// How the guest sees its vCPUs grouped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_topology: Option<CpuTopology>,
    /// The real-time clock in the node's local time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rtc_localtime: bool,
    /// A guest reboot ends QEMU, and the instance stops.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exit_on_reboot: bool,
    /// The keymap VNC assumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_keymap: Option<String>,
    /// VNC asks for the password set on the running QEMU.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vnc_password: bool,
    /// VNC's TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_tls: Option<VncTls>,
    /// A SPICE display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spice: Option<SpiceSpec>,
    /// The slot of the SPICE agent's channel, where SPICE has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spice_agent_slot: Option<u8>,
    /// A pointing device on USB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb_pointer: Option<UsbPointer>,
    /// The display adapter in slot 2, where asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_adapter: Option<DisplayAdapter>,
    /// Disks with their slots.
    pub disks: Vec<RuntimeDisk>,
    /// CD-ROM and floppy drives, with the medium each holds now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub media: Vec<MediaDrive>,
    /// USB input devices beside the pointer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usb_devices: Vec<UsbDevice>,
    /// A sound card, and its slot when it sits on PCI: given out after
    /// the balloon's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sound: Option<RuntimeSound>,
    /// Slot of the virtio-serial controller of the guest agent's channel,
    /// given out after the sound card's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent_slot: Option<u8>,
    /// Never switch a migration of this guest to postcopy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub never_lose: bool,
    /// On q35, the slots of `pcie.0` whose root ports the devices sit
    /// behind, one each, and the spare ones hot-adds take; empty on
    /// i440fx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pcie_root_ports: Vec<u8>,
    /// The slot disks and NICs start from, cold or hot-added; unset is
    /// right after the reserved ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_device_slot: Option<u8>,
    /// NICs with their slots.
    pub nics: Vec<RuntimeNic>,
    /// Slot of the virtio memory balloon, which lets the guest's memory be
    /// lowered and raised again while it runs. Given out after the disks
    /// and NICs, so it moves none of them; runtimes from before the
    /// balloon existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_slot: Option<u8>,
    /// The SCSI controller, where the spec has SCSI disks or asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scsi_controller: Option<RuntimeScsiController>,
    /// Extra QEMU arguments the node allowed, rendered last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
    /// QEMU's seccomp sandbox (`-sandbox`), where its binary has one and
    /// the agent confines instances.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sandbox: bool,
    /// The cgroup limits QEMU runs under, where the agent confines
    /// instances; each node applies them in its own cgroup layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupLimits>,
    /// The unprivileged user QEMU runs as, where the agent confines
    /// instances; runtimes without one run QEMU as the agent's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_user: Option<QemuUser>,
    /// QEMU shuts itself into an empty directory once it has opened what
    /// it needs (`-chroot`, or `-run-with chroot=` from QEMU 8.1 on).
    /// Comes with a QEMU user: a root QEMU could leave a chroot at will.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chroot: bool,
    /// The hardware of a QEMU the agent adopted beyond what a spec
    /// describes; runtimes the agent generated have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inherited: Option<InheritedMachine>,
    /// The machine part of QEMU's command line (no devices, no fds); always
    /// equal to [`argv::render_base`] of the fields above.
    pub argv: Vec<String>,
}

/// The SCSI controller of a runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeScsiController {
    /// The controller.
    pub model: ScsiController,
    /// Its PCI slot.
    pub slot: u8,
}

/// A sound card of a runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeSound {
    /// The card.
    pub card: SoundCard,
    /// Its PCI slot; none for a card that isn't on PCI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u8>,
}

/// What runtime generation needs to know about the host, decided by the caller.
#[derive(Debug, Clone, Copy)]
pub struct HostFacts<'a> {
    /// The probed QEMU binary.
    pub qemu: &'a QemuInfo,
    /// `Ok` when /dev/kvm opens; otherwise why not.
    pub kvm: Result<(), &'a str>,
    /// The instance's run directory, where its sockets go.
    pub run_dir: &'a Path,
    /// Whether /dev/vhost-net exists.
    pub vhost_net: bool,
    /// The host's CPU count, which bounds CPU masks.
    pub cpus: u32,
    /// Whether instances are confined (sandbox where QEMU has one, and
    /// cgroup limits).
    pub confine: bool,
    /// Who QEMU runs as when confined; the caller picks it (a fixed user,
    /// or one from a pool).
    pub qemu_user: Option<QemuUser>,
    /// The extra QEMU options the node allows, each with its value.
    pub allowed_extra_options: &'a [String],
}

/// Generates a runtime from a spec. Pure.
pub fn generate(
    spec: &InstanceSpec,
    host: HostFacts<'_>,
    generation: u64,
) -> Result<Runtime, RuntimeError> {
    spec.validate()?;
    check_socket_paths(host.run_dir)?;
    let machine_type = resolve_machine_type(&spec.machine_type, host.qemu)?;
    let accelerator = resolve_accelerator(spec.accelerator, host.kvm)?;
    crate::extra::check_allowed(&spec.extra_args, host.allowed_extra_options)
        .map_err(RuntimeError::ExtraArgs)?;
    if let Some(nic) = spec.nics.iter().find(|n| n.vhost && !host.vhost_net) {
        return Err(RuntimeError::VhostUnavailable(nic.name.clone()));
    }
    if let Some(pinning) = &spec.cpu_pinning {
        pinning.check_host(host.cpus)?;
    }
    let layout = PciLayout::of(&machine_type);
    let placed = place_devices(spec, layout)?;

    let mut runtime = Runtime {
        format_version: RUNTIME_FORMAT_VERSION,
        name: spec.name.clone(),
        uuid: spec.uuid,
        generation,
        qemu: QemuIdentity {
            version: host.qemu.version,
        },
        machine_type,
        accelerator,
        memory_mib: spec.memory_mib,
        vcpus: spec.vcpus,
        cpu_model: spec.cpu_model.clone(),
        boot: spec.boot.clone(),
        serial_console: spec.serial_console,
        vnc_display: spec.vnc_display,
        vnc_address: spec.vnc_address,
        memory_backing: spec.memory_backing.clone(),
        cpu_pinning: spec.cpu_pinning.clone(),
        cpu_topology: spec.cpu_topology,
        rtc_localtime: spec.rtc_localtime,
        exit_on_reboot: spec.exit_on_reboot,
        vnc_keymap: spec.vnc_keymap.clone(),
        vnc_password: spec.vnc_password,
        vnc_tls: spec.vnc_tls.clone(),
        spice: spec.spice.clone(),
        spice_agent_slot: placed.spice_agent,
        usb_pointer: spec.usb_pointer,
        display_adapter: spec.display_adapter,
        media: spec.media.clone(),
        usb_devices: spec.usb_devices.clone(),
        sound: spec.sound_card.map(|card| RuntimeSound {
            card,
            slot: placed.sound,
        }),
        guest_agent_slot: placed.guest_agent,
        never_lose: spec.never_lose,
        pcie_root_ports: placed.root_ports,
        first_device_slot: spec.first_device_slot,
        disks: placed.disks,
        nics: placed.nics,
        balloon_slot: Some(placed.balloon),
        scsi_controller: placed.scsi_controller,
        extra_args: spec.extra_args.clone(),
        sandbox: host.confine && host.qemu.sandbox,
        cgroup: host.confine.then(|| {
            CgroupLimits::for_guest(
                spec.memory_mib,
                spec.cpu_weight.unwrap_or(crate::cgroup::DEFAULT_CPU_WEIGHT),
            )
        }),
        qemu_user: host.qemu_user.filter(|_| host.confine),
        chroot: host.confine && host.qemu_user.is_some(),
        inherited: None,
        argv: Vec::new(),
    };
    runtime.argv = argv::render_base(&runtime);
    Ok(runtime)
}

/// The versioned machine type `requested` names on this QEMU; an alias
/// resolves to the type it stands for.
fn resolve_machine_type(requested: &str, qemu: &QemuInfo) -> Result<String, RuntimeError> {
    qemu.resolve_machine(requested)
        .ok_or_else(|| RuntimeError::UnknownMachineType {
            requested: requested.to_owned(),
            offered: qemu
                .machines
                .iter()
                .filter(|m| m.alias_of.is_some())
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The accelerator asked for, with `auto` decided by whether KVM opens.
fn resolve_accelerator(
    asked: Accelerator,
    kvm: Result<(), &str>,
) -> Result<ResolvedAccelerator, RuntimeError> {
    Ok(match (asked, kvm) {
        (Accelerator::Kvm, Ok(())) | (Accelerator::Auto, Ok(())) => ResolvedAccelerator::Kvm,
        (Accelerator::Kvm, Err(why)) => return Err(RuntimeError::KvmUnavailable(why.to_owned())),
        (Accelerator::Auto, Err(_)) | (Accelerator::Tcg, _) => ResolvedAccelerator::Tcg,
    })
}

/// The devices of a spec with their slots.
struct PlacedDevices {
    disks: Vec<RuntimeDisk>,
    nics: Vec<RuntimeNic>,
    balloon: u8,
    scsi_controller: Option<RuntimeScsiController>,
    sound: Option<u8>,
    guest_agent: Option<u8>,
    spice_agent: Option<u8>,
    root_ports: Vec<u8>,
}

/// The free PCI slots of a generation, handed out lowest first.
struct SlotPool<'a> {
    free: Vec<u8>,
    total: usize,
    instance: &'a str,
    needed: usize,
}

impl SlotPool<'_> {
    /// The lowest free slot from `from` on.
    fn take(&mut self, from: u8) -> Result<u8, RuntimeError> {
        let at = self.free.iter().position(|&s| s >= from);
        at.map(|at| self.free.remove(at))
            .ok_or_else(|| RuntimeError::NoFreeSlot {
                instance: self.instance.to_owned(),
                used: self.needed,
                total: self.total,
            })
    }

    /// A slot from `from` on if `wanted`.
    fn take_if(&mut self, wanted: bool, from: u8) -> Result<Option<u8>, RuntimeError> {
        wanted.then(|| self.take(from)).transpose()
    }
}

/// The disks in order: a slot from `first` on for each on virtio, the next
/// SCSI target for each on SCSI, nothing on IDE.
fn place_disks(
    disks: &[DiskSpec],
    pool: &mut SlotPool<'_>,
    first: u8,
) -> Result<Vec<RuntimeDisk>, RuntimeError> {
    let mut scsi_targets = 0..;
    disks
        .iter()
        .map(|d| match d.bus {
            DiskBus::Virtio => Ok(RuntimeDisk::new(d.clone(), Some(pool.take(first)?))),
            DiskBus::Ide => Ok(RuntimeDisk::new(d.clone(), None)),
            // The spec's check keeps them within the controller's targets.
            _ => Ok(RuntimeDisk::on_scsi_target(
                d.clone(),
                scsi_targets.next().unwrap_or_default(),
            )),
        })
        .collect()
}

/// Slots for the disks, then the NICs, then a SCSI controller, the balloon,
/// a sound card on PCI and the guest agent's channel, lowest first; on q35,
/// the root ports of those slots and then the spare ones. SCSI disks take
/// the controller's targets in order.
fn place_devices(spec: &InstanceSpec, layout: PciLayout) -> Result<PlacedDevices, RuntimeError> {
    let last = match layout {
        PciLayout::RootBus => MAX_PCI_SLOT,
        PciLayout::RootPorts => pcie::MAX_ROOT_PORT_SLOT,
    };
    let sound = spec.sound_card.is_some_and(|c| c.on_pci());
    let spice_agent = spec.spice.as_ref().is_some_and(|s| s.vdagent);
    let spare = match layout {
        PciLayout::RootBus => 0,
        PciLayout::RootPorts => spec.hotplug_ports.unwrap_or(pcie::DEFAULT_HOTPLUG_PORTS) as usize,
    };
    let scsi_model = spec.scsi_controller.or_else(|| {
        spec.disks
            .iter()
            .any(|d| d.bus.is_scsi())
            .then_some(ScsiController::VirtioScsi)
    });
    let free: Vec<u8> = free_slots().filter(|&s| s <= last).collect();
    let mut pool = SlotPool {
        total: free.len(),
        free,
        instance: &spec.name,
        needed: spec.disks.iter().filter(|d| d.bus.is_virtio()).count()
            + spec.nics.iter().filter(|n| !n.model.on_isa()).count()
            + usize::from(scsi_model.is_some())
            + 1
            + usize::from(sound)
            + usize::from(spec.guest_agent)
            + usize::from(spice_agent)
            + spare,
    };
    let first = spec.first_device_slot.unwrap_or(0);
    let disks = place_disks(&spec.disks, &mut pool, first)?;
    let nics = spec
        .nics
        .iter()
        .map(|n| {
            let slot = pool.take_if(!n.model.on_isa(), first)?;
            Ok(RuntimeNic::new(n.clone(), slot))
        })
        .collect::<Result<Vec<_>, RuntimeError>>()?;
    // The machine's own devices take the lowest free slots, below the
    // first device slot where there is one; the controller first, as in
    // Ganeti's driver.
    let scsi_controller = pool
        .take_if(scsi_model.is_some(), 0)?
        .zip(scsi_model)
        .map(|(slot, model)| RuntimeScsiController { model, slot });
    let balloon = pool.take(0)?;
    let sound = pool.take_if(sound, 0)?;
    let guest_agent = pool.take_if(spec.guest_agent, 0)?;
    let spice_agent = pool.take_if(spice_agent, 0)?;
    let mut root_ports = Vec::new();
    if layout == PciLayout::RootPorts {
        root_ports.extend(disks.iter().filter_map(|d| d.slot));
        root_ports.extend(nics.iter().filter_map(|n| n.slot));
        let controller = scsi_controller.map(|c| c.slot);
        root_ports.extend(
            [controller, Some(balloon), sound, guest_agent, spice_agent]
                .into_iter()
                .flatten(),
        );
        for _ in 0..spare {
            root_ports.push(pool.take(first)?);
        }
        root_ports.sort_unstable();
    }
    Ok(PlacedDevices {
        disks,
        nics,
        balloon,
        scsi_controller,
        sound,
        guest_agent,
        spice_agent,
        root_ports,
    })
}

/// Makes a runtime that was generated elsewhere (by a migration peer, or
/// into a save file) runnable on this host, without changing anything the
/// guest can see: it is validated as strictly as a spec, then checked
/// against this host's QEMU, whose version it then names. Pure.
pub fn adopt_on_host(foreign: &Runtime, host: HostFacts<'_>) -> Result<Runtime, RuntimeError> {
    foreign.validate()?;
    check_socket_paths(host.run_dir)?;
    // The versioned machine type must exist as such: resolving an alias
    // here would change the guest's ABI under it.
    if !host.qemu.offers_machine(&foreign.machine_type) {
        return Err(RuntimeError::MachineTypeMissing {
            machine_type: foreign.machine_type.clone(),
            made_on: foreign.qemu.version,
            here: host.qemu.version,
        });
    }
    if let Some(offered) = &host.qemu.devices
        && let Some(device) = argv::device_drivers(foreign, host.qemu)
            .into_iter()
            .find(|d| !offered.contains(d))
    {
        return Err(RuntimeError::DeviceMissing {
            device,
            made_on: foreign.qemu.version,
            here: host.qemu.version,
        });
    }
    if let (ResolvedAccelerator::Kvm, Err(why)) = (foreign.accelerator, host.kvm) {
        return Err(RuntimeError::KvmUnavailable(why.to_owned()));
    }
    crate::extra::check_allowed(&foreign.extra_args, host.allowed_extra_options)
        .map_err(RuntimeError::ExtraArgs)?;
    if let Some(nic) = foreign
        .nics
        .iter()
        .find(|n| n.spec.vhost && !host.vhost_net)
    {
        return Err(RuntimeError::VhostUnavailable(nic.spec.name.clone()));
    }
    if let Some(pinning) = &foreign.cpu_pinning {
        pinning.check_host(host.cpus)?;
    }
    if foreign.sandbox && !host.qemu.sandbox {
        return Err(RuntimeError::SandboxUnavailable);
    }
    let mut local = foreign.clone();
    local.qemu = QemuIdentity {
        version: host.qemu.version,
    };
    confine_as_host(&mut local, &host);
    Ok(local)
}

/// Gives a runtime the confinement this host gives the instances it
/// generates itself: whatever the sender wrote there is ignored, since
/// how far a QEMU is boxed in is the executing node's decision. The CPU
/// weight is the instance's own setting and stays. Pure.
fn confine_as_host(runtime: &mut Runtime, host: &HostFacts<'_>) {
    runtime.sandbox = host.confine && host.qemu.sandbox;
    runtime.cgroup = host.confine.then(|| {
        let weight = runtime
            .cgroup
            .map_or(crate::cgroup::DEFAULT_CPU_WEIGHT, |c| c.cpu_weight);
        CgroupLimits::for_guest(runtime.memory_mib, weight)
    });
    runtime.qemu_user = host.qemu_user.filter(|_| host.confine);
    runtime.chroot = host.confine && runtime.qemu_user.is_some();
    runtime.argv = argv::render_base(runtime);
}

/// Slots that generation may hand out, lowest first.
fn free_slots() -> impl ExactSizeIterator<Item = u8> {
    (0..=MAX_PCI_SLOT)
        .filter(|s| !RESERVED_PCI_SLOTS.contains(s))
        .collect::<Vec<_>>()
        .into_iter()
}

/// Checks that every socket of the run directory fits in `sun_path`.
pub fn check_socket_paths(run_dir: &Path) -> Result<(), RuntimeError> {
    for socket in RUN_DIR_SOCKETS {
        let path = run_dir.join(socket);
        let len = path.as_os_str().len();
        if len > MAX_UNIX_SOCKET_PATH {
            return Err(RuntimeError::SocketPathTooLong { path, len });
        }
    }
    Ok(())
}

impl Runtime {
    /// The spec this runtime was generated from, with the machine type and
    /// accelerator as resolved.
    pub fn to_spec(&self) -> InstanceSpec {
        InstanceSpec {
            name: self.name.clone(),
            uuid: self.uuid,
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            disks: self.disks.iter().map(|d| d.spec.clone()).collect(),
            nics: self.nics.iter().map(|n| n.spec.clone()).collect(),
            boot: self.boot.clone(),
            machine_type: self.machine_type.clone(),
            accelerator: match self.accelerator {
                ResolvedAccelerator::Kvm => Accelerator::Kvm,
                ResolvedAccelerator::Tcg => Accelerator::Tcg,
            },
            serial_console: self.serial_console,
            vnc_display: self.vnc_display,
            vnc_address: self.vnc_address,
            cpu_model: self.cpu_model.clone(),
            memory_backing: self.memory_backing.clone(),
            cpu_pinning: self.cpu_pinning.clone(),
            cpu_weight: self.cgroup.map(|c| c.cpu_weight),
            cpu_topology: self.cpu_topology,
            rtc_localtime: self.rtc_localtime,
            exit_on_reboot: self.exit_on_reboot,
            vnc_keymap: self.vnc_keymap.clone(),
            vnc_password: self.vnc_password,
            vnc_tls: self.vnc_tls.clone(),
            spice: self.spice.clone(),
            usb_pointer: self.usb_pointer,
            display_adapter: self.display_adapter,
            media: self.media.clone(),
            usb_devices: self.usb_devices.clone(),
            sound_card: self.sound.map(|s| s.card),
            guest_agent: self.guest_agent_slot.is_some(),
            never_lose: self.never_lose,
            first_device_slot: self.first_device_slot,
            scsi_controller: self.scsi_controller.map(|c| c.model),
            extra_args: self.extra_args.clone(),
            // The ports stay: what a hot-add took is one spare fewer.
            hotplug_ports: (!self.pcie_root_ports.is_empty()).then(|| {
                let used = self.used_slots().count();
                u32::try_from(self.pcie_root_ports.len().saturating_sub(used)).unwrap_or(u32::MAX)
            }),
        }
    }

    /// How the runtime's devices sit on PCI.
    pub fn pci_layout(&self) -> PciLayout {
        PciLayout::of(&self.machine_type)
    }

    /// Whether QEMU runs confined: sandboxed, in a cgroup of its own or as
    /// a user of its own.
    pub fn confined(&self) -> bool {
        self.sandbox || self.cgroup.is_some() || self.qemu_user.is_some()
    }

    /// Slots on pci.0 that are never given to a hot-added device.
    pub fn reserved_slots(&self) -> Vec<u8> {
        if self.pci_layout() == PciLayout::RootPorts {
            // Only a root port's slot has room for a hot-added device.
            return (0..=MAX_PCI_SLOT)
                .filter(|s| !self.pcie_root_ports.contains(s))
                .collect();
        }
        let mut slots = RESERVED_PCI_SLOTS.to_vec();
        // Below the first device slot, only the machine's own devices.
        slots.extend(3..self.first_device_slot.unwrap_or(0));
        if let Some(inherited) = &self.inherited {
            slots.extend(&inherited.reserved_slots);
        }
        slots
    }

    /// Every PCI slot the runtime's devices hold, the balloon's included.
    pub fn used_slots(&self) -> impl Iterator<Item = u8> + '_ {
        self.disks
            .iter()
            .filter_map(|d| d.slot)
            .chain(self.nics.iter().filter_map(|n| n.slot))
            .chain(self.balloon_slot)
            .chain(self.scsi_controller.map(|c| c.slot))
            .chain(self.sound.and_then(|s| s.slot))
            .chain(self.guest_agent_slot)
            .chain(self.spice_agent_slot)
    }

    /// Validates a runtime that arrived from elsewhere (a peer, a save file,
    /// a record on disk) as strictly as a spec. Pure.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        if self.format_version != RUNTIME_FORMAT_VERSION {
            return Err(RuntimeError::FormatVersion(self.format_version));
        }
        if self.generation == 0 {
            return Err(RuntimeError::Generation);
        }
        self.to_spec().validate()?;
        let mut seen = HashSet::new();
        let named_slots = self
            .disks
            .iter()
            .filter_map(|d| Some((d.spec.name.as_str(), d.slot?)))
            .chain(
                self.nics
                    .iter()
                    .filter_map(|n| Some((n.spec.name.as_str(), n.slot?))),
            )
            .chain(self.balloon_slot.map(|slot| ("memory balloon", slot)))
            .chain(self.scsi_controller.map(|c| ("SCSI controller", c.slot)))
            .chain(
                self.sound
                    .and_then(|s| s.slot)
                    .map(|slot| ("sound card", slot)),
            )
            .chain(
                self.guest_agent_slot
                    .map(|slot| ("guest agent channel", slot)),
            )
            .chain(
                self.spice_agent_slot
                    .map(|slot| ("SPICE agent channel", slot)),
            );
        for (name, slot) in named_slots {
            if slot > MAX_PCI_SLOT || RESERVED_PCI_SLOTS.contains(&slot) || !seen.insert(slot) {
                return Err(RuntimeError::BadSlot {
                    device: name.to_owned(),
                    slot,
                });
            }
        }
        if let Some(limits) = self.cgroup
            && (limits.memory_limit_mib < self.memory_mib
                || !crate::cgroup::CPU_WEIGHTS.contains(&limits.cpu_weight))
        {
            return Err(RuntimeError::CgroupLimits(limits));
        }
        if let Some(user) = self.qemu_user
            && (user.uid == 0 || user.gid == 0)
        {
            return Err(RuntimeError::RootQemuUser(user));
        }
        if self.chroot && self.qemu_user.is_none() {
            return Err(RuntimeError::ChrootWithoutUser);
        }
        if let Some(inherited) = &self.inherited {
            inherited.validate()?;
        }
        self.check_device_ids()?;
        self.check_device_places()?;
        self.check_root_ports()?;
        if self.argv != argv::render_base(self) {
            return Err(RuntimeError::ArgvMismatch);
        }
        Ok(())
    }
}

impl Runtime {
    /// On q35, every device has a root port of its own among the runtime's,
    /// each in a slot a port may take; elsewhere there are none. Pure.
    fn check_root_ports(&self) -> Result<(), RuntimeError> {
        let ports = &self.pcie_root_ports;
        let refuse = |why: &str| Err(RuntimeError::RootPorts(why.to_owned()));
        if self.pci_layout() == PciLayout::RootBus {
            return match ports.is_empty() {
                true => Ok(()),
                false => refuse("this machine type has no PCIe root ports"),
            };
        }
        let mut seen = HashSet::new();
        let placeable = |s: &u8| {
            !RESERVED_PCI_SLOTS.contains(s) && *s <= pcie::MAX_ROOT_PORT_SLOT && seen.insert(*s)
        };
        if !ports.iter().all(placeable) {
            return refuse("a port is in a reserved slot, out of range or twice");
        }
        if let Some(slot) = self.used_slots().find(|s| !ports.contains(s)) {
            return refuse(&format!("slot {slot} has a device but no root port"));
        }
        Ok(())
    }

    /// Each disk sits where its bus says: a slot for virtio, a target of
    /// the runtime's SCSI controller (each once, within its targets) for
    /// SCSI, nothing for IDE; each NIC in a slot unless it is on ISA.
    /// Pure.
    fn check_device_places(&self) -> Result<(), RuntimeError> {
        let mut targets = HashSet::new();
        let controller = self.scsi_controller.map(|c| c.model);
        for disk in &self.disks {
            let placed = match (disk.spec.bus, disk.slot, disk.scsi_target) {
                (DiskBus::Virtio, Some(_), None) | (DiskBus::Ide, None, None) => true,
                (bus, None, Some(target)) if bus.is_scsi() => {
                    controller.is_some_and(|c| target < c.max_targets() && targets.insert(target))
                }
                _ => false,
            };
            if !placed {
                return Err(RuntimeError::DiskPlace(disk.spec.name.clone()));
            }
        }
        if let Some(nic) = self
            .nics
            .iter()
            .find(|n| n.slot.is_some() == n.spec.model.on_isa())
        {
            return Err(RuntimeError::NicPlace(nic.spec.name.clone()));
        }
        Ok(())
    }

    /// Kept device ids must look like the agent's own (so recovery and
    /// hotplug know them) and be unique. Pure.
    fn check_device_ids(&self) -> Result<(), RuntimeError> {
        let mut seen = HashSet::new();
        let kept = self
            .disks
            .iter()
            .map(|d| (&d.spec.name, d.qemu_id.as_ref(), argv::DISK_ID_PREFIX))
            .chain(
                self.nics
                    .iter()
                    .map(|n| (&n.spec.name, n.qemu_id.as_ref(), argv::NIC_ID_PREFIX)),
            );
        for (device, id, prefix) in kept {
            let Some(id) = id else { continue };
            // QEMU's ids: a letter first, then letters, digits, '-', '.', '_'.
            let plain = id.starts_with(prefix)
                && id.len() <= MAX_QEMU_ID
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
            if !plain || !seen.insert(id) {
                return Err(RuntimeError::BadDeviceId {
                    device: device.clone(),
                    id: id.clone(),
                    prefix,
                });
            }
        }
        Ok(())
    }
}

/// The longest kept device id; block node names are limited to 31 bytes.
const MAX_QEMU_ID: usize = 31;

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::extra::ExtraArgsError;
    use crate::pinning::PinningError;
    use crate::qemu_info::{MachineType, QemuVersion};
    use crate::runtime::argv::render_base;
    use crate::spec::tests::sample_spec;
    use crate::spec::{DiskCache, DiskFormat, NicModel, SpecError};

    pub(crate) fn qemu_7_2() -> QemuInfo {
        QemuInfo {
            binary: "/usr/bin/qemu-system-x86_64".into(),
            version: QemuVersion {
                major: 7,
                minor: 2,
                micro: 22,
            },
            version_text: "QEMU emulator version 7.2.22".into(),
            sandbox: true,
            data_dirs: Vec::new(),
            firmware_dir: None,
            module_dir: None,
            devices: None,
            qmp_commands: Default::default(),
            machines: vec![
                MachineType {
                    name: "pc".into(),
                    alias_of: Some("pc-i440fx-7.2".into()),
                },
                MachineType {
                    name: "pc-i440fx-7.2".into(),
                    alias_of: None,
                },
                MachineType {
                    name: "q35".into(),
                    alias_of: Some("pc-q35-7.2".into()),
                },
                MachineType {
                    name: "pc-q35-7.2".into(),
                    alias_of: None,
                },
            ],
        }
    }

    #[test]
    fn extra_arguments_run_last_and_only_where_the_node_allows_them() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.extra_args = vec!["-device".into(), "virtio-rng-pci".into()];
        let allowed = ["-device virtio-rng-pci".to_owned()];
        let allowing = HostFacts {
            allowed_extra_options: &allowed,
            ..host(&qemu)
        };
        assert!(matches!(
            generate(&spec, host(&qemu), 1),
            Err(RuntimeError::ExtraArgs(ExtraArgsError::NotAllowed(o))) if o == "-device virtio-rng-pci"
        ));
        let rt = generate(&spec, allowing, 1).unwrap();
        let argv = argv::render_execution(&rt, &qemu_7_2(), &argv::tests::fds());
        assert_eq!(argv[argv.len() - 2..], spec.extra_args[..]);
        // Not in the machine part the runtime stores.
        assert!(!rt.argv.contains(&"virtio-rng-pci".to_owned()));
        assert_eq!(rt.to_spec().extra_args, spec.extra_args);
        // A migration's target must allow them too.
        assert!(adopt_on_host(&rt, allowing).is_ok());
        assert!(matches!(
            adopt_on_host(&rt, host(&qemu)),
            Err(RuntimeError::ExtraArgs(_))
        ));
    }

    pub(crate) fn host(qemu: &QemuInfo) -> HostFacts<'_> {
        HostFacts {
            qemu,
            kvm: Ok(()),
            run_dir: Path::new("/var/lib/kvm-agent/run/web1"),
            vhost_net: true,
            cpus: 4,
            confine: true,
            qemu_user: Some(QemuUser {
                uid: 64000,
                gid: 64000,
            }),
            allowed_extra_options: &[],
        }
    }

    #[test]
    fn cpu_masks_are_checked_against_the_host_and_kept_in_the_runtime() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.vcpus = 2;
        spec.cpu_pinning = Some("3:0-1".parse().unwrap());
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        assert_eq!(rt.to_spec().cpu_pinning, spec.cpu_pinning);
        let json = serde_json::to_value(&rt).unwrap();
        assert_eq!(json["cpu_pinning"], "3:0-1");

        let small = HostFacts {
            cpus: 2,
            ..host(&qemu)
        };
        assert!(matches!(
            generate(&spec, small, 1),
            Err(RuntimeError::CpuPinning(PinningError::NoSuchCpu {
                cpu: 3,
                ..
            }))
        ));
        assert!(matches!(
            adopt_on_host(&rt, small),
            Err(RuntimeError::CpuPinning(PinningError::NoSuchCpu {
                cpu: 3,
                ..
            }))
        ));

        spec.vcpus = 3;
        assert!(matches!(
            generate(&spec, host(&qemu), 1),
            Err(RuntimeError::Spec(SpecError::CpuPinning(
                PinningError::EntryCount { .. }
            )))
        ));
    }

    #[test]
    fn an_unpinned_runtime_is_stored_without_the_key() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
        let json = serde_json::to_value(&rt).unwrap();
        assert!(json.get("cpu_pinning").is_none(), "{json}");
    }

    #[test]
    fn a_foreign_runtime_is_adopted_with_the_local_qemu_version_only() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 3).unwrap();
        let mut newer = qemu_7_2();
        newer.version.major = 10;
        newer.version.minor = 0;
        let adopted = adopt_on_host(&rt, host(&newer)).unwrap();
        assert_eq!(adopted.qemu.version, newer.version);
        assert_eq!(adopted.machine_type, rt.machine_type);
        assert_eq!(adopted.argv, rt.argv);
        assert_eq!(
            (adopted.disks.clone(), adopted.nics.clone()),
            (rt.disks.clone(), rt.nics.clone())
        );
    }

    #[test]
    fn a_foreign_runtime_the_host_cant_run_is_refused() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
        let mut older = qemu_7_2();
        older
            .machines
            .retain(|m| !m.name.contains("7.2") && m.name != "pc");
        assert!(matches!(
            adopt_on_host(&rt, host(&older)),
            Err(RuntimeError::MachineTypeMissing { .. })
        ));
        let mut without_virtio_blk = qemu_7_2();
        let mut devices = argv::device_drivers(&rt, &qemu);
        assert!(devices.remove("virtio-blk-pci"), "{devices:?}");
        without_virtio_blk.devices = Some(devices.clone());
        assert_eq!(
            adopt_on_host(&rt, host(&without_virtio_blk)),
            Err(RuntimeError::DeviceMissing {
                device: "virtio-blk-pci".into(),
                made_on: rt.qemu.version,
                here: qemu.version,
            })
        );
        devices.insert("virtio-blk-pci".into());
        without_virtio_blk.devices = Some(devices);
        assert!(adopt_on_host(&rt, host(&without_virtio_blk)).is_ok());
        let mut no_kvm = host(&qemu);
        no_kvm.kvm = Err("no /dev/kvm");
        if rt.accelerator == ResolvedAccelerator::Kvm {
            assert!(matches!(
                adopt_on_host(&rt, no_kvm),
                Err(RuntimeError::KvmUnavailable(_))
            ));
        }
        let mut smuggled = rt.clone();
        smuggled
            .argv
            .extend(["-monitor".into(), "tcp:0.0.0.0:4444,server".into()]);
        assert_eq!(
            adopt_on_host(&smuggled, host(&qemu)),
            Err(RuntimeError::ArgvMismatch)
        );
    }

    fn disk(n: u128) -> DiskSpec {
        DiskSpec {
            aio: Default::default(),
            discard: false,
            name: format!("d{n}"),
            uuid: Uuid::from_u128(0xd000 + n),
            path: format!("/srv/d{n}.img").into(),
            format: DiskFormat::Raw,
            read_only: false,
            cache: DiskCache::None,
            bus: Default::default(),
        }
    }

    fn nic(n: u128) -> NicSpec {
        NicSpec {
            name: format!("n{n}"),
            uuid: Uuid::from_u128(0xe000 + n),
            mac: format!("52:54:00:00:00:{n:02x}").parse().unwrap(),
            model: NicModel::Virtio,
            bridge: None,
            vhost: false,
            queues: 1,
            vlan: None,
        }
    }

    #[test]
    fn vhost_without_vhost_net_is_refused() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.nics[0].vhost = true;
        let facts = HostFacts {
            vhost_net: false,
            ..host(&qemu)
        };

        assert_eq!(
            generate(&spec, facts, 1),
            Err(RuntimeError::VhostUnavailable("eth0".into()))
        );
    }

    #[test]
    fn pc_alias_resolves_to_versioned_machine() {
        let qemu = qemu_7_2();

        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();

        assert_eq!(rt.machine_type, "pc-i440fx-7.2");
    }

    #[test]
    fn devices_get_consecutive_slots_after_the_reserved_ones() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.disks.push(disk(2));

        let rt = generate(&spec, host(&qemu), 1).unwrap();

        assert_eq!(
            rt.disks.iter().map(|d| d.slot).collect::<Vec<_>>(),
            vec![Some(3), Some(4)]
        );
        assert_eq!(rt.nics[0].slot, Some(5));
        assert_eq!(rt.balloon_slot, Some(6), "the balloon comes last");
        assert_eq!(rt.used_slots().collect::<Vec<_>>(), vec![3, 4, 5, 6]);
    }

    #[test]
    fn a_runtime_from_before_the_balloon_still_validates() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
        let mut json = serde_json::to_value(&rt).unwrap();
        json.as_object_mut().unwrap().remove("balloon_slot");
        let old: Runtime = serde_json::from_value(json).unwrap();
        assert_eq!(old.balloon_slot, None);
        old.validate().unwrap();
    }

    #[test]
    fn a_balloon_in_a_used_slot_is_refused() {
        let qemu = qemu_7_2();
        let mut rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
        rt.balloon_slot = rt.nics[0].slot;
        assert!(matches!(rt.validate(), Err(RuntimeError::BadSlot { .. })));
        rt.balloon_slot = Some(1);
        assert!(matches!(rt.validate(), Err(RuntimeError::BadSlot { .. })));
    }

    #[test]
    fn auto_accelerator_follows_kvm_availability() {
        let qemu = qemu_7_2();
        let no_kvm = HostFacts {
            kvm: Err("permission denied"),
            ..host(&qemu)
        };

        let with = generate(&sample_spec(), host(&qemu), 1).unwrap();
        let without = generate(&sample_spec(), no_kvm, 1).unwrap();

        assert_eq!(with.accelerator, ResolvedAccelerator::Kvm);
        assert_eq!(without.accelerator, ResolvedAccelerator::Tcg);
    }

    #[test]
    fn explicit_kvm_without_kvm_is_an_error_not_a_fallback() {
        let qemu = qemu_7_2();
        let spec = InstanceSpec {
            accelerator: Accelerator::Kvm,
            ..sample_spec()
        };
        let no_kvm = HostFacts {
            kvm: Err("permission denied"),
            ..host(&qemu)
        };

        assert!(matches!(
            generate(&spec, no_kvm, 1),
            Err(RuntimeError::KvmUnavailable(_))
        ));
    }

    #[test]
    fn unknown_machine_type_lists_the_offered_ones() {
        let qemu = qemu_7_2();
        let spec = InstanceSpec {
            machine_type: "virt".into(),
            ..sample_spec()
        };

        let err = generate(&spec, host(&qemu), 1).unwrap_err();

        assert!(err.to_string().contains("pc, q35"), "{err}");
    }

    #[test]
    fn a_q35_gives_every_device_a_root_port_and_keeps_spare_ones() {
        let qemu = qemu_7_2();
        let spec = InstanceSpec {
            machine_type: "q35".into(),
            hotplug_ports: Some(2),
            ..sample_spec()
        };
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        // The disk, the NIC and the balloon, then two spare ports.
        assert_eq!(rt.pcie_root_ports, [3, 4, 5, 6, 7]);
        assert_eq!(rt.reserved_slots().len(), 32 - 5);
        assert_eq!(rt.to_spec().hotplug_ports, Some(2));
        assert_eq!(rt.validate(), Ok(()));
        let argv = render_base(&rt).join(" ");
        assert!(
            argv.contains("pcie-root-port,id=root-port-7,bus=pcie.0,chassis=7,slot=7,addr=0x7"),
            "{argv}"
        );
        let mut portless = rt.clone();
        portless.pcie_root_ports.retain(|&s| s != 4);
        portless.argv = render_base(&portless);
        assert!(matches!(
            portless.validate(),
            Err(RuntimeError::RootPorts(_))
        ));
        let pc = InstanceSpec {
            hotplug_ports: Some(2),
            ..sample_spec()
        };
        assert!(matches!(
            generate(&pc, host(&qemu), 1),
            Err(RuntimeError::Spec(SpecError::HotplugPorts(2)))
        ));
    }

    #[test]
    fn disks_and_nics_start_at_the_first_device_slot_as_ganeti_places_them() {
        let qemu = qemu_7_2();
        let spec = InstanceSpec {
            first_device_slot: Some(12),
            guest_agent: true,
            ..sample_spec()
        };
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        assert_eq!((rt.disks[0].slot, rt.nics[0].slot), (Some(12), Some(13)));
        // The machine's own devices take the lowest free slots.
        assert_eq!((rt.balloon_slot, rt.guest_agent_slot), (Some(3), Some(4)));
        // A hot-add goes past them too.
        assert!((0..12).all(|s| rt.reserved_slots().contains(&s)));
        assert_eq!(rt.to_spec().first_device_slot, Some(12));
        assert_eq!(rt.validate(), Ok(()));
        let before = InstanceSpec {
            first_device_slot: Some(2),
            ..sample_spec()
        };
        assert!(generate(&before, host(&qemu), 1).is_err());
    }

    #[test]
    fn too_many_devices_is_no_free_slot() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.disks = (0..20).map(disk).collect();
        spec.nics = (0..10).map(nic).collect();

        let err = generate(&spec, host(&qemu), 1).unwrap_err();

        assert!(
            matches!(
                err,
                // The balloon needs one too.
                RuntimeError::NoFreeSlot {
                    used: 31,
                    total: 29,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("no free PCI slot"));
    }

    #[test]
    fn overlong_socket_path_is_refused_at_generation() {
        let qemu = qemu_7_2();
        let long = PathBuf::from(format!("/var/lib/{}", "x".repeat(100)));
        let facts = HostFacts {
            run_dir: &long,
            ..host(&qemu)
        };

        assert!(matches!(
            generate(&sample_spec(), facts, 1),
            Err(RuntimeError::SocketPathTooLong { .. })
        ));
    }

    #[test]
    fn generated_runtime_validates_and_survives_json() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 3).unwrap();

        let back: Runtime = serde_json::from_str(&serde_json::to_string(&rt).unwrap()).unwrap();

        assert_eq!(back, rt);
        assert_eq!(back.validate(), Ok(()));
    }

    #[test]
    fn foreign_runtime_with_extra_argv_is_refused() {
        let qemu = qemu_7_2();
        let mut rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
        rt.argv.extend(["-device".into(), "pci-testdev".into()]);

        assert_eq!(rt.validate(), Err(RuntimeError::ArgvMismatch));
    }

    #[test]
    fn foreign_runtime_with_reserved_or_shared_slot_is_refused() {
        let qemu = qemu_7_2();
        let mut reserved = generate(&sample_spec(), host(&qemu), 1).unwrap();
        reserved.disks[0].slot = Some(1);
        let mut shared = generate(&sample_spec(), host(&qemu), 1).unwrap();
        shared.nics[0].slot = shared.disks[0].slot;

        assert!(matches!(
            reserved.validate(),
            Err(RuntimeError::BadSlot { slot: 1, .. })
        ));
        assert!(matches!(
            shared.validate(),
            Err(RuntimeError::BadSlot { .. })
        ));
    }

    #[test]
    fn foreign_runtime_with_changed_memory_but_old_argv_is_refused() {
        let qemu = qemu_7_2();
        let mut rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
        rt.memory_mib = 4096;
        assert!(matches!(rt.validate(), Err(RuntimeError::CgroupLimits(_))));
        rt.cgroup = Some(CgroupLimits::for_guest(4096, 100));

        assert_eq!(rt.validate(), Err(RuntimeError::ArgvMismatch));
    }

    #[test]
    fn a_confined_runtime_is_sandboxed_and_limited() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
        assert!(rt.sandbox && rt.confined());
        assert_eq!(rt.cgroup, Some(CgroupLimits::for_guest(128, 100)));
        assert_eq!(rt.qemu_user, host(&qemu).qemu_user);
        assert!(
            rt.argv
                .windows(2)
                .any(|w| w[0] == "-sandbox" && w[1] == argv::SANDBOX)
        );

        let off = HostFacts {
            confine: false,
            ..host(&qemu)
        };
        let open = generate(&sample_spec(), off, 1).unwrap();
        assert!(!open.confined());
        assert_eq!(open.qemu_user, None);
        assert!(!open.chroot);
        assert!(!open.argv.iter().any(|a| a == "-sandbox"));

        let mut no_seccomp = qemu_7_2();
        no_seccomp.sandbox = false;
        assert!(
            !generate(&sample_spec(), host(&no_seccomp), 1)
                .unwrap()
                .sandbox
        );
        assert_eq!(
            adopt_on_host(&rt, host(&no_seccomp)),
            Err(RuntimeError::SandboxUnavailable)
        );
    }

    #[test]
    fn inherited_hardware_and_kept_ids_are_checked_like_the_rest() {
        let qemu = qemu_7_2();
        let mut rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
        rt.inherited = Some(InheritedMachine {
            origin: "ganeti-kvm".into(),
            options: vec!["-usb".into(), "-net".into(), "none".into()],
            reserved_slots: (0..12).collect(),
        });
        rt.nics[0].qemu_id = Some("nic-5c1b2f0e-8a31-4f5e".into());
        rt.argv = argv::render_base(&rt);
        assert_eq!(rt.validate(), Ok(()));
        assert!(rt.reserved_slots().contains(&11));
        assert!(!rt.argv.iter().any(|a| a == "-nodefaults"));

        let mut smuggled = rt.clone();
        smuggled.inherited.as_mut().unwrap().options =
            vec!["-chardev".into(), "file,path=/etc/shadow,id=x".into()];
        smuggled.argv = argv::render_base(&smuggled);
        assert!(matches!(
            smuggled.validate(),
            Err(RuntimeError::Inherited(_))
        ));

        let mut bad_id = rt.clone();
        bad_id.nics[0].qemu_id = Some("disk-of-a-nic".into());
        assert!(matches!(
            bad_id.validate(),
            Err(RuntimeError::BadDeviceId { .. })
        ));
    }

    #[test]
    fn a_runtime_runs_as_confined_as_the_host_decides_whatever_it_says() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
        let mut forged = rt.clone();
        forged.sandbox = false;
        forged.chroot = false;
        forged.qemu_user = Some(QemuUser {
            uid: 65534,
            gid: 65534,
        });
        forged.cgroup = Some(CgroupLimits {
            memory_limit_mib: forged.memory_mib,
            cpu_weight: 10000,
        });
        forged.argv = argv::render_base(&forged);
        let elsewhere = HostFacts {
            qemu_user: Some(QemuUser {
                uid: 64005,
                gid: 64005,
            }),
            ..host(&qemu)
        };

        let adopted = adopt_on_host(&forged, elsewhere).unwrap();

        assert!(adopted.sandbox);
        assert!(adopted.chroot);
        assert_eq!(adopted.qemu_user, elsewhere.qemu_user);
        assert_eq!(
            adopted.cgroup,
            Some(CgroupLimits::for_guest(rt.memory_mib, 10000)),
            "the host's memory headroom, the instance's own weight"
        );
        assert_eq!(adopted.argv, rt.argv);
        assert_eq!(adopted.validate(), Ok(()));

        let mut uncaged = forged.clone();
        uncaged.cgroup = None;
        uncaged.argv = argv::render_base(&uncaged);
        let adopted = adopt_on_host(&uncaged, host(&qemu)).unwrap();
        assert_eq!(adopted.cgroup, rt.cgroup);

        let open_host = HostFacts {
            confine: false,
            ..host(&qemu)
        };
        let open = adopt_on_host(&rt, open_host).unwrap();
        assert!(!open.confined() && !open.chroot);
    }

    #[test]
    fn a_runtime_never_runs_qemu_as_root() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();

        assert!(rt.chroot);
        let mut unprivileged = rt.clone();
        unprivileged.qemu_user = None;
        assert_eq!(
            unprivileged.validate(),
            Err(RuntimeError::ChrootWithoutUser)
        );

        let mut rooted = rt.clone();
        rooted.qemu_user = Some(QemuUser { uid: 0, gid: 64000 });
        assert!(matches!(
            rooted.validate(),
            Err(RuntimeError::RootQemuUser(_))
        ));
        rooted.qemu_user = Some(QemuUser { uid: 64000, gid: 0 });
        assert!(matches!(
            rooted.validate(),
            Err(RuntimeError::RootQemuUser(_))
        ));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn path_strategy() -> impl Strategy<Value = String> {
            // Printable ASCII with spaces and quotes, as path components;
            // ',' and '=' are refused by validation.
            proptest::collection::vec("[ -~&&[^/,=]]{1,12}", 1..4).prop_filter_map(
                "no dot components",
                |parts| {
                    if parts.iter().any(|p| p == "." || p == "..") {
                        None
                    } else {
                        Some(format!("/{}", parts.join("/")))
                    }
                },
            )
        }

        fn spec_strategy() -> impl Strategy<Value = InstanceSpec> {
            (
                proptest::collection::vec(path_strategy(), 0..8),
                0usize..8,
                16u64..65536,
                1u32..64,
                any::<bool>(),
            )
                .prop_map(|(paths, nic_count, memory_mib, vcpus, serial)| {
                    let mut spec = sample_spec();
                    spec.memory_mib = memory_mib;
                    spec.vcpus = vcpus;
                    spec.serial_console = serial;
                    spec.disks = paths
                        .into_iter()
                        .enumerate()
                        .map(|(i, p)| DiskSpec {
                            path: p.into(),
                            ..disk(i as u128)
                        })
                        .collect();
                    spec.nics = (0..nic_count as u128).map(|i| nic(i + 1)).collect();
                    spec
                })
        }

        proptest! {
            #[test]
            fn generation_is_deterministic(spec in spec_strategy()) {
                let qemu = qemu_7_2();
                let a = generate(&spec, host(&qemu), 1).unwrap();
                let b = generate(&spec, host(&qemu), 1).unwrap();
                prop_assert_eq!(&a, &b);
                prop_assert_eq!(argv::render_base(&a), argv::render_base(&b));
            }

            #[test]
            fn slots_are_unique_and_never_reserved(spec in spec_strategy()) {
                let qemu = qemu_7_2();
                let rt = generate(&spec, host(&qemu), 1).unwrap();
                let slots: Vec<u8> = rt.used_slots().collect();
                let unique: HashSet<u8> = slots.iter().copied().collect();
                prop_assert_eq!(unique.len(), slots.len());
                prop_assert!(slots.iter().all(|s| !RESERVED_PCI_SLOTS.contains(s) && *s <= MAX_PCI_SLOT));
                prop_assert_eq!(rt.validate(), Ok(()));
            }
        }
    }

    /// Fuzzing of what arrives from outside: specs (through the API) and
    /// runtimes (from a migration peer or a save file), as JSON with one
    /// field replaced by something hostile. Nothing panics, and whatever
    /// validation accepts renders to a command line without smuggled
    /// options.
    mod fuzz {
        use proptest::prelude::*;
        use serde_json::Value;

        use super::*;

        /// Values an attacker or a bug would put in a field.
        fn hostile() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                Just(Value::from(u64::MAX)),
                Just(Value::from("")),
                Just(Value::from("a".repeat(300))),
                Just(Value::from("/srv/a,file=/etc/shadow")),
                Just(Value::from("/srv/x=y")),
                Just(Value::from("/srv/../etc/passwd")),
                Just(Value::from("br0/../x")),
                Just(Value::from("00:00:00:00:00:00")),
                Just(Value::from("01:00:5e:00:00:01")),
                Just(Value::from("00000000-0000-0000-0000-000000000000")),
                "[ -~]{0,24}".prop_map(Value::from),
                ".{0,24}".prop_map(Value::from),
                Just(Value::Array(vec![])),
                Just(serde_json::json!({})),
            ]
        }

        /// Paths to every leaf of a JSON value, as JSON pointers.
        fn leaves(value: &Value, at: String, out: &mut Vec<String>) {
            match value {
                Value::Object(m) => m
                    .iter()
                    .for_each(|(k, v)| leaves(v, format!("{at}/{k}"), out)),
                Value::Array(a) => a
                    .iter()
                    .enumerate()
                    .for_each(|(i, v)| leaves(v, format!("{at}/{i}"), out)),
                _ => out.push(at),
            }
        }

        /// `value` with one leaf (picked by `pick`) replaced.
        fn mutated(mut value: Value, pick: prop::sample::Index, with: Value) -> Value {
            let mut all = Vec::new();
            leaves(&value, String::new(), &mut all);
            if let Some(slot) = value.pointer_mut(&all[pick.index(all.len())]) {
                *slot = with;
            }
            value
        }

        /// No option value carries a line break or a NUL, which no QEMU
        /// option has and a log line or a cmdline check would misread.
        fn options_are_well_formed(argv: &[String]) -> bool {
            argv.iter()
                .filter(|a| !a.starts_with('-'))
                .all(|a| !a.contains(['\n', '\0']))
        }

        proptest! {
            #![proptest_config(crate::fuzz_config(3000))]

            #[test]
            fn a_spec_is_accepted_only_when_its_runtime_is_sound(
                pick in any::<prop::sample::Index>(),
                with in hostile(),
            ) {
                let json = mutated(serde_json::to_value(sample_spec()).unwrap(), pick, with);
                let Ok(spec) = serde_json::from_value::<InstanceSpec>(json) else {
                    return Ok(());
                };
                if spec.validate().is_err() {
                    return Ok(());
                }
                let qemu = qemu_7_2();
                if let Ok(rt) = generate(&spec, host(&qemu), 1) {
                    prop_assert_eq!(rt.validate(), Ok(()));
                    prop_assert!(options_are_well_formed(&rt.argv), "{:?}", rt.argv);
                    for d in &rt.disks {
                        let path = d.spec.path.to_string_lossy();
                        prop_assert!(!path.contains([',', '=']) && !path.contains(".."), "{path}");
                    }
                }
            }

            #[test]
            fn a_peer_runtime_is_adopted_only_when_sound(
                pick in any::<prop::sample::Index>(),
                with in hostile(),
            ) {
                let qemu = qemu_7_2();
                let rt = generate(&sample_spec(), host(&qemu), 2).unwrap();
                let json = mutated(serde_json::to_value(&rt).unwrap(), pick, with);
                let Ok(foreign) = serde_json::from_value::<Runtime>(json) else {
                    return Ok(());
                };
                if let Ok(adopted) = adopt_on_host(&foreign, host(&qemu)) {
                    prop_assert_eq!(&adopted.argv, &argv::render_base(&adopted));
                    prop_assert!(options_are_well_formed(&adopted.argv));
                }
            }

            #[test]
            fn any_bytes_as_a_runtime_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                if let Ok(foreign) = serde_json::from_slice::<Runtime>(&bytes) {
                    let _ = adopt_on_host(&foreign, host(&qemu_7_2()));
                }
            }
        }
    }
}
