//! The instance spec as flags: `instance start`, and `instance reboot
//! --mode hard`.

use clap::{Args, Parser};
use kvm_agent_proto::v1 as pb;

use super::options::{EnumParser, OptionList};

#[derive(Debug, Args, Clone)]
pub(super) struct SpecArgs {
    /// Instance name.
    #[arg(long = "name", id = "instance_name")]
    name: String,
    #[command(flatten)]
    options: SpecOptions,
}

/// An instance spec but its name, which a reboot takes as its argument.
#[derive(Debug, Args, Clone, PartialEq)]
pub(super) struct SpecOptions {
    /// Instance uuid (default: kept from the record, or new).
    #[arg(long)]
    uuid: Option<String>,
    /// Memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// A disk: path=P[,name=N][,format=raw|qcow2][,ro][,cache=none|writeback|...][,bus=virtio|ide]; repeat for more.
    #[arg(long, value_parser = parse_disk)]
    disk: Vec<pb::DiskSpec>,
    /// A NIC: mac=M[,name=N][,model=virtio|e1000|rtl8139|...][,bridge=B][,vlan=.100:200][,queues=Q][,vhost]; repeat for more.
    #[arg(long, value_parser = parse_nic)]
    nic: Vec<pb::NicSpec>,
    /// Kernel for direct boot.
    #[arg(long)]
    kernel: Option<String>,
    /// Initrd for direct boot.
    #[arg(long)]
    initrd: Option<String>,
    /// Kernel command line.
    #[arg(long)]
    append: Option<String>,
    /// Machine type.
    #[arg(long, default_value = "pc")]
    machine: String,
    /// Accelerator (auto: KVM when /dev/kvm can be opened, TCG otherwise).
    #[arg(long, default_value = "auto", value_parser = EnumParser::new("Accelerator", "accelerator"))]
    accel: i32,
    /// Pin vCPU threads to host CPUs: one list for all vCPUs ("0-1") or
    /// one per vCPU, separated by ':' ("1:0").
    #[arg(long)]
    cpu_mask: Option<String>,
    /// Share of CPU time against other instances (cgroup cpu.weight, 1-10000).
    #[arg(long)]
    cpu_weight: Option<u32>,
    /// How the guest sees its vCPUs grouped: sockets=S,cores=C,threads=T
    /// (any of them; QEMU derives the rest).
    #[arg(long, value_parser = parse_topology)]
    cpu_topology: Option<pb::CpuTopology>,
    /// The guest's real-time clock in the node's local time, not UTC.
    #[arg(long)]
    localtime: bool,
    /// Stop the instance when its guest reboots, instead of rebooting it.
    #[arg(long)]
    exit_on_reboot: bool,
    /// The keymap VNC assumes, e.g. de or en-gb.
    #[arg(long, requires = "vnc")]
    vnc_keymap: Option<String>,
    /// A pointing device on USB: tablet or mouse.
    #[arg(long, default_value = "unspecified", hide_default_value = true, value_parser = EnumParser::new("UsbPointer", "USB pointer"))]
    usb_pointer: i32,
    /// The display adapter: std, cirrus, vmware, qxl, virtio or none.
    #[arg(long, default_value = "unspecified", hide_default_value = true, value_parser = EnumParser::new("DisplayAdapter", "display adapter"))]
    display_adapter: i32,
    /// Serial console on a unix socket.
    #[arg(long)]
    serial: bool,
    /// VNC display (port 5900 + display).
    #[arg(long)]
    vnc: Option<u32>,
    /// The IP address VNC listens on [default: 127.0.0.1].
    #[arg(long, requires = "vnc")]
    vnc_address: Option<String>,
    /// VNC asks viewers for the password `instance set-display-password` sets.
    #[arg(long, requires = "vnc")]
    vnc_password: bool,
    /// VNC speaks TLS: anonymous, or with --vnc-x509-dir.
    #[arg(long, requires = "vnc")]
    vnc_tls: bool,
    /// The node's x509 files for VNC (ca-cert.pem, server-cert.pem, server-key.pem).
    #[arg(long, requires = "vnc_tls")]
    vnc_x509_dir: Option<String>,
    /// VNC viewers must present a certificate the CA signed.
    #[arg(long, requires = "vnc_x509_dir")]
    vnc_x509_verify: bool,
    /// A SPICE display on this TCP port, instead of VNC.
    #[arg(long, conflicts_with = "vnc")]
    spice: Option<u16>,
    /// The IP address SPICE listens on [default: 127.0.0.1].
    #[arg(long, requires = "spice")]
    spice_address: Option<String>,
    /// SPICE asks clients for the password `instance set-display-password` sets.
    #[arg(long, requires = "spice")]
    spice_password: bool,
    /// SPICE only over TLS: cert=FILE,key=FILE,ca=FILE[,ciphers=LIST].
    #[arg(long, requires = "spice", value_parser = parse_spice_tls)]
    spice_tls: Option<pb::SpiceTls>,
    /// The channel of the guest's SPICE agent (mouse, clipboard).
    #[arg(long, requires = "spice")]
    spice_vdagent: bool,
    /// CPU model.
    #[arg(long)]
    cpu: Option<String>,
    /// Back guest RAM with this file, or a file in this directory.
    #[arg(long)]
    memory_file: Option<String>,
    /// Map --memory-file shared.
    #[arg(long, requires = "memory_file")]
    memory_share: bool,
    /// Take guest RAM from huge pages (from --memory-file's hugetlbfs mount, default /dev/hugepages).
    #[arg(long)]
    hugepages: bool,
    /// A CD-ROM drive: [image=]PATH[,name=N], or name=N alone for an empty drive; repeat for a second.
    #[arg(long, value_parser = parse_cdrom)]
    cdrom: Vec<pb::MediaDriveSpec>,
    /// A floppy drive: [image=]PATH[,name=N].
    #[arg(long, value_parser = parse_floppy)]
    floppy: Option<pb::MediaDriveSpec>,
    /// A USB input device beside the pointer: keyboard, mouse, tablet or wacom-tablet; repeat for more.
    #[arg(long, value_parser = EnumParser::new("UsbDevice", "USB device"))]
    usb_device: Vec<i32>,
    /// A sound card: hda, ac97, es1370, sb16, adlib, gus, cs4231a or pcspk.
    #[arg(long, default_value = "unspecified", hide_default_value = true, value_parser = EnumParser::new("SoundCard", "sound card"))]
    sound_card: i32,
    /// The SCSI controller: virtio-scsi, lsi or megasas; a disk on SCSI
    /// (bus=scsi-hd, scsi-cd, scsi-block, scsi-generic) implies virtio-scsi.
    #[arg(long, default_value = "unspecified", hide_default_value = true, value_parser = EnumParser::new("ScsiController", "SCSI controller"))]
    scsi_controller: i32,
    /// Extra QEMU arguments, e.g. "-device virtio-rng-pci"; the node must
    /// allow each option (allowed_extra_options).
    #[arg(long, allow_hyphen_values = true)]
    qemu_extra: Option<String>,
    /// The PCI slot disks and NICs start from (Ganeti's kvm_pci_reservations).
    #[arg(long)]
    first_device_slot: Option<u32>,
    /// On q35, the spare PCIe root ports that hot-adds take [default: 4].
    #[arg(long)]
    hotplug_ports: Option<u32>,
    /// Never let a migration of the instance switch to postcopy, where a broken link loses it.
    #[arg(long)]
    never_lose: bool,
    /// A channel for the QEMU guest agent in the guest (`instance guest-agent`).
    #[arg(long)]
    guest_agent: bool,
    /// Without --kernel, what the firmware boots first: disk, cdrom, floppy or network.
    #[arg(long, default_value = "unspecified", hide_default_value = true, value_parser = EnumParser::new("BootDevice", "boot device"))]
    boot: i32,
}

/// Reads `--cdrom`.
fn parse_cdrom(text: &str) -> Result<pb::MediaDriveSpec, String> {
    parse_drive("CD-ROM", pb::MediaKind::Cdrom, text)
}

/// Reads `--floppy`.
fn parse_floppy(text: &str) -> Result<pb::MediaDriveSpec, String> {
    parse_drive("floppy", pb::MediaKind::Floppy, text)
}

/// A drive: a bare path is its image.
fn parse_drive(
    what: &'static str,
    kind: pb::MediaKind,
    text: &str,
) -> Result<pb::MediaDriveSpec, String> {
    let text = match text.starts_with('/') {
        true => format!("image={text}"),
        false => text.to_owned(),
    };
    let options = OptionList::parse(what, &["image", "name"], &text)?;
    Ok(pb::MediaDriveSpec {
        name: options.value("name")?.unwrap_or_default(),
        kind: kind as i32,
        image: options.value("image")?.unwrap_or_default(),
    })
}

/// Reads `--disk`.
fn parse_disk(text: &str) -> Result<pb::DiskSpec, String> {
    let keys = [
        "path", "name", "uuid", "format", "ro", "readonly", "cache", "aio", "discard", "bus",
    ];
    let options = OptionList::parse("disk", &keys, text)?;
    let format = EnumParser::new("DiskFormat", "disk format");
    let cache = EnumParser::new("DiskCache", "cache mode");
    let aio = EnumParser::new("DiskAio", "AIO");
    let bus = EnumParser::new("DiskBus", "disk bus");
    Ok(pb::DiskSpec {
        name: options.value("name")?.unwrap_or_default(),
        uuid: options.value("uuid")?.unwrap_or_default(),
        path: options.value("path")?.unwrap_or_default(),
        format: options.parsed("format", |v| format.parse(v))?.unwrap_or(0),
        read_only: options.flag("ro")? || options.flag("readonly")?,
        cache: options.parsed("cache", |v| cache.parse(v))?.unwrap_or(0),
        aio: options.parsed("aio", |v| aio.parse(v))?.unwrap_or(0),
        discard: options.flag("discard")?,
        bus: options.parsed("bus", |v| bus.parse(v))?.unwrap_or(0),
    })
}

/// Reads `--nic`.
fn parse_nic(text: &str) -> Result<pb::NicSpec, String> {
    let keys = [
        "mac", "name", "uuid", "bridge", "queues", "vhost", "model", "vlan",
    ];
    let options = OptionList::parse("NIC", &keys, text)?;
    let model = EnumParser::new("NicModel", "NIC model");
    let count = |v: &str| v.parse().map_err(|_| format!("{v:?} is not a count"));
    Ok(pb::NicSpec {
        name: options.value("name")?.unwrap_or_default(),
        uuid: options.value("uuid")?.unwrap_or_default(),
        mac: options.value("mac")?.unwrap_or_default(),
        model: options.parsed("model", |v| model.parse(v))?.unwrap_or(0),
        bridge: options.value("bridge")?.unwrap_or_default(),
        vhost: options.flag("vhost")?,
        queues: options.parsed("queues", count)?.unwrap_or(0),
        vlan: options.parsed("vlan", parse_vlan)?,
    })
}

/// SPICE's TLS files: cert=FILE,key=FILE,ca=FILE[,ciphers=LIST].
fn parse_spice_tls(text: &str) -> Result<pb::SpiceTls, String> {
    let options = OptionList::parse("SPICE TLS", &["cert", "key", "ca", "ciphers"], text)?;
    let file = |key: &str| {
        options
            .value(key)?
            .ok_or_else(|| format!("SPICE TLS needs {key}=FILE"))
    };
    Ok(pb::SpiceTls {
        cert: file("cert")?,
        key: file("key")?,
        ca: file("ca")?,
        ciphers: options.value("ciphers")?.unwrap_or_default(),
    })
}

/// A CPU topology: sockets=S,cores=C,threads=T, any of them.
fn parse_topology(text: &str) -> Result<pb::CpuTopology, String> {
    let options = OptionList::parse("CPU topology", &["sockets", "cores", "threads"], text)?;
    let count = |v: &str| v.parse().map_err(|_| format!("{v:?} is not a count"));
    Ok(pb::CpuTopology {
        sockets: options.parsed("sockets", count)?.unwrap_or(0),
        cores: options.parsed("cores", count)?.unwrap_or(0),
        threads: options.parsed("threads", count)?.unwrap_or(0),
    })
}

/// VLANs in Ganeti's syntax: `.100`, `:100:200` or `.100:200`.
pub(super) fn parse_vlan(text: &str) -> Result<pb::VlanSpec, String> {
    text.parse::<hypervisor::spec::Vlan>()
        .map(|v| crate::convert::vlan_to_proto(&v))
}

/// Names the devices given without a name by their place: disk0, nic1...
fn named<T>(devices: &[T], prefix: &str, name: impl Fn(&mut T) -> &mut String) -> Vec<T>
where
    T: Clone,
{
    let mut devices = devices.to_vec();
    for (i, device) in devices.iter_mut().enumerate() {
        let name = name(device);
        if name.is_empty() {
            *name = format!("{prefix}{i}");
        }
    }
    devices
}

impl SpecArgs {
    pub(super) fn to_proto(&self) -> pb::InstanceSpec {
        self.options.to_proto(&self.name)
    }
}

/// The spec options as they are when none is given.
#[derive(Debug, Parser)]
struct UnsetSpecOptions {
    #[command(flatten)]
    options: SpecOptions,
}

impl SpecOptions {
    /// Whether any option was given, as far as values show.
    pub(super) fn any_given(&self) -> bool {
        UnsetSpecOptions::try_parse_from(["kvm-agent"]).is_ok_and(|unset| unset.options != *self)
    }

    pub(super) fn to_proto(&self, name: &str) -> pb::InstanceSpec {
        pb::InstanceSpec {
            name: name.to_owned(),
            uuid: self.uuid.clone().unwrap_or_default(),
            memory_mib: self.memory,
            vcpus: self.vcpus,
            disks: named(&self.disk, "disk", |d| &mut d.name),
            nics: named(&self.nic, "nic", |n| &mut n.name),
            boot: Some(pb::BootSpec {
                kernel: self.kernel.clone().unwrap_or_default(),
                initrd: self.initrd.clone().unwrap_or_default(),
                cmdline: self.append.clone().unwrap_or_default(),
                device: self.boot,
            }),
            machine_type: self.machine.clone(),
            accelerator: self.accel,
            serial_console: self.serial,
            vnc: self.vnc.map(|display| pb::VncSpec {
                display,
                address: self.vnc_address.clone().unwrap_or_default(),
                keymap: self.vnc_keymap.clone().unwrap_or_default(),
                password: self.vnc_password,
                tls: self.vnc_tls.then(|| pb::VncTls {
                    x509_dir: self.vnc_x509_dir.clone().unwrap_or_default(),
                    verify_client: self.vnc_x509_verify,
                }),
            }),
            cpu_model: self.cpu.clone().unwrap_or_default(),
            cpu_mask: self.cpu_mask.clone().unwrap_or_default(),
            cpu_weight: self.cpu_weight.unwrap_or_default(),
            cpu_topology: self.cpu_topology,
            rtc_localtime: self.localtime,
            exit_on_reboot: self.exit_on_reboot,
            usb_pointer: self.usb_pointer,
            display_adapter: self.display_adapter,
            memory: (self.memory_file.is_some() || self.hugepages).then(|| pb::MemoryBacking {
                file: self.memory_file.clone().unwrap_or_default(),
                share: self.memory_share,
                hugepages: self.hugepages,
            }),
            media: self.cdrom.iter().chain(&self.floppy).cloned().collect(),
            usb_devices: self.usb_device.clone(),
            sound_card: self.sound_card,
            guest_agent: self.guest_agent,
            never_lose: self.never_lose,
            hotplug_ports: self.hotplug_ports,
            first_device_slot: self.first_device_slot.unwrap_or_default(),
            scsi_controller: self.scsi_controller,
            spice: self.spice.map(|port| pb::SpiceSpec {
                port: port.into(),
                address: self.spice_address.clone().unwrap_or_default(),
                password: self.spice_password,
                tls: self.spice_tls.clone(),
                vdagent: self.spice_vdagent,
                ..Default::default()
            }),
            extra_args: self
                .qemu_extra
                .iter()
                .flat_map(|e| e.split_whitespace())
                .map(str::to_owned)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_take_a_bare_path_as_their_image() {
        let options = UnsetSpecOptions::try_parse_from([
            "kvm-agent",
            "--cdrom",
            "/srv/iso/install.iso,name=install",
            "--cdrom",
            "name=spare",
            "--floppy",
            "/srv/img/drivers.img",
            "--boot",
            "cdrom",
        ])
        .unwrap()
        .options;
        let spec = options.to_proto("web");
        let drives: Vec<(&str, i32, &str)> = spec
            .media
            .iter()
            .map(|d| (d.name.as_str(), d.kind, d.image.as_str()))
            .collect();
        let (cdrom, floppy) = (pb::MediaKind::Cdrom as i32, pb::MediaKind::Floppy as i32);
        assert_eq!(
            drives,
            [
                ("install", cdrom, "/srv/iso/install.iso"),
                ("spare", cdrom, ""),
                ("", floppy, "/srv/img/drivers.img"),
            ]
        );
        assert_eq!(spec.boot.unwrap().device, pb::BootDevice::Cdrom as i32);
    }

    #[test]
    fn devices_read_every_key_and_get_a_name_by_their_place() {
        let options = UnsetSpecOptions::try_parse_from([
            "kvm-agent",
            "--disk",
            "path=/srv/a,,b.img,format=QCOW2,ro,cache=writeback",
            "--disk",
            "path=/srv/c.img,name=data,readonly=off",
            "--nic",
            "mac=52:54:00:00:00:01,model=e1000,bridge=br0,queues=2,vhost,vlan=.100:200",
            "--cpu-topology",
            "cores=2,threads=2",
            "--localtime",
        ])
        .unwrap()
        .options;
        let spec = options.to_proto("web");
        let root = &spec.disks[0];
        assert_eq!(root.name, "disk0");
        assert_eq!(root.path, "/srv/a,b.img");
        assert_eq!(root.format, pb::DiskFormat::Qcow2 as i32);
        assert_eq!(root.cache, pb::DiskCache::Writeback as i32);
        assert!(root.read_only);
        assert_eq!(spec.disks[1].name, "data");
        assert!(!spec.disks[1].read_only);
        let nic = &spec.nics[0];
        assert_eq!(nic.name, "nic0");
        assert_eq!(nic.model, pb::NicModel::E1000 as i32);
        assert_eq!(
            (nic.bridge.as_str(), nic.queues, nic.vhost),
            ("br0", 2, true)
        );
        let topology = spec.cpu_topology.unwrap();
        assert_eq!(
            (topology.sockets, topology.cores, topology.threads),
            (0, 2, 2)
        );
        assert!(spec.rtc_localtime);
        let vlan = nic.vlan.as_ref().unwrap();
        assert_eq!((vlan.untagged, vlan.tagged.as_slice()), (100, &[200][..]));
        assert_eq!(spec.accelerator, pb::Accelerator::Auto as i32);
    }

    #[test]
    fn a_bad_device_option_names_the_flag_and_the_choices() {
        let error = UnsetSpecOptions::try_parse_from(["kvm-agent", "--nic", "mac=m,model=rtl"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--nic"), "{error}");
        assert!(
            error.contains("unknown NIC model \"rtl\"; use virtio, e1000, rtl8139, ne2k_pci,"),
            "{error}"
        );
    }
}
