//! QEMU's side of migration, save and restore: capabilities and
//! parameters, starting an outgoing or incoming stream, and reading
//! `query-migrate`.
//!
//! [`MigrationStatus::from_query`] is pure; the rest are thin QMP calls.
//! Agent-to-agent coordination lives in the agent; TLS on the stream in
//! [`stream_tls`].

pub mod convergence;
pub mod stream_tls;

use std::os::fd::BorrowedFd;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::qmp::{QmpClient, QmpError, QmpEvent};

/// The `fdname` a save or restore stream is passed under.
pub const STREAM_FD_NAME: &str = "kvma-stream";

/// Bandwidth that means "no cap": QEMU's own default of 128 MiB/s makes a
/// save several times slower than the disk allows.
pub const UNCAPPED_BANDWIDTH: u64 = 1 << 40;

/// Settings of one outgoing migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationParameters {
    /// Cap in bytes per second; [`UNCAPPED_BANDWIDTH`] for none.
    pub max_bandwidth: u64,
    /// The longest pause QEMU may plan for the final switch-over.
    pub downtime_limit: Duration,
    /// Throttle the guest's vCPUs when it dirties memory faster than the
    /// link can carry it.
    pub auto_converge: bool,
    /// The share of vCPU time auto-converge takes away first, in percent.
    pub throttle_initial: u8,
    /// What it adds at each pass that still doesn't converge.
    pub throttle_increment: u8,
    /// Send pages that changed since they were sent as XBZRLE deltas
    /// against a cache of this many bytes; `None` sends them whole.
    pub xbzrle_cache: Option<u64>,
    /// Send memory over this many connections besides the main one
    /// (QEMU's multifd), each with a thread of its own on both sides; the
    /// target must expect them ([`prepare_incoming`]). `None` sends it
    /// all over the main one.
    pub multifd_channels: Option<u8>,
    /// Let the guest move to the target before all its memory has
    /// (QEMU's postcopy-ram; the target must allow it too,
    /// [`prepare_incoming`]); it then runs there and fetches the pages it
    /// lacks. Only [`start_postcopy`] makes the switch.
    pub postcopy: bool,
}

impl Default for MigrationParameters {
    fn default() -> Self {
        Self {
            max_bandwidth: UNCAPPED_BANDWIDTH,
            downtime_limit: Duration::from_millis(300),
            auto_converge: true,
            throttle_initial: DEFAULT_THROTTLE_INITIAL,
            throttle_increment: DEFAULT_THROTTLE_INCREMENT,
            xbzrle_cache: None,
            multifd_channels: None,
            postcopy: false,
        }
    }
}

/// QEMU's own first throttle, in percent.
pub const DEFAULT_THROTTLE_INITIAL: u8 = 20;
/// QEMU's own throttle step, in percent.
pub const DEFAULT_THROTTLE_INCREMENT: u8 = 10;
/// The most auto-converge takes (QEMU's `max-cpu-throttle` default).
pub const MAX_THROTTLE: u8 = 99;

/// Where a migration is, as `query-migrate` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationPhase {
    /// Nothing started yet (or QEMU forgot after a restart).
    None,
    /// Setting up.
    Setup,
    /// Copying memory.
    Active,
    /// Copying the last dirty pages and device state with the guest stopped.
    Device,
    /// The guest runs on the target, which fetches the pages it lacks.
    Postcopy,
    /// Postcopy lost its connection: the guest's memory is split between
    /// the two QEMUs, and neither can run it until the stream resumes.
    PostcopyPaused,
    /// Done; the stream is complete.
    Completed,
    /// Failed; see the error.
    Failed,
    /// `migrate_cancel` is under way.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Any other state of a newer QEMU, treated as active.
    Other,
}

impl MigrationPhase {
    /// The phase QEMU names `status` (`query-migrate`, `MIGRATION` events).
    pub fn from_status(status: &str) -> Self {
        match status {
            "none" => Self::None,
            "setup" => Self::Setup,
            "active" | "pre-switchover" => Self::Active,
            "device" => Self::Device,
            "postcopy-active" => Self::Postcopy,
            "postcopy-paused" | "postcopy-recover" | "postcopy-recover-setup" => {
                Self::PostcopyPaused
            }
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelling" => Self::Cancelling,
            "cancelled" => Self::Cancelled,
            _ => Self::Other,
        }
    }

    /// Whether no more progress will come.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// A snapshot of a migration's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// The phase.
    pub phase: MigrationPhase,
    /// QEMU's word for it.
    pub status: String,
    /// RAM bytes sent so far.
    pub transferred_bytes: u64,
    /// RAM bytes still to send (an estimate while the guest runs).
    pub remaining_bytes: u64,
    /// Guest RAM in all.
    pub total_bytes: u64,
    /// How fast the guest dirties memory, in bytes per second.
    pub dirty_rate_bytes_per_second: u64,
    /// QEMU's estimate of the pause at switch-over.
    pub expected_downtime: Option<Duration>,
    /// The real pause, once completed.
    pub downtime: Option<Duration>,
    /// Time since the migration started.
    pub total_time: Option<Duration>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Passes over memory so far: QEMU's dirty-bitmap syncs, one at the
    /// end of each.
    pub passes: u64,
    /// How much vCPU time auto-converge takes from the guest, in percent.
    pub throttle_percent: u8,
    /// Whether the guest runs on the target already, fetching the pages
    /// it still lacks (postcopy).
    pub postcopy: bool,
}

fn millis(v: &Value, key: &str) -> Option<Duration> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(Duration::from_millis)
}

impl MigrationStatus {
    /// Reads a `query-migrate` reply. Pure.
    pub fn from_query(reply: &Value) -> MigrationStatus {
        let status = reply
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_owned();
        let ram = reply.get("ram").cloned().unwrap_or(Value::Null);
        let ram_u64 = |key: &str| ram.get(key).and_then(Value::as_u64).unwrap_or(0);
        let page_size = match ram_u64("page-size") {
            0 => 4096,
            n => n,
        };
        MigrationStatus {
            phase: MigrationPhase::from_status(&status),
            transferred_bytes: ram_u64("transferred"),
            remaining_bytes: ram_u64("remaining"),
            total_bytes: ram_u64("total"),
            dirty_rate_bytes_per_second: ram_u64("dirty-pages-rate").saturating_mul(page_size),
            expected_downtime: millis(reply, "expected-downtime"),
            downtime: millis(reply, "downtime"),
            total_time: millis(reply, "total-time"),
            error: reply
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_owned),
            passes: ram_u64("dirty-sync-count"),
            throttle_percent: reply
                .get("cpu-throttle-percentage")
                .and_then(Value::as_u64)
                .map_or(0, |p| p.min(100) as u8),
            postcopy: status.starts_with("postcopy"),
            status,
        }
    }
}

/// Turns on the capabilities and sets the parameters of an outgoing
/// migration (or save). With `tls_hostname`, the stream is encrypted with
/// the sender's credentials ([`stream_tls::load`] them first), and the
/// receiver's certificate must name that host; without, it is plain.
pub async fn configure(
    qmp: &QmpClient,
    params: &MigrationParameters,
    tls_hostname: Option<&str>,
) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [
            { "capability": "events", "state": true },
            { "capability": "auto-converge", "state": params.auto_converge },
            { "capability": "xbzrle", "state": params.xbzrle_cache.is_some() },
            { "capability": "multifd", "state": params.multifd_channels.is_some() },
            { "capability": "postcopy-ram", "state": params.postcopy },
        ]})),
    )
    .await?;
    let downtime_ms = u64::try_from(params.downtime_limit.as_millis()).unwrap_or(u64::MAX);
    let mut parameters = json!({
        "max-bandwidth": params.max_bandwidth,
        // The same cap after a switch to postcopy; 0 is none.
        "max-postcopy-bandwidth": if params.max_bandwidth < UNCAPPED_BANDWIDTH { params.max_bandwidth } else { 0 },
        "downtime-limit": downtime_ms,
        "cpu-throttle-initial": params.throttle_initial,
        "cpu-throttle-increment": params.throttle_increment,
        // Empty turns TLS off, including an earlier migration's.
        "tls-creds": tls_hostname.map_or("", |_| stream_tls::Endpoint::Sender.object_id()),
        "tls-hostname": tls_hostname.unwrap_or(""),
    });
    if let Some(cache) = params.xbzrle_cache {
        parameters["xbzrle-cache-size"] = json!(cache);
    }
    if let Some(channels) = params.multifd_channels {
        parameters["multifd-channels"] = json!(channels);
    }
    qmp.execute("migrate-set-parameters", Some(parameters))
        .await
        .map(drop)
}

/// Starts sending the guest's state to `uri` (`tcp:HOST:PORT` or `fd:NAME`).
pub async fn start_outgoing(qmp: &QmpClient, uri: &str) -> Result<(), QmpError> {
    qmp.execute("migrate", Some(json!({ "uri": uri })))
        .await
        .map(drop)
}

/// Sends the guest's state into `fd` (the write end of a pipe).
pub async fn start_outgoing_to_fd(qmp: &QmpClient, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
    qmp.getfd(STREAM_FD_NAME, fd).await?;
    if let Err(e) = start_outgoing(qmp, &format!("fd:{STREAM_FD_NAME}")).await {
        let _ = qmp.closefd(STREAM_FD_NAME).await;
        return Err(e);
    }
    Ok(())
}

/// Has a QEMU started with `-incoming defer` announce its stream's status
/// as events, expect `multifd_channels` connections besides the main one,
/// as its source will open, and allow a switch to `postcopy`; before
/// [`start_incoming`].
pub async fn prepare_incoming(
    qmp: &QmpClient,
    multifd_channels: Option<u8>,
    postcopy: bool,
) -> Result<(), QmpError> {
    // Where the stream stands comes as events: the end is seen when it
    // happens, and in postcopy a QEMU waiting for pages may not answer a
    // query.
    let mut capabilities = vec![json!({ "capability": "events", "state": true })];
    if multifd_channels.is_some() {
        capabilities.push(json!({ "capability": "multifd", "state": true }));
    }
    if postcopy {
        capabilities.push(json!({ "capability": "postcopy-ram", "state": true }));
    }
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": capabilities })),
    )
    .await?;
    if let Some(channels) = multifd_channels {
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "multifd-channels": channels })),
        )
        .await?;
    }
    Ok(())
}

/// The kernel setting that lets unprivileged processes handle their own
/// page faults, which a receiving QEMU needs for postcopy.
pub const UNPRIVILEGED_USERFAULTFD: &str = "/proc/sys/vm/unprivileged_userfaultfd";

/// Why a QEMU can't receive a stream in postcopy, from the kernel's
/// `vm.unprivileged_userfaultfd` (none if unreadable) and whether the QEMU
/// runs as a user of its own. Pure.
pub fn postcopy_blocker(unprivileged_userfaultfd: Option<&str>, own_user: bool) -> Option<String> {
    if !own_user || unprivileged_userfaultfd.map(str::trim) != Some("0") {
        return None;
    }
    Some(
        "postcopy needs userfaultfd, which this node's kernel keeps from unprivileged QEMUs; \
         set vm.unprivileged_userfaultfd = 1 (sysctl) on it"
            .into(),
    )
}

/// [`postcopy_blocker`] for this node.
pub fn postcopy_blocker_here(own_user: bool) -> Option<String> {
    let setting = std::fs::read_to_string(UNPRIVILEGED_USERFAULTFD).ok();
    postcopy_blocker(setting.as_deref(), own_user)
}

/// Switches a migration begun with postcopy allowed to postcopy: the
/// guest stops here and goes on on the target, which fetches the pages it
/// still lacks. From here the source can't resume it.
pub async fn start_postcopy(qmp: &QmpClient) -> Result<(), QmpError> {
    qmp.execute("migrate-start-postcopy", None).await.map(drop)
}

/// Makes a QEMU started with `-incoming defer` listen on `uri`.
pub async fn start_incoming(qmp: &QmpClient, uri: &str) -> Result<(), QmpError> {
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await
        .map(drop)
}

/// Makes a QEMU whose incoming postcopy stream broke listen on `uri` for
/// the rest of it ([`resume_outgoing`] on the source). Out of band: such a
/// QEMU's main loop may be stuck behind a vCPU that waits for a page.
pub async fn recover_incoming(qmp: &QmpClient, uri: &str) -> Result<(), QmpError> {
    qmp.execute_out_of_band("migrate-recover", Some(json!({ "uri": uri })))
        .await
        .map(drop)
}

/// Resumes a postcopy stream that broke, sending the rest to `uri`, where
/// the target listens again ([`recover_incoming`]).
pub async fn resume_outgoing(qmp: &QmpClient, uri: &str) -> Result<(), QmpError> {
    qmp.execute("migrate", Some(json!({ "uri": uri, "resume": true })))
        .await
        .map(drop)
}

/// Makes a QEMU started with `-incoming defer` read its state from `fd`
/// (the read end of a pipe).
pub async fn start_incoming_from_fd(qmp: &QmpClient, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
    // Its end comes as an event to whoever waits with a [`StreamWatch`].
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "events", "state": true }] })),
    )
    .await?;
    qmp.getfd(STREAM_FD_NAME, fd).await?;
    if let Err(e) = start_incoming(qmp, &format!("fd:{STREAM_FD_NAME}")).await {
        let _ = qmp.closefd(STREAM_FD_NAME).await;
        return Err(e);
    }
    Ok(())
}

/// Reads the migration's progress.
pub async fn query(qmp: &QmpClient) -> Result<MigrationStatus, QmpError> {
    qmp.execute("query-migrate", None)
        .await
        .map(|reply| MigrationStatus::from_query(&reply))
}

/// Asks QEMU to cancel an outgoing migration.
pub async fn cancel(qmp: &QmpClient) -> Result<(), QmpError> {
    qmp.execute("migrate_cancel", None).await.map(drop)
}

/// Whether the guest's vCPUs run, from `query-status`.
pub async fn guest_running(qmp: &QmpClient) -> Result<bool, QmpError> {
    let status = qmp.execute("query-status", None).await?;
    Ok(status.get("running").and_then(Value::as_bool) == Some(true))
}

/// Pauses the guest's vCPUs.
pub async fn pause(qmp: &QmpClient) -> Result<(), QmpError> {
    qmp.execute("stop", None).await.map(drop)
}

/// Resumes the guest's vCPUs (also after a completed or failed migration),
/// then lets go of the fds left in QEMU's fd sets.
pub async fn resume(qmp: &QmpClient) -> Result<(), QmpError> {
    // A stream that has just completed leaves QEMU in `finish-migrate`
    // until its main loop sets `postmigrate`, which would stop a guest
    // that `cont` had already let run.
    let deadline = tokio::time::Instant::now() + SETTLE_LIMIT;
    while run_state(qmp).await? == "finish-migrate" && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(SETTLE_POLL).await;
    }
    qmp.execute("cont", None).await?;
    release_fdsets(qmp).await;
    Ok(())
}

/// Removes every fd still listed in QEMU's fd sets. The agent leaves none
/// there on purpose once an operation is over: block nodes hold dups of
/// their images. But QEMU closes a removed fd only while the guest runs,
/// so the boot disks' fds of a QEMU that started paused (an incoming one,
/// a pinned one) stay until they are removed again with the guest running.
/// Best effort: a leftover fd costs QEMU an fd, not the operation.
pub async fn release_fdsets(qmp: &QmpClient) {
    let Ok(sets) = qmp.execute("query-fdsets", None).await else {
        return;
    };
    let removals: Vec<crate::qmp::Command<'_>> = sets
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|set| {
            let id = set["fdset-id"].clone();
            set["fds"].as_array().into_iter().flatten().map(move |fd| {
                crate::qmp::Command::new(
                    "remove-fd",
                    serde_json::json!({ "fdset-id": id, "fd": fd["fd"] }),
                )
            })
        })
        .collect();
    if removals.is_empty() {
        return;
    }
    for result in qmp.pipeline(removals).await {
        if let Err(e) = result {
            tracing::debug!(error = %e, "remove-fd after resuming failed");
        }
    }
}

/// How long [`resume`] waits for QEMU to finish a completed stream.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);
const SETTLE_POLL: Duration = Duration::from_millis(5);

async fn run_state(qmp: &QmpClient) -> Result<String, QmpError> {
    let status = qmp.execute("query-status", None).await?;
    Ok(status["status"].as_str().unwrap_or_default().to_owned())
}

/// Paces the reads of a stream's progress: the next read is due at QEMU's
/// next `MIGRATION` event (a change of status, with the `events`
/// capability on) or after the poll interval, whichever comes first. The
/// end of a stream is seen when it happens, not up to an interval later;
/// the interval still bounds the wait where QEMU says nothing.
pub struct StreamWatch {
    /// `None` once the QMP client is gone.
    events: Option<broadcast::Receiver<QmpEvent>>,
}

impl StreamWatch {
    /// Listens from now on: make it before the stream starts, so that no
    /// change of status falls between a read and the wait.
    pub fn new(qmp: &QmpClient) -> Self {
        Self {
            events: Some(qmp.subscribe()),
        }
    }

    /// Waits until the stream's status may have changed.
    pub async fn next(&mut self, interval: Duration) {
        let deadline = tokio::time::sleep(interval);
        tokio::pin!(deadline);
        loop {
            let Some(events) = self.events.as_mut() else {
                return deadline.await;
            };
            tokio::select! {
                () = &mut deadline => return,
                event = events.recv() => match event {
                    Ok(event) if event.name == "MIGRATION" => return,
                    Ok(_) => {}
                    // Whatever was missed may have been the change.
                    Err(RecvError::Lagged(_)) => return,
                    Err(RecvError::Closed) => self.events = None,
                },
            }
        }
    }
}

/// Reads `query-migrate` as `watch` paces it until the stream ends;
/// returns the last status.
pub async fn wait_until_final(
    qmp: &QmpClient,
    mut watch: StreamWatch,
    interval: Duration,
) -> Result<MigrationStatus, QmpError> {
    loop {
        let status = query(qmp).await?;
        if status.phase.is_final() {
            return Ok(status);
        }
        watch.next(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake QEMU that sends `event` just before its answer to any command.
    async fn announcing(event: &'static str) -> QmpClient {
        crate::qmp::tests::connected(move |req| {
            vec![
                json!({"event": event, "data": {"status": "completed"}}).to_string(),
                json!({"return": {}, "id": req["id"]}).to_string(),
            ]
        })
        .await
    }

    #[tokio::test]
    async fn a_change_of_status_ends_the_wait_for_the_next_read() {
        let qmp = announcing("MIGRATION").await;
        let mut watch = StreamWatch::new(&qmp);
        qmp.execute("query-status", None).await.unwrap();

        let waited = tokio::time::Instant::now();
        watch.next(Duration::from_secs(30)).await;

        assert!(waited.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn other_events_leave_the_wait_to_its_interval() {
        let qmp = announcing("RESET").await;
        let mut watch = StreamWatch::new(&qmp);
        qmp.execute("query-status", None).await.unwrap();

        let waited = tokio::time::Instant::now();
        watch.next(Duration::from_millis(200)).await;

        assert!(waited.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn an_active_migration_is_read() {
        let reply = json!({
            "status": "active",
            "expected-downtime": 300,
            "total-time": 1500,
            "ram": {
                "transferred": 100_000_000u64,
                "remaining": 50_000_000u64,
                "total": 268_435_456u64,
                "dirty-pages-rate": 1000,
                "page-size": 4096,
                "dirty-sync-count": 4,
            },
            "cpu-throttle-percentage": 40,
        });
        let s = MigrationStatus::from_query(&reply);
        assert_eq!(s.phase, MigrationPhase::Active);
        assert_eq!(s.transferred_bytes, 100_000_000);
        assert_eq!(s.remaining_bytes, 50_000_000);
        assert_eq!(s.total_bytes, 268_435_456);
        assert_eq!(s.dirty_rate_bytes_per_second, 4_096_000);
        assert_eq!(s.expected_downtime, Some(Duration::from_millis(300)));
        assert_eq!((s.passes, s.throttle_percent, s.postcopy), (4, 40, false));
        assert_eq!(s.downtime, None);
        assert!(!s.phase.is_final());
    }

    #[test]
    fn postcopy_is_refused_only_where_an_unprivileged_qemu_cant_have_userfaultfd() {
        assert!(postcopy_blocker(Some("0\n"), true).is_some());
        assert_eq!(postcopy_blocker(Some("1\n"), true), None);
        assert_eq!(postcopy_blocker(Some("0\n"), false), None);
        assert_eq!(postcopy_blocker(None, true), None);
    }

    #[test]
    fn a_failure_carries_its_reason_and_nothing_is_made_up() {
        let s = MigrationStatus::from_query(&json!({
            "status": "failed",
            "error-desc": "Unable to write to socket: Broken pipe",
        }));
        assert_eq!(s.phase, MigrationPhase::Failed);
        assert!(s.phase.is_final());
        assert_eq!(
            s.error.as_deref(),
            Some("Unable to write to socket: Broken pipe")
        );
        assert_eq!(s.transferred_bytes, 0);
        assert_eq!(
            MigrationStatus::from_query(&json!({})).phase,
            MigrationPhase::None
        );
        let postcopy = MigrationStatus::from_query(&json!({"status": "postcopy-active"}));
        assert_eq!(postcopy.phase, MigrationPhase::Postcopy);
        assert!(postcopy.postcopy);
        let paused = MigrationStatus::from_query(&json!({"status": "postcopy-paused"}));
        assert_eq!(paused.phase, MigrationPhase::PostcopyPaused);
        assert!(!paused.phase.is_final());
    }
}
