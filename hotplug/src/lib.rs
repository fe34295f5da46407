//! Hot-adding and removing NICs and disks of a running QEMU over QMP, and
//! changing the media of its CD-ROM and floppy drives.
//!
//! [`slots`] finds a free PCI slot (pure); [`support`] says what the
//! instance's QEMU and the node can do; [`nic`], [`disk`], [`remove`] and
//! [`medium`] run the QMP sequences. A hot-add is a list of steps, each with what takes it
//! back, which one runner sends and, when a step fails, takes back in
//! reverse. Keeping the runtime in step is the caller's job: these functions change
//! QEMU only.
#![deny(missing_docs)]

pub mod disk;
pub mod medium;
pub mod nic;
mod pipeline;
pub mod remove;
pub mod slots;
pub mod support;

use std::time::Duration;

use hypervisor::pcie::PciLayout;
use hypervisor::qmp::QmpError;
use hypervisor::tap::TapError;
use serde_json::{Value, json};

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
    /// Every target of the SCSI controller holds a disk.
    #[error("no free SCSI target: the {controller} controller's {targets} hold disks")]
    NoFreeScsiTarget {
        /// QEMU's device of the controller.
        controller: &'static str,
        /// How many targets it has.
        targets: u8,
    },
    /// QEMU took the new medium but doesn't show it in the drive.
    #[error("drive {id} doesn't hold the new medium after blockdev-change-medium")]
    MediumNotInserted {
        /// QEMU device id of the drive.
        id: String,
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

/// Puts `device_add` arguments at `slot`. On the root bus layout (i440fx)
/// the bus is left out: `pci.0` is the only PCI bus there, where QEMU puts
/// a device anyway, and QEMU reads QMP input a byte at a time. Pure.
pub(crate) fn place_in_slot(args: &mut Value, layout: PciLayout, slot: u8) {
    let (bus, addr) = layout.place(slot);
    if layout == PciLayout::RootPorts {
        args["bus"] = json!(bus);
    }
    args["addr"] = json!(format!("{addr:#x}"));
}
