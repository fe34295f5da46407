//! The nouns the agent's operations and its API share: an instance's
//! state, its record and the views of it, and the options and reports of
//! operations. They depend on neither the operations nor the wire.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hypervisor::migration::MigrationStatus;
use hypervisor::probe::QemuInfo;
use hypervisor::runtime::{RuntimeDisk, RuntimeNic};
use hypervisor::{InstanceSpec, Runtime};
use serde::{Deserialize, Serialize};

/// An instance's state as callers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not running.
    Stopped,
    /// Being started.
    Starting,
    /// QEMU runs.
    Running,
    /// Being stopped.
    Stopping,
    /// QEMU exited without being asked to.
    Crashed,
    /// QEMU runs with the guest's vCPUs stopped.
    Paused,
    /// Being migrated away or saved.
    Migrating,
    /// Saved to a file; QEMU is gone.
    Saved,
    /// Waiting for its state from a migration or a restore.
    Incoming,
    /// Its record was unreadable and set aside, but its QEMU still runs.
    /// It blocks its name until an operator stops that QEMU.
    Quarantined,
}

impl State {
    /// Every state.
    pub const ALL: [State; 10] = [
        State::Stopped,
        State::Starting,
        State::Running,
        State::Stopping,
        State::Crashed,
        State::Paused,
        State::Migrating,
        State::Saved,
        State::Incoming,
        State::Quarantined,
    ];

    /// Its name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Crashed => "crashed",
            State::Paused => "paused",
            State::Migrating => "migrating",
            State::Saved => "saved",
            State::Incoming => "incoming",
            State::Quarantined => "quarantined",
        }
    }

    /// Whether QEMU runs in this state, so the guest's state can be read.
    pub fn has_qemu(self) -> bool {
        matches!(self, State::Running | State::Paused | State::Migrating)
    }
}

/// How far a migration has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportPhase {
    /// The target is starting its QEMU.
    Preparing,
    /// Memory is being sent.
    Active,
    /// The stream is complete; the target is taking over.
    Finalizing,
    /// The target owns the instance.
    Completed,
}

/// One progress report of a migration, save or restore.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationReport {
    /// The phase.
    pub phase: ReportPhase,
    /// QEMU's figures, once it sends.
    pub status: Option<MigrationStatus>,
    /// Where the stream goes.
    pub address: String,
    /// Whether the two QEMUs encrypt the stream.
    pub encrypted: bool,
    /// Since the operation began.
    pub elapsed: Duration,
}

/// What the record says about an instance, beside its runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedState {
    /// Should be running.
    Running,
    /// Stopped on request.
    Stopped,
    /// The guest powered itself off.
    StoppedByGuest,
    /// QEMU exited unasked.
    Crashed,
    /// Saved to a file (the detail says where); QEMU is gone.
    Saved,
    /// A QEMU waits for the instance's state from a migration or a
    /// restore. Until that is finalized the instance isn't this node's, so
    /// a restarted agent kills such a QEMU and drops the record.
    Incoming,
}

/// The durable record of an instance: its runtime and how it last ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The runtime to replay; one an earlier release wrote is upgraded as
    /// it is read. Shared, so that a view of the instance doesn't copy it.
    #[serde(
        serialize_with = "serialize_shared",
        deserialize_with = "deserialize_shared"
    )]
    pub runtime: Arc<Runtime>,
    /// Last known state.
    pub state: RecordedState,
    /// Why it is in that state.
    #[serde(default)]
    pub detail: String,
    /// A migration away from this node under way: set before the target
    /// is asked to take the instance, cleared once the migration ends
    /// either way, so an agent that restarts in between knows to settle
    /// it with the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outgoing: Option<OutgoingMigration>,
}

fn serialize_shared<S: serde::Serializer>(runtime: &Arc<Runtime>, s: S) -> Result<S::Ok, S::Error> {
    runtime.serialize(s)
}

fn deserialize_shared<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Arc<Runtime>, D::Error> {
    hypervisor::runtime::format::deserialize(d).map(Arc::new)
}

/// A migration a source started, as its record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingMigration {
    /// The target agent, as the caller named it.
    pub target: String,
    /// Whether the guest ran before the migration, to resume it if it
    /// stays here.
    pub was_running: bool,
}

/// A read-only copy of an instance's status.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    /// Name.
    pub name: String,
    /// State.
    pub state: State,
    /// Why it is in that state.
    pub detail: String,
    /// QEMU's pid while running.
    pub pid: Option<u32>,
    /// When QEMU started.
    pub started_at: Option<SystemTime>,
    /// The runtime in the record.
    pub runtime: Option<Arc<Runtime>>,
    /// Host tap names by NIC order, while running.
    pub taps: Vec<String>,
    /// Set after an agent restart until the instance's QEMU has been found
    /// and its devices compared; operations on it wait until then.
    pub reconciling: bool,
    /// The guest's memory as its balloon driver last reported it, while
    /// QEMU runs and once QEMU has said.
    pub balloon_mib: Option<u64>,
    /// Why QEMU runs outside the confinement its runtime gives it (an
    /// adopted QEMU until its next launch); `None` when it doesn't.
    pub unconfined: Option<String>,
    /// Stopped because its guest powered itself off.
    pub stopped_by_guest: bool,
}

/// How a reboot is done.
#[derive(Debug, Clone)]
pub enum RebootMode {
    /// Stop, then replay the saved runtime.
    Soft,
    /// Stop, then start from a runtime generated from this spec.
    Hard(Box<InstanceSpec>),
    /// `system_reset` in the same QEMU.
    Reset,
}

/// How a soft or hard reboot stops the guest, as a stop would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebootStop {
    /// Skip the powerdown: end QEMU at once.
    pub force: bool,
    /// The powerdown timeout instead of the agent's.
    pub powerdown_timeout: Option<std::time::Duration>,
}

/// Facts about the node.
#[derive(Debug)]
pub struct NodeFacts {
    /// Host name.
    pub hostname: String,
    /// QEMU binary as configured.
    pub qemu_binary: PathBuf,
    /// Probe result.
    pub qemu: Result<Arc<QemuInfo>, String>,
    /// KVM usability.
    pub kvm: Result<(), String>,
    /// MemTotal in MiB.
    pub memory_total_mib: u64,
    /// MemAvailable in MiB.
    pub memory_available_mib: u64,
    /// Online CPUs.
    pub cpus: u32,
    /// Instances with a record.
    pub instance_count: u32,
    /// The newest protocol the agent speaks to other agents.
    pub peer_protocol: u32,
}

/// Per-call settings of a migration.
#[derive(Debug, Clone, Copy, Default)]
pub struct MigrateOptions {
    /// Pause the guest before sending anything.
    pub offline: bool,
    /// Overrides the agent's default parameters.
    pub max_bandwidth: Option<u64>,
    /// Overrides the agent's default downtime limit.
    pub downtime_limit: Option<Duration>,
    /// Overrides the agent's default for auto-converge.
    pub auto_converge: Option<bool>,
    /// XBZRLE with a cache of this many bytes; none sends pages whole.
    pub xbzrle_cache: Option<u64>,
    /// Connections for memory besides the main one (multifd).
    pub multifd_channels: Option<u8>,
    /// Send the stream to another node in the clear.
    pub unencrypted: bool,
    /// Overrides QEMU's first auto-converge throttle, in percent.
    pub throttle_initial: Option<u8>,
    /// Overrides QEMU's auto-converge throttle step, in percent.
    pub throttle_increment: Option<u8>,
    /// Overrides how many passes without progress make a stall.
    pub stalled_passes: Option<u32>,
    /// Switch to postcopy when precopy stalls, or when asked.
    pub postcopy: bool,
    /// Overrides how long a broken postcopy stream is retried.
    pub postcopy_recovery_window: Option<Duration>,
}

/// What the target's QEMU must expect of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamRequest {
    /// Connections for memory besides the main one (multifd).
    pub multifd_channels: Option<u8>,
    /// TLS between the two QEMUs.
    pub encrypted: bool,
    /// The source may switch to postcopy.
    pub postcopy: bool,
}

/// What a save came to.
#[derive(Debug, Clone)]
pub struct SaveOutcome {
    /// The instance afterwards.
    pub view: InstanceView,
    /// Size of the file.
    pub file_bytes: u64,
    /// Whether the guest ran when it was saved.
    pub was_running: bool,
    /// How long the save took.
    pub duration: Duration,
}

/// Where a guest's memory stands after SetMemory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    /// The target now set.
    pub target_mib: u64,
    /// What the guest has.
    pub actual_mib: u64,
    /// The runtime's memory.
    pub maximum_mib: u64,
}

/// A device a hotplug operation added or removed, for the reply.
#[derive(Debug)]
pub enum ChangedDevice {
    /// A NIC, with its tap while running.
    Nic(RuntimeNic, String),
    /// A disk.
    Disk(RuntimeDisk),
}

/// What taking over one instance came to.
#[derive(Debug)]
pub enum TakeoverOutcome {
    /// The agent runs it now.
    Adopted(Box<InstanceView>),
    /// A dry run found nothing against it.
    WouldAdopt(Box<Runtime>),
    /// The agent already ran this QEMU.
    AlreadyAdopted,
    /// Left as it is, for this reason.
    Refused(String),
}

/// One instance found in Ganeti's files.
#[derive(Debug)]
pub struct Takeover {
    /// Instance name.
    pub name: String,
    /// Its QEMU's pid, once known.
    pub pid: Option<u32>,
    /// What became of it.
    pub outcome: TakeoverOutcome,
}
