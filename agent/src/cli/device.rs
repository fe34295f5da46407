//! `kvm-agent device`: hot-add, remove and list the devices of running
//! instances, and change the media of their drives.

use clap::{Args, Subcommand};
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

use super::Printer;
use super::options::EnumParser;

#[derive(Debug, Subcommand)]
pub(super) enum DeviceCommand {
    /// Hot-add a NIC.
    AddNic(AddNicArgs),
    /// Hot-add a disk.
    AddDisk(AddDiskArgs),
    /// Hot-remove a device (the guest must release it).
    Remove {
        /// Instance name.
        instance: String,
        /// Device name.
        device: String,
    },
    /// Move a running NIC's tap to another bridge; the guest's link stays up.
    SetBridge {
        /// Instance name.
        instance: String,
        /// The NIC's device name.
        device: String,
        /// The bridge to join; leave it out for none.
        #[arg(long)]
        bridge: Option<String>,
    },
    /// Put another image into a CD-ROM or floppy drive, or eject its medium.
    ChangeMedium {
        /// Instance name.
        instance: String,
        /// The drive's device name.
        drive: String,
        /// The new image; leave it out to eject.
        image: Option<String>,
    },
    /// List an instance's devices.
    List {
        /// Instance name.
        instance: String,
    },
    /// Show what hotplug can do for an instance.
    Support {
        /// Instance name.
        instance: String,
    },
}

#[derive(Debug, Args)]
pub(super) struct AddNicArgs {
    /// Instance name.
    instance: String,
    /// Guest MAC.
    #[arg(long)]
    mac: String,
    /// Device name (default: nic-<first 8 of a new uuid>).
    #[arg(long)]
    name: Option<String>,
    /// NIC model.
    #[arg(long, default_value = "virtio", value_parser = EnumParser::new("NicModel", "NIC model"))]
    model: i32,
    /// Bridge to attach the tap to.
    #[arg(long)]
    bridge: Option<String>,
    /// In-kernel vhost-net.
    #[arg(long)]
    vhost: bool,
    /// Queue pairs (multiqueue when more than 1).
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// The VLANs of the tap's bridge port, in Ganeti's syntax: `.100`
    /// (untagged), `:100:200` (tagged), `.100:200` (both). The bridge must
    /// filter VLANs.
    #[arg(long, value_parser = super::spec::parse_vlan)]
    vlan: Option<pb::VlanSpec>,
}

impl AddNicArgs {
    fn request(self) -> pb::AddNicRequest {
        let nic = pb::NicSpec {
            name: self.name.unwrap_or_else(|| default_device_name("nic")),
            mac: self.mac,
            model: self.model,
            bridge: self.bridge.unwrap_or_default(),
            vhost: self.vhost,
            queues: self.queues,
            vlan: self.vlan,
            ..Default::default()
        };
        pb::AddNicRequest {
            name: self.instance,
            nic: Some(nic),
        }
    }
}

#[derive(Debug, Args)]
pub(super) struct AddDiskArgs {
    /// Instance name.
    instance: String,
    /// Absolute path of the image.
    #[arg(long)]
    path: String,
    /// Device name (default: disk-<first 8 of a new uuid>).
    #[arg(long)]
    name: Option<String>,
    /// Image format.
    #[arg(long, default_value = "raw", value_parser = EnumParser::new("DiskFormat", "disk format"))]
    format: i32,
    /// Attach read-only.
    #[arg(long)]
    read_only: bool,
    /// Host cache mode.
    #[arg(long, default_value = "none", value_parser = EnumParser::new("DiskCache", "cache mode"))]
    cache: i32,
    /// How QEMU submits the disk's I/O: threads, native or io_uring.
    #[arg(long, default_value = "threads", value_parser = EnumParser::new("DiskAio", "AIO"))]
    aio: i32,
    /// Let the guest's discards free the image's blocks.
    #[arg(long)]
    discard: bool,
}

impl AddDiskArgs {
    fn request(self) -> pb::AddDiskRequest {
        let disk = pb::DiskSpec {
            name: self.name.unwrap_or_else(|| default_device_name("disk")),
            path: self.path,
            format: self.format,
            cache: self.cache,
            read_only: self.read_only,
            aio: self.aio,
            discard: self.discard,
            ..Default::default()
        };
        pb::AddDiskRequest {
            name: self.instance,
            disk: Some(disk),
        }
    }
}

pub(super) fn print_device(d: &pb::DeviceInfo) {
    let kind = match pb::DeviceKind::try_from(d.kind) {
        Ok(pb::DeviceKind::Nic) => "nic ",
        Ok(pb::DeviceKind::Cdrom) => "cdrom",
        Ok(pb::DeviceKind::Floppy) => "floppy",
        _ => "disk",
    };
    let tap = if d.tap.is_empty() {
        String::new()
    } else {
        format!(" tap={}", d.tap)
    };
    let place =
        match d.kind == pb::DeviceKind::Cdrom as i32 || d.kind == pb::DeviceKind::Floppy as i32 {
            true => "no slot".to_owned(),
            false => format!("slot {:#04x}", d.pci_slot),
        };
    let detail = match d.detail.as_str() {
        "" => "(empty)",
        detail => detail,
    };
    println!("{kind} {:<12} {place}  {detail}{tap}", d.name);
}

fn default_device_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Runs `kvm-agent device`.
pub(super) async fn run(
    mut client: NodeAgentClient<Channel>,
    command: DeviceCommand,
    out: Printer,
) -> anyhow::Result<()> {
    let changed = match command {
        DeviceCommand::AddNic(args) => client.add_nic(args.request()).await?,
        DeviceCommand::AddDisk(args) => client.add_disk(args.request()).await?,
        DeviceCommand::Remove { instance, device } => {
            let request = pb::RemoveDeviceRequest {
                name: instance,
                device,
            };
            client.remove_device(request).await?
        }
        DeviceCommand::SetBridge {
            instance,
            device,
            bridge,
        } => {
            let request = pb::SetNicBridgeRequest {
                name: instance,
                device,
                bridge: bridge.unwrap_or_default(),
            };
            client.set_nic_bridge(request).await?
        }
        DeviceCommand::ChangeMedium {
            instance,
            drive,
            image,
        } => {
            let request = pb::ChangeMediumRequest {
                name: instance,
                drive: drive.clone(),
                image: image.unwrap_or_default(),
            };
            let info = client.change_medium(request).await?.into_inner();
            let device = info.devices.into_iter().find(|d| d.name == drive);
            out.show(&device.unwrap_or_default(), print_device);
            return Ok(());
        }
        DeviceCommand::List { instance } => {
            let request = pb::GetInstanceRequest { name: instance };
            let info = client.get_instance(request).await?.into_inner();
            out.show_all(&info.devices, |devices| {
                devices.iter().for_each(print_device);
            });
            return Ok(());
        }
        DeviceCommand::Support { instance } => {
            let request = pb::HotplugSupportRequest { name: instance };
            let support = client.hotplug_support(request).await?.into_inner();
            out.show(&support, print_support);
            return Ok(());
        }
    };
    let device = changed.into_inner().device.unwrap_or_default();
    out.show(&device, print_device);
    Ok(())
}

fn print_support(support: &pb::HotplugSupportResponse) {
    let rows = [
        ("nic", &support.nic),
        ("disk", &support.disk),
        ("remove", &support.remove),
        ("vhost", &support.vhost),
    ];
    for (what, capability) in rows {
        let c = capability.clone().unwrap_or_default();
        let answer = if c.supported { "yes" } else { "no" };
        let reason = if c.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.reason)
        };
        println!("{what:<7} {answer}{reason}");
    }
}
