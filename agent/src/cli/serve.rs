//! `kvm-agent serve` and `config check`: the agent's settings from file,
//! environment and flags, and running the agent with them.

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{Printer, TlsArgs, print_to_pipe};
use crate::instances::Agent;
use crate::server::{self, Listeners};
use crate::settings::{self, FileConfig, LogFormat, Settings};
use crate::tls::TlsMaterial;

/// Flags of `serve` and `config check`. Each can also come from the
/// environment variable named in its help, and each overrides the same key
/// of the config file; unset, the file's value or the default holds.
#[derive(Debug, Args)]
pub(super) struct ServeArgs {
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
    /// Certificate (PEM) this node's QEMUs show on migration streams
    /// [default: --tls-cert].
    #[arg(long, env = "KVM_AGENT_MIGRATION_STREAM_CERT")]
    migration_stream_cert: Option<PathBuf>,
    /// Its private key [default: --tls-key].
    #[arg(long, env = "KVM_AGENT_MIGRATION_STREAM_KEY")]
    migration_stream_key: Option<PathBuf>,
    /// The CA (PEM) the other QEMU's certificate must be signed by
    /// [default: --tls-ca].
    #[arg(long, env = "KVM_AGENT_MIGRATION_STREAM_CA")]
    migration_stream_ca: Option<PathBuf>,
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
            // A node's policy: only in its config file.
            allowed_extra_options: None,
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
                peer_protocol: None,
                stream_cert: self.migration_stream_cert.clone(),
                stream_key: self.migration_stream_key.clone(),
                stream_ca: self.migration_stream_ca.clone(),
            },
        }
    }

    /// Every layer applied: flags over environment over file over defaults.
    pub(super) fn settings(
        &self,
        socket: Option<&PathBuf>,
        tls: &TlsArgs,
    ) -> anyhow::Result<Settings> {
        let file = settings::load(self.config.as_deref())?;
        let mut settings = self.layer(socket, tls).over(file).resolve()?;
        settings.agent.fault_point = self.fault_point;
        Ok(settings)
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum ConfigCommand {
    /// Validate the config file with the environment and flags, and print
    /// the effective settings as TOML (JSON with --output json).
    Check(ServeArgs),
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour codes only for a person at a terminal, not in a log file.
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.json().boxed(),
    };
    // Steps are timed whatever the log level lets through.
    let steps =
        crate::telemetry::StepTimer.with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.is_span() && matches!(meta.name(), "op" | "step")
        }));
    tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(steps)
        .init();
}

/// Runs the agent until it is told to stop.
pub(super) async fn serve(settings: Settings) -> anyhow::Result<()> {
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
    if let Some(stream) = &agent.migration.stream_tls {
        // Only checked here: QEMU reads them at each migration.
        TlsMaterial::load(&crate::tls::TlsFiles {
            cert: stream.cert.clone(),
            key: stream.key.clone(),
            ca: stream.ca.clone(),
        })
        .context("the migration stream's TLS files")?;
    }
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
        crate::telemetry::serve(addr, watch, move || counted.tally())?;
    }
    server::serve(agent, listeners).await
}

/// Runs `config check`: prints the effective settings, as TOML or JSON.
pub(super) fn config(
    command: ConfigCommand,
    socket: Option<&PathBuf>,
    tls: &TlsArgs,
    out: Printer,
) -> anyhow::Result<()> {
    let ConfigCommand::Check(args) = command;
    let effective = args.settings(socket, tls)?.effective();
    let text = if out.json {
        serde_json::to_string_pretty(&effective)? + "\n"
    } else {
        toml::to_string(&effective)?
    };
    print_to_pipe(text.as_bytes())
}
