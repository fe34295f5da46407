//! `kvm-agent device`: hot-add, remove and list the devices of running
//! instances.

use anyhow::Context;
use clap::Subcommand;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

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

pub(super) fn device_json(d: &pb::DeviceInfo) -> Value {
    json!({
        "kind": pb::DeviceKind::try_from(d.kind)
            .map(|k| k.as_str_name().trim_start_matches("DEVICE_KIND_").to_lowercase())
            .unwrap_or_default(),
        "name": d.name,
        "uuid": d.uuid,
        "pci_slot": d.pci_slot,
        "qemu_id": d.qemu_id,
        "detail": d.detail,
        "tap": d.tap,
    })
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
    json_out: bool,
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
            client
                .add_nic(pb::AddNicRequest {
                    name: instance,
                    nic: Some(nic),
                })
                .await?
                .into_inner()
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
            client
                .add_disk(pb::AddDiskRequest {
                    name: instance,
                    disk: Some(disk),
                })
                .await?
                .into_inner()
        }
        DeviceCommand::Remove { instance, device } => client
            .remove_device(pb::RemoveDeviceRequest {
                name: instance,
                device,
            })
            .await?
            .into_inner(),
        DeviceCommand::List { instance } => {
            let info = client
                .get_instance(pb::GetInstanceRequest { name: instance })
                .await?
                .into_inner();
            if json_out {
                println!(
                    "{}",
                    Value::Array(info.devices.iter().map(device_json).collect())
                );
            } else {
                info.devices.iter().for_each(print_device);
            }
            return Ok(());
        }
        DeviceCommand::Support { instance } => {
            let s = client
                .hotplug_support(pb::HotplugSupportRequest { name: instance })
                .await?
                .into_inner();
            let rows = [
                ("nic", s.nic),
                ("disk", s.disk),
                ("remove", s.remove),
                ("vhost", s.vhost),
            ];
            if json_out {
                let map: serde_json::Map<String, Value> = rows
                    .iter()
                    .map(|(k, c)| {
                        let c = c.clone().unwrap_or_default();
                        (
                            (*k).to_owned(),
                            json!({ "supported": c.supported, "reason": c.reason }),
                        )
                    })
                    .collect();
                println!("{}", Value::Object(map));
            } else {
                for (k, c) in rows {
                    let c = c.unwrap_or_default();
                    println!(
                        "{k:<7} {}{}",
                        if c.supported { "yes" } else { "no" },
                        if c.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", c.reason)
                        }
                    );
                }
            }
            return Ok(());
        }
    };
    let device = changed.device.unwrap_or_default();
    if json_out {
        println!("{}", device_json(&device));
    } else {
        print_device(&device);
    }
    Ok(())
}
