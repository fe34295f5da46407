//! The `kvm-agent` command line: `serve`, and client subcommands that call
//! the API over the agent's socket.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};

use crate::config::{DEFAULT_STATE_DIR, SOCKET_NAME};
use crate::settings::{self, FileConfig, LogFormat, Settings};

mod moves;
use crate::instances::Agent;
use crate::peer::AgentAddress;
use crate::server::{self, Listeners};
use crate::tls::{TlsFiles, TlsMaterial};

/// kvm-agent: a node agent for QEMU/KVM clusters.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// The agent's unix socket: where `serve` creates it, and what client
    /// commands call (default: agent.sock in the state directory).
    #[arg(long, global = true, env = "KVM_AGENT_SOCKET")]
    socket: Option<PathBuf>,
    /// The agent client commands call, when not the local socket:
    /// https://HOST:PORT (mutual TLS), http://127.0.0.1:PORT or a socket path.
    #[arg(long, global = true, env = "KVM_AGENT_ADDRESS", value_parser = AgentAddress::parse)]
    agent: Option<AgentAddress>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Output format of client commands.
    #[arg(long, short, global = true, value_enum, default_value = "human")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// Mutual TLS on TCP. With `serve`: the agent's certificate, and the CA
/// its clients' and migration targets' certificates must be signed by.
/// With client commands: the client's certificate, and the agent's CA.
#[derive(Debug, Args)]
struct TlsArgs {
    /// Certificate (PEM) this side presents.
    #[arg(long, global = true, env = "KVM_AGENT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of that certificate.
    #[arg(long, global = true, env = "KVM_AGENT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The cluster's CA (PEM), which signed the other side's certificate.
    #[arg(
        long,
        global = true,
        env = "KVM_AGENT_TLS_CA",
        visible_alias = "client-ca"
    )]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn load(&self) -> anyhow::Result<Option<TlsMaterial>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => {
                let files = TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                };
                Ok(Some(TlsMaterial::load(&files)?))
            }
            _ => bail!("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca"),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Serve(ServeArgs),
    /// Check the agent's settings.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Facts about the node.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Manage instances.
    Instance {
        #[command(subcommand)]
        command: InstanceCommand,
    },
    /// Hot-add, remove and list the devices of running instances.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Attach to an instance's serial console (on the node; Ctrl-] detaches).
    Console {
        /// Instance name.
        name: String,
    },
    /// Move a running instance to another node's agent.
    Migrate(moves::MigrateArgs),
    /// Cancel an outgoing migration (the instance stays), or drop an incoming one.
    CancelMigration {
        /// Instance name.
        name: String,
    },
    /// Save a guest's state to a new file on the node; its QEMU then ends.
    Save {
        /// Instance name.
        name: String,
        /// Absolute path of the file to create (must not exist).
        path: String,
    },
    /// Start an instance from a save file.
    Restore {
        /// Absolute path of the save file.
        path: String,
        /// Stay paused until `kvm-agent instance resume`.
        #[arg(long)]
        paused: bool,
    },
    /// Follow the agent's events (one line each; JSON lines with --output json).
    Events {
        /// Only this instance.
        #[arg(long)]
        instance: Option<String>,
        /// Replay the kept events after this sequence number first.
        #[arg(long)]
        after: Option<u64>,
    },
    /// Print a completion script, e.g. `kvm-agent completions bash >
    /// /etc/bash_completion.d/kvm-agent`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
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

/// Flags of `serve` and `config check`. Each can also come from the
/// environment variable named in its help, and each overrides the same key
/// of the config file; unset, the file's value or the default holds.
#[derive(Debug, Args)]
struct ServeArgs {
    /// The TOML config file [default: /etc/kvm-agent/config.toml, if it exists].
    #[arg(long, env = "KVM_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Records, run directories and the default socket live here [default: /var/lib/kvm-agent].
    #[arg(long, env = "KVM_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Also serve TCP, `tcp://ADDR:PORT`: with mutual TLS (--tls-cert,
    /// --tls-key, --client-ca), or on a loopback address without it.
    #[arg(long, env = "KVM_AGENT_LISTEN")]
    listen: Option<settings::TcpListen>,
    /// QEMU binary, by name (looked up on PATH) or path [default: qemu-system-x86_64].
    #[arg(long, env = "KVM_AGENT_QEMU")]
    qemu_binary: Option<PathBuf>,
    /// Also give every instance an operators' QMP socket (qmp-operator.sock in its run directory).
    #[arg(long, env = "KVM_AGENT_OPERATOR_QMP", num_args = 0..=1, default_missing_value = "true")]
    operator_qmp: Option<bool>,
    /// Tap name template; the kernel replaces %d with a free number [default: kvmtap%d].
    #[arg(long, env = "KVM_AGENT_TAP_TEMPLATE")]
    tap_template: Option<String>,
    /// How long a stop waits for the guest to power off after ACPI powerdown [default: 60000].
    #[arg(long, env = "KVM_AGENT_POWERDOWN_TIMEOUT_MS")]
    powerdown_timeout_ms: Option<NonZeroU64>,
    /// How long a stop waits after QMP quit [default: 5000].
    #[arg(long, env = "KVM_AGENT_QUIT_TIMEOUT_MS")]
    quit_timeout_ms: Option<NonZeroU64>,
    /// How long a stop waits after SIGKILL [default: 5000].
    #[arg(long, env = "KVM_AGENT_KILL_TIMEOUT_MS")]
    kill_timeout_ms: Option<NonZeroU64>,
    /// How long a device removal waits for the guest to release the device [default: 10000].
    #[arg(long, env = "KVM_AGENT_UNPLUG_TIMEOUT_MS")]
    unplug_timeout_ms: Option<NonZeroU64>,
    /// Accept disk images, kernels, initrds, memory files and save files
    /// only under this directory (repeat for several, or separate them
    /// with ':'; default: anywhere).
    #[arg(
        long = "allowed-root",
        value_name = "DIR",
        env = "KVM_AGENT_ALLOWED_ROOTS",
        value_delimiter = ':'
    )]
    allowed_roots: Vec<PathBuf>,
    /// Stop making progress at this point (for tests of crash recovery).
    #[arg(long, hide = true)]
    fault_point: Option<crate::config::FaultPoint>,
    /// Serve Prometheus metrics on this loopback address (off when unset).
    #[arg(long, env = "KVM_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Events kept for watchers that resume [default: 4096].
    #[arg(long, env = "KVM_AGENT_EVENT_BUFFER")]
    event_buffer: Option<NonZeroUsize>,
    /// Connections served at once on each listener; more are closed at
    /// once [default: 1024].
    #[arg(long, env = "KVM_AGENT_MAX_CONNECTIONS")]
    max_connections: Option<NonZeroUsize>,
    /// Timeout of one QMP command [default: 10000].
    #[arg(long, env = "KVM_AGENT_QMP_TIMEOUT_MS")]
    qmp_timeout_ms: Option<NonZeroU64>,
    /// How long a freshly started QEMU may take to greet on QMP [default: 10000].
    #[arg(long, env = "KVM_AGENT_QMP_GREETING_TIMEOUT_MS")]
    qmp_greeting_timeout_ms: Option<NonZeroU64>,
    /// Rotate an instance's qemu.log past this size, at launch [default: 1048576].
    #[arg(long, env = "KVM_AGENT_QEMU_LOG_MAX_BYTES")]
    qemu_log_max_bytes: Option<NonZeroU64>,
    /// Rotated copies of qemu.log kept [default: 3].
    #[arg(long, env = "KVM_AGENT_QEMU_LOG_KEEP")]
    qemu_log_keep: Option<NonZeroU32>,
    /// Log format [default: text].
    #[arg(long, env = "KVM_AGENT_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// strict: QEMU runs as an unprivileged user under its seccomp
    /// sandbox, with no new privileges and a cgroup per instance; off:
    /// none of it, for debugging [default: strict].
    #[arg(long, env = "KVM_AGENT_CONFINEMENT", value_enum)]
    confinement: Option<crate::config::Confinement>,
    /// Where cgroups are mounted [default: /sys/fs/cgroup].
    #[arg(long, env = "KVM_AGENT_CGROUP_ROOT")]
    cgroup_root: Option<settings::AbsolutePath>,
    /// The agent's cgroup, under which each instance gets its own [default: kvm-agent].
    #[arg(long, env = "KVM_AGENT_CGROUP_PARENT")]
    cgroup_parent: Option<settings::CgroupName>,
    /// Run every confined QEMU as this one user instead of a uid each: a
    /// name, a uid, or uid:gid. Applies only without a uid pool.
    #[arg(long, env = "KVM_AGENT_QEMU_USER")]
    qemu_user: Option<settings::UserName>,
    /// Give each instance's QEMU a uid of its own from this range,
    /// FIRST-LAST (its gid is the same number) [default: 70000-70999].
    #[arg(long, env = "KVM_AGENT_QEMU_UID_POOL")]
    qemu_uid_pool: Option<settings::UidRange>,
    /// Address this node's QEMUs receive migrations on; other nodes must
    /// reach it [default: 127.0.0.1].
    #[arg(long, env = "KVM_AGENT_MIGRATION_ADDRESS")]
    migration_address: Option<std::net::IpAddr>,
    /// Ports incoming migrations may listen on, FIRST-LAST [default: 49152-49215].
    #[arg(long, env = "KVM_AGENT_MIGRATION_PORTS")]
    migration_ports: Option<settings::PortRange>,
    /// How long a call to another agent (a migration's target) may take [default: 30000].
    #[arg(long, env = "KVM_AGENT_PEER_TIMEOUT_MS")]
    peer_timeout_ms: Option<NonZeroU64>,
}

impl ServeArgs {
    /// The flags and environment as one settings layer; the global
    /// `--socket` and TLS flags belong to it too.
    fn layer(&self, socket: Option<&PathBuf>, tls: &TlsArgs) -> FileConfig {
        FileConfig {
            state_dir: self.state_dir.clone(),
            socket: socket.cloned(),
            listen: self.listen,
            qemu_binary: self.qemu_binary.clone(),
            allowed_roots: (!self.allowed_roots.is_empty()).then(|| {
                self.allowed_roots
                    .iter()
                    .cloned()
                    .map(settings::AbsolutePath)
                    .collect()
            }),
            log_format: self.log_format,
            confinement: self.confinement,
            metrics_listen: self.metrics_listen,
            event_buffer: self.event_buffer,
            max_connections: self.max_connections,
            tls: settings::TlsSection {
                cert: tls.tls_cert.clone(),
                key: tls.tls_key.clone(),
                ca: tls.tls_ca.clone(),
            },
            qmp: settings::QmpSection {
                timeout_ms: self.qmp_timeout_ms,
                greeting_timeout_ms: self.qmp_greeting_timeout_ms,
                operator_socket: self.operator_qmp,
            },
            stop: settings::StopSection {
                powerdown_timeout_ms: self.powerdown_timeout_ms,
                quit_timeout_ms: self.quit_timeout_ms,
                kill_timeout_ms: self.kill_timeout_ms,
            },
            devices: settings::DevicesSection {
                tap_template: self.tap_template.clone(),
                unplug_timeout_ms: self.unplug_timeout_ms,
            },
            qemu_log: settings::QemuLogSection {
                max_bytes: self.qemu_log_max_bytes,
                keep: self.qemu_log_keep,
            },
            cgroups: settings::CgroupsSection {
                root: self.cgroup_root.clone(),
                parent: self.cgroup_parent.clone(),
            },
            qemu_user: settings::QemuUserSection {
                user: self.qemu_user.clone(),
                uid_pool: self.qemu_uid_pool.clone(),
            },
            migration: settings::MigrationSection {
                address: self.migration_address,
                ports: self.migration_ports.clone(),
                peer_timeout_ms: self.peer_timeout_ms,
            },
        }
    }

    /// Every layer applied: flags over environment over file over defaults.
    fn settings(&self, socket: Option<&PathBuf>, tls: &TlsArgs) -> anyhow::Result<Settings> {
        let file = settings::load(self.config.as_deref())?;
        let mut settings = self.layer(socket, tls).over(file).resolve()?;
        settings.agent.fault_point = self.fault_point;
        Ok(settings)
    }
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the config file with the environment and flags, and print
    /// the effective settings as TOML (JSON with --output json).
    Check(ServeArgs),
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Show QEMU, KVM, memory and CPUs.
    Info,
}

#[derive(Debug, Subcommand)]
enum InstanceCommand {
    /// Start an instance from a spec given by flags.
    Start(SpecArgs),
    /// Stop an instance.
    Stop {
        /// Instance name.
        name: String,
        /// SIGKILL at once.
        #[arg(long)]
        force: bool,
        /// Override the powerdown timeout.
        #[arg(long)]
        powerdown_timeout_ms: Option<u32>,
    },
    /// Reboot an instance.
    Reboot {
        /// Instance name.
        name: String,
        /// soft replays the saved runtime, hard applies the spec, reset is system_reset.
        #[arg(long, value_enum, default_value = "soft")]
        mode: RebootModeArg,
        #[command(
            flatten,
            next_help_heading = "The spec a hard reboot applies (--mode hard only)"
        )]
        spec: SpecOptions,
    },
    /// Show one instance.
    Info {
        /// Instance name.
        name: String,
    },
    /// List instances.
    List,
    /// Print an instance's saved runtime.
    Runtime {
        /// Instance name.
        name: String,
    },
    /// Stop a guest's vCPUs; QEMU keeps running.
    Pause {
        /// Instance name.
        name: String,
    },
    /// Let a paused guest run again.
    Resume {
        /// Instance name.
        name: String,
    },
    /// Take a quarantined instance's QEMU back, once QEMU shows it is the
    /// runtime of the record that was set aside.
    Adopt {
        /// Instance name.
        name: String,
    },
    /// Move a running guest's memory with its balloon, up to the memory it
    /// was started with; waits until the guest has got there.
    SetMemory {
        /// Instance name.
        name: String,
        /// Target in MiB.
        memory_mib: u64,
        /// Set the target and return at once.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the guest.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RebootModeArg {
    Soft,
    Hard,
    Reset,
}

#[derive(Debug, Args, Clone)]
struct SpecArgs {
    /// Instance name.
    #[arg(long = "name", id = "instance_name")]
    name: String,
    #[command(flatten)]
    options: SpecOptions,
}

/// An instance spec but its name, which a reboot takes as its argument.
#[derive(Debug, Args, Clone, PartialEq)]
struct SpecOptions {
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
    fn to_proto(&self) -> anyhow::Result<pb::InstanceSpec> {
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
    fn any_given(&self) -> bool {
        UnsetSpecOptions::try_parse_from(["kvm-agent"]).is_ok_and(|unset| unset.options != *self)
    }

    fn to_proto(&self, name: &str) -> anyhow::Result<pb::InstanceSpec> {
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

/// Connects to the agent client commands call.
async fn connect_agent(
    address: &AgentAddress,
    tls: Option<&TlsMaterial>,
) -> anyhow::Result<NodeAgentClient<Channel>> {
    crate::peer::connect(address, None, tls)
        .await
        .with_context(|| {
            format!("can't reach the agent at {address}; is `kvm-agent serve` running?")
        })
}

/// A wire enum value as people read it: `INSTANCE_STATE_RUNNING` → `running`.
fn enum_label(name: Option<&str>, prefix: &str, value: i32) -> String {
    name.map_or_else(
        || value.to_string(),
        |n| n.trim_start_matches(prefix).to_lowercase(),
    )
}

fn state_name(state: i32) -> String {
    let name = pb::InstanceState::try_from(state).ok();
    enum_label(name.map(|s| s.as_str_name()), "INSTANCE_STATE_", state)
}

/// The state, or `reconciling` while the agent, just restarted, has only
/// the record's word for it.
fn shown_state(i: &pb::InstanceInfo) -> String {
    if i.reconciling {
        "reconciling".into()
    } else {
        state_name(i.state)
    }
}

fn instance_json(i: &pb::InstanceInfo) -> Value {
    json!({
        "name": i.name,
        "uuid": i.uuid,
        "state": state_name(i.state),
        "reconciling": i.reconciling,
        "state_detail": i.state_detail,
        "pid": i.pid,
        "uptime_seconds": i.uptime_seconds,
        "memory_mib": i.memory_mib,
        "vcpus": i.vcpus,
        "runtime_generation": i.runtime_generation,
        "machine_type": i.machine_type,
        "accelerator": i.accelerator,
        "qemu_version": i.qemu_version,
        "cpu_mask": i.cpu_mask,
        "devices": i.devices.iter().map(device_json).collect::<Vec<_>>(),
    })
}

fn print_instance(i: &pb::InstanceInfo) {
    println!("name:        {}", i.name);
    println!("uuid:        {}", i.uuid);
    println!("state:       {}", shown_state(i));
    if !i.state_detail.is_empty() {
        println!("detail:      {}", i.state_detail);
    }
    if i.pid != 0 {
        println!("pid:         {}  (up {}s)", i.pid, i.uptime_seconds);
    }
    println!("memory:      {} MiB, {} vcpus", i.memory_mib, i.vcpus);
    if !i.cpu_mask.is_empty() {
        println!("cpu mask:    {}", i.cpu_mask);
    }
    println!(
        "machine:     {} ({}), QEMU {}",
        i.machine_type, i.accelerator, i.qemu_version
    );
    println!("generation:  {}", i.runtime_generation);
    for d in &i.devices {
        print!("  ");
        print_device(d);
    }
}

/// Writes output meant for files and pipes; a reader that stops early
/// (`| head`) is not an error.
fn print_to_pipe(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Runs the command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completions { shell } = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, "kvm-agent", &mut script);
        return print_to_pipe(&script);
    }
    match &cli.command {
        Command::Serve(args) => return serve(args.settings(cli.socket.as_ref(), &cli.tls)?).await,
        Command::Config {
            command: ConfigCommand::Check(args),
        } => {
            let settings = args.settings(cli.socket.as_ref(), &cli.tls)?;
            let effective = settings.effective();
            let text = if matches!(cli.output, Output::Json) {
                serde_json::to_string_pretty(&effective)? + "\n"
            } else {
                toml::to_string(&effective)?
            };
            return print_to_pipe(text.as_bytes());
        }
        _ => {}
    }
    let tls = cli.tls.load()?;
    let agent = cli.agent.clone().unwrap_or_else(|| {
        AgentAddress::Unix(
            cli.socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR).join(SOCKET_NAME)),
        )
    });
    let connect = async || connect_agent(&agent, tls.as_ref()).await;
    let json_out = matches!(cli.output, Output::Json);
    match cli.command {
        Command::Serve(_) | Command::Config { .. } | Command::Completions { .. } => {
            unreachable!("handled above")
        }
        Command::Node {
            command: NodeCommand::Info,
        } => {
            let n = connect()
                .await?
                .get_node_info(pb::GetNodeInfoRequest {})
                .await?
                .into_inner();
            if json_out {
                println!(
                    "{}",
                    json!({
                        "hostname": n.hostname, "qemu_path": n.qemu_path, "qemu_version": n.qemu_version,
                        "qemu_error": n.qemu_error, "kvm_available": n.kvm_available, "kvm_detail": n.kvm_detail,
                        "memory_total_mib": n.memory_total_mib, "memory_available_mib": n.memory_available_mib,
                        "cpus": n.cpus, "instance_count": n.instance_count, "agent_version": n.agent_version,
                    })
                );
            } else {
                println!("hostname:   {}", n.hostname);
                println!(
                    "qemu:       {} {}{}",
                    n.qemu_path, n.qemu_version, n.qemu_error
                );
                println!("kvm:        {} ({})", n.kvm_available, n.kvm_detail);
                println!(
                    "memory:     {} MiB total, {} MiB available",
                    n.memory_total_mib, n.memory_available_mib
                );
                println!("cpus:       {}", n.cpus);
                println!("instances:  {}", n.instance_count);
            }
            Ok(())
        }
        Command::Instance { command } => instance(connect().await?, command, json_out).await,
        Command::Device { command } => device(connect().await?, command, json_out).await,
        Command::Console { name } => console(connect().await?, name, json_out).await,
        Command::Events { instance, after } => {
            events(connect().await?, instance, after, json_out).await
        }
        Command::Migrate(args) => moves::migrate(connect().await?, args, json_out).await,
        Command::CancelMigration { name } => {
            let cancelled = connect()
                .await?
                .cancel_migration(pb::CancelMigrationRequest { name: name.clone() })
                .await?
                .into_inner()
                .cancelled;
            if json_out {
                println!("{}", json!({ "name": name, "cancelled": cancelled }));
            } else {
                println!("{name}: {cancelled} migration cancelled");
            }
            Ok(())
        }
        Command::Save { name, path } => moves::save(connect().await?, name, path, json_out).await,
        Command::Restore { path, paused } => {
            moves::restore(connect().await?, path, paused, json_out).await
        }
    }
}

async fn instance(
    mut client: NodeAgentClient<Channel>,
    command: InstanceCommand,
    json_out: bool,
) -> anyhow::Result<()> {
    let show = |i: &pb::InstanceInfo| {
        if json_out {
            println!("{}", instance_json(i));
        } else {
            print_instance(i);
        }
    };
    match command {
        InstanceCommand::Start(spec) => {
            let spec = spec.to_proto()?;
            show(
                &client
                    .start_instance(pb::StartInstanceRequest { spec: Some(spec) })
                    .await?
                    .into_inner(),
            );
        }
        InstanceCommand::Stop {
            name,
            force,
            powerdown_timeout_ms,
        } => {
            let r = client
                .stop_instance(pb::StopInstanceRequest {
                    name,
                    force,
                    powerdown_timeout_ms: powerdown_timeout_ms.unwrap_or(0),
                })
                .await?
                .into_inner();
            let method = pb::StopMethod::try_from(r.method)
                .map(|m| {
                    m.as_str_name()
                        .trim_start_matches("STOP_METHOD_")
                        .to_lowercase()
                })
                .unwrap_or_default();
            if json_out {
                println!(
                    "{}",
                    json!({ "method": method, "instance": r.instance.as_ref().map(instance_json) })
                );
            } else {
                println!("stopped ({method})");
            }
        }
        InstanceCommand::Reboot { name, mode, spec } => {
            let mode = match mode {
                RebootModeArg::Soft => pb::RebootMode::Soft,
                RebootModeArg::Hard => pb::RebootMode::Hard,
                RebootModeArg::Reset => pb::RebootMode::Reset,
            };
            let spec = match mode {
                pb::RebootMode::Hard => Some(spec.to_proto(&name)?),
                _ if spec.any_given() => {
                    anyhow::bail!("spec options apply to a hard reboot only; add --mode hard")
                }
                _ => None,
            };
            show(
                &client
                    .reboot_instance(pb::RebootInstanceRequest {
                        name,
                        mode: mode as i32,
                        spec,
                    })
                    .await?
                    .into_inner(),
            );
        }
        InstanceCommand::Info { name } => show(
            &client
                .get_instance(pb::GetInstanceRequest { name })
                .await?
                .into_inner(),
        ),
        InstanceCommand::List => {
            let list = client
                .list_instances(pb::ListInstancesRequest {})
                .await?
                .into_inner()
                .instances;
            if json_out {
                println!("{}", Value::Array(list.iter().map(instance_json).collect()));
            } else {
                println!(
                    "{:<20} {:<11} {:>8} {:>8} {:>5} {:>4}",
                    "NAME", "STATE", "PID", "MEM_MIB", "VCPUS", "GEN"
                );
                for i in &list {
                    println!(
                        "{:<20} {:<11} {:>8} {:>8} {:>5} {:>4}",
                        i.name,
                        shown_state(i),
                        i.pid,
                        i.memory_mib,
                        i.vcpus,
                        i.runtime_generation
                    );
                }
            }
        }
        InstanceCommand::Runtime { name } => {
            let r = client
                .get_runtime(pb::GetRuntimeRequest { name })
                .await?
                .into_inner();
            println!("{}", r.runtime_json);
        }
        InstanceCommand::Pause { name } => {
            show(
                &client
                    .pause_instance(pb::PauseInstanceRequest { name })
                    .await?
                    .into_inner(),
            );
        }
        InstanceCommand::Resume { name } => {
            show(
                &client
                    .resume_instance(pb::ResumeInstanceRequest { name })
                    .await?
                    .into_inner(),
            );
        }
        InstanceCommand::Adopt { name } => {
            show(
                &client
                    .adopt_instance(pb::AdoptInstanceRequest { name })
                    .await?
                    .into_inner(),
            );
        }
        InstanceCommand::SetMemory {
            name,
            memory_mib,
            no_wait,
            timeout_ms,
        } => {
            let r = client
                .set_memory(pb::SetMemoryRequest {
                    name: name.clone(),
                    memory_mib,
                    wait: !no_wait,
                    timeout_ms,
                })
                .await?
                .into_inner();
            if json_out {
                println!(
                    "{}",
                    json!({
                        "name": name, "target_mib": r.target_mib,
                        "actual_mib": r.actual_mib, "maximum_mib": r.maximum_mib,
                    })
                );
            } else {
                println!(
                    "{name}: {} MiB of {} MiB (target {} MiB)",
                    r.actual_mib, r.maximum_mib, r.target_mib
                );
            }
        }
    }
    Ok(())
}

fn device_json(d: &pb::DeviceInfo) -> Value {
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

fn print_device(d: &pb::DeviceInfo) {
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

async fn device(
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

/// The byte that detaches from a console: Ctrl-], as telnet and virsh use.
const CONSOLE_ESCAPE: u8 = 0x1d;

async fn console(
    mut client: NodeAgentClient<Channel>,
    name: String,
    json_out: bool,
) -> anyhow::Result<()> {
    let info = client
        .get_console_info(pb::GetConsoleInfoRequest { name: name.clone() })
        .await?
        .into_inner();
    if json_out {
        println!(
            "{}",
            json!({ "serial_socket": info.serial_socket, "vnc_address": info.vnc_address })
        );
        return Ok(());
    }
    if info.serial_socket.is_empty() {
        bail!("instance {name:?} has no serial console; start it with one (--serial)");
    }
    let socket =
        std::os::unix::net::UnixStream::connect(&info.serial_socket).with_context(|| {
            format!(
                "can't open {} (run this on the instance's node, as root)",
                info.serial_socket
            )
        })?;
    eprintln!("attached to the serial console of {name}; press Ctrl-] to detach\r");
    tokio::task::spawn_blocking(move || relay_console(socket)).await??;
    eprintln!("\r\ndetached from {name}");
    Ok(())
}

/// Restores the terminal's settings when dropped.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enter() -> RawTerminal {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawTerminal(None); // not a terminal: relay bytes as they come
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// Copies the console to stdout and stdin to the console until the escape
/// byte, end of input, or the console closing.
fn relay_console(socket: std::os::unix::net::UnixStream) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let _raw = RawTerminal::enter();
    let mut from_guest = socket.try_clone()?;
    let output = std::thread::spawn(move || {
        let mut stdout = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_guest.read(&mut buf) {
            if n == 0
                || stdout
                    .write_all(&buf[..n])
                    .and_then(|()| stdout.flush())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut to_guest = socket;
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = stdin.read(&mut buf)?;
        if n == 0 {
            break;
        }
        match buf[..n].iter().position(|&b| b == CONSOLE_ESCAPE) {
            Some(at) => {
                to_guest.write_all(&buf[..at])?;
                break;
            }
            None => to_guest.write_all(&buf[..n])?,
        }
    }
    let _ = to_guest.shutdown(std::net::Shutdown::Both);
    let _ = output.join();
    Ok(())
}

async fn events(
    mut client: NodeAgentClient<Channel>,
    instance: Option<String>,
    after: Option<u64>,
    json_out: bool,
) -> anyhow::Result<()> {
    let request = pb::WatchEventsRequest {
        instance: instance.unwrap_or_default(),
        after_sequence: after,
    };
    let mut stream = client.watch_events(request).await?.into_inner();
    while let Some(event) = stream.message().await? {
        let kind = pb::EventKind::try_from(event.kind)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("EVENT_KIND_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        if json_out {
            println!(
                "{}",
                json!({
                    "sequence": event.sequence, "unix_millis": event.unix_millis, "instance": event.instance,
                    "kind": kind, "state": state_name(event.state), "state_detail": event.state_detail,
                    "guest_initiated": event.guest_initiated, "device": event.device,
                    "pci_slot": event.pci_slot, "reboot": event.reboot,
                    "migration": event.migration.as_ref().map(moves::progress_json),
                })
            );
            continue;
        }
        let what = match event.kind {
            k if k == pb::EventKind::StateChanged as i32 => {
                let by_guest = if event.guest_initiated {
                    " (by the guest)"
                } else {
                    ""
                };
                format!("{}{by_guest}", state_name(event.state))
            }
            k if k == pb::EventKind::Rebooted as i32 => format!("rebooted ({})", event.reboot),
            k if k == pb::EventKind::MigrationProgress as i32 => event
                .migration
                .as_ref()
                .map(moves::progress_line)
                .unwrap_or_default(),
            _ => format!("{kind} {}", event.device),
        };
        println!("{:>6} {:<20} {what}", event.sequence, event.instance);
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour codes only for a person at a terminal, not in a log file.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    init_logging(settings.log_format);
    let Settings {
        mut agent,
        socket,
        listen,
        tls,
        metrics_listen,
        max_connections,
        ..
    } = settings;
    let tls = tls.as_ref().map(TlsMaterial::load).transpose()?;
    agent.migration.peer_tls = tls.clone();
    let listeners = Listeners {
        socket,
        tcp: listen,
        tls,
        max_connections,
    };
    listeners.check().map_err(anyhow::Error::msg)?;
    let agent = Agent::open(agent).context("opening the state directory")?;
    if let Some(addr) = metrics_listen {
        let watch = agent
            .watch_events(None)
            .map_err(|e| anyhow::anyhow!("can't follow the events for metrics: {e}"))?;
        let counted = agent.clone();
        crate::telemetry::serve(addr, watch, move || {
            counted.list().into_iter().map(|v| v.state).collect()
        })?;
    }
    server::serve(agent, listeners).await
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

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
