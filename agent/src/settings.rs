//! The settings of `kvm-agent serve` in layers: built-in defaults, then the
//! TOML file, then environment variables, then flags. Each layer is a
//! [`FileConfig`] whose unset keys fall through to the layer below.
//!
//! Parsing is strict: an unknown key or a value of the wrong type or range
//! is an error that names the file, the line and the column.

use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hypervisor::identity::QemuUser;
use hypervisor::migration::stream_tls::StreamCredentials;
use serde::{Deserialize, Serialize};

use crate::config::{
    AgentConfig, AllowedRoots, Confinement, DEFAULT_QEMU_USER, DEFAULT_STATE_DIR, DEFAULT_UID_POOL,
    QemuUsers, SOCKET_NAME,
};
use crate::tls::TlsFiles;

/// Where `serve` looks for its config file when not told otherwise. A
/// missing file there means "all defaults"; a missing file that was named
/// explicitly is an error.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kvm-agent/config.toml";

/// Why the settings can't be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file can't be read.
    #[error("can't read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file isn't valid TOML, has an unknown key or a bad value.
    #[error("config file {}, line {line}, column {column}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, as the parser says it.
        message: String,
    },
    /// Each value is well-formed, but the whole doesn't work.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, as written in the file (`section.key`).
        key: &'static str,
        /// What is wrong and what to do.
        message: String,
    },
}

/// Format of the agent's own log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Declares a layer: every key optional, unknown keys refused, and `over`
/// to lay it on top of a lower layer. Sections merge key by key.
macro_rules! layer {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $field:ident: $ty:ty, )*
        }
        $( sections { $( $(#[$smeta:meta])* $section:ident: $sty:ty, )* } )?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: Option<$ty>, )*
            $($( $(#[$smeta])* pub $section: $sty, )*)?
        }

        impl $name {
            /// This layer's keys where set, the lower layer's elsewhere.
            pub fn over(self, lower: Self) -> Self {
                Self {
                    $( $field: self.$field.or(lower.$field), )*
                    $($( $section: self.$section.over(lower.$section), )*)?
                }
            }
        }
    };
}

layer! {
    /// The config file's layout; also one layer of settings. See
    /// `agent/config.example.toml` for every key with its default.
    pub struct FileConfig {
        /// Records, run directories and the default socket live here.
        state_dir: PathBuf,
        /// The agent's unix socket (default: agent.sock in `state_dir`).
        socket: PathBuf,
        /// Also serve TCP: `tcp://ADDR:PORT`.
        listen: TcpListen,
        /// QEMU binary, by name or path.
        qemu_binary: PathBuf,
        /// Directories host files of requests must lie in.
        allowed_roots: Vec<AbsolutePath>,
        /// Extra QEMU options specs may carry, each with its value.
        allowed_extra_options: Vec<String>,
        /// `text` or `json`.
        log_format: LogFormat,
        /// `strict` or `off`.
        confinement: Confinement,
        /// Loopback address of the Prometheus endpoint.
        metrics_listen: SocketAddr,
        /// Events kept for watchers that resume.
        event_buffer: NonZeroUsize,
        /// Connections served at once, on each listener.
        max_connections: NonZeroUsize,
    }
    sections {
        /// Mutual TLS of the TCP listener and of calls to other agents.
        tls: TlsSection,
        /// QEMU's monitor.
        qmp: QmpSection,
        /// Stop escalation.
        stop: StopSection,
        /// Taps and hot-unplug.
        devices: DevicesSection,
        /// Rotation of each instance's `qemu.log`.
        qemu_log: QemuLogSection,
        /// Where each instance's cgroup goes.
        cgroups: CgroupsSection,
        /// Who confined QEMUs run as.
        qemu_user: QemuUserSection,
        /// Incoming and outgoing migrations.
        migration: MigrationSection,
    }
}

layer! {
    /// `[tls]`: PEM files.
    pub struct TlsSection {
        /// This node's certificate.
        cert: PathBuf,
        /// Its private key.
        key: PathBuf,
        /// The cluster's CA.
        ca: PathBuf,
    }
}

layer! {
    /// `[qmp]`
    pub struct QmpSection {
        /// Timeout of one QMP command.
        timeout_ms: NonZeroU64,
        /// How long a fresh QEMU may take to greet.
        greeting_timeout_ms: NonZeroU64,
        /// Give every instance a second QMP socket for operators.
        operator_socket: bool,
    }
}

layer! {
    /// `[stop]`
    pub struct StopSection {
        /// Wait after ACPI powerdown.
        powerdown_timeout_ms: NonZeroU64,
        /// Wait after QMP quit.
        quit_timeout_ms: NonZeroU64,
        /// Wait after SIGKILL.
        kill_timeout_ms: NonZeroU64,
    }
}

layer! {
    /// `[devices]`
    pub struct DevicesSection {
        /// Tap name template; the kernel fills in `%d`.
        tap_template: String,
        /// How long a removal waits for the guest.
        unplug_timeout_ms: NonZeroU64,
    }
}

layer! {
    /// `[qemu_log]`
    pub struct QemuLogSection {
        /// Rotate past this size, at launch.
        max_bytes: NonZeroU64,
        /// Rotated copies kept.
        keep: NonZeroU32,
    }
}

layer! {
    /// `[cgroups]`
    pub struct CgroupsSection {
        /// Where cgroups are mounted.
        root: AbsolutePath,
        /// The agent's cgroup under each hierarchy.
        parent: CgroupName,
    }
}

layer! {
    /// `[qemu_user]`
    pub struct QemuUserSection {
        /// A user name, a uid, or `uid:gid`.
        user: UserName,
        /// One uid per instance from this range instead.
        uid_pool: UidRange,
    }
}

layer! {
    /// `[migration]`
    pub struct MigrationSection {
        /// Address this node's QEMUs receive migrations on.
        address: IpAddr,
        /// Ports incoming migrations may listen on.
        ports: PortRange,
        /// How long a call to another agent may take.
        peer_timeout_ms: NonZeroU64,
        /// The newest protocol to speak to other agents.
        peer_protocol: u32,
        /// The certificate QEMUs show on migration streams.
        stream_cert: PathBuf,
        /// Its private key.
        stream_key: PathBuf,
        /// The CA the other QEMU's certificate must be signed by.
        stream_ca: PathBuf,
    }
}

/// A TCP listen address written `tcp://ADDR:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TcpListen(pub SocketAddr);

impl TryFrom<String> for TcpListen {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl std::str::FromStr for TcpListen {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        crate::server::parse_tcp_listen(text).map(TcpListen)
    }
}

impl From<TcpListen> for String {
    fn from(listen: TcpListen) -> String {
        format!("tcp://{}", listen.0)
    }
}

/// A port range written `FIRST-LAST` (or one port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange(pub RangeInclusive<u16>);

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (first, last) = text.split_once('-').unwrap_or((text, text));
        match (first.parse::<u16>(), last.parse::<u16>()) {
            (Ok(first), Ok(last)) if first > 0 && first <= last => Ok(PortRange(first..=last)),
            _ => Err(format!("{text:?} is not a port range like 49152-49215")),
        }
    }
}

impl From<PortRange> for String {
    fn from(range: PortRange) -> String {
        format!("{}-{}", range.0.start(), range.0.end())
    }
}

/// A user written as a name, a uid, or `uid:gid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserName(pub String);

impl TryFrom<String> for UserName {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        name.parse()
    }
}

impl std::str::FromStr for UserName {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        let numeric = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        let named = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        let ids = match name.split_once(':') {
            Some((uid, gid)) => numeric(uid) && numeric(gid),
            None => numeric(name),
        };
        if named || ids {
            Ok(UserName(name.to_owned()))
        } else {
            Err(format!(
                "{name:?} is not a user; write a name, a uid, or uid:gid"
            ))
        }
    }
}

impl From<UserName> for String {
    fn from(name: UserName) -> String {
        name.0
    }
}

impl UserName {
    /// The uid and gid it stands for on this host. A name or a bare uid
    /// is looked up in the user database; `uid:gid` is taken as it is.
    pub fn resolve(&self) -> Result<QemuUser, String> {
        let text = &self.0;
        let user = if let Some((uid, gid)) = text.split_once(':') {
            QemuUser {
                uid: uid.parse().map_err(|_| format!("{uid:?} is not a uid"))?,
                gid: gid.parse().map_err(|_| format!("{gid:?} is not a gid"))?,
            }
        } else {
            let entry = match text.parse::<u32>() {
                Ok(uid) => nix::unistd::User::from_uid(uid.into()),
                Err(_) => nix::unistd::User::from_name(text),
            }
            .map_err(|e| format!("can't look up user {text:?}: {e}"))?
            .ok_or_else(|| {
                format!("no user {text:?} on this host; create it, or give the ids as uid:gid")
            })?;
            QemuUser {
                uid: entry.uid.as_raw(),
                gid: entry.gid.as_raw(),
            }
        };
        if user.uid == 0 || user.gid == 0 {
            return Err(format!(
                "{text:?} is root ({user}); QEMU runs as root only with confinement = \"off\""
            ));
        }
        Ok(user)
    }
}

/// A range of uids written `FIRST-LAST`, root excluded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UidRange(pub RangeInclusive<u32>);

impl TryFrom<String> for UidRange {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl std::str::FromStr for UidRange {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text
            .split_once('-')
            .map(|(f, l)| (f.parse::<u32>(), l.parse::<u32>()))
        {
            Some((Ok(first), Ok(last))) if first > 0 && first <= last => Ok(UidRange(first..=last)),
            _ => Err(format!(
                "{text:?} is not a uid range like 64000-64999 (root excluded)"
            )),
        }
    }
}

impl From<UidRange> for String {
    fn from(range: UidRange) -> String {
        format!("{}-{}", range.0.start(), range.0.end())
    }
}

/// Checks that no account of this host, and no subordinate id range of
/// `/etc/subuid` or `/etc/subgid`, uses a uid or gid of `pool`: a pool uid
/// must belong to one QEMU and nothing else.
fn unused_by_accounts(pool: &RangeInclusive<u32>) -> Result<(), String> {
    let range = format!("{}-{}", pool.start(), pool.end());
    for id in pool.clone() {
        if let Ok(Some(user)) = nix::unistd::User::from_uid(id.into()) {
            return Err(format!(
                "uid pool {range} overlaps the user {:?} (uid {id}); choose a range no account uses",
                user.name
            ));
        }
        if let Ok(Some(group)) = nix::unistd::Group::from_gid(id.into()) {
            return Err(format!(
                "uid pool {range} overlaps the group {:?} (gid {id}); choose a range no account uses",
                group.name
            ));
        }
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        if let Some((owner, first, last)) = subordinate_overlap(&text, pool) {
            return Err(format!(
                "uid pool {range} overlaps {owner:?}'s subordinate ids {first}-{last} in {file}; \
                 choose a range no account uses"
            ));
        }
    }
    Ok(())
}

/// The first `name:first:count` line of a subordinate id file whose range
/// meets `pool`, as (name, first, last). Pure.
fn subordinate_overlap(text: &str, pool: &RangeInclusive<u32>) -> Option<(String, u32, u32)> {
    text.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let (name, first, count) = (fields.next()?, fields.next()?, fields.next()?);
        let first: u32 = first.parse().ok()?;
        let count: u32 = count.parse().ok()?;
        let last = first.checked_add(count.checked_sub(1)?)?;
        (first <= *pool.end() && last >= *pool.start()).then(|| (name.to_owned(), first, last))
    })
}

/// A cgroup name: a relative path of plain components.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CgroupName(pub String);

impl TryFrom<String> for CgroupName {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        name.parse()
    }
}

impl std::str::FromStr for CgroupName {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        let plain = |c: &str| hypervisor::spec::is_safe_identifier(c, 64);
        if !name.is_empty() && name.split('/').all(plain) {
            Ok(CgroupName(name.to_owned()))
        } else {
            Err(format!(
                "cgroup name {name:?} must be a relative path of plain names, like kvm-agent or machine.slice/kvm-agent"
            ))
        }
    }
}

impl From<CgroupName> for String {
    fn from(name: CgroupName) -> String {
        name.0
    }
}

/// A path that must be absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PathBuf", into = "PathBuf")]
pub struct AbsolutePath(pub PathBuf);

impl TryFrom<PathBuf> for AbsolutePath {
    type Error = String;
    fn try_from(path: PathBuf) -> Result<Self, String> {
        if path.is_absolute() {
            Ok(AbsolutePath(path))
        } else {
            Err(format!("{} is not an absolute path", path.display()))
        }
    }
}

impl std::str::FromStr for AbsolutePath {
    type Err = String;
    fn from_str(path: &str) -> Result<Self, String> {
        PathBuf::from(path).try_into()
    }
}

impl From<AbsolutePath> for PathBuf {
    fn from(path: AbsolutePath) -> PathBuf {
        path.0
    }
}

/// Parses a config file's text. Pure.
pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |span| span.start);
        let (line, column) = line_and_column(text, offset);
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message: e.message().trim_end().to_owned(),
        }
    })
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

/// Reads the config file: `path` when given (it must exist), else
/// [`DEFAULT_CONFIG_PATH`] if it exists, else nothing.
pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let (path, required) = match path {
        Some(path) => (path, true),
        None => (Path::new(DEFAULT_CONFIG_PATH), false),
    };
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, path),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
            Ok(FileConfig::default())
        }
        Err(source) => Err(ConfigError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The settings `serve` runs with, every layer applied.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What the agent itself uses.
    pub agent: AgentConfig,
    /// The agent's unix socket.
    pub socket: PathBuf,
    /// The TCP listener, if any.
    pub listen: Option<SocketAddr>,
    /// Mutual TLS files, all three or none.
    pub tls: Option<TlsFiles>,
    /// The agent's log format.
    pub log_format: LogFormat,
    /// The Prometheus endpoint, if on.
    pub metrics_listen: Option<SocketAddr>,
    /// Connections served at once, on each listener.
    pub max_connections: usize,
}

fn millis(value: Option<NonZeroU64>, default: Duration) -> Duration {
    value.map_or(default, |ms| Duration::from_millis(ms.get()))
}

fn as_millis(duration: Duration) -> Option<NonZeroU64> {
    NonZeroU64::new(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

fn allowed_roots(roots: Vec<AbsolutePath>) -> Result<AllowedRoots, ConfigError> {
    let roots = roots.into_iter().map(PathBuf::from).collect();
    AllowedRoots::new(roots).map_err(|message| ConfigError::Invalid {
        key: "allowed_roots",
        message,
    })
}

impl MigrationSection {
    /// Sets what this section sets in `migration`.
    fn resolve(self, migration: &mut crate::config::MigrationConfig) -> Result<(), ConfigError> {
        if let Some(address) = self.address {
            migration.address = address.to_string();
        }
        if let Some(ports) = self.ports {
            migration.ports = ports.0;
        }
        migration.peer_timeout = millis(self.peer_timeout_ms, migration.peer_timeout);
        if let Some(protocol) = self.peer_protocol {
            let spoken = crate::peer::OLDEST_PEER_PROTOCOL..=crate::peer::PEER_PROTOCOL;
            if !spoken.contains(&protocol) {
                return Err(ConfigError::Invalid {
                    key: "migration.peer_protocol",
                    message: format!(
                        "{protocol} is not a protocol this agent speaks ({} to {})",
                        spoken.start(),
                        spoken.end()
                    ),
                });
            }
            migration.peer_protocol = protocol;
        }
        migration.stream_tls = match (self.stream_cert, self.stream_key, self.stream_ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(StreamCredentials { cert, key, ca }),
            _ => {
                return Err(ConfigError::Invalid {
                    key: "migration",
                    message: "stream TLS needs all of stream_cert, stream_key and stream_ca \
                              (--migration-stream-cert, --migration-stream-key, \
                              --migration-stream-ca), or none to use the [tls] files"
                        .into(),
                });
            }
        };
        Ok(())
    }
}

impl FileConfig {
    /// Fills in the defaults and checks what no single value can show.
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let mut agent = AgentConfig::new(state_dir);
        if let Some(binary) = self.qemu_binary {
            agent.qemu_binary = binary;
        }
        agent.allowed_roots = allowed_roots(self.allowed_roots.unwrap_or_default())?;
        agent.allowed_extra_options = self.allowed_extra_options.unwrap_or_default();
        if let Some(n) = self.event_buffer {
            agent.event_buffer = n.get();
        }
        agent.confinement = self.confinement.unwrap_or_default();
        if let Some(root) = self.cgroups.root {
            agent.cgroup_root = root.0;
        }
        if let Some(parent) = self.cgroups.parent {
            agent.cgroup_parent = parent.0;
        }
        agent.qemu_users = self.qemu_user.resolve()?;

        let launch = &mut agent.launch;
        launch.qmp.command_timeout = millis(self.qmp.timeout_ms, launch.qmp.command_timeout);
        launch.qmp.greeting_timeout =
            millis(self.qmp.greeting_timeout_ms, launch.qmp.greeting_timeout);
        launch.operator_qmp = self.qmp.operator_socket.unwrap_or(launch.operator_qmp);
        if let Some(template) = self.devices.tap_template {
            launch.tap_template = template;
        }
        if let Some(max) = self.qemu_log.max_bytes {
            launch.log_max_bytes = max.get();
        }
        if let Some(keep) = self.qemu_log.keep {
            launch.log_keep = keep.get();
        }
        agent.unplug_timeout = millis(self.devices.unplug_timeout_ms, agent.unplug_timeout);

        let stop = &mut agent.stop;
        stop.powerdown = millis(self.stop.powerdown_timeout_ms, stop.powerdown);
        stop.quit = millis(self.stop.quit_timeout_ms, stop.quit);
        stop.kill = millis(self.stop.kill_timeout_ms, stop.kill);

        self.migration.resolve(&mut agent.migration)?;

        let tls = self.tls.resolve()?;
        if agent.migration.stream_tls.is_none() {
            agent.migration.stream_tls = tls.as_ref().map(|t| StreamCredentials {
                cert: t.cert.clone(),
                key: t.key.clone(),
                ca: t.ca.clone(),
            });
        }
        let listen = self.listen.map(|l| l.0);
        crate::server::check_tcp_exposure(listen, tls.is_some()).map_err(|message| {
            ConfigError::Invalid {
                key: "listen",
                message,
            }
        })?;
        if let Some(addr) = self.metrics_listen {
            crate::telemetry::check_address(addr).map_err(|e| ConfigError::Invalid {
                key: "metrics_listen",
                message: e.to_string(),
            })?;
        }
        Ok(Settings {
            socket: self
                .socket
                .unwrap_or_else(|| agent.state_dir.join(SOCKET_NAME)),
            agent,
            listen,
            tls,
            log_format: self.log_format.unwrap_or_default(),
            metrics_listen: self.metrics_listen,
            max_connections: self
                .max_connections
                .map_or(crate::server::DEFAULT_MAX_CONNECTIONS, NonZeroUsize::get),
        })
    }
}

impl QemuUserSection {
    /// A user named without a pool is the operator's choice of one user
    /// for all; otherwise each instance gets a uid of its own.
    fn resolve(self) -> Result<QemuUsers, ConfigError> {
        let pool = match (&self.user, self.uid_pool) {
            (_, Some(pool)) => Some(pool.0),
            (Some(_), None) => None,
            (None, None) => Some(DEFAULT_UID_POOL),
        };
        if let Some(pool) = &pool {
            unused_by_accounts(pool).map_err(|message| ConfigError::Invalid {
                key: "qemu_user.uid_pool",
                message,
            })?;
        }
        let user = self
            .user
            .unwrap_or_else(|| UserName(DEFAULT_QEMU_USER.into()));
        Ok(QemuUsers {
            fixed: user.resolve().map_err(|message| ConfigError::Invalid {
                key: "qemu_user.user",
                message,
            })?,
            name: user.0,
            pool,
        })
    }
}

impl TlsSection {
    /// All three files, or none.
    fn resolve(self) -> Result<Option<TlsFiles>, ConfigError> {
        match (self.cert, self.key, self.ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            _ => Err(ConfigError::Invalid {
                key: "tls",
                message:
                    "mutual TLS needs all of cert, key and ca (--tls-cert, --tls-key, --tls-ca)"
                        .into(),
            }),
        }
    }
}

impl Settings {
    /// Every key with the value in use, as a config file would hold it.
    pub fn effective(&self) -> FileConfig {
        let agent = &self.agent;
        let launch = &agent.launch;
        let stream = agent.migration.stream_tls.as_ref();
        FileConfig {
            state_dir: Some(agent.state_dir.clone()),
            socket: Some(self.socket.clone()),
            listen: self.listen.map(TcpListen),
            qemu_binary: Some(agent.qemu_binary.clone()),
            allowed_roots: Some(
                agent
                    .allowed_roots
                    .given()
                    .iter()
                    .cloned()
                    .map(AbsolutePath)
                    .collect(),
            ),
            allowed_extra_options: Some(agent.allowed_extra_options.clone()),
            log_format: Some(self.log_format),
            confinement: Some(agent.confinement),
            metrics_listen: self.metrics_listen,
            event_buffer: NonZeroUsize::new(agent.event_buffer),
            max_connections: NonZeroUsize::new(self.max_connections),
            tls: TlsSection {
                cert: self.tls.as_ref().map(|t| t.cert.clone()),
                key: self.tls.as_ref().map(|t| t.key.clone()),
                ca: self.tls.as_ref().map(|t| t.ca.clone()),
            },
            qmp: QmpSection {
                timeout_ms: as_millis(launch.qmp.command_timeout),
                greeting_timeout_ms: as_millis(launch.qmp.greeting_timeout),
                operator_socket: Some(launch.operator_qmp),
            },
            stop: StopSection {
                powerdown_timeout_ms: as_millis(agent.stop.powerdown),
                quit_timeout_ms: as_millis(agent.stop.quit),
                kill_timeout_ms: as_millis(agent.stop.kill),
            },
            devices: DevicesSection {
                tap_template: Some(launch.tap_template.clone()),
                unplug_timeout_ms: as_millis(agent.unplug_timeout),
            },
            qemu_log: QemuLogSection {
                max_bytes: NonZeroU64::new(launch.log_max_bytes),
                keep: NonZeroU32::new(launch.log_keep),
            },
            cgroups: CgroupsSection {
                root: Some(AbsolutePath(agent.cgroup_root.clone())),
                parent: Some(CgroupName(agent.cgroup_parent.clone())),
            },
            qemu_user: QemuUserSection {
                user: Some(UserName(agent.qemu_users.name.clone())),
                uid_pool: agent.qemu_users.pool.clone().map(UidRange),
            },
            migration: MigrationSection {
                address: agent.migration.address.parse().ok(),
                ports: Some(PortRange(agent.migration.ports.clone())),
                peer_timeout_ms: as_millis(agent.migration.peer_timeout),
                peer_protocol: Some(agent.migration.peer_protocol),
                stream_cert: stream.map(|s| s.cert.clone()),
                stream_key: stream.map(|s| s.key.clone()),
                stream_ca: stream.map(|s| s.ca.clone()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config.example.toml");

    fn parse_str(text: &str) -> Result<FileConfig, ConfigError> {
        parse(text, Path::new("test.toml"))
    }

    fn parse_error(text: &str) -> (usize, usize, String) {
        match parse_str(text) {
            Err(ConfigError::Parse {
                line,
                column,
                message,
                ..
            }) => (line, column, message),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn a_peer_protocol_this_agent_does_not_speak_is_refused() {
        let older = parse_str("[migration]\npeer_protocol = 1\n")
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(older.agent.migration.peer_protocol, 1);
        let err = parse_str("[migration]\npeer_protocol = 9\n")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("migration.peer_protocol") && err.contains("9"),
            "{err}"
        );
    }

    #[test]
    fn example_config_spells_out_the_defaults() {
        let example = parse_str(EXAMPLE).unwrap().resolve().unwrap();
        let defaults = FileConfig::default().resolve().unwrap();
        assert_eq!(example.effective(), defaults.effective());
    }

    #[test]
    fn unknown_key_is_refused_with_its_line() {
        let (line, column, message) =
            parse_error("state_dir = \"/srv/kvm\"\n\n[stop]\nquit_timeout = 5\n");
        assert_eq!((line, column), (4, 1));
        assert!(
            message.contains("unknown field `quit_timeout`"),
            "{message}"
        );
        assert!(message.contains("quit_timeout_ms"), "{message}");
    }

    #[test]
    fn bad_values_are_refused_with_their_line() {
        let (line, _, message) = parse_error("[qmp]\ntimeout_ms = \"soon\"\n");
        assert_eq!(line, 2);
        assert!(message.contains("invalid type"), "{message}");
        let (line, _, _) = parse_error("[stop]\n\nkill_timeout_ms = 0\n");
        assert_eq!(line, 3);
        let (line, _, message) = parse_error("[migration]\nports = \"9000-8000\"\n");
        assert_eq!(line, 2);
        assert!(message.contains("port range"), "{message}");
        let (line, _, message) = parse_error("log_format = \"xml\"\n");
        assert_eq!(line, 1);
        assert!(message.contains("text"), "{message}");
        let (line, _, message) = parse_error("\nallowed_roots = [\"srv\"]\n");
        assert_eq!(line, 2);
        assert!(message.contains("absolute"), "{message}");
    }

    #[test]
    fn a_user_named_without_a_pool_is_shared_and_otherwise_each_gets_its_own() {
        let by_default = parse_str("").unwrap().resolve().unwrap();
        assert_eq!(by_default.agent.qemu_users.pool, Some(DEFAULT_UID_POOL));
        let shared = parse_str("[qemu_user]\nuser = \"65534:65534\"\n")
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(shared.agent.qemu_users.pool, None);
        let both = parse_str("[qemu_user]\nuser = \"65534:65534\"\nuid_pool = \"71000-71009\"\n")
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(both.agent.qemu_users.pool, Some(71000..=71009));
    }

    #[test]
    fn a_pool_over_an_account_is_refused() {
        // Root's group, and uid 0 itself, exist on every host.
        let err = parse_str("[qemu_user]\nuid_pool = \"1-1\"\n")
            .unwrap()
            .resolve()
            .map(|_| ())
            .expect_err("uid 1 is an account on Debian");
        let message = err.to_string();
        assert!(
            message.contains("choose a range no account uses"),
            "{message}"
        );
    }

    #[test]
    fn subordinate_ranges_that_meet_the_pool_are_found() {
        let subuid = "alice:100000:65536\nbob:165536:65536\n";
        assert_eq!(subordinate_overlap(subuid, &(70000..=70999)), None);
        assert_eq!(
            subordinate_overlap(subuid, &(165000..=165600)),
            Some(("alice".into(), 100000, 165535))
        );
        assert_eq!(
            subordinate_overlap(subuid, &(231071..=231071)),
            Some(("bob".into(), 165536, 231071))
        );
        assert_eq!(subordinate_overlap("garbage\n:1:\n", &(0..=u32::MAX)), None);
    }

    #[test]
    fn upper_layers_win_key_by_key() {
        let file = parse_str(
            "qemu_binary = \"/opt/qemu\"\n[stop]\nquit_timeout_ms = 7000\nkill_timeout_ms = 8000\n",
        )
        .unwrap();
        let flags = FileConfig {
            stop: StopSection {
                kill_timeout_ms: NonZeroU64::new(1000),
                ..Default::default()
            },
            ..Default::default()
        };
        let settings = flags.over(file).resolve().unwrap();
        assert_eq!(settings.agent.qemu_binary, PathBuf::from("/opt/qemu"));
        assert_eq!(settings.agent.stop.quit, Duration::from_secs(7));
        assert_eq!(settings.agent.stop.kill, Duration::from_secs(1));
    }

    #[test]
    fn effective_config_reads_back_as_itself() {
        let settings =
            parse_str("listen = \"tcp://127.0.0.1:7070\"\n[migration]\nports = \"50000-50010\"\n")
                .unwrap()
                .resolve()
                .unwrap();
        let printed = toml::to_string(&settings.effective()).unwrap();
        let again = parse_str(&printed).unwrap().resolve().unwrap();
        assert_eq!(again.effective(), settings.effective());
        assert!(
            printed.contains("listen = \"tcp://127.0.0.1:7070\""),
            "{printed}"
        );
    }

    #[test]
    fn whole_config_rules_name_the_key() {
        let err = parse_str("listen = \"tcp://0.0.0.0:7070\"\n")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().starts_with("listen: "), "{err}");
        let err = parse_str("[tls]\ncert = \"/etc/a.pem\"\n")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().starts_with("tls: "), "{err}");
    }
}
