//! The nouns the agent's operations and its API share: an instance's
//! state and a migration's progress. They depend on neither the
//! operations nor the wire.

use std::time::Duration;

use hypervisor::migration::MigrationStatus;

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
    /// Since the operation began.
    pub elapsed: Duration,
}
