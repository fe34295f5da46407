//! Which PCI slot a hot-add takes: a slot QEMU hasn't taken, the runtime
//! doesn't hold and the machine doesn't reserve.
//!
//! QEMU's part comes from `query-pci`, asked once per process (right after
//! launch, or when adopting it) and kept up to date by the agent's own
//! hot-adds, so a hot-add doesn't wait for it. Where something else added
//! a device (the operators' monitor, or a monitor of an adopted QEMU),
//! `device_add` at the taken slot fails, QEMU is asked again and the
//! hot-add tried once more at a free slot. A removal or a failed hot-add
//! forgets the slots, and a bus full as remembered is asked again: the
//! next look-up asks QEMU.

use std::sync::Arc;

use hypervisor::qmp::QmpError;
use hypervisor::runtime::Runtime;
use tracing::Instrument;

use super::{Agent, Instance, Process};
use crate::error::AgentError;

/// What one try at a hot-add came to.
pub(super) enum Tried<T> {
    /// Done, or failed for good.
    Done(T),
    /// Its slot was taken behind the agent's back; worth another try.
    Again,
}

/// A slot picked for a hot-add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SlotPick {
    pub(super) slot: u8,
    /// Whether QEMU's taken slots came from memory rather than a fresh
    /// `query-pci`.
    pub(super) remembered: bool,
}

/// Runs a hot-add's `attempt` (given whether it is the first), and once
/// more if the first found its slot taken behind the agent's back.
pub(super) async fn at_most_twice<T, F>(mut attempt: impl FnMut(bool) -> F) -> Result<T, AgentError>
where
    F: Future<Output = Result<Tried<T>, AgentError>>,
{
    let mut first = true;
    loop {
        match attempt(first).await? {
            Tried::Done(done) => return Ok(done),
            Tried::Again => first = false,
        }
    }
}

/// The bus-0 slots `process`'s QEMU shows taken in `query-pci`.
async fn query_pci_slots(process: &Process) -> Result<Vec<u8>, QmpError> {
    let pci = process.qmp().execute("query-pci", None).await?;
    Ok(hotplug::slots::bus0_slots(&pci))
}

/// Asks QEMU which bus-0 slots it has taken and has `process` remember
/// them, in the background: a freshly launched QEMU, so its first hot-add
/// finds them known. A failure only leaves them unknown.
pub(super) fn learn_pci_slots_soon(process: &Arc<Process>) {
    let process = Arc::downgrade(process);
    tokio::spawn(async move {
        let Some(process) = process.upgrade() else {
            return;
        };
        if let Ok(slots) = query_pci_slots(&process).await {
            process.learn_pci_slots(slots);
        }
    });
}

impl Agent {
    /// Asks QEMU which bus-0 slots it has taken, and remembers them.
    async fn ask_pci_slots(
        &self,
        inst: &Instance,
        process: &Process,
    ) -> Result<Vec<u8>, AgentError> {
        let slots = query_pci_slots(process)
            .instrument(tracing::debug_span!("step", step = "query-pci"))
            .await
            .map_err(|source| AgentError::Qmp {
                instance: inst.name().to_owned(),
                source,
            })?;
        process.set_pci_slots(Some(slots.clone()));
        Ok(slots)
    }

    /// A free slot for a hot-add into `runtime`'s QEMU. A bus full as
    /// remembered is asked again: a device may have left behind the
    /// agent's back.
    pub(super) async fn free_slot(
        &self,
        inst: &Instance,
        process: &Process,
        runtime: &Runtime,
    ) -> Result<SlotPick, AgentError> {
        let find = |taken: Vec<u8>| {
            hotplug::slots::find_free_slot(taken, runtime.used_slots(), &runtime.reserved_slots())
        };
        if let Some(Ok(slot)) = process.pci_slots().map(find) {
            return Ok(SlotPick {
                slot,
                remembered: true,
            });
        }
        let taken = self.ask_pci_slots(inst, process).await?;
        let slot = find(taken).map_err(|e| AgentError::Hotplug {
            instance: inst.name().to_owned(),
            source: e.into(),
        })?;
        Ok(SlotPick {
            slot,
            remembered: false,
        })
    }

    /// Settles the slots after a hot-add at `pick`: on success QEMU has
    /// taken the slot; on failure the slots are forgotten, and the result
    /// says whether to try again, if `may_try_again`: the slot came from
    /// memory and QEMU, asked now, has a device there that the agent didn't
    /// put.
    pub(super) async fn after_hot_add<T>(
        &self,
        inst: &Instance,
        process: &Process,
        pick: SlotPick,
        result: &Result<T, AgentError>,
        may_try_again: bool,
    ) -> bool {
        let failed_in_device_add = match result {
            Ok(_) => {
                process.take_pci_slot(pick.slot);
                return false;
            }
            Err(AgentError::Hotplug {
                source: hotplug::HotplugError::Qmp { step, .. },
                ..
            }) => *step == "device_add",
            Err(_) => false,
        };
        process.set_pci_slots(None);
        if !(may_try_again && pick.remembered && failed_in_device_add) {
            return false;
        }
        let taken = self.ask_pci_slots(inst, process).await;
        let again = taken.is_ok_and(|slots| slots.contains(&pick.slot));
        if again {
            tracing::warn!(instance = %inst.name(), slot = pick.slot, "a device was added at this PCI slot behind the agent's back; trying the next free slot");
        }
        again
    }
}
