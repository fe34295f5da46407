//! An async QMP client.
//!
//! One reader task owns the read half of the socket: it routes each reply to
//! the caller waiting for it and broadcasts events, so a caller can wait for
//! `DEVICE_DELETED` or `RESET` while other commands flow. QEMU answers
//! in-band commands in the order it got them, so those are sent without an
//! `id` and their replies matched in that order: QEMU reads QMP input one
//! byte per turn of its main loop, and an id is most of a short command.
//! Out-of-band commands, whose replies may overtake, carry one. Every
//! command has a timeout, and QEMU's error `class` and `desc` are kept.
//!
//! A fault (a line that isn't QMP, an over-long line, a reply that never
//! comes, a hang-up) drops the connection: after a timeout a late reply
//! could only confuse the next caller. A client made with
//! [`QmpClient::connect`] rebuilds it on the next command, so one bad moment
//! doesn't cost the instance its monitor. Event subscribers keep their
//! subscription across the rebuild.
//!
//! Asked to, and where QEMU offers it, the client enables out-of-band
//! execution: a few commands (`migrate-recover`) must get through while
//! QEMU's main loop is blocked, as it is when a guest waits for memory a
//! broken postcopy stream never brings. It costs fd passing round trips
//! (see [`QmpClient::pipeline`]), so only QEMUs that may need it ask.

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use sendfd::SendWithFd;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use crate::qemu_info::{CommandSet, QemuVersion};

mod parse;

pub use parse::{Incoming, offers_out_of_band, parse_greeting, parse_incoming};

/// Timeouts and bounds of a QMP connection.
#[derive(Debug, Clone, Copy)]
pub struct QmpConfig {
    /// How long to wait for the greeting after connecting.
    pub greeting_timeout: Duration,
    /// Default timeout of one command.
    pub command_timeout: Duration,
    /// Longest line accepted from QEMU; a longer one drops the connection.
    pub max_line_bytes: usize,
    /// Enable out-of-band execution where QEMU offers it.
    pub out_of_band: bool,
}

impl Default for QmpConfig {
    fn default() -> Self {
        Self {
            greeting_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(10),
            max_line_bytes: 1024 * 1024,
            out_of_band: false,
        }
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `SHUTDOWN`.
    pub name: String,
    /// Its `data`, or `null`.
    pub data: Value,
}

/// What can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting, reading or writing failed.
    #[error("QMP socket I/O failed")]
    Io(#[from] std::io::Error),
    /// QEMU didn't greet in time.
    #[error("no QMP greeting within {0:?}")]
    NoGreeting(Duration),
    /// A command got no reply in time.
    #[error("QMP command {command} got no reply within {after:?}")]
    Timeout {
        /// Command name.
        command: String,
        /// The timeout.
        after: Duration,
    },
    /// The connection is gone.
    #[error("QMP connection closed{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Disconnected {
        /// Why, when known.
        reason: Option<String>,
    },
    /// QEMU sent something that isn't QMP.
    #[error("QMP protocol violation: {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Qemu {
        /// Command name.
        command: String,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The command isn't in this QEMU's `query-commands`.
    #[error("this QEMU does not support the QMP command {0}")]
    Unsupported(String),
}

impl QmpError {
    /// Whether reconnecting could help: a dropped or confused connection,
    /// not an error QEMU gave on purpose.
    pub fn should_reconnect(&self) -> bool {
        matches!(
            self,
            QmpError::Io(_)
                | QmpError::Disconnected { .. }
                | QmpError::Protocol(_)
                | QmpError::Timeout { .. }
        )
    }
}

type ReplySender = oneshot::Sender<Result<Value, QmpError>>;

/// The commands sent on a connection and not yet answered.
#[derive(Default)]
struct Waiters {
    /// Out-of-band commands, by the id each was sent with.
    by_id: HashMap<u64, ReplySender>,
    /// In-band commands, in the order they were written.
    in_order: VecDeque<ReplySender>,
}

/// What one connection's reader shares with its writers.
struct Shared {
    waiters: Mutex<Waiters>,
    closed: watch::Sender<Option<String>>,
}

impl Shared {
    /// Marks the connection gone and fails every waiting command. The first
    /// reason wins.
    fn finish(&self, reason: String) {
        let waiters = std::mem::take(&mut *lock(&self.waiters));
        let senders = waiters.by_id.into_values().chain(waiters.in_order);
        for tx in senders {
            let _ = tx.send(Err(QmpError::Disconnected {
                reason: Some(reason.clone()),
            }));
        }
        self.closed.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason);
            true
        });
    }
}

/// One socket to QEMU, from greeting to hang-up.
struct Connection {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// The socket, for `shutdown`; valid while `writer` lives.
    socket: RawFd,
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    /// The greeting offered out-of-band execution (enabled in the handshake).
    out_of_band: bool,
}

impl Connection {
    /// Reads the greeting and starts the reader task.
    async fn open(
        stream: UnixStream,
        config: &QmpConfig,
        events: broadcast::Sender<QmpEvent>,
    ) -> Result<(Arc<Connection>, QemuVersion), QmpError> {
        let socket = stream.as_raw_fd();
        let (read, writer) = stream.into_split();
        let mut lines =
            FramedRead::new(read, LinesCodec::new_with_max_length(config.max_line_bytes));
        let greeting = tokio::time::timeout(config.greeting_timeout, lines.next())
            .await
            .map_err(|_| QmpError::NoGreeting(config.greeting_timeout))?;
        let greeting = match greeting {
            None => {
                return Err(QmpError::Disconnected {
                    reason: Some("before the greeting".into()),
                });
            }
            Some(line) => line.map_err(line_error)?,
        };
        let version = parse_greeting(&greeting)?;
        let out_of_band = config.out_of_band && offers_out_of_band(&greeting);
        let (closed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            waiters: Mutex::default(),
            closed,
        });
        let reader = tokio::spawn(read_loop(lines, socket, shared.clone(), events));
        Ok((
            Arc::new(Connection {
                writer: tokio::sync::Mutex::new(writer),
                socket,
                shared,
                reader,
                out_of_band,
            }),
            version,
        ))
    }

    fn closed_reason(&self) -> Option<String> {
        self.shared.closed.borrow().clone()
    }

    /// The handshake's `qmp_capabilities`, enabling what the greeting offered.
    fn capabilities(&self) -> Command<'static> {
        match self.out_of_band {
            true => Command::new("qmp_capabilities", json!({ "enable": ["oob"] })),
            false => Command::bare("qmp_capabilities"),
        }
    }

    /// Drops the connection: waiting commands fail, and QEMU sees the
    /// hang-up at once (its monitor serves one client at a time, so a
    /// rebuilt connection is only greeted after this).
    fn drop_with(&self, reason: String) {
        tracing::warn!(%reason, "dropping the QMP connection");
        self.reader.abort();
        self.shared.finish(reason);
        let _ = nix::sys::socket::shutdown(self.socket, nix::sys::socket::Shutdown::Both);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A QMP client after the capabilities handshake.
pub struct QmpClient {
    connection: Mutex<Arc<Connection>>,
    /// Serializes rebuilds, so a burst of callers opens one connection.
    rebuilding: tokio::sync::Mutex<()>,
    /// Where to reconnect; `None` for a client made from a stream.
    path: Option<PathBuf>,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    config: QmpConfig,
    version: QemuVersion,
    commands: Arc<CommandSet>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("version", &self.version)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Commands that are sent before `query-commands` is known.
const HANDSHAKE_COMMANDS: [&str; 2] = ["qmp_capabilities", "query-commands"];
/// Events a slow subscriber may fall behind by before it misses some.
const EVENT_BUFFER: usize = 256;

impl QmpClient {
    /// Connects to a QMP unix socket and completes the handshake. After a
    /// fault, the client reconnects to the same path on the next command.
    pub async fn connect(path: &Path, config: QmpConfig) -> Result<Self, QmpError> {
        Self::connect_knowing(path, config, None).await
    }

    /// [`Self::connect`] to a QEMU whose `commands` are known, as another of
    /// its binary listed them: the handshake doesn't ask again.
    pub async fn connect_knowing(
        path: &Path,
        config: QmpConfig,
        commands: Option<Arc<CommandSet>>,
    ) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let mut client = Self::handshake_knowing(stream, config, commands).await?;
        client.path = Some(path.to_owned());
        Ok(client)
    }

    /// Reads the greeting, sends `qmp_capabilities` and learns the supported
    /// commands. Such a client can't reconnect once its stream is gone.
    pub async fn handshake(stream: UnixStream, config: QmpConfig) -> Result<Self, QmpError> {
        Self::handshake_knowing(stream, config, None).await
    }

    async fn handshake_knowing(
        stream: UnixStream,
        config: QmpConfig,
        commands: Option<Arc<CommandSet>>,
    ) -> Result<Self, QmpError> {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (connection, version) = Connection::open(stream, &config, events.clone()).await?;
        let mut client = QmpClient {
            connection: Mutex::new(connection.clone()),
            rebuilding: tokio::sync::Mutex::new(()),
            path: None,
            events,
            next_id: AtomicU64::new(1),
            config,
            version,
            commands: Arc::default(),
        };
        let timeout = client.config.command_timeout;
        let mut handshake = vec![connection.capabilities()];
        if commands.is_none() {
            // QEMU answers in order, so this one runs in command mode.
            handshake.push(Command::bare("query-commands"));
        }
        let mut replies = client
            .exchange(&connection, handshake, timeout)
            .await
            .into_iter();
        replies.next().expect("the capabilities' reply")?;
        client.commands = match commands {
            Some(known) => known,
            None => {
                let listed = replies.next().expect("the commands' reply")?;
                Arc::new(
                    listed
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c.get("name")?.as_str().map(str::to_owned))
                        .collect(),
                )
            }
        };
        Ok(client)
    }

    /// QEMU's version from the greeting.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// Whether this QEMU has the command.
    pub fn supports(&self, command: &str) -> bool {
        self.commands.contains(command)
    }

    /// The commands this QEMU offers.
    pub fn commands(&self) -> Arc<CommandSet> {
        self.commands.clone()
    }

    /// Subscribes to events from now on, across reconnections.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// True while the current connection is gone (until a rebuild).
    pub fn is_closed(&self) -> bool {
        self.current().closed_reason().is_some()
    }

    /// Waits until the current connection is gone and returns why.
    pub async fn closed(&self) -> String {
        let mut rx = self.current().shared.closed.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return "reader ended".into();
            }
        }
    }

    /// Runs a command with the default timeout.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, self.config.command_timeout)
            .await
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send(command, arguments, None, timeout).await
    }

    /// Runs a command out of band: QEMU runs it at once, even while its
    /// main loop is blocked. Only commands QEMU allows out of band
    /// (`allow-oob`), on a QEMU that offered it.
    pub async fn execute_out_of_band(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let batch = vec![Command {
            name: command,
            arguments,
            fd: None,
            out_of_band: true,
        }];
        self.send_batch(batch, self.config.command_timeout)
            .await
            .pop()
            .unwrap_or(Err(QmpError::Disconnected { reason: None }))
    }

    /// Runs a command whose fd rides in the same `sendmsg` (SCM_RIGHTS), as
    /// `getfd` and `add-fd` need. QEMU keeps its own copy; the caller's fd
    /// stays the caller's.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        self.send(command, arguments, Some(fd), self.config.command_timeout)
            .await
    }

    /// `getfd`: hands QEMU an fd under a name, for `netdev_add fd=NAME`.
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": name })), fd)
            .await
            .map(drop)
    }

    /// `closefd`: drops a named fd QEMU hasn't used.
    pub async fn closefd(&self, name: &str) -> Result<(), QmpError> {
        self.execute("closefd", Some(json!({ "fdname": name })))
            .await
            .map(drop)
    }

    /// `add-fd`: puts an fd into a new fdset, usable as `/dev/fdset/N`.
    /// Returns the fdset id.
    pub async fn add_fd(&self, fd: BorrowedFd<'_>) -> Result<u64, QmpError> {
        let reply = self.execute_with_fd("add-fd", None, fd).await?;
        reply
            .get("fdset-id")
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::Protocol(format!("add-fd reply without fdset-id: {reply}")))
    }

    /// `remove-fd`: releases an fdset. QEMU closes its fds once nothing
    /// uses them.
    pub async fn remove_fd(&self, fdset_id: u64) -> Result<(), QmpError> {
        self.execute("remove-fd", Some(json!({ "fdset-id": fdset_id })))
            .await
            .map(drop)
    }

    /// Sends several commands back to back and then collects their
    /// replies, in order: one round trip instead of one per command. QEMU
    /// runs them in order, so a command that depends on a failed one fails
    /// too; the caller undoes what succeeded. With out-of-band on, a
    /// command with an fd goes alone instead (see [`sent_alone`]).
    pub async fn pipeline(&self, commands: Vec<Command<'_>>) -> Vec<Result<Value, QmpError>> {
        self.send_batch(commands, self.config.command_timeout).await
    }

    async fn send(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let batch = vec![Command {
            name: command,
            arguments,
            fd,
            out_of_band: false,
        }];
        self.send_batch(batch, timeout)
            .await
            .pop()
            .unwrap_or(Err(QmpError::Disconnected { reason: None }))
    }

    fn current(&self) -> Arc<Connection> {
        lock(&self.connection).clone()
    }

    /// The current connection, rebuilt first if a fault dropped it.
    async fn live_connection(&self) -> Result<Arc<Connection>, QmpError> {
        let current = self.current();
        let Some(reason) = current.closed_reason() else {
            return Ok(current);
        };
        let Some(path) = &self.path else {
            return Err(QmpError::Disconnected {
                reason: Some(reason),
            });
        };
        let _one = self.rebuilding.lock().await;
        let current = self.current();
        if current.closed_reason().is_none() {
            return Ok(current);
        }
        tracing::info!(path = %path.display(), after = %reason, "rebuilding the QMP connection");
        let rebuilt = async {
            let stream = UnixStream::connect(path).await?;
            let (connection, _) =
                Connection::open(stream, &self.config, self.events.clone()).await?;
            let timeout = self.config.command_timeout;
            self.exchange(&connection, vec![connection.capabilities()], timeout)
                .await
                .remove(0)?;
            Ok::<_, QmpError>(connection)
        }
        .await;
        match rebuilt {
            Ok(connection) => {
                *lock(&self.connection) = connection.clone();
                Ok(connection)
            }
            Err(e @ (QmpError::NoGreeting(_) | QmpError::Timeout { .. })) => Err(e),
            Err(e) => Err(QmpError::Disconnected {
                reason: Some(format!("{reason}; reconnecting failed: {e}")),
            }),
        }
    }

    async fn send_batch(
        &self,
        commands: Vec<Command<'_>>,
        timeout: Duration,
    ) -> Vec<Result<Value, QmpError>> {
        let fail_all = |commands: &[Command<'_>], e: &dyn Fn() -> QmpError| {
            commands.iter().map(|_| Err(e())).collect()
        };
        if let Some(bad) = commands
            .iter()
            .find(|c| !HANDSHAKE_COMMANDS.contains(&c.name) && !self.supports(c.name))
        {
            return fail_all(&commands, &|| QmpError::Unsupported(bad.name.to_owned()));
        }
        // A rebuild counts against the command's timeout, so a stop's
        // escalation isn't held up by a QEMU that accepts but never greets.
        let deadline = tokio::time::Instant::now() + timeout;
        let connection = match tokio::time::timeout_at(deadline, self.live_connection()).await {
            Ok(Ok(c)) => c,
            failed => {
                let first = std::cell::Cell::new(Some(match failed {
                    Ok(Err(e)) => e,
                    _ => QmpError::Timeout {
                        command: commands.first().map_or("", |c| c.name).to_owned(),
                        after: timeout,
                    },
                }));
                return fail_all(&commands, &|| {
                    first
                        .take()
                        .unwrap_or(QmpError::Disconnected { reason: None })
                });
            }
        };
        if let Some(command) = commands
            .iter()
            .find(|c| c.out_of_band && !connection.out_of_band)
        {
            let unsupported = format!("{} (out of band)", command.name);
            return fail_all(&commands, &|| QmpError::Unsupported(unsupported.clone()));
        }
        self.exchange_until(&connection, commands, deadline, timeout)
            .await
    }

    /// Sends commands on one connection and collects their replies. A
    /// timeout drops the connection.
    async fn exchange(
        &self,
        connection: &Connection,
        commands: Vec<Command<'_>>,
        timeout: Duration,
    ) -> Vec<Result<Value, QmpError>> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.exchange_until(connection, commands, deadline, timeout)
            .await
    }

    /// [`Self::exchange`] with a deadline; `timeout` is what errors report.
    async fn exchange_until(
        &self,
        connection: &Connection,
        commands: Vec<Command<'_>>,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Vec<Result<Value, QmpError>> {
        let (ids, receivers, lines, mut in_band) = self.register(connection, &commands);
        // Checked after registering, so a reader that ends meanwhile
        // fails these commands instead of leaving them to time out.
        if let Some(reason) = connection.closed_reason() {
            forget(connection, &ids);
            return commands
                .iter()
                .map(|_| {
                    Err(QmpError::Disconnected {
                        reason: Some(reason.clone()),
                    })
                })
                .collect();
        }

        let mut results: Vec<Option<Result<Value, QmpError>>> =
            commands.iter().map(|_| None).collect();
        let outcome = tokio::time::timeout_at(deadline, async {
            let mut receivers = receivers.into_iter();
            let mut answered = 0;
            {
                let mut writer = connection.writer.lock().await;
                for (i, (line, command)) in lines.iter().zip(&commands).enumerate() {
                    let alone = sent_alone(command, connection);
                    if alone {
                        for slot in &mut results[answered..i] {
                            *slot = Some(reply(receivers.next()).await);
                        }
                        answered = i;
                    }
                    let place = in_band[i].take();
                    write_command(connection, &mut writer, line, command.fd, place).await?;
                    if alone {
                        results[i] = Some(reply(receivers.next()).await);
                        answered = i + 1;
                    }
                }
            }
            for slot in &mut results[answered..] {
                *slot = Some(reply(receivers.next()).await);
            }
            Ok::<(), std::io::Error>(())
        })
        .await;
        forget(connection, &ids);
        let write_error = match outcome {
            Ok(Err(e)) => Some(e.to_string()),
            _ => None,
        };
        if let Some(unanswered) = results.iter().zip(&commands).find(|(r, _)| r.is_none()) {
            let reason = match &write_error {
                Some(e) => format!("writing {} failed: {e}", unanswered.1.name),
                None => format!("{} got no reply within {timeout:?}", unanswered.1.name),
            };
            connection.drop_with(reason);
        }
        outcomes(results, &commands, write_error, timeout)
    }

    /// Gives each command a place for its reply and renders its line: the
    /// ids of the out-of-band ones (registered here), the reply receivers,
    /// the lines, and the reply senders of the in-band ones (registered as
    /// each line is written), in command order.
    fn register(&self, connection: &Connection, commands: &[Command<'_>]) -> Registered {
        let mut ids = Vec::new();
        let mut receivers = Vec::with_capacity(commands.len());
        let mut lines = Vec::with_capacity(commands.len());
        let mut in_band = Vec::with_capacity(commands.len());
        for command in commands {
            let (tx, rx) = oneshot::channel();
            let mut message = match command.out_of_band {
                true => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    lock(&connection.shared.waiters).by_id.insert(id, tx);
                    ids.push(id);
                    in_band.push(None);
                    json!({ "exec-oob": command.name, "id": id })
                }
                false => {
                    in_band.push(Some(tx));
                    json!({ "execute": command.name })
                }
            };
            if let Some(arguments) = &command.arguments {
                message["arguments"] = arguments.clone();
            }
            let mut line = message.to_string();
            // Nothing may follow a command sent alone, not even its newline.
            if !sent_alone(command, connection) {
                line.push('\n');
            }
            receivers.push(rx);
            lines.push(line);
        }
        (ids, receivers, lines, in_band)
    }
}

/// What [`QmpClient::register`] hands back.
type Registered = (
    Vec<u64>,
    Vec<oneshot::Receiver<Result<Value, QmpError>>>,
    Vec<String>,
    Vec<Option<ReplySender>>,
);

/// Drops the connection when a caller gives up on a command while its line
/// is being written: QEMU may hold part of the line, and the in-band
/// replies would be matched one off.
struct AbandonedWrite<'a> {
    connection: Option<&'a Connection>,
}

impl<'a> AbandonedWrite<'a> {
    fn arm(connection: &'a Connection) -> Self {
        AbandonedWrite {
            connection: Some(connection),
        }
    }

    fn disarm(&mut self) {
        self.connection = None;
    }
}

impl Drop for AbandonedWrite<'_> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection {
            connection.drop_with("a command was abandoned while it was being written".into());
        }
    }
}

/// The reply `rx` brings, or a disconnection if it can't come.
async fn reply(rx: Option<oneshot::Receiver<Result<Value, QmpError>>>) -> Result<Value, QmpError> {
    match rx {
        Some(rx) => rx
            .await
            .unwrap_or(Err(QmpError::Disconnected { reason: None })),
        None => Err(QmpError::Disconnected { reason: None }),
    }
}

/// Stops waiting for the replies of the out-of-band commands `ids`,
/// whatever became of them. An in-band command's place stays until its
/// reply comes, so the ones after it are matched right.
fn forget(connection: &Connection, ids: &[u64]) {
    let mut waiters = lock(&connection.shared.waiters);
    for id in ids {
        waiters.by_id.remove(id);
    }
}

/// Each command's result: its reply with QEMU's errors named after the
/// command, or for a command left unanswered, the write error or a
/// timeout.
fn outcomes(
    results: Vec<Option<Result<Value, QmpError>>>,
    commands: &[Command<'_>],
    write_error: Option<String>,
    timeout: Duration,
) -> Vec<Result<Value, QmpError>> {
    results
        .into_iter()
        .zip(commands)
        .map(|(result, command)| match result {
            None => Err(match &write_error {
                Some(e) => QmpError::Disconnected {
                    reason: Some(e.clone()),
                },
                None => QmpError::Timeout {
                    command: command.name.to_owned(),
                    after: timeout,
                },
            }),
            Some(Err(QmpError::Qemu { class, desc, .. })) => Err(QmpError::Qemu {
                command: command.name.to_owned(),
                class,
                desc,
            }),
            Some(other) => other,
        })
        .collect()
}

/// One command of a [`QmpClient::pipeline`].
#[derive(Debug)]
pub struct Command<'a> {
    /// Command name.
    pub name: &'a str,
    /// Its arguments.
    pub arguments: Option<Value>,
    /// An fd to send in the same `sendmsg`.
    pub fd: Option<BorrowedFd<'a>>,
    /// Sent as `exec-oob`, run by QEMU at once.
    pub out_of_band: bool,
}

impl<'a> Command<'a> {
    /// A command with arguments.
    pub fn new(name: &'a str, arguments: Value) -> Self {
        Command {
            name,
            arguments: Some(arguments),
            fd: None,
            out_of_band: false,
        }
    }

    /// A command without arguments.
    pub fn bare(name: &'a str) -> Self {
        Command {
            name,
            arguments: None,
            fd: None,
            out_of_band: false,
        }
    }

    /// Attaches an fd (SCM_RIGHTS) to the command.
    pub fn with_fd(mut self, fd: BorrowedFd<'a>) -> Self {
        self.fd = Some(fd);
        self
    }
}

/// Whether `command` must be the only bytes QEMU has to read from the
/// moment it is written until it is answered: a command carrying an fd,
/// on a connection with out-of-band on.
///
/// Out of band, QEMU's monitor thread reads the socket while its main
/// thread runs the commands. In QEMU 7.2 to 10.0, every read walks the list
/// of fds received and not yet taken, while `getfd` or `add-fd` in the
/// main thread takes and frees that list: a byte read at that moment (the
/// next command, or only the newline after this one) crashes QEMU with a
/// NULL dereference in the monitor thread. So such a command waits for
/// every reply before it, is written without a newline, and is answered
/// before anything else is written. Without out-of-band, the main thread
/// does the reading too, and the commands around an fd may be pipelined.
fn sent_alone(command: &Command<'_>, connection: &Connection) -> bool {
    command.fd.is_some() && connection.out_of_band
}

/// Writes one command's line, taking its place among the in-band replies
/// first when it is in-band: its reply is the next after those of the
/// commands written before it.
async fn write_command(
    connection: &Connection,
    writer: &mut OwnedWriteHalf,
    line: &str,
    fd: Option<BorrowedFd<'_>>,
    in_band: Option<ReplySender>,
) -> std::io::Result<()> {
    let mut abandoned = AbandonedWrite::arm(connection);
    if let Some(tx) = in_band {
        lock(&connection.shared.waiters).in_order.push_back(tx);
    }
    let written = write_line(writer, line.as_bytes(), fd).await;
    abandoned.disarm();
    written
}

/// Writes one command line, with an fd attached when given.
///
/// The fd rides on the first chunk of the line, so QEMU has it by the time
/// it parses the command. `sendfd` sends without `MSG_NOSIGNAL`: a QEMU
/// that hung up gives `EPIPE`, not a signal, because Rust programs ignore
/// `SIGPIPE`, as the plain writes already rely on.
async fn write_line(
    writer: &mut OwnedWriteHalf,
    line: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let Some(fd) = fd else {
        return writer.write_all(line).await;
    };
    let stream: &UnixStream = writer.as_ref();
    let sent = loop {
        stream.writable().await?;
        match stream.send_with_fd(line, &[fd.as_raw_fd()]) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    // The fd went with the first chunk; the rest of a long line follows.
    writer.write_all(&line[sent..]).await
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn line_error(e: LinesCodecError) -> QmpError {
    match e {
        LinesCodecError::MaxLineLengthExceeded => {
            QmpError::Protocol("a line exceeded the length bound".into())
        }
        LinesCodecError::Io(e) => QmpError::Io(e),
    }
}

async fn read_loop(
    mut lines: FramedRead<tokio::net::unix::OwnedReadHalf, LinesCodec>,
    socket: RawFd,
    shared: Arc<Shared>,
    events: broadcast::Sender<QmpEvent>,
) {
    let reason = loop {
        let line = match lines.next().await {
            None => break "QEMU closed the socket".to_owned(),
            Some(Err(e)) => break line_error(e).to_string(),
            Some(Ok(line)) => line,
        };
        match parse_incoming(&line) {
            Ok(Incoming::Event(event)) => {
                tracing::debug!(event = %event.name, "qmp event");
                // No subscriber is fine: nobody is waiting for events.
                let _ = events.send(event);
            }
            Ok(Incoming::Reply { id, result }) => {
                let waiter = {
                    let mut waiters = lock(&shared.waiters);
                    match id {
                        Some(id) => waiters.by_id.remove(&id),
                        None => waiters.in_order.pop_front(),
                    }
                };
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(result.map_err(|(class, desc)| QmpError::Qemu {
                            command: String::new(),
                            class,
                            desc,
                        }));
                    }
                    None => tracing::warn!(?id, "a QMP reply nobody waits for"),
                }
            }
            Err(e) => break e.to_string(),
        }
    };
    tracing::debug!(%reason, "qmp connection closed");
    shared.finish(reason);
    // Hang up for good, so QEMU's monitor is free for a new connection.
    // `lines` still owns the socket here.
    let _ = nix::sys::socket::shutdown(socket, nix::sys::socket::Shutdown::Both);
}

#[cfg(test)]
pub(crate) mod tests {
    use tokio::io::{AsyncBufReadExt, BufReader};

    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;

    fn config() -> QmpConfig {
        QmpConfig {
            greeting_timeout: Duration::from_millis(500),
            command_timeout: Duration::from_millis(500),
            max_line_bytes: 4096,
            out_of_band: false,
        }
    }

    /// A scripted peer: greets, answers the handshake, then runs `script`
    /// on each later request line.
    async fn fake_qemu<F>(server: UnixStream, mut script: F)
    where
        F: FnMut(Value) -> Vec<String> + Send + 'static,
    {
        let (read, mut write) = server.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(format!("{GREETING}\n").as_bytes())
            .await
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let req: Value = serde_json::from_str(&line).unwrap();
            let id = req["id"].clone();
            let name = req["execute"].as_str().or(req["exec-oob"].as_str());
            let replies = match name.unwrap() {
                "qmp_capabilities" => vec![json!({"return": {}, "id": id}).to_string()],
                "query-commands" => vec![
                    json!({"return": [{"name": "query-status"}, {"name": "quit"}, {"name": "cont"}], "id": id})
                        .to_string(),
                ],
                _ => script(req),
            };
            for r in replies {
                if write.write_all(format!("{r}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }

    /// A client of a fake QEMU that answers each command with `script`'s lines.
    pub(crate) async fn connected<F>(script: F) -> QmpClient
    where
        F: FnMut(Value) -> Vec<String> + Send + 'static,
    {
        connected_with(config(), script).await
    }

    async fn connected_with<F>(config: QmpConfig, script: F) -> QmpClient
    where
        F: FnMut(Value) -> Vec<String> + Send + 'static,
    {
        let (client, server) = UnixStream::pair().unwrap();
        tokio::spawn(fake_qemu(server, script));
        QmpClient::handshake(client, config).await.unwrap()
    }

    #[test]
    fn greeting_gives_version() {
        assert_eq!(
            parse_greeting(GREETING).unwrap(),
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
    }

    #[test]
    fn out_of_band_is_used_only_where_the_greeting_offers_it() {
        assert!(offers_out_of_band(GREETING));
        let without = GREETING.replace(r#"["oob"]"#, "[]");
        assert!(!offers_out_of_band(&without));
        assert!(!offers_out_of_band("not json"));
    }

    fn answer_how_it_came(req: Value) -> Vec<String> {
        let how = match req.get("exec-oob") {
            Some(_) => "oob",
            None => "in band",
        };
        vec![json!({"return": {"status": how}, "id": req["id"]}).to_string()]
    }

    #[tokio::test]
    async fn out_of_band_is_off_unless_asked_for() {
        let client = connected(answer_how_it_came).await;

        let refused = client.execute_out_of_band("cont", None).await;

        assert!(
            matches!(refused, Err(QmpError::Unsupported(_))),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn an_out_of_band_command_goes_as_exec_oob() {
        let config = QmpConfig {
            out_of_band: true,
            ..config()
        };
        let client = connected_with(config, answer_how_it_came).await;

        let reply = client.execute_out_of_band("cont", None).await.unwrap();

        assert_eq!(reply["status"], "oob");
        let reply = client.execute("cont", None).await.unwrap();
        assert_eq!(reply["status"], "in band");
    }

    #[tokio::test]
    async fn only_out_of_band_commands_carry_an_id() {
        let config = QmpConfig {
            out_of_band: true,
            ..config()
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let client = connected_with(config, move |req| {
            lock(&log).push(req.clone());
            answer_how_it_came(req)
        })
        .await;

        client.execute("cont", None).await.unwrap();
        client.execute_out_of_band("cont", None).await.unwrap();

        let seen = lock(&seen).clone();
        assert!(seen[0].get("id").is_none(), "{}", seen[0]);
        assert!(seen[1]["id"].is_u64(), "{}", seen[1]);
    }

    #[tokio::test]
    async fn an_out_of_band_reply_may_overtake_an_in_band_one() {
        let config = QmpConfig {
            out_of_band: true,
            ..config()
        };
        // The in-band reply is held back until the out-of-band command
        // has been answered, as QEMU does when its main loop is busy.
        let client = connected_with(config, |req| match req.get("exec-oob") {
            None => vec![],
            Some(_) => vec![
                json!({"return": {"status": "oob"}, "id": req["id"]}).to_string(),
                json!({"return": {"status": "in band"}}).to_string(),
            ],
        })
        .await;

        let (in_band, out_of_band) = tokio::join!(client.execute("query-status", None), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.execute_out_of_band("cont", None).await
        });

        assert_eq!(in_band.unwrap()["status"], "in band");
        assert_eq!(out_of_band.unwrap()["status"], "oob");
    }

    #[tokio::test]
    async fn a_caller_that_stops_waiting_keeps_its_place_in_line() {
        // `quit` is answered only when the next command comes, after its
        // caller has given up.
        let client = connected(|req| match req["execute"].as_str() {
            Some("quit") => vec![],
            _ => vec![
                json!({"return": {"status": "quit"}}).to_string(),
                json!({"return": {"status": "cont"}}).to_string(),
            ],
        })
        .await;

        let gave_up =
            tokio::time::timeout(Duration::from_millis(50), client.execute("quit", None)).await;
        let reply = client.execute("cont", None).await.unwrap();

        assert!(gave_up.is_err());
        assert_eq!(reply["status"], "cont");
    }

    /// A peer that greets and answers every request with `{}`, recording
    /// what was asked.
    async fn recording_qemu(server: UnixStream, asked: Arc<Mutex<Vec<String>>>) {
        let (read, mut write) = server.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = format!("{GREETING}\n");
        write.write_all(greeting.as_bytes()).await.unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let req: Value = serde_json::from_str(&line).unwrap();
            let name = req["execute"].as_str().unwrap_or_default().to_owned();
            asked.lock().unwrap().push(name);
            let reply = json!({"return": {}, "id": req["id"]}).to_string();
            if write
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    #[tokio::test]
    async fn a_qemu_of_known_commands_is_not_asked_for_them() {
        let (client, server) = UnixStream::pair().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(recording_qemu(server, asked.clone()));
        let known: CommandSet = ["query-status".to_owned()].into();

        let client = QmpClient::handshake_knowing(client, config(), Some(Arc::new(known)))
            .await
            .unwrap();

        assert!(client.supports("query-status"));
        assert!(!client.supports("cont"));
        client.execute("query-status", None).await.unwrap();
        let refused = client.execute("cont", None).await;
        assert!(
            matches!(refused, Err(QmpError::Unsupported(_))),
            "{refused:?}"
        );
        assert_eq!(*asked.lock().unwrap(), ["qmp_capabilities", "query-status"]);
    }

    #[tokio::test]
    async fn the_handshake_learns_the_commands_it_then_hands_out() {
        let client = connected(answer_how_it_came).await;

        let commands = client.commands();

        let mut names: Vec<&str> = commands.iter().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["cont", "query-status", "quit"]);
    }

    #[test]
    fn error_reply_keeps_class_and_desc() {
        let parsed = parse_incoming(
            r#"{"id": 7, "error": {"class": "GenericError", "desc": "Duplicate ID"}}"#,
        )
        .unwrap();

        assert_eq!(
            parsed,
            Incoming::Reply {
                id: Some(7),
                result: Err(("GenericError".into(), "Duplicate ID".into()))
            }
        );
    }

    #[tokio::test]
    async fn replies_are_routed_by_id_with_events_interleaved() {
        let client = connected(|req| {
            let id = req["id"].clone();
            vec![
                json!({"event": "RESET", "data": {"guest": false}}).to_string(),
                json!({"return": {"status": "running"}, "id": id}).to_string(),
            ]
        })
        .await;
        let mut events = client.subscribe();

        let status = client.execute("query-status", None).await.unwrap();

        assert_eq!(status["status"], "running");
        assert_eq!(events.recv().await.unwrap().name, "RESET");
    }

    #[tokio::test]
    async fn pipeline_returns_each_reply_in_order_with_failures_in_place() {
        let client = connected(|req| {
            let id = req["id"].clone();
            let reply = match req["execute"].as_str().unwrap() {
                "quit" => json!({"error": {"class": "GenericError", "desc": "not now"}, "id": id}),
                _ => json!({"return": {"status": "running"}, "id": id}),
            };
            vec![reply.to_string()]
        })
        .await;

        let results = client
            .pipeline(vec![
                Command::bare("query-status"),
                Command::bare("quit"),
                Command::bare("query-status"),
            ])
            .await;

        assert_eq!(results.len(), 3);
        assert_eq!(results[0].as_ref().unwrap()["status"], "running");
        assert!(
            matches!(&results[1], Err(QmpError::Qemu { command, desc, .. }) if command == "quit" && desc == "not now"),
            "{:?}",
            results[1]
        );
        assert!(results[2].is_ok());
    }

    #[tokio::test]
    async fn pipeline_with_an_unsupported_command_sends_nothing() {
        let client = connected(|_| panic!("must not be sent")).await;

        let results = client
            .pipeline(vec![
                Command::bare("query-status"),
                Command::bare("device_add"),
            ])
            .await;

        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(QmpError::Unsupported(c)) if c == "device_add"))
        );
    }

    #[tokio::test]
    async fn resume_waits_for_a_completed_stream_to_settle_before_cont() {
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = sent.clone();
        let mut finishing = 3;
        let client = connected(move |req| {
            let command = req["execute"].as_str().unwrap().to_owned();
            let reply = match command.as_str() {
                "query-status" if finishing > 0 => {
                    finishing -= 1;
                    json!({"status": "finish-migrate", "running": false})
                }
                "query-status" => json!({"status": "postmigrate", "running": false}),
                _ => json!({}),
            };
            log.lock().unwrap().push(command);
            vec![json!({"return": reply, "id": req["id"]}).to_string()]
        })
        .await;

        crate::migration::resume(&client).await.unwrap();

        assert_eq!(
            *sent.lock().unwrap(),
            [
                "query-status",
                "query-status",
                "query-status",
                "query-status",
                "cont"
            ],
            "cont only once QEMU has left finish-migrate"
        );
    }

    #[tokio::test]
    async fn unsupported_command_never_reaches_qemu() {
        let client = connected(|_| panic!("must not be sent")).await;

        let err = client.execute("device_add", None).await.unwrap_err();

        assert!(
            matches!(err, QmpError::Unsupported(ref c) if c == "device_add"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn silent_qemu_times_out() {
        let client = connected(|_| vec![]).await;

        let err = client.execute("query-status", None).await.unwrap_err();

        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert!(err.should_reconnect());
    }

    #[tokio::test]
    async fn garbage_line_drops_the_connection_with_a_protocol_error() {
        let client = connected(|_| vec!["this is not json".into()]).await;

        let err = client.execute("query-status", None).await.unwrap_err();

        assert!(
            matches!(err, QmpError::Disconnected { reason: Some(ref r) } if r.contains("not JSON")),
            "{err:?}"
        );
        assert!(client.is_closed());
    }

    #[tokio::test]
    async fn overlong_line_drops_the_connection() {
        let client =
            connected(|_| vec![format!("{{\"return\": \"{}\"}}", "x".repeat(10_000))]).await;

        let err = client.execute("query-status", None).await.unwrap_err();

        assert!(
            matches!(err, QmpError::Disconnected { reason: Some(ref r) } if r.contains("length bound")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn reply_with_unknown_id_is_ignored() {
        let client = connected(|req| {
            let id = req["id"].clone();
            vec![
                json!({"return": {}, "id": 999}).to_string(),
                json!({"return": {"status": "paused"}, "id": id}).to_string(),
            ]
        })
        .await;

        let status = client.execute("query-status", None).await.unwrap();

        assert_eq!(status["status"], "paused");
    }

    /// Serves QMP on a socket path; connection `n` (from 0) runs
    /// `script(n, request)`.
    fn listening_qemu<F>(script: F) -> (tempfile::TempDir, PathBuf)
    where
        F: Fn(usize, Value) -> Vec<String> + Send + Sync + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let script = Arc::new(script);
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let script = script.clone();
                tokio::spawn(fake_qemu(stream, move |req| script(n, req)));
            }
        });
        (dir, path)
    }

    fn reply(req: &Value, ret: Value) -> String {
        json!({"return": ret, "id": req["id"]}).to_string()
    }

    #[tokio::test]
    async fn a_garbage_line_is_survived_by_reconnecting() {
        let (_dir, path) = listening_qemu(|n, req| match n {
            0 => vec!["this is not json".into()],
            _ => vec![
                json!({"event": "RESUME", "data": {}}).to_string(),
                reply(&req, json!({"status": "running"})),
            ],
        });
        let client = QmpClient::connect(&path, config()).await.unwrap();
        let mut events = client.subscribe();

        let err = client.execute("query-status", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Disconnected { .. }), "{err:?}");
        assert!(client.is_closed());

        let status = client.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");
        assert!(!client.is_closed());
        let event = events.recv().await.unwrap();
        assert_eq!(event.name, "RESUME", "subscriptions outlive the rebuild");
    }

    #[tokio::test]
    async fn a_reply_that_never_comes_drops_the_connection_and_the_next_command_reconnects() {
        let (_dir, path) = listening_qemu(|n, req| match n {
            0 => vec![],
            _ => vec![reply(&req, json!({"status": "paused"}))],
        });
        let client = QmpClient::connect(&path, config()).await.unwrap();

        let err = client.execute("query-status", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert!(client.is_closed(), "a timed-out connection is dropped");

        let status = client.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "paused");
    }

    #[tokio::test]
    async fn a_rebuild_that_is_never_greeted_times_out_within_the_command_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (first, _) = listener.accept().await.unwrap();
            tokio::spawn(fake_qemu(first, |_| vec!["garbage".into()]));
            // Later connections wait in the backlog, never greeted.
            std::future::pending::<()>().await;
            drop(listener);
        });
        // A greeting wait far longer than the command's: only the command's
        // own timeout may end the rebuild.
        let patient = QmpConfig {
            greeting_timeout: Duration::from_secs(30),
            ..config()
        };
        let client = QmpClient::connect(&path, patient).await.unwrap();
        let _ = client.execute("query-status", None).await.unwrap_err();

        let started = std::time::Instant::now();
        let err = client.execute("query-status", None).await.unwrap_err();

        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < config().command_timeout * 2);
    }

    #[tokio::test]
    async fn a_client_made_from_a_stream_does_not_reconnect() {
        let client = connected(|_| vec!["garbage".into()]).await;
        let _ = client.execute("query-status", None).await.unwrap_err();

        let err = client.execute("query-status", None).await.unwrap_err();

        assert!(
            matches!(err, QmpError::Disconnected { reason: Some(ref r) } if r.contains("not JSON")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn no_greeting_is_a_typed_error() {
        let (client, _server) = UnixStream::pair().unwrap();

        let err = QmpClient::handshake(client, config()).await.unwrap_err();

        assert!(matches!(err, QmpError::NoGreeting(_)), "{err:?}");
    }

    /// Reads the lines the client sent at once from a blocking socket,
    /// collecting any fds that came with them. The client sends more only
    /// after a reply, so a read never takes part of a later batch.
    fn recv_lines_with_fds(
        sock: &std::os::unix::net::UnixStream,
    ) -> (String, Vec<std::os::fd::OwnedFd>) {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
        let mut line = Vec::new();
        let mut fds = Vec::new();
        while !line.ends_with(b"\n") {
            let mut chunk = [0u8; 64 * 1024];
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
            let mut cmsg = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [std::io::IoSliceMut::new(&mut chunk)];
            let msg = recvmsg(sock, &mut iov, &mut cmsg, RecvFlags::CMSG_CLOEXEC).unwrap();
            for c in cmsg.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = c {
                    fds.extend(received);
                }
            }
            let n = msg.bytes;
            assert!(n > 0, "peer closed");
            line.extend_from_slice(&chunk[..n]);
        }
        (String::from_utf8(line).unwrap(), fds)
    }

    /// Hands `getfd` with a file to a fake QEMU; returns the request it
    /// read, the fds that came with it, and the file.
    async fn getfd_through_a_fake_qemu(
        name: &str,
        config: QmpConfig,
    ) -> (Value, Vec<std::os::fd::OwnedFd>, std::fs::File) {
        let (client_end, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut out = server.try_clone().unwrap();
            use std::io::Write;
            writeln!(out, "{GREETING}").unwrap();
            loop {
                let (lines, fds) = recv_lines_with_fds(&server);
                for line in lines.lines() {
                    let req: Value = serde_json::from_str(line).unwrap();
                    let ret = match req["execute"].as_str().unwrap() {
                        "query-commands" => json!([{"name": "getfd"}]),
                        "getfd" => {
                            writeln!(out, "{}", json!({"return": {}, "id": req["id"]})).unwrap();
                            return (req, fds);
                        }
                        _ => json!({}),
                    };
                    writeln!(out, "{}", json!({"return": ret, "id": req["id"]})).unwrap();
                }
            }
        });
        client_end.set_nonblocking(true).unwrap();
        let client = QmpClient::handshake(UnixStream::from_std(client_end).unwrap(), config)
            .await
            .unwrap();
        let file = tempfile::tempfile().unwrap();

        client
            .getfd(name, std::os::fd::AsFd::as_fd(&file))
            .await
            .unwrap();

        let (req, fds) = peer.join().unwrap();
        (req, fds, file)
    }

    fn same_file(a: &impl AsRawFd, b: &impl AsRawFd) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ino = |fd: i32| {
            std::fs::metadata(format!("/proc/self/fd/{fd}"))
                .unwrap()
                .ino()
        };
        ino(a.as_raw_fd()) == ino(b.as_raw_fd())
    }

    #[tokio::test]
    async fn getfd_sends_the_fd_with_the_command() {
        let (req, fds, file) = getfd_through_a_fake_qemu("net0", config()).await;

        assert_eq!(req["arguments"]["fdname"], "net0");
        assert_eq!(fds.len(), 1, "exactly one fd must cross with the command");
        assert!(
            same_file(&file, &fds[0]),
            "the received fd is the same file"
        );
    }

    #[tokio::test]
    async fn a_line_longer_than_the_socket_buffer_keeps_its_fd() {
        // Far over a Unix socket's send buffer, so the first send is partial
        // and the rest of the line follows without the fd.
        let name = "n".repeat(4 * 1024 * 1024);
        let config = QmpConfig {
            command_timeout: Duration::from_secs(10),
            ..config()
        };

        let (req, fds, file) = getfd_through_a_fake_qemu(&name, config).await;

        assert_eq!(req["arguments"]["fdname"].as_str(), Some(name.as_str()));
        assert_eq!(fds.len(), 1, "the fd crosses once, with the first chunk");
        assert!(
            same_file(&file, &fds[0]),
            "the received fd is the same file"
        );
    }

    /// A fake QEMU with out-of-band on that reads the socket as bytes, the
    /// way QEMU's monitor thread does, and answers every command. After
    /// each command that brought an fd, it waits a moment before
    /// answering; it returns each command's name with whether any byte
    /// came after that command before its reply.
    fn fake_qemu_reading_bytes(
        server: std::os::unix::net::UnixStream,
    ) -> std::thread::JoinHandle<Vec<(String, bool)>> {
        use std::io::Write;
        std::thread::spawn(move || {
            let mut out = server.try_clone().unwrap();
            writeln!(out, "{GREETING}").unwrap();
            let mut seen = Vec::new();
            let mut buf = Vec::new();
            loop {
                let (chunk, fds) = recv_with_fds(&server);
                if chunk.is_empty() {
                    return seen;
                }
                let fd_pending = !fds.is_empty();
                buf.extend_from_slice(&chunk);
                let mut objects = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
                let mut parsed = Vec::new();
                while let Some(Ok(request)) = objects.next() {
                    parsed.push((request, objects.byte_offset()));
                }
                let consumed = parsed.last().map_or(0, |(_, end)| *end);
                for (request, end) in parsed {
                    let name = request["execute"].as_str().unwrap().to_owned();
                    let mut followed = buf.len() > end;
                    if fd_pending && matches!(name.as_str(), "getfd" | "add-fd") {
                        server.set_nonblocking(false).unwrap();
                        server
                            .set_read_timeout(Some(Duration::from_millis(50)))
                            .unwrap();
                        let peeked =
                            rustix::net::recv(&server, &mut [0u8], rustix::net::RecvFlags::PEEK);
                        followed |= peeked.is_ok_and(|(n, _)| n > 0);
                        server.set_read_timeout(None).unwrap();
                    }
                    let ret = match name.as_str() {
                        "query-commands" => json!(
                            ["getfd", "netdev_add", "device_add", "query-status"]
                                .map(|name| json!({ "name": name }))
                        ),
                        _ => json!({}),
                    };
                    writeln!(out, "{}", json!({ "return": ret })).unwrap();
                    seen.push((name, followed));
                }
                buf.drain(..consumed);
            }
        })
    }

    /// One read of whatever the client sent, with the fds that came with it.
    fn recv_with_fds(
        sock: &std::os::unix::net::UnixStream,
    ) -> (Vec<u8>, Vec<std::os::fd::OwnedFd>) {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
        let mut chunk = vec![0u8; 64 * 1024];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [std::io::IoSliceMut::new(&mut chunk)];
        let msg = recvmsg(sock, &mut iov, &mut cmsg, RecvFlags::CMSG_CLOEXEC).unwrap();
        let fds = cmsg
            .drain()
            .flat_map(|c| match c {
                RecvAncillaryMessage::ScmRights(received) => received.collect(),
                _ => Vec::new(),
            })
            .collect();
        chunk.truncate(msg.bytes);
        (chunk, fds)
    }

    #[tokio::test]
    async fn out_of_band_nothing_is_sent_while_qemu_takes_an_fd() {
        let (client_end, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = fake_qemu_reading_bytes(server);
        client_end.set_nonblocking(true).unwrap();
        let config = QmpConfig {
            out_of_band: true,
            ..config()
        };
        let client = QmpClient::handshake(UnixStream::from_std(client_end).unwrap(), config)
            .await
            .unwrap();
        let file = tempfile::tempfile().unwrap();
        let fd = std::os::fd::AsFd::as_fd(&file);

        let replies = client
            .pipeline(vec![
                Command::bare("query-status"),
                Command::new("getfd", json!({ "fdname": "tap0" })).with_fd(fd),
                Command::new(
                    "netdev_add",
                    json!({ "type": "tap", "id": "n", "fd": "tap0" }),
                ),
                Command::new("device_add", json!({ "driver": "virtio-net-pci" })),
            ])
            .await;
        drop(client);

        assert!(replies.iter().all(Result::is_ok), "{replies:?}");
        let seen = peer.join().unwrap();
        let names: Vec<&str> = seen.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names[names.len() - 4..],
            ["query-status", "getfd", "netdev_add", "device_add"]
        );
        let getfd = seen.iter().find(|(name, _)| name == "getfd").unwrap();
        assert!(!getfd.1, "bytes came after getfd before it was answered");
    }

    #[tokio::test]
    async fn socket_closing_mid_command_is_disconnected() {
        let (client_end, server) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let (read, mut write) = server.into_split();
            let mut lines = BufReader::new(read).lines();
            write
                .write_all(format!("{GREETING}\n").as_bytes())
                .await
                .unwrap();
            for _ in 0..2 {
                let line = lines.next_line().await.unwrap().unwrap();
                let req: Value = serde_json::from_str(&line).unwrap();
                let ret = if req["execute"] == "query-commands" {
                    json!([{"name": "query-status"}])
                } else {
                    json!({})
                };
                write
                    .write_all(format!("{}\n", json!({"return": ret, "id": req["id"]})).as_bytes())
                    .await
                    .unwrap();
            }
            let _ = lines.next_line().await; // read the command, then hang up
        });
        let client = QmpClient::handshake(client_end, config()).await.unwrap();

        let err = client.execute("query-status", None).await.unwrap_err();

        assert!(matches!(err, QmpError::Disconnected { .. }), "{err:?}");
    }
}

/// Fuzzing of the decoders QEMU's bytes reach: any line gives a value or a
/// typed error, never a panic. `KVM_AGENT_FUZZ_CASES` sets the case count.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn config() -> ProptestConfig {
        crate::fuzz_config(4000)
    }

    /// JSON values shaped like QMP traffic, with wrong types mixed in.
    fn qmp_like() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("return".to_owned()),
                        Just("error".to_owned()),
                        Just("id".to_owned()),
                        Just("event".to_owned()),
                        Just("class".to_owned()),
                        Just("desc".to_owned()),
                        Just("QMP".to_owned()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_line_is_a_value_or_a_protocol_error(line in ".{0,200}") {
            match parse_incoming(&line) {
                Ok(_) | Err(QmpError::Protocol(_)) => {}
                Err(other) => prop_assert!(false, "unexpected error {other:?}"),
            }
            let _ = parse_greeting(&line);
        }

        #[test]
        fn qmp_shaped_json_never_panics(value in qmp_like()) {
            let line = value.to_string();
            if let Ok(Incoming::Reply { id, .. }) = parse_incoming(&line) {
                prop_assert_eq!(id, value.get("id").and_then(Value::as_u64));
            }
            let _ = parse_greeting(&line);
        }

        #[test]
        fn a_reply_survives_any_extra_fields(
            id in any::<u64>(),
            extra in proptest::collection::btree_map("[a-z]{1,8}", ".{0,8}", 0..4),
        ) {
            let mut reply = json!({"return": {"status": "running"}, "id": id});
            for (k, v) in extra {
                if k != "return" && k != "id" && k != "error" && k != "event" {
                    reply[k] = Value::from(v);
                }
            }
            let parsed = parse_incoming(&reply.to_string()).unwrap();
            prop_assert_eq!(
                parsed,
                Incoming::Reply { id: Some(id), result: Ok(json!({"status": "running"})) }
            );
        }
    }
}
