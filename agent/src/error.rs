//! The agent's error type and its one mapping to gRPC status codes.

use hotplug::HotplugError;
use hypervisor::guest_agent::GuestAgentError;
use hypervisor::lifecycle::{LaunchError, StopError};
use hypervisor::migration::stream_tls::StreamTlsError;
use hypervisor::probe::ProbeError;
use hypervisor::qmp::QmpError;
use hypervisor::runtime::RuntimeError;
use hypervisor::spec::SpecError;
use runtime_store::StoreError;
use runtime_store::savefile::SaveFileError;
use tonic::{Code, Status};

use crate::events::WatchError;

/// Everything an agent operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed (bad spec, bad uuid, missing field).
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A request field is missing or unusable.
    #[error("{0}")]
    BadRequest(String),
    /// A peer agent's release is too far from this one's to work with.
    #[error("{0}")]
    PeerVersion(String),
    /// No such instance.
    #[error("instance {0:?} not found")]
    NotFound(String),
    /// Start of an instance that runs.
    #[error("instance {name:?} is already running (pid {pid})")]
    AlreadyRunning {
        /// Instance name.
        name: String,
        /// Its QEMU.
        pid: u32,
    },
    /// An operation that needs a running instance.
    #[error("instance {0:?} is not running")]
    NotRunning(String),
    /// Delete or rename of an instance that isn't stopped.
    #[error("instance {name:?} {why}")]
    NotStopped {
        /// Instance name.
        name: String,
        /// What it is doing instead.
        why: String,
    },
    /// A running NIC's tap couldn't move to the bridge asked for; it stays
    /// where it was.
    #[error("instance {instance:?}: NIC {device:?} stays where it was")]
    Bridge {
        /// Instance name.
        instance: String,
        /// The NIC.
        device: String,
        /// Why.
        source: hypervisor::tap::TapError,
    },
    /// A rename to a name another instance has.
    #[error("an instance named {0:?} exists already")]
    NameTaken(String),
    /// Every uid of the QEMU user pool is held by a running instance.
    #[error(
        "instance {instance:?}: every uid of the QEMU user pool {first}-{last} is held by a running instance"
    )]
    QemuUsersExhausted {
        /// Instance name.
        instance: String,
        /// The pool's first uid.
        first: u32,
        /// Its last.
        last: u32,
    },
    /// The uid a runtime runs QEMU as belongs to another running instance.
    #[error(
        "instance {instance:?} runs QEMU as uid {uid}, which instance {holder:?} holds on this node"
    )]
    QemuUserTaken {
        /// Instance name.
        instance: String,
        /// The uid.
        uid: u32,
        /// The instance that has it.
        holder: String,
    },
    /// A disk image isn't there.
    #[error("instance {instance:?}: disk {disk:?} path {path} does not exist")]
    DiskMissing {
        /// Instance name.
        instance: String,
        /// Disk name.
        disk: String,
        /// Its path.
        path: String,
    },
    /// A disk image can't be used.
    #[error("instance {instance:?}: disk {disk:?} path {path} can't be used: {reason}")]
    DiskUnusable {
        /// Instance name.
        instance: String,
        /// Disk name.
        disk: String,
        /// Its path.
        path: String,
        /// Why.
        reason: String,
    },
    /// No such device on the instance.
    #[error("instance {instance:?} has no device {device:?}")]
    DeviceNotFound {
        /// Instance name.
        instance: String,
        /// Device name.
        device: String,
    },
    /// A hotplug operation failed; QEMU and the runtime are as before.
    #[error("instance {instance:?}: hotplug failed")]
    Hotplug {
        /// Instance name.
        instance: String,
        /// What went wrong.
        #[source]
        source: HotplugError,
    },
    /// The guest agent in an instance's guest didn't do what was asked.
    #[error("instance {instance:?}: {source}")]
    GuestAgent {
        /// Instance name.
        instance: String,
        /// What went wrong.
        #[source]
        source: GuestAgentError,
    },
    /// Runtime generation refused the spec or a stored runtime.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The QEMU binary can't be used.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// QEMU couldn't be started.
    #[error("instance {instance:?} failed to start")]
    Launch {
        /// Instance name.
        instance: String,
        /// What went wrong.
        #[source]
        source: LaunchError,
    },
    /// QEMU couldn't be stopped.
    #[error("instance {instance:?} failed to stop")]
    Stop {
        /// Instance name.
        instance: String,
        /// What went wrong.
        #[source]
        source: StopError,
    },
    /// A QMP command failed.
    #[error("instance {instance:?}: QMP failed")]
    Qmp {
        /// Instance name.
        instance: String,
        /// What went wrong.
        #[source]
        source: QmpError,
    },
    /// A record couldn't be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A save file can't be written or read.
    #[error("save file {}", path.display())]
    SaveFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        #[source]
        source: SaveFileError,
    },
    /// The uuid offered doesn't match the instance recorded by that name.
    #[error(
        "instance {instance:?} is recorded here with uuid {recorded}, not {offered}; it is another instance by the same name"
    )]
    UuidMismatch {
        /// Instance name.
        instance: String,
        /// The uuid in this node's record.
        recorded: String,
        /// The uuid offered.
        offered: String,
    },
    /// A QEMU of that name runs without a readable record.
    #[error(
        "a QEMU of instance {name:?} (pid {pid}) runs here without a readable record, maybe on the same disks"
    )]
    Quarantined {
        /// Instance name.
        name: String,
        /// That QEMU.
        pid: u32,
    },
    /// A quarantined instance can't be adopted as it is.
    #[error("instance {instance:?} can't be adopted: {reason}")]
    AdoptionRefused {
        /// Instance name.
        instance: String,
        /// What didn't match.
        reason: String,
    },
    /// A migration from Ganeti's KVM driver whose machine the agent can't
    /// launch with the same hardware.
    #[error("instance {instance:?} can't come from Ganeti's KVM driver: {reason}")]
    GanetiMigrationRefused {
        /// Instance name.
        instance: String,
        /// What can't be reproduced.
        reason: String,
    },
    /// A migration's target is the agent the instance already runs on.
    #[error("instance {0:?} already runs on this node; a migration's target must be another node")]
    MigrationToItself(String),
    /// The other agent of a migration refused or couldn't be reached.
    #[error("target agent {target}: {message}")]
    Peer {
        /// Its address.
        target: String,
        /// What it said, or why it couldn't be reached.
        message: String,
        /// Its status code (UNAVAILABLE when unreachable).
        code: Code,
    },
    /// QEMU's migration failed; the instance stays where it was.
    #[error("instance {instance:?}: migration failed: {reason}")]
    MigrationFailed {
        /// Instance name.
        instance: String,
        /// QEMU's reason.
        reason: String,
    },
    /// An encrypted stream was asked of a node without credentials for it.
    #[error(
        "this agent has no TLS credentials for migration streams: it was started without [tls] \
         and without [migration] stream_cert, stream_key and stream_ca"
    )]
    NoStreamCredentials,
    /// A QEMU can't have the migration stream's credentials.
    #[error("instance {instance:?}: {source}")]
    StreamTls {
        /// Instance name.
        instance: String,
        /// Why.
        #[source]
        source: StreamTlsError,
    },
    /// Precopy stopped converging: the guest dirties memory faster than
    /// the stream carries it.
    #[error(
        "instance {instance:?}: precopy stopped converging after {passes} passes over memory: \
         {remaining_mib} MiB still to send while the guest dirties {dirty_mib_per_second} MiB/s{}, \
         with the guest throttled by {throttle_percent}%",
        bandwidth_mib_per_second.map(|b| format!(" against a cap of {b} MiB/s")).unwrap_or_default()
    )]
    MigrationStalled {
        /// Instance name.
        instance: String,
        /// Passes so far.
        passes: u64,
        /// Memory left after the last pass.
        remaining_mib: u64,
        /// The guest's dirty rate.
        dirty_mib_per_second: u64,
        /// The stream's cap, if it had one.
        bandwidth_mib_per_second: Option<u64>,
        /// Auto-converge's throttle.
        throttle_percent: u8,
    },
    /// This node can't receive a stream in postcopy.
    #[error("{0}")]
    PostcopyUnavailable(String),
    /// Postcopy was asked of a migration that doesn't allow it.
    #[error("instance {0:?}: its migration was started without postcopy")]
    PostcopyNotAllowed(String),
    /// Postcopy was asked for an instance that must never depend on one
    /// link.
    #[error("instance {0:?} is marked never_lose: a broken link in postcopy would lose it")]
    NeverLose(String),
    /// A migration in postcopy lost its stream: the guest's memory is
    /// split between the two nodes.
    #[error(
        "instance {instance:?}: postcopy to {target} was interrupted ({reason}); the guest's memory \
         is split between this node and {target}, and it can't run on either until the stream \
         resumes"
    )]
    PostcopyInterrupted {
        /// Instance name.
        instance: String,
        /// The target agent.
        target: String,
        /// What QEMU or the target said.
        reason: String,
    },
    /// The migration was cancelled; the instance stays where it was.
    #[error("instance {0:?}: migration cancelled")]
    MigrationCancelled(String),
    /// The target got the stream but never said whether it took over.
    #[error(
        "instance {instance:?}: the target {target} did not confirm that it took over ({reason}); the guest stays paused here so it can't run twice"
    )]
    MigrationOutcomeUnknown {
        /// Instance name.
        instance: String,
        /// The target.
        target: String,
        /// What went wrong.
        reason: String,
    },
    /// No migration to finalize or cancel.
    #[error("instance {0:?} has no migration under way")]
    NoMigration(String),
    /// Every port of the migration range is taken.
    #[error("no free migration port in {first}-{last}")]
    NoMigrationPort {
        /// First port of the range.
        first: u16,
        /// Last port of the range.
        last: u16,
    },
    /// A display password for an instance whose display asks for none.
    #[error(
        "instance {0:?}: its display asks for no password; start it with one (VncSpec.password or SpiceSpec.password) first"
    )]
    NoDisplayPassword(String),
    /// The runtime has no memory balloon.
    #[error(
        "instance {0:?} has no memory balloon: its runtime was made before the agent gave every instance one"
    )]
    NoBalloon(String),
    /// The guest didn't reach its memory target in time.
    #[error(
        "instance {instance:?} has {actual_mib} MiB after {waited_ms} ms, not the {target_mib} MiB asked for; the target stays set"
    )]
    BalloonTargetNotReached {
        /// Instance name.
        instance: String,
        /// The target.
        target_mib: u64,
        /// What the guest has.
        actual_mib: u64,
        /// How long the agent waited.
        waited_ms: u64,
    },
    /// A blocking task died.
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller left before the operation began, so it never did.
    #[error("the caller left before the operation began; nothing was done")]
    CallerGone,
}

/// An error and its sources, as one line.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

impl AgentError {
    // Long: one arm per error; the whole table in one place is what lets
    // a reader check every code against every other.
    /// The gRPC code of this error, and a hint at what to do next. Hints
    /// are for any API caller, so they name API methods, not commands;
    /// the command line adds its own (`cli::hint`).
    fn code_and_hint(&self) -> (Code, &'static str) {
        match self {
            AgentError::Spec(_) | AgentError::BadRequest(_) => {
                (Code::InvalidArgument, "fix the request and retry")
            }
            AgentError::PeerVersion(_) => (
                Code::FailedPrecondition,
                "upgrade the older agent, one release at a time",
            ),
            AgentError::NotFound(_) => (Code::NotFound, "ListInstances shows those there are"),
            AgentError::AlreadyRunning { .. } => {
                (Code::AlreadyExists, "stop it first, or reboot it")
            }
            AgentError::NotRunning(_) => (Code::FailedPrecondition, "start it first"),
            AgentError::NotStopped { .. } => (
                Code::FailedPrecondition,
                "only a stopped instance can be deleted or renamed: stop it first",
            ),
            AgentError::Bridge {
                source: hypervisor::tap::TapError::Vlan(_),
                ..
            } => (Code::FailedPrecondition, "name a bridge that filters VLANs"),
            AgentError::Bridge { .. } => (
                Code::FailedPrecondition,
                "create the bridge first, or name one that exists",
            ),
            AgentError::GuestAgent { source, .. } => match source {
                GuestAgentError::NoChannel => (
                    Code::FailedPrecondition,
                    "start the instance with guest_agent set",
                ),
                GuestAgentError::Timeout { .. } => (
                    Code::DeadlineExceeded,
                    "run qemu-guest-agent in the guest, or wait longer",
                ),
                GuestAgentError::Refused { .. } => {
                    (Code::FailedPrecondition, "see the guest agent's own log")
                }
                GuestAgentError::Connect(_) | GuestAgentError::Channel { .. } => {
                    (Code::Unavailable, "retry")
                }
            },
            AgentError::NameTaken(_) => (
                Code::AlreadyExists,
                "pick another name, or delete that instance first",
            ),
            AgentError::QemuUsersExhausted { .. } => (
                Code::ResourceExhausted,
                "stop an instance, or widen qemu_user.uid_pool",
            ),
            AgentError::QemuUserTaken { .. } => (
                Code::FailedPrecondition,
                "stop the instance that holds the uid, or run this one elsewhere",
            ),
            AgentError::NoDisplayPassword(_) => (
                Code::FailedPrecondition,
                "restart the instance with a display password",
            ),
            AgentError::NoBalloon(_) => (
                Code::FailedPrecondition,
                "restart it (hard reboot, or stop and start) to give it one",
            ),
            AgentError::BalloonTargetNotReached { .. } => (
                Code::DeadlineExceeded,
                "the guest needs a virtio_balloon driver and enough free memory; wait longer or check inside the guest",
            ),
            AgentError::DiskMissing { .. } | AgentError::DiskUnusable { .. } => {
                (Code::InvalidArgument, "create the image or fix the path")
            }
            AgentError::DeviceNotFound { .. } => {
                (Code::NotFound, "GetInstance shows the instance's devices")
            }
            AgentError::Hotplug { source, .. } => match source {
                HotplugError::Unsupported(_) => {
                    (Code::FailedPrecondition, "this node or QEMU can't do it")
                }
                HotplugError::Slot(_) | HotplugError::NoFreeScsiTarget { .. } => {
                    (Code::ResourceExhausted, "remove a device first")
                }
                HotplugError::Tap(_) => (
                    Code::FailedPrecondition,
                    "fix the network setup on the node",
                ),
                HotplugError::GuestDidNotRelease { .. } => (
                    Code::DeadlineExceeded,
                    "retry once the guest OS runs, or stop the instance",
                ),
                HotplugError::Qmp {
                    source: QmpError::Timeout { .. },
                    ..
                } => (Code::DeadlineExceeded, "QEMU may be hung; retry"),
                HotplugError::Qmp {
                    source: QmpError::Qemu { .. },
                    ..
                } => (Code::FailedPrecondition, "QEMU refused the device"),
                HotplugError::Qmp { .. } => {
                    (Code::Unavailable, "retry; the agent reconnects to QEMU")
                }
                HotplugError::MediumNotInserted { .. } => (Code::Internal, "see the agent's log"),
            },
            AgentError::Runtime(e) => match e {
                RuntimeError::NoFreeSlot { .. } => {
                    (Code::ResourceExhausted, "remove a device first")
                }
                RuntimeError::VhostUnavailable(_) => (
                    Code::InvalidArgument,
                    "turn vhost off, or load vhost_net on the node",
                ),
                RuntimeError::MachineTypeMissing { .. } | RuntimeError::DeviceMissing { .. } => {
                    (Code::FailedPrecondition, "the instance stays where it is")
                }
                RuntimeError::KvmUnavailable(_) | RuntimeError::SocketPathTooLong { .. } => {
                    (Code::FailedPrecondition, "fix the node setup")
                }
                RuntimeError::ExtraArgs(_) => (
                    Code::FailedPrecondition,
                    "leave the option out, or have the node's operator allow it",
                ),
                _ => (Code::InvalidArgument, "fix the request and retry"),
            },
            AgentError::Probe(_) => (
                Code::FailedPrecondition,
                "fix the QEMU installation on this node",
            ),
            AgentError::Launch { source, .. } => match source {
                LaunchError::ExitedEarly { log_tail, .. }
                    if log_tail.contains("backing store")
                        && log_tail.contains("Cannot allocate memory") =>
                {
                    (
                        Code::ResourceExhausted,
                        "not enough free huge pages (or memory) for guest RAM: raise vm.nr_hugepages, or start it on another node",
                    )
                }
                LaunchError::ExitedEarly { log_tail, .. } if log_tail.contains("backing store") => {
                    (
                        Code::FailedPrecondition,
                        "check the memory backing path: a hugetlbfs mount for huge pages, a file or directory otherwise",
                    )
                }
                LaunchError::RunDir { source, .. } if is_out_of_space(source) => (
                    Code::ResourceExhausted,
                    "free space where the instance's run directory is",
                ),
                LaunchError::Qmp(_) => (
                    Code::Unavailable,
                    "check qemu.log in the instance's run directory",
                ),
                LaunchError::Spawn { .. } => (Code::Internal, "check the agent's permissions"),
                LaunchError::QemuUnreachable { .. } => (
                    Code::FailedPrecondition,
                    "install QEMU where its users reach it, or point qemu_binary at such a copy",
                ),
                _ => (
                    Code::FailedPrecondition,
                    "fix the cause above and start again",
                ),
            },
            AgentError::Stop { .. } => (Code::Internal, "inspect the QEMU process on the node"),
            AgentError::Qmp { source, .. } => match source {
                QmpError::Timeout { .. } | QmpError::NoGreeting(_) => (
                    Code::DeadlineExceeded,
                    "QEMU may be hung; retry or stop with force",
                ),
                QmpError::Qemu { .. } => (Code::FailedPrecondition, "QEMU refused the request"),
                QmpError::Unsupported(_) => (
                    Code::FailedPrecondition,
                    "this QEMU is too old for the request",
                ),
                _ => (Code::Unavailable, "retry; the agent reconnects to QEMU"),
            },
            AgentError::Store(e) if e.is_out_of_space() => (
                Code::ResourceExhausted,
                "free space in the agent's state directory",
            ),
            AgentError::Store(_) | AgentError::Internal(_) => {
                (Code::Internal, "see the agent's log")
            }
            AgentError::CallerGone => (Code::Cancelled, "call again with a longer deadline"),
            AgentError::SaveFile { source, .. } => match source {
                SaveFileError::Exists(_) => (
                    Code::AlreadyExists,
                    "choose another path, or remove the old file first",
                ),
                e if e.is_corrupt() => (
                    Code::InvalidArgument,
                    "the file is damaged or not a save file; it was left as it is",
                ),
                e if e.io_error().is_some_and(is_out_of_space) => {
                    (Code::ResourceExhausted, "free space where the file goes")
                }
                e if e.io_error().map(std::io::Error::kind)
                    == Some(std::io::ErrorKind::NotFound) =>
                {
                    (Code::NotFound, "check the path")
                }
                _ => (
                    Code::FailedPrecondition,
                    "check the path and its permissions",
                ),
            },
            AgentError::Quarantined { .. } => (
                Code::FailedPrecondition,
                "stop that QEMU first, with a forced StopInstance",
            ),
            AgentError::AdoptionRefused { .. } => (
                Code::FailedPrecondition,
                "its QEMU is left as it is; a forced StopInstance ends it",
            ),
            AgentError::GanetiMigrationRefused { .. } => (
                Code::FailedPrecondition,
                "nothing was started; the instance runs on at its source, and can move to a node still on Ganeti's KVM driver",
            ),
            AgentError::MigrationToItself(_) => {
                (Code::FailedPrecondition, "name another node as the target")
            }
            AgentError::UuidMismatch { .. } => (
                Code::FailedPrecondition,
                "remove or rename the other instance first",
            ),
            AgentError::Peer { code, .. } => (
                *code,
                "the instance stays on this node; fix the target and retry",
            ),
            AgentError::MigrationFailed { .. } => {
                (Code::Aborted, "the instance stays where it was; retry")
            }
            AgentError::NoStreamCredentials => (
                Code::FailedPrecondition,
                "give the agent its node certificate, or migrate unencrypted",
            ),
            AgentError::StreamTls { .. } => (
                Code::FailedPrecondition,
                "check the migration stream's certificate, key and CA on this node; nothing was sent",
            ),
            AgentError::MigrationStalled { .. } => (
                Code::Aborted,
                "the guest runs on here; migrate with auto-converge, a higher bandwidth, or offline",
            ),
            AgentError::PostcopyUnavailable(_) => (
                Code::FailedPrecondition,
                "migrate without postcopy, or allow it on the target node",
            ),
            AgentError::PostcopyNotAllowed(_) => (
                Code::FailedPrecondition,
                "start the migration with postcopy allowed",
            ),
            AgentError::NeverLose(_) => (
                Code::FailedPrecondition,
                "migrate it without postcopy (auto-converge, a higher bandwidth, or offline)",
            ),
            AgentError::PostcopyInterrupted { .. } => (
                Code::DataLoss,
                "keep both QEMUs: neither may be stopped while the other lacks its memory",
            ),
            AgentError::MigrationCancelled(_) => {
                (Code::Cancelled, "the instance stays on this node")
            }
            AgentError::MigrationOutcomeUnknown { .. } => (
                Code::Unavailable,
                "check the target: resume here only if it doesn't run the instance",
            ),
            AgentError::NoMigration(_) => (Code::FailedPrecondition, "nothing to do"),
            AgentError::NoMigrationPort { .. } => (
                Code::ResourceExhausted,
                "wait for running migrations to finish, or widen --migration-ports",
            ),
        }
    }
}

/// A full disk or an exhausted quota.
fn is_out_of_space(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// The longest error message sent back to a caller. Messages echo names
/// and paths from the request; a huge one must not come back whole, nor
/// grow past what a client accepts in its trailers.
pub const MAX_STATUS_MESSAGE: usize = 2048;

/// `text` cut to at most `max` bytes, on a character boundary, with a mark
/// where it was cut.
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end]).into()
}

impl From<WatchError> for Status {
    fn from(err: WatchError) -> Status {
        let code = match err {
            WatchError::TooManyWatchers | WatchError::Lagged { .. } => Code::ResourceExhausted,
            WatchError::TooOld { .. } | WatchError::Ahead { .. } => Code::OutOfRange,
        };
        Status::new(code, err.to_string())
    }
}

impl From<AgentError> for Status {
    fn from(err: AgentError) -> Status {
        let (code, hint) = err.code_and_hint();
        let message = format!("{} ({hint})", chain(&err));
        Status::new(code, bounded(&message, MAX_STATUS_MESSAGE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_errors_are_invalid_argument() {
        let status = Status::from(AgentError::Spec(SpecError::Vcpus(0)));

        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("vcpus 0"));
    }

    #[test]
    fn a_huge_name_is_not_echoed_in_full() {
        let status = Status::from(AgentError::NotFound("x".repeat(1 << 20)));

        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().len() <= MAX_STATUS_MESSAGE);
        assert!(status.message().ends_with("..."));
        assert_eq!(bounded("é".repeat(10).as_str(), 6), "é...");
        assert_eq!(bounded("short", 6), "short");
    }

    #[test]
    fn already_running_is_already_exists() {
        let status = Status::from(AgentError::AlreadyRunning {
            name: "web1".into(),
            pid: 42,
        });

        assert_eq!(status.code(), Code::AlreadyExists);
    }

    #[test]
    fn qmp_timeout_is_deadline_exceeded() {
        let err = AgentError::Qmp {
            instance: "web1".into(),
            source: QmpError::Timeout {
                command: "quit".into(),
                after: std::time::Duration::from_secs(1),
            },
        };

        assert_eq!(Status::from(err).code(), Code::DeadlineExceeded);
    }

    #[test]
    fn no_free_slot_is_resource_exhausted() {
        let err = AgentError::Runtime(RuntimeError::NoFreeSlot {
            instance: "x".into(),
            used: 30,
            total: 29,
        });

        assert_eq!(Status::from(err).code(), Code::ResourceExhausted);
    }

    #[test]
    fn message_carries_the_cause_chain() {
        let err = AgentError::Launch {
            instance: "web1".into(),
            source: LaunchError::ExitedEarly {
                status: "exit status: 1".into(),
                log_tail: "Could not open 'x'".into(),
            },
        };

        let status = Status::from(err);

        assert!(
            status.message().contains("failed to start"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("Could not open 'x'"),
            "{}",
            status.message()
        );
    }
}
