//! `kvm-agent device`: hot-add, remove and list the devices of running
//! instances.

use anyhow::Context;
use clap::Subcommand;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

use super::Printer;

#[derive(Debug, Subcommand)]
pub(super) enum DeviceCommand {
    /// Hot-add a NIC.
    AddNic {
        /// Instance name.
        instance: String,
        /// Guest MAC.
        #[arg(long)]
        mac: String,
        /// Device name (default: nic-<first 8 of a new uuid>).
        #[arg(long)]
        name: Option<String>,
        /// virtio or e1000.
        #[arg(long, default_value = "virtio")]
        model: String,
        /// Bridge to attach the tap to.
        #[arg(long)]
        bridge: Option<String>,
        /// In-kernel vhost-net.
        #[arg(long)]
        vhost: bool,
        /// Queue pairs (multiqueue when more than 1).
        #[arg(long, default_value_t = 1)]
        queues: u32,
    },
    /// Hot-add a disk.
    AddDisk {
        /// Instance name.
        instance: String,
        /// Absolute path of the image.
        #[arg(long)]
        path: String,
        /// Device name (default: disk-<first 8 of a new uuid>).
        #[arg(long)]
        name: Option<String>,
        /// raw or qcow2.
        #[arg(long, default_value = "raw")]
        format: String,
        /// Attach read-only.
        #[arg(long)]
        read_only: bool,
        /// none, writeback, writethrough, directsync or unsafe.
        #[arg(long, default_value = "none")]
        cache: String,
    },
    /// Hot-remove a device (the guest must release it).
    Remove {
        /// Instance name.
        instance: String,
        /// Device name.
        device: String,
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

pub(super) fn print_device(d: &pb::DeviceInfo) {
    let kind = if d.kind == pb::DeviceKind::Nic as i32 {
        "nic "
    } else {
        "disk"
    };
    let tap = if d.tap.is_empty() {
        String::new()
    } else {
        format!(" tap={}", d.tap)
    };
    println!(
        "{kind} {:<12} slot {:#04x}  {}{tap}",
        d.name, d.pci_slot, d.detail
    );
}

fn default_device_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn enum_value(
    what: &str,
    prefix: &str,
    value: &str,
    parse: impl Fn(&str) -> Option<i32>,
) -> anyhow::Result<i32> {
    parse(&format!("{prefix}{}", value.to_uppercase()))
        .with_context(|| format!("unknown {what} {value:?}"))
}

/// Runs `kvm-agent device`.
pub(super) async fn run(
    mut client: NodeAgentClient<Channel>,
    command: DeviceCommand,
    out: Printer,
) -> anyhow::Result<()> {
    let changed = match command {
        DeviceCommand::AddNic {
            instance,
            mac,
            name,
            model,
            bridge,
            vhost,
            queues,
        } => {
            let model = enum_value("NIC model", "NIC_MODEL_", &model, |s| {
                pb::NicModel::from_str_name(s).map(|m| m as i32)
            })?;
            let nic = pb::NicSpec {
                name: name.unwrap_or_else(|| default_device_name("nic")),
                mac,
                model,
                bridge: bridge.unwrap_or_default(),
                vhost,
                queues,
                ..Default::default()
            };
            let request = pb::AddNicRequest {
                name: instance,
                nic: Some(nic),
            };
            client.add_nic(request).await?
        }
        DeviceCommand::AddDisk {
            instance,
            path,
            name,
            format,
            read_only,
            cache,
        } => {
            let disk = pb::DiskSpec {
                name: name.unwrap_or_else(|| default_device_name("disk")),
                path,
                format: enum_value("disk format", "DISK_FORMAT_", &format, |s| {
                    pb::DiskFormat::from_str_name(s).map(|f| f as i32)
                })?,
                cache: enum_value("cache mode", "DISK_CACHE_", &cache, |s| {
                    pb::DiskCache::from_str_name(s).map(|c| c as i32)
                })?,
                read_only,
                ..Default::default()
            };
            let request = pb::AddDiskRequest {
                name: instance,
                disk: Some(disk),
            };
            client.add_disk(request).await?
        }
        DeviceCommand::Remove { instance, device } => {
            let request = pb::RemoveDeviceRequest {
                name: instance,
                device,
            };
            client.remove_device(request).await?
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
