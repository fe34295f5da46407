//! Hot-adding and removing NICs and disks of a running QEMU over QMP.
//!
//! [`slots`] finds a free PCI slot (pure); [`support`] says what the
//! instance's QEMU and the node can do; [`nic`], [`disk`] and [`remove`] run
//! the QMP sequences, each undoing its earlier steps when a later one fails.
//! Keeping the runtime in step is the caller's job: these functions change
//! QEMU only.
#![deny(missing_docs)]

pub mod disk;
pub mod nic;
pub mod remove;
pub mod slots;
pub mod support;

use std::time::Duration;

use hypervisor::qmp::{QmpClient, QmpError};
use hypervisor::tap::TapError;
use serde_json::Value;

pub use slots::{SlotError, SlotMap};

/// What can go wrong in a hotplug operation.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// The instance's QEMU or the node lacks what the operation needs.
    #[error("hotplug is not supported here: {0}")]
    Unsupported(String),
    /// No slot is left.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The tap couldn't be set up.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A QMP step failed; earlier steps were undone.
    #[error("{step} failed")]
    Qmp {
        /// The step, e.g. `device_add`.
        step: &'static str,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },
    /// QEMU accepted the device but it isn't where it should be.
    #[error("device {id} is not at slot {slot:#x} after device_add")]
    Verify {
        /// QEMU device id.
        id: String,
        /// Expected slot.
        slot: u8,
    },
    /// The guest didn't release the device.
    #[error(
        "the guest did not release device {id} within {after:?}; it has no OS or ignores ACPI hot-unplug, and the device stays attached"
    )]
    GuestDidNotRelease {
        /// QEMU device id.
        id: String,
        /// How long we waited.
        after: Duration,
    },
}

impl HotplugError {
    fn qmp(step: &'static str) -> impl FnOnce(QmpError) -> HotplugError {
        move |source| HotplugError::Qmp { step, source }
    }
}

/// Runs a rollback step; a failure there is logged, never raised, so the
/// original error reaches the caller.
async fn undo(qmp: &QmpClient, command: &str, arguments: Value) {
    if let Err(e) = qmp.execute(command, Some(arguments.clone())).await {
        tracing::warn!(command, %arguments, error = %e, "rollback step failed");
    }
}
