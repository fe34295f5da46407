//! Conversions between the wire types (`kvmagent.v1`) and the hypervisor's
//! domain types. Pure.

use std::path::PathBuf;
use std::sync::Arc;

use hotplug::support::Support;
use hypervisor::lifecycle::StopMethod;
use hypervisor::runtime::{RuntimeDisk, RuntimeNic};
use hypervisor::spec::{
    Accelerator, Boot, CpuTopology, DiskAio, DiskBus, DiskCache, DiskFormat, DiskSpec,
    DisplayAdapter, InstanceSpec, MAX_VLAN_ID, MacAddr, MediaDrive, MediaKind, MemoryBacking,
    NicModel, NicSpec, ScsiController, SoundCard, SpecError, UsbDevice, UsbPointer, Vlan,
};
use kvm_agent_proto::v1 as pb;
use uuid::Uuid;

mod displays;
mod migration;

pub use migration::{
    MAX_DOWNTIME_LIMIT, migrate_options_from_proto, report_to_proto, stream_request_from_proto,
    stream_request_to_proto,
};

use crate::error::AgentError;
use crate::events::{Event, EventKind};
use crate::model::{
    ChangedDevice, InstanceView, MemoryReport, NodeFacts, RebootMode, SaveOutcome, State, Takeover,
    TakeoverOutcome,
};

/// Default machine type when the request leaves it empty.
pub const DEFAULT_MACHINE_TYPE: &str = "pc";
/// Default CPU model when the request leaves it empty.
pub const DEFAULT_CPU_MODEL: &str = "qemu64";
/// Where huge pages come from when the request doesn't say.
pub const DEFAULT_HUGEPAGES_MOUNT: &str = "/dev/hugepages";

fn parse_uuid(what: &str, text: &str) -> Result<Uuid, AgentError> {
    if text.is_empty() {
        return Ok(Uuid::nil());
    }
    Uuid::parse_str(text)
        .map_err(|e| AgentError::BadRequest(format!("{what} uuid {text:?} is invalid: {e}")))
}

fn non_empty(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// Converts a wire disk. A missing uuid stays nil.
pub fn disk_from_proto(d: &pb::DiskSpec) -> Result<DiskSpec, AgentError> {
    Ok(DiskSpec {
        name: d.name.clone(),
        uuid: parse_uuid(&format!("disk {:?}", d.name), &d.uuid)?,
        path: PathBuf::from(&d.path),
        format: match pb::DiskFormat::try_from(d.format) {
            Ok(pb::DiskFormat::Qcow2) => DiskFormat::Qcow2,
            Ok(pb::DiskFormat::Raw | pb::DiskFormat::Unspecified) => DiskFormat::Raw,
            Err(_) => {
                return Err(AgentError::BadRequest(format!(
                    "disk {:?}: unknown format {}",
                    d.name, d.format
                )));
            }
        },
        read_only: d.read_only,
        aio: match pb::DiskAio::try_from(d.aio) {
            Ok(pb::DiskAio::Unspecified | pb::DiskAio::Threads) => DiskAio::Threads,
            Ok(pb::DiskAio::Native) => DiskAio::Native,
            Ok(pb::DiskAio::IoUring) => DiskAio::IoUring,
            Err(_) => {
                return Err(AgentError::BadRequest(format!(
                    "disk {:?}: unknown AIO {}",
                    d.name, d.aio
                )));
            }
        },
        discard: d.discard,
        bus: match pb::DiskBus::try_from(d.bus) {
            Ok(pb::DiskBus::Unspecified | pb::DiskBus::Virtio) => DiskBus::Virtio,
            Ok(pb::DiskBus::Ide) => DiskBus::Ide,
            Ok(pb::DiskBus::ScsiHd) => DiskBus::ScsiHd,
            Ok(pb::DiskBus::ScsiCd) => DiskBus::ScsiCd,
            Ok(pb::DiskBus::ScsiBlock) => DiskBus::ScsiBlock,
            Ok(pb::DiskBus::ScsiGeneric) => DiskBus::ScsiGeneric,
            Err(_) => {
                return Err(AgentError::BadRequest(format!(
                    "disk {:?}: unknown bus {}",
                    d.name, d.bus
                )));
            }
        },
        cache: match pb::DiskCache::try_from(d.cache) {
            Ok(pb::DiskCache::Unspecified | pb::DiskCache::None) => DiskCache::None,
            Ok(pb::DiskCache::Writeback) => DiskCache::Writeback,
            Ok(pb::DiskCache::Writethrough) => DiskCache::Writethrough,
            Ok(pb::DiskCache::Directsync) => DiskCache::Directsync,
            Ok(pb::DiskCache::Unsafe) => DiskCache::Unsafe,
            Err(_) => {
                return Err(AgentError::BadRequest(format!(
                    "disk {:?}: unknown cache mode {}",
                    d.name, d.cache
                )));
            }
        },
    })
}

/// Converts a wire NIC. A missing uuid stays nil.
pub fn nic_from_proto(n: &pb::NicSpec) -> Result<NicSpec, AgentError> {
    Ok(NicSpec {
        name: n.name.clone(),
        uuid: parse_uuid(&format!("NIC {:?}", n.name), &n.uuid)?,
        mac: n
            .mac
            .parse::<MacAddr>()
            .map_err(|()| SpecError::MacSyntax {
                nic: n.name.clone(),
                mac: n.mac.clone(),
            })?,
        model: match pb::NicModel::try_from(n.model) {
            Ok(pb::NicModel::Unspecified | pb::NicModel::Virtio) => NicModel::Virtio,
            Ok(pb::NicModel::E1000) => NicModel::E1000,
            Ok(pb::NicModel::Rtl8139) => NicModel::Rtl8139,
            Ok(pb::NicModel::Ne2kPci) => NicModel::Ne2kPci,
            Ok(pb::NicModel::I82551) => NicModel::I82551,
            Ok(pb::NicModel::I82557b) => NicModel::I82557b,
            Ok(pb::NicModel::I82559er) => NicModel::I82559er,
            Ok(pb::NicModel::Pcnet) => NicModel::Pcnet,
            Ok(pb::NicModel::Ne2kIsa) => NicModel::Ne2kIsa,
            Err(_) => {
                return Err(AgentError::BadRequest(format!(
                    "NIC {:?}: unknown model {}",
                    n.name, n.model
                )));
            }
        },
        bridge: (!n.bridge.is_empty()).then(|| n.bridge.clone()),
        vhost: n.vhost,
        queues: n.queues.max(1),
        vlan: n.vlan.as_ref().map(vlan_from_proto).transpose()?,
    })
}

/// Converts wire VLANs; an id that doesn't fit is refused here, the rest
/// of the checks are the spec's.
fn vlan_from_proto(v: &pb::VlanSpec) -> Result<Vlan, AgentError> {
    let id = |id: u32| {
        u16::try_from(id)
            .map_err(|_| AgentError::BadRequest(format!("VLAN id {id} is outside 1-{MAX_VLAN_ID}")))
    };
    Ok(Vlan {
        untagged: (v.untagged != 0).then(|| id(v.untagged)).transpose()?,
        tagged: v.tagged.iter().map(|&t| id(t)).collect::<Result<_, _>>()?,
    })
}

/// The wire form of a NIC's VLANs.
pub fn vlan_to_proto(v: &Vlan) -> pb::VlanSpec {
    pb::VlanSpec {
        untagged: v.untagged.map_or(0, u32::from),
        tagged: v.tagged.iter().map(|&t| u32::from(t)).collect(),
    }
}

/// The name of a device the caller left unnamed: `{prefix}N`, the lowest
/// N no device in `taken` has.
pub fn free_device_name<'a>(prefix: &str, taken: impl Iterator<Item = &'a str> + Clone) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|name| !taken.clone().any(|t| t == name))
        .expect("an unbounded range has a free name")
}

/// Names the spec's unnamed devices, in order: a name follows from the
/// device's place, so a hard reboot with the same spec keeps it.
fn name_unnamed_devices(disks: &mut [DiskSpec], nics: &mut [NicSpec]) {
    for i in 0..disks.len() {
        if disks[i].name.is_empty() {
            let taken = disks.iter().map(|d| d.name.as_str());
            let taken = taken.chain(nics.iter().map(|n| n.name.as_str()));
            disks[i].name = free_device_name("disk", taken);
        }
    }
    for i in 0..nics.len() {
        if nics[i].name.is_empty() {
            let taken = disks.iter().map(|d| d.name.as_str());
            let taken = taken.chain(nics.iter().map(|n| n.name.as_str()));
            nics[i].name = free_device_name("nic", taken);
        }
    }
}

/// Converts a wire spec. Missing uuids stay nil: the agent fills them in
/// from the instance's record, or with fresh ones.
pub fn spec_from_proto(p: pb::InstanceSpec) -> Result<InstanceSpec, AgentError> {
    let mut disks = p
        .disks
        .iter()
        .map(disk_from_proto)
        .collect::<Result<Vec<_>, _>>()?;
    let mut nics = p
        .nics
        .iter()
        .map(nic_from_proto)
        .collect::<Result<Vec<_>, _>>()?;
    name_unnamed_devices(&mut disks, &mut nics);
    let media = media_from_proto(&p.media, &disks, &nics)?;
    let boot = boot_from_proto(p.boot)?;
    let accelerator = accelerator_from_proto(p.accelerator)?;
    let vnc = displays::vnc_from_proto(p.vnc.as_ref())?;
    let cpu_pinning = match p.cpu_mask.as_str() {
        "" => None,
        mask => Some(mask.parse().map_err(SpecError::from)?),
    };
    let usb_devices = p
        .usb_devices
        .iter()
        .map(|&d| usb_device_from_proto(d))
        .collect::<Result<_, _>>()?;
    Ok(InstanceSpec {
        cpu_pinning,
        cpu_weight: (p.cpu_weight != 0).then_some(p.cpu_weight),
        cpu_topology: p.cpu_topology.map(cpu_topology_from_proto),
        rtc_localtime: p.rtc_localtime,
        exit_on_reboot: p.exit_on_reboot,
        vnc_keymap: vnc.keymap,
        spice: p
            .spice
            .as_ref()
            .map(displays::spice_from_proto)
            .transpose()?,
        vnc_password: vnc.password,
        vnc_tls: vnc.tls,
        usb_pointer: usb_pointer_from_proto(p.usb_pointer)?,
        display_adapter: display_adapter_from_proto(p.display_adapter)?,
        name: p.name,
        uuid: parse_uuid("instance", &p.uuid)?,
        memory_mib: p.memory_mib,
        // A first script leaves it out; one vCPU is what it means.
        vcpus: p.vcpus.max(1),
        disks,
        nics,
        boot,
        machine_type: if p.machine_type.is_empty() {
            DEFAULT_MACHINE_TYPE.into()
        } else {
            p.machine_type
        },
        accelerator,
        serial_console: p.serial_console,
        vnc_display: vnc.display,
        vnc_address: vnc.address,
        cpu_model: if p.cpu_model.is_empty() {
            DEFAULT_CPU_MODEL.into()
        } else {
            p.cpu_model
        },
        memory_backing: memory_backing_from_proto(p.memory)?,
        media,
        usb_devices,
        sound_card: sound_card_from_proto(p.sound_card)?,
        guest_agent: p.guest_agent,
        never_lose: p.never_lose,
        hotplug_ports: p.hotplug_ports,
        first_device_slot: match p.first_device_slot {
            0 => None,
            slot => Some(u8::try_from(slot).unwrap_or(u8::MAX)),
        },
        scsi_controller: scsi_controller_from_proto(p.scsi_controller)?,
        extra_args: p.extra_args,
    })
}

fn cpu_topology_from_proto(t: pb::CpuTopology) -> CpuTopology {
    CpuTopology {
        sockets: t.sockets,
        cores: t.cores,
        threads: t.threads,
    }
}

fn scsi_controller_from_proto(controller: i32) -> Result<Option<ScsiController>, AgentError> {
    Ok(Some(match pb::ScsiController::try_from(controller) {
        Ok(pb::ScsiController::Unspecified) => return Ok(None),
        Ok(pb::ScsiController::VirtioScsi) => ScsiController::VirtioScsi,
        Ok(pb::ScsiController::Lsi) => ScsiController::Lsi,
        Ok(pb::ScsiController::Megasas) => ScsiController::Megasas,
        Err(_) => {
            return Err(AgentError::BadRequest(format!(
                "scsi_controller: {controller} is not a SCSI controller; use virtio-scsi, lsi or megasas"
            )));
        }
    }))
}

fn usb_device_from_proto(device: i32) -> Result<UsbDevice, AgentError> {
    match pb::UsbDevice::try_from(device) {
        Ok(pb::UsbDevice::Keyboard) => Ok(UsbDevice::Keyboard),
        Ok(pb::UsbDevice::Mouse) => Ok(UsbDevice::Mouse),
        Ok(pb::UsbDevice::Tablet) => Ok(UsbDevice::Tablet),
        Ok(pb::UsbDevice::WacomTablet) => Ok(UsbDevice::WacomTablet),
        _ => Err(AgentError::BadRequest(format!(
            "usb_devices: {device} is not a USB device; use keyboard, mouse, tablet or wacom-tablet"
        ))),
    }
}

fn sound_card_from_proto(card: i32) -> Result<Option<SoundCard>, AgentError> {
    Ok(Some(match pb::SoundCard::try_from(card) {
        Ok(pb::SoundCard::Unspecified) => return Ok(None),
        Ok(pb::SoundCard::Hda) => SoundCard::Hda,
        Ok(pb::SoundCard::Ac97) => SoundCard::Ac97,
        Ok(pb::SoundCard::Es1370) => SoundCard::Es1370,
        Ok(pb::SoundCard::Sb16) => SoundCard::Sb16,
        Ok(pb::SoundCard::Adlib) => SoundCard::Adlib,
        Ok(pb::SoundCard::Gus) => SoundCard::Gus,
        Ok(pb::SoundCard::Cs4231a) => SoundCard::Cs4231a,
        Ok(pb::SoundCard::Pcspk) => SoundCard::Pcspk,
        Err(_) => {
            return Err(AgentError::BadRequest(format!(
                "sound_card: {card} is not a sound card"
            )));
        }
    }))
}

/// The drives of a wire spec, each unnamed one named after its kind and
/// the lowest number no device has.
fn media_from_proto(
    drives: &[pb::MediaDriveSpec],
    disks: &[DiskSpec],
    nics: &[NicSpec],
) -> Result<Vec<MediaDrive>, AgentError> {
    let mut media: Vec<MediaDrive> = Vec::with_capacity(drives.len());
    for drive in drives {
        let kind = match pb::MediaKind::try_from(drive.kind) {
            Ok(pb::MediaKind::Cdrom) => MediaKind::Cdrom,
            Ok(pb::MediaKind::Floppy) => MediaKind::Floppy,
            _ => {
                return Err(AgentError::BadRequest(format!(
                    "drive {:?}: kind must be cdrom or floppy",
                    drive.name
                )));
            }
        };
        media.push(MediaDrive {
            name: drive.name.clone(),
            kind,
            image: non_empty(&drive.image),
        });
    }
    for i in 0..media.len() {
        if media[i].name.is_empty() {
            let taken = disks.iter().map(|d| d.name.as_str());
            let taken = taken
                .chain(nics.iter().map(|n| n.name.as_str()))
                .chain(media.iter().map(|d| d.name.as_str()));
            let prefix = match media[i].kind {
                MediaKind::Cdrom => "cdrom",
                MediaKind::Floppy => "floppy",
            };
            media[i].name = free_device_name(prefix, taken);
        }
    }
    Ok(media)
}

fn boot_from_proto(boot: Option<pb::BootSpec>) -> Result<Boot, AgentError> {
    let Some(b) = boot else {
        return Ok(Boot::Disk);
    };
    let device = pb::BootDevice::try_from(b.device)
        .map_err(|_| AgentError::BadRequest(format!("boot: unknown device {}", b.device)))?;
    if !b.kernel.is_empty() {
        if !matches!(device, pb::BootDevice::Unspecified) {
            return Err(AgentError::BadRequest(
                "boot: a kernel boot boots no device; leave device unset".into(),
            ));
        }
        return Ok(Boot::Kernel {
            kernel: PathBuf::from(b.kernel),
            initrd: non_empty(&b.initrd),
            cmdline: b.cmdline,
        });
    }
    if !b.initrd.is_empty() || !b.cmdline.is_empty() {
        return Err(AgentError::BadRequest(
            "boot: an initrd or kernel command line needs a kernel".into(),
        ));
    }
    Ok(match device {
        pb::BootDevice::Unspecified | pb::BootDevice::Disk => Boot::Disk,
        pb::BootDevice::Cdrom => Boot::Cdrom,
        pb::BootDevice::Floppy => Boot::Floppy,
        pb::BootDevice::Network => Boot::Network,
    })
}

fn usb_pointer_from_proto(pointer: i32) -> Result<Option<UsbPointer>, AgentError> {
    match pb::UsbPointer::try_from(pointer) {
        Ok(pb::UsbPointer::Unspecified) => Ok(None),
        Ok(pb::UsbPointer::Tablet) => Ok(Some(UsbPointer::Tablet)),
        Ok(pb::UsbPointer::Mouse) => Ok(Some(UsbPointer::Mouse)),
        Err(_) => Err(AgentError::BadRequest(format!(
            "unknown USB pointer {pointer}"
        ))),
    }
}

fn display_adapter_from_proto(adapter: i32) -> Result<Option<DisplayAdapter>, AgentError> {
    Ok(Some(match pb::DisplayAdapter::try_from(adapter) {
        Ok(pb::DisplayAdapter::Unspecified) => return Ok(None),
        Ok(pb::DisplayAdapter::Std) => DisplayAdapter::Std,
        Ok(pb::DisplayAdapter::Cirrus) => DisplayAdapter::Cirrus,
        Ok(pb::DisplayAdapter::Vmware) => DisplayAdapter::Vmware,
        Ok(pb::DisplayAdapter::Qxl) => DisplayAdapter::Qxl,
        Ok(pb::DisplayAdapter::Virtio) => DisplayAdapter::Virtio,
        Ok(pb::DisplayAdapter::None) => DisplayAdapter::None,
        Err(_) => {
            return Err(AgentError::BadRequest(format!(
                "unknown display adapter {adapter}"
            )));
        }
    }))
}

fn accelerator_from_proto(accelerator: i32) -> Result<Accelerator, AgentError> {
    match pb::Accelerator::try_from(accelerator) {
        Ok(pb::Accelerator::Unspecified | pb::Accelerator::Auto) => Ok(Accelerator::Auto),
        Ok(pb::Accelerator::Kvm) => Ok(Accelerator::Kvm),
        Ok(pb::Accelerator::Tcg) => Ok(Accelerator::Tcg),
        Err(_) => Err(AgentError::BadRequest(format!(
            "unknown accelerator {accelerator}"
        ))),
    }
}

fn memory_backing_from_proto(
    memory: Option<pb::MemoryBacking>,
) -> Result<MemoryBacking, AgentError> {
    match memory {
        None => Ok(MemoryBacking::Anonymous),
        Some(m) if m.hugepages => Ok(MemoryBacking::HugePages {
            path: if m.file.is_empty() {
                DEFAULT_HUGEPAGES_MOUNT.into()
            } else {
                m.file.into()
            },
        }),
        Some(m) if m.file.is_empty() => Err(SpecError::Path {
            what: "memory backing".into(),
            path: PathBuf::new(),
            reason: "it is empty; give a file or directory, or leave memory unset",
        }
        .into()),
        Some(m) => Ok(MemoryBacking::File {
            path: m.file.into(),
            share: m.share,
        }),
    }
}

/// The wire form of an instance's state.
pub fn state_to_proto(state: State) -> pb::InstanceState {
    match state {
        State::Stopped => pb::InstanceState::Stopped,
        State::Starting => pb::InstanceState::Starting,
        State::Running => pb::InstanceState::Running,
        State::Stopping => pb::InstanceState::Stopping,
        State::Crashed => pb::InstanceState::Crashed,
        State::Paused => pb::InstanceState::Paused,
        State::Migrating => pb::InstanceState::Migrating,
        State::Saved => pb::InstanceState::Saved,
        State::Incoming => pb::InstanceState::Incoming,
        State::Quarantined => pb::InstanceState::Quarantined,
    }
}

/// An instance's state from its wire form; `None` for a value this
/// agent doesn't know (a newer peer's).
pub fn state_from_proto(state: i32) -> Option<State> {
    State::ALL
        .into_iter()
        .find(|s| state_to_proto(*s) as i32 == state)
}

/// The wire form of an instance view.
pub fn view_to_proto(view: InstanceView) -> pb::InstanceInfo {
    let mut info = pb::InstanceInfo {
        name: view.name,
        state: state_to_proto(view.state) as i32,
        state_detail: view.detail,
        pid: view.pid.unwrap_or(0),
        uptime_seconds: uptime_seconds(view.started_at),
        reconciling: view.reconciling,
        balloon_mib: view.balloon_mib.unwrap_or(0),
        unconfined: view.unconfined.unwrap_or_default(),
        stopped_by_guest: view.stopped_by_guest,
        ..Default::default()
    };
    let Some(rt) = view.runtime else {
        return info;
    };
    info.uuid = rt.uuid.to_string();
    info.memory_mib = rt.memory_mib;
    info.vcpus = rt.vcpus;
    info.runtime_generation = rt.generation;
    info.machine_type = rt.machine_type.clone();
    info.accelerator = rt.accelerator.as_str().to_owned();
    info.qemu_version = rt.qemu.version.to_string();
    info.cpu_mask = rt
        .cpu_pinning
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    info.devices = rt
        .disks
        .iter()
        .map(disk_to_proto)
        .chain(rt.nics.iter().enumerate().map(|(i, n)| {
            nic_to_proto(n, view.taps.get(i).map(String::as_str).unwrap_or_default())
        }))
        .chain(rt.media.iter().map(media_to_proto))
        .collect();
    info
}

/// Whole seconds since QEMU started; 0 when none runs.
pub fn uptime_seconds(started_at: Option<std::time::SystemTime>) -> u64 {
    started_at
        .and_then(|t| t.elapsed().ok())
        .map_or(0, |d| d.as_secs())
}

/// The wire form of a CD-ROM or floppy drive and its medium.
pub fn media_to_proto(d: &MediaDrive) -> pb::DeviceInfo {
    pb::DeviceInfo {
        kind: match d.kind {
            MediaKind::Cdrom => pb::DeviceKind::Cdrom,
            MediaKind::Floppy => pb::DeviceKind::Floppy,
        } as i32,
        name: d.name.clone(),
        qemu_id: d.device_id(),
        detail: d
            .image
            .as_ref()
            .map(|i| i.display().to_string())
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// The wire form of what taking over Ganeti's instances came to.
pub fn takeovers_to_proto(takeovers: Vec<Takeover>) -> pb::AdoptGanetiInstancesResponse {
    use pb::GanetiAdoptionOutcome as Outcome;
    let instances = takeovers
        .into_iter()
        .map(|t| {
            let mut adoption = pb::GanetiAdoption {
                name: t.name.clone(),
                pid: t.pid.unwrap_or(0),
                ..Default::default()
            };
            let (outcome, instance) = match t.outcome {
                TakeoverOutcome::Adopted(view) => (Outcome::Adopted, Some(view_to_proto(*view))),
                TakeoverOutcome::WouldAdopt(runtime) => {
                    let view = InstanceView {
                        name: t.name,
                        state: State::Running,
                        detail: String::new(),
                        pid: t.pid,
                        started_at: None,
                        runtime: Some(Arc::from(runtime)),
                        taps: Vec::new(),
                        reconciling: false,
                        balloon_mib: None,
                        unconfined: None,
                        stopped_by_guest: false,
                    };
                    (Outcome::WouldAdopt, Some(view_to_proto(view)))
                }
                TakeoverOutcome::AlreadyAdopted => (Outcome::AlreadyAdopted, None),
                TakeoverOutcome::Refused(reason) => {
                    adoption.reason = reason;
                    (Outcome::Refused, None)
                }
            };
            adoption.outcome = outcome as i32;
            adoption.instance = instance;
            adoption
        })
        .collect();
    pb::AdoptGanetiInstancesResponse { instances }
}

/// The wire form of a disk and its slot.
pub fn disk_to_proto(d: &RuntimeDisk) -> pb::DeviceInfo {
    pb::DeviceInfo {
        kind: pb::DeviceKind::Disk as i32,
        name: d.spec.name.clone(),
        uuid: d.spec.uuid.to_string(),
        pci_slot: d.slot.map_or(0, u32::from),
        scsi_target: d.scsi_target.map(u32::from),
        qemu_id: d.device_id(),
        detail: d.spec.path.display().to_string(),
        tap: String::new(),
        ..Default::default()
    }
}

/// The wire form of a NIC, its slot and its tap.
pub fn nic_to_proto(n: &RuntimeNic, tap: &str) -> pb::DeviceInfo {
    pb::DeviceInfo {
        kind: pb::DeviceKind::Nic as i32,
        name: n.spec.name.clone(),
        uuid: n.spec.uuid.to_string(),
        pci_slot: n.slot.map_or(0, u32::from),
        scsi_target: None,
        qemu_id: n.device_id(),
        detail: n.spec.mac.to_string(),
        tap: tap.to_owned(),
        bridge: n.spec.bridge.clone().unwrap_or_default(),
        vlan: n.spec.vlan.as_ref().map(vlan_to_proto),
    }
}

/// The wire form of an event.
pub fn event_to_proto(event: &Event) -> pb::Event {
    let mut wire = pb::Event {
        sequence: event.sequence,
        unix_millis: event.unix_millis,
        instance: event.instance.clone(),
        ..Default::default()
    };
    match &event.kind {
        EventKind::State {
            state,
            detail,
            guest_initiated,
        } => {
            wire.kind = pb::EventKind::StateChanged as i32;
            wire.state = state_to_proto(*state) as i32;
            wire.state_detail = detail.clone();
            wire.guest_initiated = *guest_initiated;
        }
        EventKind::DeviceAdded {
            device,
            slot,
            scsi_target,
        } => {
            wire.kind = pb::EventKind::DeviceAdded as i32;
            wire.device = device.clone();
            wire.pci_slot = slot.map_or(0, u32::from);
            wire.scsi_target = scsi_target.map(u32::from);
        }
        EventKind::DeviceRemoved { device } => {
            wire.kind = pb::EventKind::DeviceRemoved as i32;
            wire.device = device.clone();
        }
        EventKind::Rebooted {
            how,
            guest_initiated,
        } => {
            wire.kind = pb::EventKind::Rebooted as i32;
            wire.reboot = (*how).to_owned();
            wire.guest_initiated = *guest_initiated;
        }
        EventKind::MigrationProgress(report) => {
            wire.kind = pb::EventKind::MigrationProgress as i32;
            wire.migration = Some(report_to_proto(report));
        }
        EventKind::Deleted { detail } => {
            wire.kind = pb::EventKind::Deleted as i32;
            wire.state_detail = detail.clone();
        }
    }
    wire
}

/// The wire form of a stop method.
pub fn stop_method_to_proto(method: Option<StopMethod>) -> pb::StopMethod {
    match method {
        None => pb::StopMethod::AlreadyStopped,
        Some(StopMethod::Powerdown) => pb::StopMethod::Powerdown,
        Some(StopMethod::Quit) => pb::StopMethod::Quit,
        Some(StopMethod::Kill) => pb::StopMethod::Kill,
    }
}

/// A reboot's mode; a hard reboot needs the spec it starts from.
pub fn reboot_mode_from_proto(
    mode: i32,
    spec: Option<pb::InstanceSpec>,
) -> Result<RebootMode, AgentError> {
    match pb::RebootMode::try_from(mode) {
        Ok(pb::RebootMode::Unspecified | pb::RebootMode::Soft) => Ok(RebootMode::Soft),
        Ok(pb::RebootMode::Reset) => Ok(RebootMode::Reset),
        Ok(pb::RebootMode::Hard) => {
            let spec =
                spec.ok_or_else(|| AgentError::BadRequest("a hard reboot needs a spec".into()))?;
            Ok(RebootMode::Hard(Box::new(spec_from_proto(spec)?)))
        }
        Err(_) => Err(AgentError::BadRequest(format!(
            "unknown reboot mode {mode}"
        ))),
    }
}

/// The wire form of the node's facts.
pub fn node_info_to_proto(facts: NodeFacts) -> pb::NodeInfo {
    let (qemu_path, qemu_version, qemu_error) = match &facts.qemu {
        Ok(info) => (
            info.binary.display().to_string(),
            info.version_text.clone(),
            String::new(),
        ),
        Err(e) => (
            facts.qemu_binary.display().to_string(),
            String::new(),
            e.clone(),
        ),
    };
    pb::NodeInfo {
        hostname: facts.hostname,
        qemu_path,
        qemu_version,
        qemu_error,
        kvm_available: facts.kvm.is_ok(),
        kvm_detail: facts
            .kvm
            .err()
            .unwrap_or_else(|| "/dev/kvm opens read-write".into()),
        memory_total_mib: facts.memory_total_mib,
        memory_available_mib: facts.memory_available_mib,
        cpus: facts.cpus,
        instance_count: facts.instance_count,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        peer_protocol: facts.peer_protocol,
    }
}

/// The wire form of where a guest's memory stands.
pub fn memory_report_to_proto(report: MemoryReport) -> pb::SetMemoryResponse {
    pb::SetMemoryResponse {
        target_mib: report.target_mib,
        actual_mib: report.actual_mib,
        maximum_mib: report.maximum_mib,
    }
}

/// The wire form of a finished save.
pub fn save_outcome_to_proto(saved: SaveOutcome) -> pb::SaveInstanceResponse {
    pb::SaveInstanceResponse {
        instance: Some(view_to_proto(saved.view)),
        file_bytes: saved.file_bytes,
        was_running: saved.was_running,
        duration_ms: saved.duration.as_millis() as u64,
    }
}

/// The wire form of what an instance's QEMU can hotplug.
pub fn support_to_proto(support: &Support) -> pb::HotplugSupportResponse {
    let capability = |r: &Result<(), String>| {
        Some(pb::Capability {
            supported: r.is_ok(),
            reason: r.clone().err().unwrap_or_default(),
        })
    };
    pb::HotplugSupportResponse {
        nic: capability(&support.nic),
        disk: capability(&support.disk),
        remove: capability(&support.remove),
        vhost: capability(&support.vhost),
    }
}

/// The wire form of a hot-added or removed device and the instance after.
pub fn device_change_to_proto(
    (view, changed): (InstanceView, ChangedDevice),
) -> pb::DeviceChangeResponse {
    let device = match &changed {
        ChangedDevice::Nic(nic, tap) => nic_to_proto(nic, tap),
        ChangedDevice::Disk(disk) => disk_to_proto(disk),
    };
    pb::DeviceChangeResponse {
        instance: Some(view_to_proto(view)),
        device: Some(device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> pb::InstanceSpec {
        pb::InstanceSpec {
            name: "web1".into(),
            memory_mib: 128,
            vcpus: 1,
            nics: vec![pb::NicSpec {
                name: "eth0".into(),
                mac: "52:54:00:00:00:01".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn empty_fields_take_defaults() {
        let spec = spec_from_proto(wire()).unwrap();

        assert_eq!(spec.machine_type, "pc");
        assert_eq!(spec.cpu_model, "qemu64");
        assert_eq!(spec.accelerator, Accelerator::Auto);
        assert_eq!(spec.boot, Boot::Disk);
        assert!(spec.uuid.is_nil());
    }

    #[test]
    fn vcpus_and_device_names_default() {
        let mut w = wire();
        w.vcpus = 0;
        w.nics[0].name = String::new();
        w.nics.push(pb::NicSpec {
            name: "nic0".into(),
            mac: "52:54:00:00:00:02".into(),
            ..Default::default()
        });
        w.disks = vec![pb::DiskSpec {
            path: "/img".into(),
            ..Default::default()
        }];

        let spec = spec_from_proto(w).unwrap();

        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.disks[0].name, "disk0");
        assert_eq!(spec.nics[0].name, "nic1");
        assert_eq!(spec.nics[1].name, "nic0");
    }

    #[test]
    fn malformed_mac_is_a_spec_error() {
        let mut w = wire();
        w.nics[0].mac = "not-a-mac".into();

        assert!(matches!(
            spec_from_proto(w),
            Err(AgentError::Spec(SpecError::MacSyntax { .. }))
        ));
    }

    #[test]
    fn cmdline_without_kernel_is_refused() {
        let w = pb::InstanceSpec {
            boot: Some(pb::BootSpec {
                cmdline: "quiet".into(),
                ..Default::default()
            }),
            ..wire()
        };

        assert!(matches!(spec_from_proto(w), Err(AgentError::BadRequest(_))));
    }

    #[test]
    fn a_boot_device_comes_without_a_kernel_and_drives_are_named_by_kind() {
        let cdrom = pb::MediaDriveSpec {
            kind: pb::MediaKind::Cdrom as i32,
            image: "/srv/iso/install.iso".into(),
            ..Default::default()
        };
        let floppy = pb::MediaDriveSpec {
            kind: pb::MediaKind::Floppy as i32,
            ..Default::default()
        };
        let w = pb::InstanceSpec {
            boot: Some(pb::BootSpec {
                device: pb::BootDevice::Cdrom as i32,
                ..Default::default()
            }),
            media: vec![cdrom.clone(), floppy, cdrom],
            ..wire()
        };
        let spec = spec_from_proto(w.clone()).unwrap();
        assert_eq!(spec.boot, Boot::Cdrom);
        let names: Vec<&str> = spec.media.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["cdrom0", "floppy0", "cdrom1"]);
        assert_eq!(spec.media[1].image, None);

        let mut both = w.clone();
        both.boot.as_mut().unwrap().kernel = "/boot/vmlinuz".into();
        assert!(matches!(
            spec_from_proto(both),
            Err(AgentError::BadRequest(_))
        ));
        let mut kindless = w;
        kindless.media[0].kind = 0;
        assert!(matches!(
            spec_from_proto(kindless),
            Err(AgentError::BadRequest(_))
        ));
    }

    #[test]
    fn malformed_uuid_is_a_bad_request() {
        let w = pb::InstanceSpec {
            uuid: "xyz".into(),
            ..wire()
        };

        assert!(matches!(spec_from_proto(w), Err(AgentError::BadRequest(_))));
    }
}
