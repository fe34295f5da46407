//! From the command line of a QEMU that Ganeti's KVM driver started, and
//! its runtime file, to the agent's runtime for the same guest. Pure.
//!
//! Every option is sorted into one of three kinds: what the runtime
//! models (memory, CPUs, machine, boot, devices), what only the host sees
//! and the agent does its own way (monitors, pidfile, logs, daemonizing),
//! and what shapes the guest without a spec field, which is kept as it is
//! ([`InheritedMachine`]). An option in none of them refuses the adoption:
//! the agent would otherwise give the guest other hardware at its next
//! launch.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use hypervisor::Runtime;
use hypervisor::argv::msix_vectors;
use hypervisor::runtime::{
    InheritedMachine, QemuIdentity, RUNTIME_FORMAT_VERSION, ResolvedAccelerator, RuntimeDisk,
    RuntimeNic, inherited,
};
use hypervisor::spec::{
    Boot, CpuTopology, DiskAio, DiskCache, DiskFormat, DiskSpec, NicModel, NicSpec,
};
use uuid::Uuid;

use super::runtime_file::{GanetiDisk, GanetiNic, GanetiRuntime, HvInfo};

/// The origin recorded in an adopted runtime.
pub const ORIGIN: &str = "ganeti-kvm";

/// What QEMU itself says, beyond its command line.
#[derive(Debug, Clone)]
pub struct LiveFacts {
    /// The versioned machine type (QOM's `/machine` type).
    pub machine_type: String,
    /// Whether KVM is enabled (`query-kvm`).
    pub accelerator: ResolvedAccelerator,
    /// The QEMU the runtime will be replayed on.
    pub qemu: QemuIdentity,
}

/// The runtime of `name` as its QEMU runs, without the agent's
/// confinement (the caller gives it the host's). Errors say what can't be
/// reproduced.
pub fn translate(
    name: &str,
    ganeti: &GanetiRuntime,
    cmdline: &[String],
    live: &LiveFacts,
) -> Result<Runtime, String> {
    let mut parsed = Parsed::default();
    let mut args = cmdline.iter().skip(1);
    while let Some(option) = args.next() {
        parsed.read(option, &mut args, ganeti)?;
    }
    parsed.into_runtime(name, ganeti, live)
}

/// What the walk over the command line found.
#[derive(Debug, Default)]
struct Parsed {
    memory_mib: Option<u64>,
    smp: Option<(u32, Option<CpuTopology>)>,
    uuid: Option<Uuid>,
    cpu_model: Option<String>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
    rtc_localtime: bool,
    exit_on_reboot: bool,
    vnc: Option<(IpAddr, u32)>,
    serial_console: bool,
    kept: Vec<String>,
    /// By netdev id: tap queues and whether vhost is on.
    netdevs: HashMap<String, (u32, bool)>,
    /// By drive id.
    drives: HashMap<String, Drive>,
    /// NIC devices: hvinfo id, MAC, and the MSI-X `vectors` asked for.
    nic_devices: Vec<(String, String, Option<u32>)>,
    disk_devices: Vec<String>,
}

/// A `-drive` of Ganeti's driver: the image and how QEMU opens it.
#[derive(Debug)]
struct Drive {
    file: String,
    cache: DiskCache,
    aio: DiskAio,
    discard: bool,
}

/// `key=value` pairs of a QEMU option value after its first part.
fn properties(value: &str) -> Vec<(&str, &str)> {
    value
        .split(',')
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

impl Parsed {
    /// Reads one option, and its value from `args`.
    fn read<'a>(
        &mut self,
        option: &str,
        args: &mut impl Iterator<Item = &'a String>,
        ganeti: &GanetiRuntime,
    ) -> Result<(), String> {
        let mut value = || {
            args.next()
                .cloned()
                .ok_or_else(|| format!("option {option} has no value"))
        };
        match option {
            // The host's side, which the agent does its own way.
            "-name" | "-pidfile" | "-D" | "-monitor" | "-qmp" | "-chroot" | "-incoming"
            | "-runas" => {
                value()?;
            }
            "-daemonize" | "-S" | "-enable-kvm" => {}
            "-m" => self.memory_mib = Some(memory_mib(&value()?)?),
            "-smp" => self.smp = Some(smp(&value()?)?),
            "-machine" | "-M" => check_machine(&value()?)?,
            "-uuid" => {
                let uuid = value()?;
                self.uuid = Some(uuid.parse().map_err(|_| format!("a bad -uuid {uuid}"))?);
            }
            "-cpu" => self.cpu_model = Some(value()?),
            "-kernel" => self.kernel = Some(PathBuf::from(value()?)),
            "-initrd" => self.initrd = Some(PathBuf::from(value()?)),
            "-append" => self.append = Some(value()?),
            "-rtc" => match value()?.as_str() {
                "base=localtime" => self.rtc_localtime = true,
                other => return Err(format!("-rtc {other} is not one the agent knows")),
            },
            "-display" => match value()?.as_str() {
                "none" => {}
                other => return Err(format!("-display {other} is not one the agent knows")),
            },
            "-vnc" => self.vnc = vnc(&value()?)?,
            "-serial" => {
                let serial = value()?;
                if serial == "none" {
                    self.keep("-serial", Some(serial));
                } else if serial.starts_with("unix:") {
                    self.serial_console = true;
                } else {
                    return Err(format!(
                        "-serial {serial} is not a socket the agent can serve"
                    ));
                }
            }
            // Re-added in every runtime, whether there are NICs or not.
            "-net" => {
                let net = value()?;
                if net != "none" {
                    return Err(format!("-net {net} is not one the agent can reproduce"));
                }
            }
            "-netdev" => self.netdev(&value()?)?,
            "-drive" => self.drive(&value()?)?,
            "-device" => self.device(value()?, ganeti)?,
            "-no-reboot" => self.exit_on_reboot = true,
            other if InheritedMachine::keeps(other) => {
                let kept = InheritedMachine::takes_value(other)
                    .then(&mut value)
                    .transpose()?;
                self.keep(other, kept);
            }
            other => {
                return Err(format!(
                    "QEMU option {other} is not one the agent can reproduce"
                ));
            }
        }
        Ok(())
    }

    fn keep(&mut self, option: &str, value: Option<String>) {
        self.kept.push(option.to_owned());
        self.kept.extend(value);
    }

    fn netdev(&mut self, value: &str) -> Result<(), String> {
        let (mut id, mut queues, mut vhost, mut tap) = (None, 0, false, false);
        for (key, v) in properties(value) {
            match (key, v) {
                ("type", "tap") | ("tap", "") => tap = true,
                ("id", v) => id = Some(v.to_owned()),
                ("fd", _) => queues = 1,
                ("fds", v) => queues = v.split(':').count() as u32,
                ("vhost", "on") => vhost = true,
                ("vhostfd" | "vhostfds", _) => {}
                _ => {
                    return Err(format!(
                        "netdev option {key}={v} is not one the agent knows"
                    ));
                }
            }
        }
        let id = id
            .filter(|_| tap && queues > 0)
            .ok_or_else(|| format!("-netdev {value} is not a tap on inherited fds"))?;
        self.netdevs.insert(id, (queues, vhost));
        Ok(())
    }

    fn drive(&mut self, value: &str) -> Result<(), String> {
        let (mut id, mut file) = (None, None);
        let (mut cache, mut aio, mut discard) = (DiskCache::Writeback, DiskAio::Threads, false);
        for (key, v) in properties(value) {
            match (key, v) {
                ("id", v) => id = Some(v.to_owned()),
                ("file", v) => file = Some(v.to_owned()),
                ("format", "raw") | ("if", "none") | ("auto-read-only", "off") => {}
                ("aio", "threads") | ("discard", "ignore") => {}
                ("aio", "native") => aio = DiskAio::Native,
                ("aio", "io_uring") => aio = DiskAio::IoUring,
                ("discard", "unmap") => discard = true,
                ("cache", v) => cache = disk_cache(v)?,
                _ => {
                    return Err(format!(
                        "drive option {key}={v} is not one the agent can reproduce"
                    ));
                }
            }
        }
        match (id, file) {
            (Some(id), Some(file)) => {
                let drive = Drive {
                    file,
                    cache,
                    aio,
                    discard,
                };
                self.drives.insert(id, drive);
                Ok(())
            }
            _ => Err(format!("-drive {value} has no id or no file")),
        }
    }

    fn device(&mut self, value: String, ganeti: &GanetiRuntime) -> Result<(), String> {
        let driver = value.split(',').next().unwrap_or_default();
        if inherited::check_options(&["-device".into(), value.clone()]).is_ok() {
            self.keep("-device", Some(value));
            return Ok(());
        }
        let props: HashMap<&str, &str> = properties(&value).into_iter().skip(1).collect();
        let id = props.get("id").copied().unwrap_or_default();
        let placed = |info: &HvInfo| {
            info.driver == driver
                && props.get("bus") == Some(&info.bus.as_str())
                && props.get("addr") == Some(&format!("{:#x}", info.slot).as_str())
        };
        let allowed = |keys: &[&str]| props.keys().all(|k| keys.contains(k));
        if let Some(nic) = ganeti.nics.iter().find(|n| n.hvinfo.id == id) {
            if !placed(&nic.hvinfo)
                || !allowed(&["id", "bus", "addr", "netdev", "mac", "mq", "vectors"])
                || props.get("netdev") != Some(&id)
            {
                return Err(format!(
                    "NIC device {value} is not as the runtime file places it"
                ));
            }
            let vectors = props.get("vectors").map(|v| v.parse().unwrap_or(0));
            let mac = props.get("mac").copied().unwrap_or_default().to_owned();
            self.nic_devices.push((id.to_owned(), mac, vectors));
            return Ok(());
        }
        if let Some(disk) = ganeti.disks.iter().find(|d| d.hvinfo.id == id) {
            if driver != "virtio-blk-pci"
                || !placed(&disk.hvinfo)
                || !allowed(&["id", "bus", "addr", "drive"])
                || props.get("drive") != Some(&id)
            {
                return Err(format!(
                    "disk device {value} is not a paravirtual disk as the runtime file places it"
                ));
            }
            self.disk_devices.push(id.to_owned());
            return Ok(());
        }
        let placed: Vec<&str> = ganeti
            .nics
            .iter()
            .map(|n| n.hvinfo.id.as_str())
            .chain(ganeti.disks.iter().map(|d| d.hvinfo.id.as_str()))
            .collect();
        Err(format!(
            "QEMU has device {value}, which is not one the runtime file places (it places {})",
            placed.join(", ")
        ))
    }

    fn into_runtime(
        mut self,
        name: &str,
        ganeti: &GanetiRuntime,
        live: &LiveFacts,
    ) -> Result<Runtime, String> {
        let uuid = self.uuid.ok_or("QEMU has no -uuid")?;
        let memory_mib = self.memory_mib.ok_or("QEMU has no -m")?;
        let (vcpus, cpu_topology) = self.smp.unwrap_or((1, None));
        let boot = match (self.kernel.take(), self.append.take()) {
            (Some(kernel), cmdline) => Boot::Kernel {
                kernel,
                initrd: self.initrd.take(),
                cmdline: cmdline.unwrap_or_default(),
            },
            (None, _) => Boot::Disk,
        };
        let nics = self.nics(ganeti)?;
        let disks = self.disks(ganeti)?;
        let mut options = std::mem::take(&mut self.kept);
        options.extend(["-net".into(), "none".into()]);
        let mut runtime = Runtime {
            format_version: RUNTIME_FORMAT_VERSION,
            name: name.to_owned(),
            uuid,
            generation: 1,
            qemu: live.qemu.clone(),
            machine_type: live.machine_type.clone(),
            accelerator: live.accelerator,
            memory_mib,
            vcpus,
            // QEMU's default for the pc and q35 machines.
            cpu_model: self.cpu_model.take().unwrap_or_else(|| "qemu64".into()),
            boot,
            serial_console: self.serial_console,
            vnc_display: self.vnc.map(|(_, display)| display),
            vnc_address: self.vnc.map(|(address, _)| address),
            memory_backing: Default::default(),
            cpu_pinning: None,
            cpu_topology,
            rtc_localtime: self.rtc_localtime,
            exit_on_reboot: self.exit_on_reboot,
            // QEMU's own defaults and Ganeti's -k, -usb and -vga stay as
            // inherited options.
            vnc_keymap: None,
            usb_pointer: None,
            display_adapter: None,
            media: vec![],
            usb_devices: vec![],
            sound: None,
            guest_agent_slot: None,
            never_lose: false,
            pcie_root_ports: vec![],
            first_device_slot: None,
            disks,
            nics,
            balloon_slot: None,
            scsi_controller: None,
            extra_args: Vec::new(),
            vnc_password: false,
            vnc_tls: None,
            spice: None,
            spice_agent_slot: None,
            sandbox: false,
            cgroup: None,
            qemu_user: None,
            chroot: false,
            inherited: Some(InheritedMachine {
                origin: ORIGIN.into(),
                options,
                reserved_slots: (0..ganeti.pci_reservations()).collect(),
            }),
            argv: Vec::new(),
        };
        runtime.argv = hypervisor::argv::render_base(&runtime);
        runtime.validate().map_err(|e| e.to_string())?;
        Ok(runtime)
    }

    fn nics(&self, ganeti: &GanetiRuntime) -> Result<Vec<RuntimeNic>, String> {
        if self.nic_devices.len() != ganeti.nics.len() {
            return Err(format!(
                "QEMU has {} NICs where the runtime file has {}",
                self.nic_devices.len(),
                ganeti.nics.len()
            ));
        }
        ganeti
            .nics
            .iter()
            .map(|nic| {
                let (_, mac, vectors) = self
                    .nic_devices
                    .iter()
                    .find(|(id, _, _)| *id == nic.hvinfo.id)
                    .ok_or_else(|| format!("QEMU has no NIC {}", nic.hvinfo.id))?;
                let &(queues, vhost) = self
                    .netdevs
                    .get(&nic.hvinfo.id)
                    .ok_or_else(|| format!("NIC {} has no tap netdev", nic.hvinfo.id))?;
                if vectors.is_some_and(|v| v != msix_vectors(queues)) {
                    return Err(format!(
                        "NIC {} has other MSI-X vectors than the agent gives {queues} queues",
                        nic.hvinfo.id
                    ));
                }
                nic_spec(nic, mac, queues, vhost).map(|spec| RuntimeNic {
                    spec,
                    slot: Some(nic.hvinfo.slot),
                    qemu_id: Some(nic.hvinfo.id.clone()),
                })
            })
            .collect()
    }

    fn disks(&self, ganeti: &GanetiRuntime) -> Result<Vec<RuntimeDisk>, String> {
        if self.disk_devices.len() != ganeti.disks.len() {
            return Err(format!(
                "QEMU has {} disks where the runtime file has {}",
                self.disk_devices.len(),
                ganeti.disks.len()
            ));
        }
        ganeti
            .disks
            .iter()
            .map(|disk| {
                let drive = self
                    .drives
                    .get(&disk.hvinfo.id)
                    .ok_or_else(|| format!("disk {} has no drive", disk.hvinfo.id))?;
                if drive.file != disk.link {
                    return Err(format!(
                        "disk {} opened {}, not {} as the runtime file says",
                        disk.hvinfo.id, drive.file, disk.link
                    ));
                }
                Ok(RuntimeDisk {
                    spec: disk_spec(disk, drive)?,
                    slot: Some(disk.hvinfo.slot),
                    scsi_target: None,
                    qemu_id: Some(disk.hvinfo.id.clone()),
                })
            })
            .collect()
    }
}

/// The agent's name of a Ganeti device: its Ganeti name where that is one
/// the agent accepts, else one made from its uuid, as Ganeti's class names
/// devices.
fn device_name(kind: &str, name: Option<&str>, uuid: Uuid) -> String {
    match name {
        Some(n) if hypervisor::spec::is_safe_identifier(n, 63) => n.to_owned(),
        _ => format!(
            "{kind}-{}",
            uuid.to_string().split('-').next().unwrap_or_default()
        ),
    }
}

fn nic_spec(nic: &GanetiNic, mac: &str, queues: u32, vhost: bool) -> Result<NicSpec, String> {
    if nic.mode != "bridged" {
        return Err(format!(
            "NIC {} is {}; the agent attaches NICs to bridges only",
            nic.hvinfo.id, nic.mode
        ));
    }
    if !nic.vlan.is_empty() {
        return Err(format!(
            "NIC {} is on VLAN {:?}, which adoption doesn't carry yet",
            nic.hvinfo.id, nic.vlan
        ));
    }
    let model = NicModel::ON_PCI
        .into_iter()
        .find(|m| m.qemu_device() == nic.hvinfo.driver)
        .ok_or_else(|| format!("NIC model {} is not one the agent knows", nic.hvinfo.driver))?;
    if !mac.eq_ignore_ascii_case(&nic.mac) {
        return Err(format!(
            "NIC {} has MAC {mac} in QEMU and {} in the runtime file",
            nic.hvinfo.id, nic.mac
        ));
    }
    Ok(NicSpec {
        name: device_name("nic", nic.name.as_deref(), nic.uuid),
        uuid: nic.uuid,
        mac: mac.parse().map_err(|_| format!("a bad MAC {mac:?}"))?,
        model,
        bridge: Some(nic.link.clone()).filter(|l| !l.is_empty()),
        vhost,
        queues,
        vlan: None,
    })
}

fn disk_spec(disk: &GanetiDisk, drive: &Drive) -> Result<DiskSpec, String> {
    if disk.mode != "rw" {
        return Err(format!(
            "disk {} is read-only, which Ganeti's KVM driver never starts",
            disk.hvinfo.id
        ));
    }
    Ok(DiskSpec {
        name: device_name("disk", disk.name.as_deref(), disk.uuid),
        uuid: disk.uuid,
        path: PathBuf::from(&disk.link),
        format: DiskFormat::Raw,
        read_only: false,
        cache: drive.cache,
        aio: drive.aio,
        discard: drive.discard,
        bus: Default::default(),
    })
}

fn disk_cache(value: &str) -> Result<DiskCache, String> {
    Ok(match value {
        "none" => DiskCache::None,
        "writeback" => DiskCache::Writeback,
        "writethrough" => DiskCache::Writethrough,
        "directsync" => DiskCache::Directsync,
        "unsafe" => DiskCache::Unsafe,
        other => return Err(format!("disk cache {other} is not one the agent knows")),
    })
}

/// `-m 128`, `-m 128M` or `-m size=128M`, in MiB.
fn memory_mib(value: &str) -> Result<u64, String> {
    let size = value.strip_prefix("size=").unwrap_or(value);
    let (digits, factor) = match size.as_bytes().last() {
        Some(b'M' | b'm') => (&size[..size.len() - 1], 1),
        Some(b'G' | b'g') => (&size[..size.len() - 1], 1024),
        _ => (size, 1),
    };
    digits
        .parse::<u64>()
        .map(|n| n * factor)
        .map_err(|_| format!("-m {value} is not a size the agent knows"))
}

/// `-smp 2` or `-smp 4,cores=2,threads=1,sockets=2`.
fn smp(value: &str) -> Result<(u32, Option<CpuTopology>), String> {
    let bad = || format!("-smp {value} is not one the agent knows");
    let mut parts = value.split(',');
    let vcpus = parts.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
    let mut topology = CpuTopology::default();
    let mut shaped = false;
    for part in parts {
        let (key, n) = part.split_once('=').ok_or_else(bad)?;
        let n: u32 = n.parse().map_err(|_| bad())?;
        match key {
            "sockets" => topology.sockets = n,
            "cores" => topology.cores = n,
            "threads" => topology.threads = n,
            _ => return Err(bad()),
        }
        shaped = true;
    }
    Ok((vcpus, shaped.then_some(topology)))
}

/// `-machine type[,accel=…]`, with nothing more: the type is taken from
/// what QEMU says it runs, which resolves an alias.
fn check_machine(value: &str) -> Result<(), String> {
    let mut parts = value.split(',');
    parts.next();
    for (key, v) in parts.map(|p| p.split_once('=').unwrap_or((p, ""))) {
        match (key, v) {
            ("accel", "kvm" | "tcg") => {}
            _ => {
                return Err(format!(
                    "machine option {key}={v} is not one the agent can reproduce"
                ));
            }
        }
    }
    Ok(())
}

/// Ganeti's `-vnc` values: `:5`, `10.0.0.1:5`, `[::1]:5`, or `none`.
fn vnc(value: &str) -> Result<Option<(IpAddr, u32)>, String> {
    if value == "none" {
        return Ok(None);
    }
    let bad = || format!("-vnc {value} is not a plain VNC address the agent can serve");
    let (host, display) = value.rsplit_once(':').ok_or_else(bad)?;
    let display: u32 = display.parse().map_err(|_| bad())?;
    let address = match host.trim_start_matches('[').trim_end_matches(']') {
        "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ip => ip.parse().map_err(|_| bad())?,
    };
    Ok(Some((address, display)))
}

#[cfg(test)]
pub(crate) mod tests {
    use hypervisor::argv::{ExecutionFds, render_execution};
    use hypervisor::qemu_info::QemuVersion;

    use super::*;
    use crate::ganeti::runtime_file::tests::sample;

    const UUID: &str = "0d6e5a3c-4c9b-4b8e-9f6a-1c2d3e4f5a6b";

    /// The command line Ganeti 3.0's driver runs for [`sample`].
    pub(crate) fn ganeti_cmdline() -> Vec<String> {
        let ctrl = "/var/run/ganeti/kvm-hypervisor/ctrl/web1";
        let nic = "nic-5c1b2f0e-8a31-4f5e";
        let disk = "disk-932df160-7a22-4067";
        [
            "/usr/bin/qemu-system-x86_64", "-name", "web1", "-m", "128", "-smp", "1",
            "-pidfile", "/var/run/ganeti/kvm-hypervisor/pid/web1",
            "-device", "virtio-balloon", "-daemonize", "-D", "/var/log/ganeti/kvm/web1.log",
            "-machine", "pc-i440fx-7.2", "-kernel", "/boot/vmlinuz", "-initrd", "/boot/initrd",
            "-append", "root=/dev/vda1 ro console=ttyS0,38400",
            "-monitor", &format!("unix:{ctrl}.monitor,server,nowait"),
            "-serial", &format!("unix:{ctrl}.serial,server,nowait"),
            "-usb", "-display", "none", "-uuid", UUID,
            "-netdev", &format!("type=tap,id={nic},fd=8"),
            "-device", &format!("virtio-net-pci,id={nic},bus=pci.0,addr=0xd,netdev={nic},mac=aa:00:00:12:34:56"),
            "-qmp", &format!("unix:{ctrl}.qmp,server,nowait"),
            "-qmp", &format!("unix:{ctrl}.kvmd,server,nowait"),
            "-device", &format!("virtio-blk-pci,id={disk},bus=pci.0,addr=0xc,drive={disk}"),
            "-drive", &format!("file=/var/run/ganeti/instance-disks/web1:0,format=raw,if=none,aio=threads,id={disk},auto-read-only=off"),
            "-S",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    pub(crate) fn live() -> LiveFacts {
        LiveFacts {
            machine_type: "pc-i440fx-7.2".into(),
            accelerator: ResolvedAccelerator::Tcg,
            qemu: QemuIdentity {
                version: QemuVersion {
                    major: 7,
                    minor: 2,
                    micro: 22,
                },
            },
        }
    }

    pub(crate) fn ganeti() -> GanetiRuntime {
        GanetiRuntime::parse(&sample().to_string()).unwrap()
    }

    fn with(cmdline: &[String], extra: &[&str]) -> Vec<String> {
        let mut changed = cmdline.to_vec();
        changed.extend(extra.iter().map(|&a| a.to_owned()));
        changed
    }

    #[test]
    fn ganetis_machine_is_described_and_its_extras_kept() {
        let rt = translate("web1", &ganeti(), &ganeti_cmdline(), &live()).unwrap();

        assert_eq!(rt.uuid.to_string(), UUID);
        assert_eq!((rt.memory_mib, rt.vcpus), (128, 1));
        assert!(rt.serial_console);
        assert_eq!(rt.cpu_model, "qemu64");
        let inherited = rt.inherited.as_ref().unwrap();
        assert_eq!(
            inherited.options,
            ["-device", "virtio-balloon", "-usb", "-net", "none"]
        );
        assert_eq!(inherited.reserved_slots, (0..12).collect::<Vec<u8>>());
        assert_eq!(
            rt.nics[0].qemu_id.as_deref(),
            Some("nic-5c1b2f0e-8a31-4f5e")
        );
        assert_eq!(
            (rt.nics[0].slot, rt.nics[0].spec.bridge.as_deref()),
            (Some(13), Some("br0"))
        );
        assert_eq!(rt.disks[0].slot, Some(12));
        assert_eq!(rt.disks[0].spec.cache, DiskCache::Writeback);
        assert_eq!(rt.balloon_slot, None);
        assert_eq!(rt.validate(), Ok(()));
    }

    #[test]
    fn the_agent_launches_it_again_with_ganetis_ids_and_qemus_default_devices() {
        let rt = translate("web1", &ganeti(), &ganeti_cmdline(), &live()).unwrap();
        let fds = ExecutionFds {
            qmp: 3,
            serial: Some(4),
            taps: vec![vec![5]],
            vhost: vec![vec![]],
            disks: vec![hypervisor::argv::ImageFd {
                fd: 6,
                kind: hypervisor::disk::ImageKind::File,
            }],
            media: vec![],
            guest_agent: None,
            machine: Default::default(),
            operator_qmp: None,
            chroot: None,
            mode: Default::default(),
        };
        let qemu = hypervisor::qemu_info::QemuInfo {
            binary: "/usr/bin/qemu-system-x86_64".into(),
            version: live().qemu.version,
            version_text: String::new(),
            machines: Vec::new(),
            sandbox: true,
            data_dirs: Vec::new(),
            firmware_dir: None,
            module_dir: None,
            devices: None,
            qmp_commands: Default::default(),
        };
        let argv = render_execution(&rt, &qemu, &fds).join(" ");

        assert!(!argv.contains("-nodefaults"), "{argv}");
        assert!(
            argv.contains("-device virtio-balloon -usb -net none"),
            "{argv}"
        );
        assert!(
            argv.contains("virtio-net-pci,id=nic-5c1b2f0e-8a31-4f5e,netdev=nic-5c1b2f0e-8a31-4f5e,mac=aa:00:00:12:34:56,bus=pci.0,addr=0xd"),
            "{argv}"
        );
        assert!(
            argv.contains("virtio-blk-pci,id=disk-932df160-7a22-4067,drive=fmt-932df1607a22,bus=pci.0,addr=0xc,write-cache=on -"),
            "{argv}"
        );
        assert!(!argv.contains("bootindex"), "{argv}");
    }

    #[test]
    fn what_the_agent_cant_reproduce_is_refused_by_name() {
        let cmdline = ganeti_cmdline();
        let refusal = |cmdline: &[String], ganeti: &GanetiRuntime| {
            translate("web1", ganeti, cmdline, &live()).unwrap_err()
        };
        let spice = with(&cmdline, &["-spice", "addr=0.0.0.0,port=5900"]);
        assert!(refusal(&spice, &ganeti()).contains("-spice"));
        let guest_agent = with(
            &cmdline,
            &["-chardev", "socket,path=/x,server,nowait,id=qga0"],
        );
        assert!(refusal(&guest_agent, &ganeti()).contains("-chardev"));

        let mut moved = ganeti();
        moved.nics[0].hvinfo.slot = 14;
        assert!(refusal(&cmdline, &moved).contains("not as the runtime file places it"));
        let mut routed = ganeti();
        routed.nics[0].mode = "routed".into();
        assert!(refusal(&cmdline, &routed).contains("routed"));
        let mut elsewhere = ganeti();
        elsewhere.disks[0].link = "/dev/other".into();
        assert!(refusal(&cmdline, &elsewhere).contains("not /dev/other"));
    }

    #[test]
    fn a_guest_that_stops_on_reboot_keeps_doing_so() {
        let cmdline = with(&ganeti_cmdline(), &["-no-reboot"]);
        let rt = translate("web1", &ganeti(), &cmdline, &live()).unwrap();
        assert!(rt.exit_on_reboot);
        assert!(rt.argv.iter().any(|a| a == "-no-reboot"));
    }

    #[test]
    fn ganetis_other_spellings_are_read() {
        assert_eq!(memory_mib("size=2G"), Ok(2048));
        assert_eq!(
            smp("4,cores=2,threads=1,sockets=2"),
            Ok((
                4,
                Some(CpuTopology {
                    sockets: 2,
                    cores: 2,
                    threads: 1
                })
            ))
        );
        assert_eq!(vnc(":5"), Ok(Some((IpAddr::V4(Ipv4Addr::UNSPECIFIED), 5))));
        assert_eq!(vnc("[::1]:7"), Ok(Some(("::1".parse().unwrap(), 7))));
        assert!(vnc("unix:/run/vnc").is_err());
        assert!(vnc("0.0.0.0:1,password").is_err());
    }
}
