//! Runtime → QEMU command line. Pure.
//!
//! [`render_base`] renders the machine (what the runtime stores in `argv`);
//! [`render_execution`] renders it again with the host files it names
//! replaced by fds, and adds what only exists at execution: disks and NICs
//! with their explicit `bus=pci.0,addr=`, tap, image and socket fds.

use std::os::fd::RawFd;
use std::path::Path;

use uuid::Uuid;

use super::{Runtime, RuntimeDisk, RuntimeNic};
use crate::disk::{ImageKind, SCSI_CONTROLLER_ID};
use crate::media;
use crate::pcie::{self, PciLayout};
use crate::pinning::CpuPinning;
use crate::qemu_info::{QemuInfo, QemuVersion};
use crate::spec::{
    Boot, DiskAio, DiskBus, DiskCache, DiskFormat, DisplayAdapter, MemoryBacking, NicModel,
    UsbPointer,
};
use crate::{spice, vnc};

/// The PCI bus every device is placed on.
pub const PCI_BUS: &str = "pci.0";

/// `bus=...,addr=...` of the device that has `slot`.
pub fn pci_at(layout: PciLayout, slot: u8) -> String {
    let (bus, addr) = layout.place(slot);
    format!("bus={bus},addr={addr:#x}")
}
/// QMP chardev id of the agent's monitor.
pub const QMP_CHARDEV: &str = "qmp";
/// QMP chardev id of the operator's monitor.
pub const OPERATOR_QMP_CHARDEV: &str = "qmp-operator";
/// Chardev id of the serial console.
pub const SERIAL_CHARDEV: &str = "serial0";
/// QEMU id of the guest agent channel's chardev.
const GUEST_AGENT_CHARDEV: &str = "qga0";
/// QEMU id of the guest agent channel's virtio-serial controller.
const GUEST_AGENT_SERIAL: &str = "qga-serial";

/// Escapes a value for QEMU's `key=value,...` syntax, where a literal comma
/// is written twice. Without this a path like `/a,file=/etc/shadow` would
/// smuggle in an option.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The short form of a device uuid used in QEMU ids. Block node names are
/// limited to 31 bytes, so ids use the first 12 hex digits.
fn short(uuid: Uuid) -> String {
    uuid.simple().to_string()[..12].to_owned()
}

/// How the QEMU id of every disk device starts.
pub const DISK_ID_PREFIX: &str = "disk-";
/// How the QEMU id of every NIC device starts.
pub const NIC_ID_PREFIX: &str = "nic-";
/// QEMU's seccomp sandbox: no obsolete system calls, no privilege changes,
/// no new processes, no changes to its own scheduling or limits. QEMU is
/// never daemonized (it would fork under the filter) and never given
/// `-runas` (a privilege change).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// QEMU id of the memory balloon device.
pub const BALLOON_ID: &str = "balloon0";

/// QEMU device id of a disk.
pub fn disk_device_id(uuid: Uuid) -> String {
    format!("{DISK_ID_PREFIX}{}", short(uuid))
}

/// Block node of a disk's file (protocol) layer.
pub fn disk_file_node(uuid: Uuid) -> String {
    format!("file-{}", short(uuid))
}

/// Block node of a disk's format layer, the one the device uses.
pub fn disk_format_node(uuid: Uuid) -> String {
    format!("fmt-{}", short(uuid))
}

/// QEMU device id of a NIC.
pub fn nic_device_id(uuid: Uuid) -> String {
    format!("{NIC_ID_PREFIX}{}", short(uuid))
}

/// QEMU netdev id of a NIC.
pub fn netdev_id(uuid: Uuid) -> String {
    format!("net-{}", short(uuid))
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// QEMU object id of guest RAM when it isn't anonymous.
const MEMORY_BACKEND_ID: &str = "guest-ram";

/// The machine part of the command line, naming host files by path.
pub fn render_base(rt: &Runtime) -> Vec<String> {
    render_machine(rt, &MachineFds::default())
}

/// Fds standing in for the host files the machine part names. `None`
/// keeps a file's path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineFds {
    /// The kernel of a direct kernel boot.
    pub kernel: Option<RawFd>,
    /// Its initrd.
    pub initrd: Option<RawFd>,
    /// The file guest RAM lives in.
    pub memory: Option<RawFd>,
    /// The agent's copy of VNC's x509 directory.
    pub vnc_x509: Option<RawFd>,
    /// The agent's copy of SPICE's TLS files, as an x509 directory.
    pub spice_x509: Option<RawFd>,
}

/// Whether a QEMU command line (`/proc/<pid>/cmdline`, binary first) starts
/// with the machine part of `rt`, as a launch renders it. Fd numbers are
/// not compared: they depend on the launch, not on the runtime. Pure.
pub fn machine_part_matches(rt: &Runtime, cmdline: &[String]) -> bool {
    let kernel_boot = matches!(rt.boot, Boot::Kernel { .. });
    let file_backed = rt.memory_backing != MemoryBacking::Anonymous;
    // The fds a launch gives: boot files always, a RAM file to a QEMU with
    // a user of its own.
    let fds = MachineFds {
        kernel: kernel_boot.then_some(0),
        initrd: match &rt.boot {
            Boot::Kernel { initrd, .. } => initrd.as_ref().map(|_| 0),
            _ => None,
        },
        memory: (file_backed && rt.qemu_user.is_some()).then_some(0),
        vnc_x509: rt
            .vnc_tls
            .as_ref()
            .and_then(|t| t.x509_dir.as_ref())
            .map(|_| 0),
        spice_x509: rt.spice.as_ref().and_then(|s| s.tls.as_ref()).map(|_| 0),
    };
    let expected = render_machine(rt, &fds);
    let Some(actual) = cmdline.get(1..=expected.len()) else {
        return false;
    };
    expected
        .iter()
        .zip(actual)
        .all(|(e, a)| without_fd_numbers(e) == without_fd_numbers(a))
}

/// `arg` with the number of every `/proc/self/fd/N` left out.
fn without_fd_numbers(arg: &str) -> String {
    const FD_PATH: &str = "/proc/self/fd/";
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(at) = rest.find(FD_PATH) {
        out.push_str(&rest[..at + FD_PATH.len()]);
        rest = rest[at + FD_PATH.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

/// The path through which a process reaches its own fd `fd`.
pub fn proc_fd_path(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

/// The machine part with each file that has an fd named as
/// `/proc/self/fd/N`, which QEMU opens without walking the directories of
/// the file's real path.
fn render_machine(rt: &Runtime, fds: &MachineFds) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", escape(&rt.name)),
        "-uuid".into(),
        rt.uuid.to_string(),
        "-machine".into(),
        format!(
            "{},accel={}{}",
            escape(&rt.machine_type),
            rt.accelerator.as_str(),
            if rt.memory_backing == MemoryBacking::Anonymous {
                String::new()
            } else {
                format!(",memory-backend={MEMORY_BACKEND_ID}")
            }
        ),
        "-cpu".into(),
        escape(&rt.cpu_model),
        "-m".into(),
        format!("size={}M", rt.memory_mib),
        "-smp".into(),
        format!(
            "{}{}",
            rt.vcpus,
            rt.cpu_topology.map(|t| t.smp_suffix()).unwrap_or_default()
        ),
    ];
    // An adopted QEMU's guest has QEMU's default devices; they stay.
    if rt.inherited.is_none() {
        argv.push("-nodefaults".into());
    }
    argv.extend([
        "-no-user-config".into(),
        "-msg".into(),
        "timestamp=on".into(),
    ]);
    if rt.rtc_localtime {
        argv.extend(["-rtc".into(), "base=localtime".into()]);
    }
    if rt.exit_on_reboot {
        argv.push("-no-reboot".into());
    }
    if rt.sandbox {
        argv.extend(["-sandbox".into(), SANDBOX.into()]);
    }
    if let Some(backend) = memory_backend(rt, fds.memory.map(proc_fd_path)) {
        argv.extend(["-object".into(), backend]);
    }
    argv.extend(render_displays(rt, fds));
    argv.extend(pcie::render_root_ports(&rt.pcie_root_ports));
    argv.extend(render_console_devices(rt));
    argv.extend(render_boot(rt, fds));
    if let Some(inherited) = &rt.inherited {
        argv.extend(inherited.options.iter().cloned());
    }
    argv
}

/// VNC (with its TLS credentials) or no display, and SPICE with its
/// agent's channel; the TLS files through the agent's copies where the
/// launch has them.
fn render_displays(rt: &Runtime, fds: &MachineFds) -> Vec<String> {
    let mut argv = Vec::new();
    match rt.vnc_display {
        Some(display) => {
            if let Some(tls) = &rt.vnc_tls {
                let dir = tls.x509_dir.as_ref().map(|dir| match fds.vnc_x509 {
                    Some(fd) => proc_fd_path(fd),
                    None => escape(&dir.display().to_string()),
                });
                argv.extend(["-object".into(), vnc::tls_object(tls, dir.as_deref())]);
            }
            argv.extend([
                "-vnc".into(),
                vnc_listen(rt.vnc_address, display)
                    + &vnc::vnc_options(rt.vnc_tls.as_ref(), rt.vnc_password),
            ]);
            if let Some(keymap) = &rt.vnc_keymap {
                argv.extend(["-k".into(), keymap.clone()]);
            }
        }
        None => argv.extend(["-display".into(), "none".into()]),
    }
    if let Some(spice) = &rt.spice {
        let x509_dir = fds.spice_x509.map(proc_fd_path);
        argv.extend([
            "-spice".into(),
            spice::spice_option(spice, x509_dir.as_deref()),
        ]);
        if let Some(slot) = rt.spice_agent_slot {
            argv.extend(spice::vdagent_devices(&pci_at(rt.pci_layout(), slot)));
        }
    }
    argv
}

/// The display adapter in slot 2, the USB devices and the sound card.
/// Without an adapter asked for, VNC and SPICE get the standard VGA; a machine
/// adopted from another manager keeps the one QEMU gave it by default.
fn render_console_devices(rt: &Runtime) -> Vec<String> {
    let mut argv = Vec::new();
    let adapter = rt
        .display_adapter
        .or((rt.vnc_display.is_some() || rt.spice.is_some()).then_some(DisplayAdapter::Std));
    if let Some(device) = adapter.and_then(DisplayAdapter::qemu_device)
        && rt.inherited.is_none()
    {
        let bus = rt.pci_layout().root_bus();
        argv.extend(["-device".into(), format!("{device},bus={bus},addr=0x2")]);
    }
    let usb_devices = rt
        .usb_pointer
        .map(UsbPointer::qemu_device)
        .into_iter()
        .chain(rt.usb_devices.iter().map(|d| d.qemu_device()));
    for (index, device) in usb_devices.enumerate() {
        if index == 0 {
            // The USB controller is the PIIX3's own function, in slot 1.
            argv.push("-usb".into());
        }
        argv.extend(["-device".into(), device.into()]);
    }
    if let Some(sound) = rt.sound {
        let at = sound.slot.map(|slot| pci_at(rt.pci_layout(), slot));
        argv.extend(sound.card.render(at.as_deref()));
    }
    argv
}

/// `-kernel`, `-initrd` and `-append` of a direct kernel boot, the files
/// named by fd where they have one.
fn render_boot(rt: &Runtime, fds: &MachineFds) -> Vec<String> {
    let host_file = |fd: Option<RawFd>, path: &Path| match fd {
        Some(fd) => proc_fd_path(fd),
        None => path.to_string_lossy().into_owned(),
    };
    let mut argv = Vec::new();
    if let Boot::Kernel {
        kernel,
        initrd,
        cmdline,
    } = &rt.boot
    {
        // -kernel and -initrd take a plain file name, not key=value options.
        argv.extend(["-kernel".into(), host_file(fds.kernel, kernel)]);
        if let Some(initrd) = initrd {
            argv.extend(["-initrd".into(), host_file(fds.initrd, initrd)]);
        }
        argv.extend(["-append".into(), cmdline.clone()]);
    }
    argv
}

/// QEMU's `-vnc` address and display: `127.0.0.1:5`, `0.0.0.0:5100`, or
/// `[::]:5100` (brackets around an IPv6 address, as QEMU parses it).
pub fn vnc_listen(address: Option<std::net::IpAddr>, display: u32) -> String {
    match address.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)) {
        std::net::IpAddr::V4(v4) => format!("{v4}:{display}"),
        std::net::IpAddr::V6(v6) => format!("[{v6}]:{display}"),
    }
}

/// The `memory-backend-file` object of a file-backed guest's RAM, with
/// `reached_as` the path QEMU opens the file by when it isn't its own.
fn memory_backend(rt: &Runtime, reached_as: Option<String>) -> Option<String> {
    let (path, share, prealloc) = match &rt.memory_backing {
        MemoryBacking::Anonymous => return None,
        MemoryBacking::File { path, share } => (path, *share, false),
        MemoryBacking::HugePages { path } => (path, false, true),
    };
    let path = reached_as.unwrap_or_else(|| path.to_string_lossy().into_owned());
    Some(format!(
        "memory-backend-file,id={MEMORY_BACKEND_ID},size={}M,mem-path={},share={},prealloc={}",
        rt.memory_mib,
        escape(&path),
        on_off(share),
        on_off(prealloc)
    ))
}

/// The fds and sockets that exist only at execution.
#[derive(Debug, Clone)]
pub struct ExecutionFds {
    /// Listening socket of the agent's QMP monitor.
    pub qmp: RawFd,
    /// Listening socket of the serial console, when the runtime has one.
    pub serial: Option<RawFd>,
    /// Listening socket of the guest agent's channel, when the runtime has
    /// one.
    pub guest_agent: Option<RawFd>,
    /// Per NIC in runtime order, one tap fd per queue.
    pub taps: Vec<Vec<RawFd>>,
    /// Per NIC in runtime order, one vhost-net fd per queue (empty
    /// without vhost).
    pub vhost: Vec<Vec<RawFd>>,
    /// Per disk in runtime order, its open image.
    pub disks: Vec<ImageFd>,
    /// Per CD-ROM or floppy drive in runtime order, its open medium; none
    /// for an empty drive.
    pub media: Vec<Option<RawFd>>,
    /// The boot and RAM files, opened.
    pub machine: MachineFds,
    /// Listening socket of an extra QMP monitor for operators, when
    /// enabled.
    pub operator_qmp: Option<RawFd>,
    /// The empty directory QEMU shuts itself into, when the runtime has a
    /// chroot.
    pub chroot: Option<RawFd>,
    /// How the guest begins.
    pub mode: LaunchMode,
}

/// A disk's open image, as QEMU inherits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageFd {
    /// The fd.
    pub fd: RawFd,
    /// What it is on the host.
    pub kind: ImageKind,
}

/// How a launched guest begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LaunchMode {
    /// Boot it.
    #[default]
    Boot,
    /// Boot it with its vCPUs stopped (`-S`): the guest runs no
    /// instruction until someone resumes it.
    BootPaused,
    /// Wait, paused, for its state from a migration or a save file
    /// (`-S -incoming defer`).
    Incoming,
}

/// The fd set that carries the image of the disk at `index` in the
/// runtime. Sets start at 1, and hot-added disks take sets of their own.
pub fn disk_fdset(index: usize) -> u64 {
    index as u64 + 1
}

/// The fd set that carries the medium of the drive at `index` in the
/// runtime at launch: the next after the disks'.
pub fn media_fdset(rt: &Runtime, index: usize) -> u64 {
    disk_fdset(rt.disks.len() + index)
}

/// Where the first disk comes in the boot order, if anywhere: first when
/// the guest boots from disk, right after the device it boots from
/// otherwise, so a guest whose CD-ROM holds no bootable medium boots from
/// its disk. An adopted machine boots the way its own options say
/// (`-boot`).
fn first_disk_boot_index(rt: &Runtime) -> Option<u32> {
    match rt.boot {
        _ if rt.inherited.is_some() => None,
        Boot::Disk => Some(1),
        Boot::Cdrom | Boot::Floppy | Boot::Network => Some(2),
        Boot::Kernel { .. } => None,
    }
}

/// The full command line for `qemu`, the binary that runs it: the machine
/// with its files as fds, disks, NICs and the execution fds. What QEMU
/// versions spell differently is spelled for `qemu`, not for the QEMU the
/// runtime was made on.
pub fn render_execution(rt: &Runtime, qemu: &QemuInfo, fds: &ExecutionFds) -> Vec<String> {
    let mut argv = render_machine(rt, &fds.machine);
    if let Some(dir) = &qemu.firmware_dir {
        argv.extend(["-L".into(), dir.to_string_lossy().into_owned()]);
    }
    let layout = rt.pci_layout();
    argv.extend(render_disks(rt, &fds.disks));
    for (index, image) in fds.media.iter().enumerate() {
        let image = image.map(|fd| (fd, media_fdset(rt, index)));
        let boot_index = media::boot_index(&rt.media, index, rt.boot.media_kind());
        argv.extend(media::render(&rt.media, index, image, boot_index, layout));
    }
    for (index, (nic, taps)) in rt.nics.iter().zip(&fds.taps).enumerate() {
        let vhost = fds.vhost.get(index).map(Vec::as_slice).unwrap_or_default();
        let mut nic_args = render_nic(nic, taps, vhost, layout);
        if index == 0 && rt.boot == Boot::Network {
            nic_args[3].push_str(",bootindex=1");
        }
        argv.extend(nic_args);
    }
    if let Some(slot) = rt.balloon_slot {
        argv.extend([
            "-device".into(),
            format!(
                "virtio-balloon-pci,id={BALLOON_ID},{}",
                pci_at(layout, slot)
            ),
        ]);
    }
    argv.extend([
        "-chardev".into(),
        format!("socket,id={QMP_CHARDEV},fd={},server=on,wait=off", fds.qmp),
        "-mon".into(),
        format!("chardev={QMP_CHARDEV},mode=control"),
    ]);
    if let Some(fd) = fds.operator_qmp {
        argv.extend([
            "-chardev".into(),
            format!("socket,id={OPERATOR_QMP_CHARDEV},fd={fd},server=on,wait=off"),
            "-mon".into(),
            format!("chardev={OPERATOR_QMP_CHARDEV},mode=control"),
        ]);
    }
    if let Some(fd) = fds.serial {
        argv.extend([
            "-chardev".into(),
            format!("socket,id={SERIAL_CHARDEV},fd={fd},server=on,wait=off"),
            "-serial".into(),
            format!("chardev:{SERIAL_CHARDEV}"),
        ]);
    }
    if let (Some(slot), Some(fd)) = (rt.guest_agent_slot, fds.guest_agent) {
        argv.extend(render_guest_agent(&pci_at(layout, slot), fd));
    }
    if let Some(fd) = fds.chroot {
        argv.extend(chroot_option(qemu.version, fd));
    }
    // Last, so a device among them takes a slot none of the runtime's has.
    argv.extend(rt.extra_args.iter().cloned());
    if fds.mode == LaunchMode::Incoming {
        // -S as well, so the guest only runs once the agent says so, not
        // as soon as the stream is complete.
        argv.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    } else if fds.mode == LaunchMode::BootPaused
        || rt.cpu_pinning.as_ref().is_some_and(CpuPinning::restricts)
    {
        // A pinned guest waits until its vCPU threads are pinned, so it
        // never runs where it must not.
        argv.push("-S".into());
    }
    argv
}

/// The device drivers a launch of `rt` names with `-device` (on `qemu`,
/// whose spelling may differ), each once. Pure.
pub fn device_drivers(rt: &Runtime, qemu: &QemuInfo) -> std::collections::BTreeSet<String> {
    let fds = ExecutionFds {
        qmp: 0,
        serial: rt.serial_console.then_some(0),
        guest_agent: rt.guest_agent_slot.map(|_| 0),
        taps: rt
            .nics
            .iter()
            .map(|n| vec![0; n.spec.queues as usize])
            .collect(),
        vhost: rt.nics.iter().map(|_| Vec::new()).collect(),
        disks: rt
            .disks
            .iter()
            .map(|_| ImageFd {
                fd: 0,
                kind: ImageKind::File,
            })
            .collect(),
        media: rt.media.iter().map(|_| Some(0)).collect(),
        machine: MachineFds::default(),
        operator_qmp: None,
        chroot: None,
        mode: LaunchMode::Incoming,
    };
    render_execution(rt, qemu, &fds)
        .windows(2)
        .filter(|pair| pair[0] == "-device")
        .filter_map(|pair| pair[1].split(',').next().map(str::to_owned))
        .collect()
}

/// The SCSI controller, then every disk on its image fd: in its slot, at
/// its SCSI target, or in order on IDE.
fn render_disks(rt: &Runtime, images: &[ImageFd]) -> Vec<String> {
    let mut argv = Vec::new();
    if let Some(controller) = rt.scsi_controller {
        argv.extend([
            "-device".into(),
            format!(
                "{},id={SCSI_CONTROLLER_ID},{}",
                controller.model.device(),
                pci_at(rt.pci_layout(), controller.slot)
            ),
        ]);
    }
    for (index, (disk, &image)) in rt.disks.iter().zip(images).enumerate() {
        let boot_index = first_disk_boot_index(rt).filter(|_| index == 0);
        let ide_index = rt.disks[..index]
            .iter()
            .filter(|d| d.spec.bus == DiskBus::Ide)
            .count();
        argv.extend(render_disk(
            disk,
            image,
            disk_fdset(index),
            boot_index,
            rt.pci_layout(),
            ide_index,
        ));
    }
    argv
}

/// The port name qemu-ga looks for.
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// The guest agent's channel: its virtio-serial controller `at` its PCI
/// place, and the port, on the listening socket `socket`.
fn render_guest_agent(at: &str, socket: RawFd) -> [String; 6] {
    [
        "-chardev".into(),
        format!("socket,id={GUEST_AGENT_CHARDEV},fd={socket},server=on,wait=off"),
        "-device".into(),
        format!("virtio-serial-pci,id={GUEST_AGENT_SERIAL},{at}"),
        "-device".into(),
        format!(
            "virtserialport,bus={GUEST_AGENT_SERIAL}.0,chardev={GUEST_AGENT_CHARDEV},name={GUEST_AGENT_PORT}"
        ),
    ]
}

/// The first QEMU with `-run-with chroot=`, which replaces `-chroot`.
pub const RUN_WITH_CHROOT_SINCE: QemuVersion = QemuVersion {
    major: 8,
    minor: 1,
    micro: 0,
};

/// The chroot option in the spelling of the QEMU that executes the runtime,
/// so a runtime made for an older QEMU still runs on a newer one. The
/// directory is reached through `/proc/self/fd/N`, which doesn't depend on
/// QEMU's user seeing the directories above it.
pub fn chroot_option(version: QemuVersion, dir: RawFd) -> [String; 2] {
    let dir = proc_fd_path(dir);
    if version >= RUN_WITH_CHROOT_SINCE {
        ["-run-with".into(), format!("chroot={}", escape(&dir))]
    } else {
        ["-chroot".into(), dir]
    }
}

/// `cache.direct`, `cache.no-flush` and the device's `write-cache` for a
/// cache mode, the way QEMU's `cache=` shorthand expands them. Shared by
/// the command line and hotplug, so a disk behaves the same either way.
pub fn cache_flags(cache: DiskCache) -> (bool, bool, bool) {
    match cache {
        DiskCache::None => (true, false, true),
        DiskCache::Writeback => (false, false, true),
        DiskCache::Writethrough => (false, false, false),
        DiskCache::Directsync => (true, false, false),
        DiskCache::Unsafe => (false, true, true),
    }
}

/// `-add-fd` of the open image into `fdset`, `-blockdev` (file on
/// `/dev/fdset/N`), `-blockdev` (format) and `-device` for one disk.
pub fn render_disk(
    disk: &RuntimeDisk,
    image: ImageFd,
    fdset: u64,
    boot_index: Option<u32>,
    layout: PciLayout,
    ide_index: usize,
) -> [String; 8] {
    let d = &disk.spec;
    let (direct, no_flush, write_cache) = cache_flags(d.cache);
    let format = match d.format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    let file_node = disk_file_node(d.uuid);
    let format_node = disk_format_node(d.uuid);
    let boot = boot_index
        .map(|order| format!(",bootindex={order}"))
        .unwrap_or_default();
    // Options QEMU's defaults cover are left out, so a disk without them
    // renders as it always has.
    let aio = match d.aio {
        DiskAio::Threads => String::new(),
        other => format!(",aio={}", other.as_str()),
    };
    let discard = if d.discard { ",discard=unmap" } else { "" };
    // A pass-through device has the guest's cache flags, not QEMU's.
    let write_cache = match d.bus.passes_through() {
        true => String::new(),
        false => format!(",write-cache={}", on_off(write_cache)),
    };
    [
        "-add-fd".into(),
        format!("fd={},set={fdset}", image.fd),
        "-blockdev".into(),
        format!(
            "driver={},node-name={file_node},filename=/dev/fdset/{fdset},read-only={},cache.direct={},cache.no-flush={}{aio}{discard}",
            image.kind.protocol_driver(),
            on_off(d.read_only),
            on_off(direct),
            on_off(no_flush)
        ),
        "-blockdev".into(),
        format!(
            "driver={format},node-name={format_node},file={file_node},read-only={}{discard}",
            on_off(d.read_only)
        ),
        "-device".into(),
        format!(
            "{},id={},drive={format_node},{}{write_cache}{boot}",
            disk_driver(disk),
            disk.device_id(),
            disk_at(disk, layout, ide_index),
        ),
    ]
}

/// QEMU's device of a disk.
pub fn disk_driver(disk: &RuntimeDisk) -> &'static str {
    match disk.spec.bus {
        DiskBus::Virtio => "virtio-blk-pci",
        DiskBus::Ide => "ide-hd",
        scsi => scsi.scsi_device().unwrap_or("scsi-hd"),
    }
}

/// Where a disk's device sits: its PCI slot, its SCSI target, or, for the
/// disk that is `ide_index`th among the IDE disks, its place on the
/// primary IDE channel (a q35's AHCI has one unit per bus, and the first
/// two buses are the disks').
fn disk_at(disk: &RuntimeDisk, layout: PciLayout, ide_index: usize) -> String {
    match (disk.slot, disk.scsi_target, layout) {
        (Some(slot), _, _) => pci_at(layout, slot),
        (None, Some(target), _) => scsi_at(target),
        (None, None, PciLayout::RootBus) => format!("bus=ide.0,unit={ide_index}"),
        (None, None, PciLayout::RootPorts) => format!("bus=ide.{ide_index},unit=0"),
    }
}

/// A SCSI target on the controller's bus, with one LUN, as Ganeti's driver
/// places its SCSI disks.
pub fn scsi_at(target: u8) -> String {
    format!("bus={SCSI_CONTROLLER_ID}.0,channel=0,scsi-id={target},lun=0")
}

/// The option ROM QEMU loads for a NIC model's device, at start and at
/// hot-add; an ISA NIC has none.
pub fn option_rom(model: NicModel) -> Option<&'static str> {
    // QEMU's own defaults: EFI ROMs where it has them.
    Some(match model {
        NicModel::Virtio => "efi-virtio.rom",
        NicModel::E1000 => "efi-e1000.rom",
        NicModel::Rtl8139 => "efi-rtl8139.rom",
        NicModel::Pcnet => "efi-pcnet.rom",
        NicModel::Ne2kPci => "pxe-ne2k_pci.rom",
        NicModel::I82551 | NicModel::I82557b | NicModel::I82559er => "pxe-eepro100.rom",
        NicModel::Ne2kIsa => return None,
    })
}

/// Joins fds the way `fds=` and `vhostfds=` want them.
fn fd_list(fds: &[RawFd]) -> String {
    fds.iter()
        .map(RawFd::to_string)
        .collect::<Vec<_>>()
        .join(":")
}

/// MSI-X vectors a multiqueue virtio-net device needs: one per queue of
/// each direction, one for control and one for config.
pub fn msix_vectors(queues: u32) -> u32 {
    2 * queues + 2
}

/// `-netdev` and `-device` for one NIC on inherited tap fds (one per
/// queue) and vhost fds. No `vnet_hdr=`: QEMU reads it from the fd and
/// refuses both.
pub fn render_nic(
    nic: &RuntimeNic,
    tap_fds: &[RawFd],
    vhost_fds: &[RawFd],
    layout: PciLayout,
) -> [String; 4] {
    let n = &nic.spec;
    let model = n.model.qemu_device();
    let netdev = nic.netdev_id();
    [
        "-netdev".into(),
        {
            let taps = match tap_fds {
                [one] => format!("fd={one}"),
                many => format!("fds={}", fd_list(many)),
            };
            let vhost = match vhost_fds {
                [] => String::new(),
                [one] => format!(",vhost=on,vhostfd={one}"),
                many => format!(",vhost=on,vhostfds={}", fd_list(many)),
            };
            format!("tap,id={netdev},{taps}{vhost}")
        },
        "-device".into(),
        format!(
            "{model},id={},netdev={netdev},mac={}{}{}",
            nic.device_id(),
            n.mac,
            nic.slot
                .map(|slot| format!(",{}", pci_at(layout, slot)))
                .unwrap_or_default(),
            if n.queues > 1 {
                format!(",mq=on,vectors={}", msix_vectors(n.queues))
            } else {
                String::new()
            }
        ),
    ]
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::runtime::tests::{host, qemu_7_2};
    use crate::runtime::{RuntimeError, generate};
    use crate::spec::tests::sample_spec;

    /// Splits QEMU `key=value,...` syntax the way QEMU does (`,,` is a comma).
    fn split_keyval(s: &str) -> Vec<(String, String)> {
        let mut items = Vec::new();
        let mut current = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    current.push(',');
                } else {
                    items.push(std::mem::take(&mut current));
                }
            } else {
                current.push(c);
            }
        }
        items.push(current);
        items
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (kv, String::new()),
            })
            .collect()
    }

    pub(crate) fn fds() -> ExecutionFds {
        ExecutionFds {
            qmp: 3,
            serial: Some(4),
            taps: vec![vec![5]],
            vhost: vec![vec![]],
            disks: vec![ImageFd {
                fd: 6,
                kind: ImageKind::File,
            }],
            media: vec![],
            guest_agent: None,
            machine: MachineFds::default(),
            operator_qmp: None,
            chroot: None,
            mode: LaunchMode::Boot,
        }
    }

    #[test]
    fn a_launched_command_line_matches_its_runtime_whatever_the_fd_numbers() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.boot = Boot::Kernel {
            kernel: "/srv/boot/vmlinuz".into(),
            initrd: None,
            cmdline: String::new(),
        };
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        let mut launched = fds();
        launched.machine.kernel = Some(17);
        let cmdline: Vec<String> = std::iter::once("qemu-system-x86_64".to_owned())
            .chain(render_execution(&rt, &qemu_7_2(), &launched))
            .collect();

        assert!(machine_part_matches(&rt, &cmdline));

        let mut more_memory = rt.clone();
        more_memory.memory_mib += 1;
        assert!(!machine_part_matches(&more_memory, &cmdline));
        assert!(!machine_part_matches(&rt, &cmdline[..3]));
        assert_eq!(
            without_fd_numbers("file=/proc/self/fd/12,x=/proc/self/fd/3"),
            "file=/proc/self/fd/,x=/proc/self/fd/"
        );
    }

    #[test]
    fn the_chroot_option_follows_the_executing_qemus_spelling() {
        let version = |major, minor| QemuVersion {
            major,
            minor,
            micro: 0,
        };
        assert_eq!(
            chroot_option(version(7, 2), 9),
            ["-chroot", "/proc/self/fd/9"]
        );
        assert_eq!(
            chroot_option(version(8, 0), 9),
            ["-chroot", "/proc/self/fd/9"]
        );
        assert_eq!(
            chroot_option(version(8, 1), 9),
            ["-run-with", "chroot=/proc/self/fd/9"]
        );
        assert_eq!(
            chroot_option(version(10, 0), 9),
            ["-run-with", "chroot=/proc/self/fd/9"]
        );

        // A runtime is spelled for the QEMU that executes it, whichever
        // QEMU it was made on: an upgrade or a migration changes it.
        let old_qemu = qemu_7_2();
        let new_qemu = QemuInfo {
            version: version(10, 0),
            ..qemu_7_2()
        };
        let made_on_old = generate(&sample_spec(), host(&old_qemu), 1).unwrap();
        let made_on_new = generate(&sample_spec(), host(&new_qemu), 1).unwrap();
        let with_chroot = ExecutionFds {
            chroot: Some(9),
            ..fds()
        };
        for rt in [&made_on_old, &made_on_new] {
            let on_old = render_execution(rt, &old_qemu, &with_chroot).join(" ");
            assert!(on_old.contains("-chroot /proc/self/fd/9"), "{on_old}");
            assert!(!on_old.contains("-run-with"), "{on_old}");
            let on_new = render_execution(rt, &new_qemu, &with_chroot).join(" ");
            assert!(
                on_new.contains("-run-with chroot=/proc/self/fd/9"),
                "{on_new}"
            );
            assert!(!on_new.contains("-chroot"), "{on_new}");
        }
    }

    #[test]
    fn a_qemu_with_a_firmware_dir_of_its_own_is_pointed_at_it() {
        let system = qemu_7_2();
        let unpacked = QemuInfo {
            firmware_dir: Some("/opt/qemu-10.0/usr/share/qemu".into()),
            ..qemu_7_2()
        };
        let rt = generate(&sample_spec(), host(&system), 1).unwrap();

        let argv = render_execution(&rt, &unpacked, &fds());
        let at = argv.iter().position(|a| a == "-L").expect("a -L option");
        assert_eq!(argv[at + 1], "/opt/qemu-10.0/usr/share/qemu");
        // After the machine part, which the runtime's own argv is checked
        // against.
        assert_eq!(argv[..rt.argv.len()], rt.argv[..]);
        assert!(!render_execution(&rt, &system, &fds()).contains(&"-L".to_owned()));
    }

    #[test]
    fn host_files_are_named_by_path_in_the_runtime_and_by_fd_at_execution() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.boot = Boot::Kernel {
            kernel: "/srv/boot/vmlinuz".into(),
            initrd: Some("/srv/boot/initrd".into()),
            cmdline: "console=ttyS0".into(),
        };
        spec.memory_backing = MemoryBacking::File {
            path: "/dev/shm/web1".into(),
            share: true,
        };
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        let base = rt.argv.join(" ");
        assert!(
            base.contains("-kernel /srv/boot/vmlinuz -initrd /srv/boot/initrd"),
            "{base}"
        );
        assert!(base.contains("mem-path=/dev/shm/web1,"), "{base}");

        let execution = render_execution(
            &rt,
            &qemu_7_2(),
            &ExecutionFds {
                machine: MachineFds {
                    kernel: Some(7),
                    initrd: Some(8),
                    memory: Some(9),
                    vnc_x509: None,
                    spice_x509: None,
                },
                ..fds()
            },
        )
        .join(" ");
        assert!(
            execution.contains("-kernel /proc/self/fd/7 -initrd /proc/self/fd/8"),
            "{execution}"
        );
        assert!(
            execution.contains("mem-path=/proc/self/fd/9,"),
            "{execution}"
        );
        assert!(
            execution.contains("-add-fd fd=6,set=1 -blockdev driver=file,"),
            "{execution}"
        );
        assert!(execution.contains("filename=/dev/fdset/1,"), "{execution}");
        for path in [
            "/srv/",
            "/dev/shm/",
            &rt.disks[0].spec.path.to_string_lossy(),
        ] {
            assert!(!execution.contains(path), "{path} in {execution}");
        }
    }

    #[test]
    fn an_incoming_start_waits_paused_for_the_stream() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
        let plain = render_execution(&rt, &qemu_7_2(), &fds());
        assert!(!plain.iter().any(|a| a == "-incoming" || a == "-S"));
        let incoming = render_execution(
            &rt,
            &qemu_7_2(),
            &ExecutionFds {
                mode: LaunchMode::Incoming,
                ..fds()
            },
        );
        assert!(incoming.ends_with(&["-S".into(), "-incoming".into(), "defer".into()]));
    }

    #[test]
    fn a_cdrom_boot_puts_the_cdrom_first_and_the_disk_right_after() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.boot = Boot::Cdrom;
        spec.media = vec![
            crate::spec::MediaDrive {
                name: "install".into(),
                kind: crate::spec::MediaKind::Cdrom,
                image: Some("/srv/iso/install.iso".into()),
            },
            crate::spec::MediaDrive {
                name: "spare".into(),
                kind: crate::spec::MediaKind::Cdrom,
                image: None,
            },
        ];
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        let argv = render_execution(
            &rt,
            &qemu_7_2(),
            &ExecutionFds {
                media: vec![Some(9), None],
                ..fds()
            },
        )
        .join(" ");
        // The disk's image is set 1; the medium takes the next.
        assert!(argv.contains("-add-fd fd=9,set=2 "), "{argv}");
        assert!(
            argv.contains("ide-cd,id=media-install,bus=ide.1,unit=0,drive=media0,bootindex=1"),
            "{argv}"
        );
        assert!(
            argv.contains("ide-cd,id=media-spare,bus=ide.1,unit=1 "),
            "{argv}"
        );
        assert!(argv.contains(",bootindex=2"), "{argv}");
        assert!(!argv.contains("-boot "), "{argv}");
    }

    #[test]
    fn usb_devices_share_one_controller_and_a_pci_sound_card_its_slot() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.usb_pointer = Some(UsbPointer::Tablet);
        spec.usb_devices = vec![crate::spec::UsbDevice::Keyboard];
        spec.sound_card = Some(crate::spec::SoundCard::Ac97);
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        // After the disk (3), the NIC (4) and the balloon (5).
        assert_eq!(rt.sound.and_then(|s| s.slot), Some(6));
        let argv = render_base(&rt).join(" ");
        assert_eq!(argv.matches("-usb ").count(), 1, "{argv}");
        assert!(
            argv.contains("-usb -device usb-tablet -device usb-kbd"),
            "{argv}"
        );
        assert!(
            argv.contains("AC97,id=sound0,audiodev=audio0,bus=pci.0,addr=0x6"),
            "{argv}"
        );
        assert!(rt.validate().is_ok());
    }

    #[test]
    fn an_ide_disk_takes_no_slot_and_sits_on_the_primary_channel() {
        let qemu = qemu_7_2();
        for (machine, at) in [("pc", "bus=ide.0,unit=0"), ("q35", "bus=ide.0,unit=0")] {
            let mut spec = sample_spec();
            spec.machine_type = machine.into();
            spec.disks[0].bus = crate::spec::DiskBus::Ide;
            let rt = generate(&spec, host(&qemu), 1).unwrap();
            assert_eq!(rt.disks[0].slot, None);
            // The NIC takes the first slot.
            assert_eq!(rt.nics[0].slot, Some(3));
            let argv = render_execution(&rt, &qemu_7_2(), &fds()).join(" ");
            let device = format!("ide-hd,id={},drive=", rt.disks[0].device_id());
            assert!(argv.contains(&device) && argv.contains(at), "{argv}");
        }
    }

    #[test]
    fn scsi_disks_take_targets_on_a_controller_placed_before_the_balloon() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        let mut second = spec.disks[0].clone();
        second.name = "cd".into();
        second.uuid = Uuid::from_u128(0xcd);
        second.bus = DiskBus::ScsiCd;
        spec.disks[0].bus = DiskBus::ScsiHd;
        spec.disks.push(second);
        spec.scsi_controller = Some(crate::spec::ScsiController::Megasas);
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        let places: Vec<_> = rt.disks.iter().map(|d| (d.slot, d.scsi_target)).collect();
        assert_eq!(places, [(None, Some(0)), (None, Some(1))]);
        // The NIC takes slot 3, the controller 4 and the balloon 5.
        assert_eq!(rt.scsi_controller.map(|c| c.slot), Some(4));
        assert_eq!(rt.balloon_slot, Some(5));
        let images = [6, 7].map(|fd| ImageFd {
            fd,
            kind: ImageKind::Device,
        });
        let fds = ExecutionFds {
            disks: images.to_vec(),
            ..fds()
        };
        let argv = render_execution(&rt, &qemu_7_2(), &fds).join(" ");
        assert!(
            argv.contains("-device megasas,id=scsi,bus=pci.0,addr=0x4 -add-fd fd=6,set=1"),
            "{argv}"
        );
        assert!(argv.contains("driver=host_device,node-name="), "{argv}");
        let hd = format!(
            "scsi-hd,id={},drive={},bus=scsi.0,channel=0,scsi-id=0,lun=0,write-cache=on,bootindex=1",
            rt.disks[0].device_id(),
            disk_format_node(rt.disks[0].spec.uuid)
        );
        assert!(argv.contains(&hd), "{argv}");
        assert!(argv.contains("scsi-cd,id="), "{argv}");
        assert!(argv.contains("scsi-id=1,lun=0"), "{argv}");
        rt.validate().unwrap();

        // A disk on a target twice, or on SCSI with no controller, is
        // refused.
        let mut twice = rt.clone();
        twice.disks[1].scsi_target = Some(0);
        assert!(matches!(twice.validate(), Err(RuntimeError::DiskPlace(d)) if d == "cd"));
        let mut bare = rt;
        bare.scsi_controller = None;
        assert!(matches!(bare.validate(), Err(RuntimeError::DiskPlace(_))));
    }

    #[test]
    fn an_isa_nic_takes_no_slot_and_names_no_bus() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.nics[0].model = NicModel::Ne2kIsa;
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        assert_eq!(rt.nics[0].slot, None);
        // The disk takes 3, the balloon the next free one.
        assert_eq!(rt.balloon_slot, Some(4));
        let argv = render_execution(&rt, &qemu_7_2(), &fds()).join(" ");
        let device = format!(
            "ne2k_isa,id={},netdev={},mac={} ",
            rt.nics[0].device_id(),
            rt.nics[0].netdev_id(),
            spec.nics[0].mac
        );
        assert!(argv.contains(&device), "{argv}");
        let mut slotted = rt.clone();
        slotted.nics[0].slot = Some(9);
        assert!(matches!(slotted.validate(), Err(RuntimeError::NicPlace(_))));
    }

    #[test]
    fn a_pass_through_disk_leaves_the_cache_flags_to_the_guest() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.disks[0].bus = DiskBus::ScsiBlock;
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        // Implied: virtio-scsi.
        assert_eq!(
            rt.scsi_controller.map(|c| c.model),
            Some(crate::spec::ScsiController::VirtioScsi)
        );
        let argv = render_execution(&rt, &qemu_7_2(), &fds()).join(" ");
        assert!(argv.contains("-device virtio-scsi-pci,id=scsi,"), "{argv}");
        let device = argv
            .split(" -device ")
            .find(|d| d.starts_with("scsi-block"));
        assert!(device.is_some_and(|d| !d.contains("write-cache")), "{argv}");
    }

    #[test]
    fn a_network_boot_puts_the_first_nic_first() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.boot = Boot::Network;
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        let argv = render_execution(&rt, &qemu_7_2(), &fds());
        let nic = argv
            .iter()
            .find(|a| a.starts_with("virtio-net-pci,"))
            .unwrap();
        assert!(nic.ends_with(",bootindex=1"), "{nic}");
        let disk = argv
            .iter()
            .find(|a| a.starts_with("virtio-blk-pci,"))
            .unwrap();
        assert!(disk.ends_with(",bootindex=2"), "{disk}");
    }

    #[test]
    fn a_paused_boot_stops_the_vcpus_before_the_first_instruction() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
        let paused = render_execution(
            &rt,
            &qemu_7_2(),
            &ExecutionFds {
                mode: LaunchMode::BootPaused,
                ..fds()
            },
        );
        assert_eq!(paused.iter().filter(|a| *a == "-S").count(), 1);
        assert!(!paused.iter().any(|a| a == "-incoming"));
    }

    #[test]
    fn vnc_tls_reads_the_agents_copy_of_the_x509_files() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.vnc_display = Some(5);
        spec.vnc_password = true;
        spec.vnc_tls = Some(crate::vnc::VncTls {
            x509_dir: Some("/etc/ganeti/vnc-x509".into()),
            verify_client: false,
        });
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        let base = rt.argv.join(" ");
        assert!(
            base.contains("dir=/etc/ganeti/vnc-x509,verify-peer=off -vnc 127.0.0.1:5,tls-creds=vnctls0,password=on"),
            "{base}"
        );
        let fds = ExecutionFds {
            machine: MachineFds {
                vnc_x509: Some(11),
                ..MachineFds::default()
            },
            ..fds()
        };
        let execution = render_execution(&rt, &qemu_7_2(), &fds);
        assert!(
            execution.join(" ").contains("dir=/proc/self/fd/11,"),
            "{execution:?}"
        );
        assert!(machine_part_matches(
            &rt,
            &[vec!["qemu".to_owned()], execution].concat()
        ));

        let mut unverifiable = spec.clone();
        unverifiable.vnc_tls = Some(crate::vnc::VncTls {
            x509_dir: None,
            verify_client: true,
        });
        assert!(matches!(
            generate(&unverifiable, host(&qemu), 1),
            Err(RuntimeError::Spec(
                crate::spec::SpecError::VncVerifyWithoutCa
            ))
        ));
    }

    #[test]
    fn vnc_listens_on_loopback_unless_told_and_brackets_ipv6() {
        assert_eq!(vnc_listen(None, 5), "127.0.0.1:5");
        assert_eq!(
            vnc_listen(Some("0.0.0.0".parse().unwrap()), 5100),
            "0.0.0.0:5100"
        );
        assert_eq!(vnc_listen(Some("::".parse().unwrap()), 5100), "[::]:5100");
    }

    #[test]
    fn topology_local_time_and_reboot_exit_are_on_the_command_line_only_when_asked() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.vcpus = 4;
        let plain = generate(&spec, host(&qemu), 1).unwrap();
        let after = |argv: &[String], flag: &str| {
            let at = argv.iter().position(|a| a == flag)?;
            argv.get(at + 1).cloned()
        };
        assert_eq!(after(&plain.argv, "-smp").as_deref(), Some("4"));
        assert_eq!(after(&plain.argv, "-rtc"), None);
        assert!(!plain.argv.iter().any(|a| a == "-no-reboot"));
        spec.cpu_topology = Some(crate::spec::CpuTopology {
            sockets: 1,
            cores: 2,
            threads: 2,
        });
        spec.rtc_localtime = true;
        spec.exit_on_reboot = true;
        let shaped = generate(&spec, host(&qemu), 1).unwrap();
        assert!(shaped.argv.iter().any(|a| a == "-no-reboot"));
        assert!(shaped.to_spec().exit_on_reboot);
        assert_eq!(
            after(&shaped.argv, "-smp").as_deref(),
            Some("4,sockets=1,cores=2,threads=2")
        );
        assert_eq!(
            after(&shaped.argv, "-rtc").as_deref(),
            Some("base=localtime")
        );
        assert_eq!(shaped.to_spec().cpu_topology, spec.cpu_topology);
        assert!(shaped.to_spec().rtc_localtime);
    }

    #[test]
    fn a_pinned_guest_starts_paused_until_its_threads_are_pinned() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.vcpus = 2;
        spec.cpu_pinning = Some("1:0".parse().unwrap());
        let rt = generate(&spec, host(&qemu), 1).unwrap();
        assert_eq!(
            render_execution(&rt, &qemu_7_2(), &fds())
                .last()
                .map(String::as_str),
            Some("-S")
        );
        spec.cpu_pinning = Some("all".parse().unwrap());
        let unrestricted = generate(&spec, host(&qemu), 1).unwrap();
        assert!(
            !render_execution(&unrestricted, &qemu_7_2(), &fds())
                .iter()
                .any(|a| a == "-S")
        );
    }

    #[test]
    fn file_backed_memory_is_named_on_the_machine() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.memory_backing = MemoryBacking::File {
            path: "/dev/shm/guest".into(),
            share: true,
        };
        let argv = render_base(&generate(&spec, host(&qemu), 1).unwrap()).join(" ");
        assert!(
            argv.contains("accel=kvm,memory-backend=guest-ram"),
            "{argv}"
        );
        assert!(
            argv.contains("-object memory-backend-file,id=guest-ram,size=128M,mem-path=/dev/shm/guest,share=on,prealloc=off"),
            "{argv}"
        );
        spec.memory_backing = MemoryBacking::HugePages {
            path: "/dev/hugepages".into(),
        };
        let argv = render_base(&generate(&spec, host(&qemu), 1).unwrap()).join(" ");
        assert!(
            argv.contains("mem-path=/dev/hugepages,share=off,prealloc=on"),
            "{argv}"
        );
        let plain = render_base(&generate(&sample_spec(), host(&qemu), 1).unwrap()).join(" ");
        assert!(!plain.contains("memory-backend"), "{plain}");
    }

    #[test]
    fn console_devices_are_the_adapter_in_slot_2_and_a_usb_pointer() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.vnc_display = None;
        let headless = generate(&spec, host(&qemu), 1).unwrap().argv.join(" ");
        assert!(!headless.contains("addr=0x2"), "{headless}");
        assert!(!headless.contains("-usb"), "{headless}");

        spec.vnc_display = Some(5);
        spec.vnc_keymap = Some("de".into());
        let vnc = generate(&spec, host(&qemu), 1).unwrap().argv.join(" ");
        assert!(
            vnc.contains("-k de -device VGA,bus=pci.0,addr=0x2"),
            "{vnc}"
        );

        spec.display_adapter = Some(DisplayAdapter::Cirrus);
        spec.usb_pointer = Some(crate::spec::UsbPointer::Tablet);
        let shaped = generate(&spec, host(&qemu), 1).unwrap();
        let argv = shaped.argv.join(" ");
        assert!(
            argv.contains("-device cirrus-vga,bus=pci.0,addr=0x2 -usb -device usb-tablet"),
            "{argv}"
        );
        assert_eq!(shaped.to_spec().display_adapter, spec.display_adapter);

        spec.display_adapter = Some(DisplayAdapter::None);
        let blind = generate(&spec, host(&qemu), 1).unwrap().argv.join(" ");
        assert!(!blind.contains("addr=0x2"), "{blind}");
        spec.vnc_display = None;
        assert!(spec.validate().is_err(), "a keymap needs VNC");
    }

    #[test]
    fn comma_is_doubled() {
        assert_eq!(escape("/a,b,,c"), "/a,,b,,,,c");
    }

    #[test]
    fn base_argv_names_machine_memory_and_uuid() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();

        let argv = render_base(&rt).join(" ");

        assert!(argv.contains("-machine pc-i440fx-7.2,accel=kvm"), "{argv}");
        assert!(argv.contains("-m size=128M"), "{argv}");
        assert!(argv.contains(&format!("-uuid {}", rt.uuid)), "{argv}");
        assert!(argv.contains("-nodefaults"), "{argv}");
    }

    #[test]
    fn every_device_has_an_explicit_bus_and_slot() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();

        let argv = render_execution(&rt, &qemu_7_2(), &fds());

        let devices: Vec<&String> = argv
            .windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| &w[1])
            .collect();
        assert_eq!(devices.len(), 3);
        assert!(devices[0].contains("bus=pci.0,addr=0x3"), "{}", devices[0]);
        assert!(devices[1].contains("bus=pci.0,addr=0x4"), "{}", devices[1]);
        assert_eq!(
            devices[2],
            "virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x5"
        );
    }

    #[test]
    fn nic_uses_the_inherited_tap_fd() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();

        let argv = render_execution(&rt, &qemu_7_2(), &fds());

        let netdev = argv.iter().find(|a| a.starts_with("tap,")).unwrap();
        assert_eq!(
            netdev,
            &format!("tap,id={},fd=5", netdev_id(rt.nics[0].spec.uuid))
        );
    }

    #[test]
    fn multiqueue_nic_lists_every_queue_fd_and_turns_mq_on() {
        let qemu = qemu_7_2();
        let mut spec = sample_spec();
        spec.nics[0].queues = 2;
        spec.nics[0].vhost = true;
        let rt = generate(&spec, host(&qemu), 1).unwrap();

        let [_, netdev, _, device] =
            render_nic(&rt.nics[0], &[10, 11], &[12, 13], PciLayout::RootBus);

        assert!(
            netdev.ends_with(",fds=10:11,vhost=on,vhostfds=12:13"),
            "{netdev}"
        );
        assert!(device.ends_with(",mq=on,vectors=6"), "{device}");
    }

    #[test]
    fn disk_boot_marks_first_disk_bootable() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();

        let argv = render_execution(&rt, &qemu_7_2(), &fds()).join(" ");

        assert!(argv.contains("bootindex=1"), "{argv}");
    }

    #[test]
    fn cache_none_is_direct_io() {
        let qemu = qemu_7_2();
        let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();

        let [_, _, _, file, ..] = render_disk(
            &rt.disks[0],
            ImageFd {
                fd: 6,
                kind: ImageKind::File,
            },
            1,
            None,
            PciLayout::RootBus,
            0,
        );

        let kv = split_keyval(&file);
        assert!(kv.contains(&("cache.direct".into(), "on".into())), "{file}");
    }

    #[test]
    fn node_names_fit_qemus_limit() {
        let id = Uuid::from_u128(u128::MAX);

        assert!(disk_file_node(id).len() <= 31);
        assert!(disk_format_node(id).len() <= 31);
    }

    proptest! {
        #[test]
        fn no_ram_path_can_smuggle_an_option(
            parts in proptest::collection::vec("[ -~&&[^/]]{1,16}", 1..4)
        ) {
            prop_assume!(parts.iter().all(|p| p != "." && p != ".."));
            let path = format!("/{}", parts.join("/"));
            let qemu = qemu_7_2();
            // Validation refuses ',' and '='; escaping must hold anyway.
            let mut rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
            rt.memory_backing = MemoryBacking::File { path: path.clone().into(), share: false };

            let argv = render_base(&rt);
            let object = argv.iter().find(|a| a.starts_with("memory-backend-file,")).unwrap();

            let kv = split_keyval(object);
            let keys: Vec<&str> = kv.iter().map(|(k, _)| k.as_str()).collect();
            prop_assert_eq!(keys, vec!["memory-backend-file", "id", "size", "mem-path", "share", "prealloc"]);
            prop_assert_eq!(&kv[3].1, &path);
        }

        #[test]
        fn a_disk_renders_the_same_options_whatever_it_is(read_only: bool, boot: bool, fd in 3i32..1000, set in 1u64..64) {
            let qemu = qemu_7_2();
            let mut rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
            rt.disks[0].spec.read_only = read_only;

            let [_, add_fd, _, file, _, format, _, device] = render_disk(&rt.disks[0], ImageFd { fd, kind: ImageKind::File }, set, boot.then_some(1), PciLayout::RootBus, 0);

            prop_assert_eq!(add_fd, format!("fd={fd},set={set}"));
            let kv = split_keyval(&file);
            let keys: Vec<&str> = kv.iter().map(|(k, _)| k.as_str()).collect();
            prop_assert_eq!(keys, vec!["driver", "node-name", "filename", "read-only", "cache.direct", "cache.no-flush"]);
            prop_assert_eq!(&kv[2].1, &format!("/dev/fdset/{set}"));
            prop_assert_eq!(split_keyval(&format).len(), 4);
            prop_assert_eq!(split_keyval(&device).len(), if boot { 7 } else { 6 });
        }

        #[test]
        fn rendering_is_deterministic(tap in 3i32..1000, qmp in 3i32..1000) {
            let qemu = qemu_7_2();
            let rt = generate(&sample_spec(), host(&qemu), 1).unwrap();
            let fds = ExecutionFds { qmp, taps: vec![vec![tap]], serial: None, ..fds() };
            prop_assert_eq!(render_execution(&rt, &qemu_7_2(), &fds), render_execution(&rt, &qemu_7_2(), &fds));
        }
    }
}
