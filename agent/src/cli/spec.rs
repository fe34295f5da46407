//! The instance spec as flags: `instance start`, and `instance reboot
//! --mode hard`.

use anyhow::{Context, bail};
use clap::{Args, Parser};
use kvm_agent_proto::v1 as pb;

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
    /// A disk: path=P[,name=N][,format=raw|qcow2][,ro][,cache=none|writeback|...]; repeat for more.
    #[arg(long)]
    disk: Vec<String>,
    /// A NIC: mac=M[,name=N][,model=virtio|e1000][,bridge=B]; repeat for more.
    #[arg(long)]
    nic: Vec<String>,
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
    /// auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Pin vCPU threads to host CPUs: one list for all vCPUs ("0-1") or
    /// one per vCPU, separated by ':' ("1:0").
    #[arg(long)]
    cpu_mask: Option<String>,
    /// Share of CPU time against other instances (cgroup cpu.weight, 1-10000).
    #[arg(long)]
    cpu_weight: Option<u32>,
    /// Serial console on a unix socket.
    #[arg(long)]
    serial: bool,
    /// VNC display on 127.0.0.1.
    #[arg(long)]
    vnc: Option<u32>,
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
}

/// Splits `key=value,...`, where `,,` stands for a comma.
fn split_options(s: &str) -> Vec<(String, String)> {
    let mut items = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            (',', Some(',')) => {
                chars.next();
                items.last_mut().into_iter().for_each(|i| i.push(','));
            }
            (',', _) => items.push(String::new()),
            _ => items.last_mut().into_iter().for_each(|i| i.push(c)),
        }
    }
    items
        .into_iter()
        .filter(|i| !i.is_empty())
        .map(|i| match i.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (i, String::new()),
        })
        .collect()
}

impl SpecArgs {
    pub(super) fn to_proto(&self) -> anyhow::Result<pb::InstanceSpec> {
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

    pub(super) fn to_proto(&self, name: &str) -> anyhow::Result<pb::InstanceSpec> {
        let disks = self
            .disk
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let mut disk = pb::DiskSpec {
                    name: format!("disk{i}"),
                    ..Default::default()
                };
                for (k, v) in split_options(text) {
                    match k.as_str() {
                        "path" => disk.path = v,
                        "name" => disk.name = v,
                        "uuid" => disk.uuid = v,
                        "ro" | "readonly" => disk.read_only = true,
                        "format" => {
                            disk.format = pb::DiskFormat::from_str_name(&format!(
                                "DISK_FORMAT_{}",
                                v.to_uppercase()
                            ))
                            .with_context(|| format!("unknown disk format {v:?}"))?
                                as i32
                        }
                        "cache" => {
                            disk.cache = pb::DiskCache::from_str_name(&format!(
                                "DISK_CACHE_{}",
                                v.to_uppercase()
                            ))
                            .with_context(|| format!("unknown cache mode {v:?}"))?
                                as i32
                        }
                        _ => bail!("unknown disk option {k:?}"),
                    }
                }
                Ok(disk)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let nics = self
            .nic
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let mut nic = pb::NicSpec {
                    name: format!("nic{i}"),
                    ..Default::default()
                };
                for (k, v) in split_options(text) {
                    match k.as_str() {
                        "mac" => nic.mac = v,
                        "name" => nic.name = v,
                        "uuid" => nic.uuid = v,
                        "bridge" => nic.bridge = v,
                        "queues" => {
                            nic.queues = v
                                .parse()
                                .with_context(|| format!("bad queue count {v:?}"))?
                        }
                        "vhost" => nic.vhost = true,
                        "model" => {
                            nic.model = pb::NicModel::from_str_name(&format!(
                                "NIC_MODEL_{}",
                                v.to_uppercase()
                            ))
                            .with_context(|| format!("unknown NIC model {v:?}"))?
                                as i32
                        }
                        _ => bail!("unknown NIC option {k:?}"),
                    }
                }
                Ok(nic)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let accelerator =
            pb::Accelerator::from_str_name(&format!("ACCELERATOR_{}", self.accel.to_uppercase()))
                .with_context(|| format!("unknown accelerator {:?}", self.accel))?;
        Ok(pb::InstanceSpec {
            name: name.to_owned(),
            uuid: self.uuid.clone().unwrap_or_default(),
            memory_mib: self.memory,
            vcpus: self.vcpus,
            disks,
            nics,
            boot: Some(pb::BootSpec {
                kernel: self.kernel.clone().unwrap_or_default(),
                initrd: self.initrd.clone().unwrap_or_default(),
                cmdline: self.append.clone().unwrap_or_default(),
            }),
            machine_type: self.machine.clone(),
            accelerator: accelerator as i32,
            serial_console: self.serial,
            vnc: self.vnc.map(|display| pb::VncSpec { display }),
            cpu_model: self.cpu.clone().unwrap_or_default(),
            cpu_mask: self.cpu_mask.clone().unwrap_or_default(),
            cpu_weight: self.cpu_weight.unwrap_or_default(),
            memory: (self.memory_file.is_some() || self.hugepages).then(|| pb::MemoryBacking {
                file: self.memory_file.clone().unwrap_or_default(),
                share: self.memory_share,
                hugepages: self.hugepages,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_option_with_doubled_comma_keeps_the_comma() {
        assert_eq!(
            split_options("path=/srv/a,,b.img,ro"),
            vec![
                ("path".into(), "/srv/a,b.img".into()),
                ("ro".into(), String::new())
            ]
        );
    }
}
