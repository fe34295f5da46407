//! PCI slot allocation on bus 0. Pure.
//!
//! A slot is free only if QEMU doesn't show a device there (`query-pci`),
//! the runtime doesn't hold it (a device whose removal is still pending),
//! and the machine doesn't reserve it.

use bitvec::prelude::*;
use hypervisor::pcie::ROOT_PORT_PREFIX;
use serde_json::Value;

/// Slots on one PCI bus.
pub const SLOTS: usize = 32;

/// The state of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Can be given out.
    Free,
    /// Never given out (host bridge, chipset, display).
    Reserved,
    /// Held by a device.
    Allocated,
}

/// Why no slot could be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// Every slot is taken.
    #[error(
        "no free PCI slot ({used} of {usable} usable slots in use; on q35, slots of root ports)"
    )]
    NoFreeSlot {
        /// Allocated slots.
        used: usize,
        /// Slots that aren't reserved.
        usable: usize,
    },
    /// A slot number beyond the bus.
    #[error("PCI slot {0} is beyond the bus (0..{SLOTS})")]
    OutOfRange(u64),
}

/// Three states per slot, as two bitmaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    reserved: BitArr!(for SLOTS, in u32),
    allocated: BitArr!(for SLOTS, in u32),
}

impl SlotMap {
    /// A bus with `reserved` slots and nothing allocated.
    pub fn new(reserved: &[u8]) -> Self {
        let mut map = SlotMap {
            reserved: BitArray::ZERO,
            allocated: BitArray::ZERO,
        };
        for &slot in reserved {
            if let Some(mut bit) = map.reserved.get_mut(usize::from(slot)) {
                *bit = true;
            }
        }
        map
    }

    /// Marks a slot as held by a device.
    pub fn mark_allocated(&mut self, slot: u64) -> Result<(), SlotError> {
        let index = usize::try_from(slot)
            .ok()
            .filter(|&s| s < SLOTS)
            .ok_or(SlotError::OutOfRange(slot))?;
        self.allocated.set(index, true);
        Ok(())
    }

    /// The state of a slot (reserved wins over allocated).
    pub fn state(&self, slot: u8) -> SlotState {
        let i = usize::from(slot);
        match (
            self.reserved.get(i).as_deref(),
            self.allocated.get(i).as_deref(),
        ) {
            (Some(true), _) | (None, _) => SlotState::Reserved,
            (_, Some(true)) => SlotState::Allocated,
            _ => SlotState::Free,
        }
    }

    /// The lowest free slot, now allocated.
    pub fn allocate(&mut self) -> Result<u8, SlotError> {
        let taken = self.reserved | self.allocated;
        match taken.first_zero() {
            Some(slot) => {
                self.allocated.set(slot, true);
                Ok(slot as u8)
            }
            None => Err(SlotError::NoFreeSlot {
                used: (self.allocated & !self.reserved).count_ones(),
                usable: SLOTS - self.reserved.count_ones(),
            }),
        }
    }
}

/// `(slot, qdev_id)` of every device on bus 0 in a `query-pci` reply. A
/// q35's root ports stand for the device behind each: the port itself is
/// left out and its device is given the port's slot. The devices behind a
/// port show only once the guest's firmware has numbered the buses.
pub fn bus0_devices(query_pci: &Value) -> Vec<(u8, String)> {
    let slot_and_id = |d: &Value| {
        let slot = u8::try_from(d.get("slot")?.as_u64()?).ok()?;
        let id = d.get("qdev_id").and_then(Value::as_str).unwrap_or_default();
        Some((slot, id.to_owned()))
    };
    let devices = |bus: &Value| -> Vec<Value> {
        bus.get("devices")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut found = Vec::new();
    let root = query_pci.as_array().into_iter().flatten();
    for device in root
        .filter(|bus| bus.get("bus").and_then(Value::as_u64) == Some(0))
        .flat_map(devices)
    {
        let Some((slot, id)) = slot_and_id(&device) else {
            continue;
        };
        if !id.starts_with(ROOT_PORT_PREFIX) {
            found.push((slot, id));
            continue;
        }
        let behind = device.get("pci_bridge").map(devices).unwrap_or_default();
        found.extend(
            behind
                .iter()
                .filter_map(slot_and_id)
                .map(|(_, id)| (slot, id)),
        );
    }
    found
}

/// The bus-0 slots a `query-pci` reply shows taken, each once, in order.
/// Pure.
pub fn bus0_slots(query_pci: &Value) -> Vec<u8> {
    let mut slots: Vec<u8> = bus0_devices(query_pci)
        .into_iter()
        .map(|(slot, _)| slot)
        .collect();
    slots.sort_unstable();
    slots.dedup();
    slots
}

/// Finds a free slot from the three sources: the slots QEMU has taken
/// (from [`bus0_slots`]), the runtime's and the reserved ones. Pure.
pub fn find_free_slot(
    qemu_slots: impl IntoIterator<Item = u8>,
    runtime_slots: impl IntoIterator<Item = u8>,
    reserved: &[u8],
) -> Result<u8, SlotError> {
    let mut map = SlotMap::new(reserved);
    for slot in qemu_slots {
        map.mark_allocated(slot.into())?;
    }
    for slot in runtime_slots {
        map.mark_allocated(slot.into())?;
    }
    map.allocate()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const RESERVED: [u8; 3] = [0, 1, 2];

    fn pci(slots: &[(u64, &str)]) -> Value {
        json!([{ "bus": 0, "devices": slots.iter().map(|(s, id)| json!({"slot": s, "function": 0, "qdev_id": id})).collect::<Vec<_>>() }])
    }

    #[test]
    fn a_device_behind_a_root_port_has_the_ports_slot() {
        let reply = json!([{ "bus": 0, "devices": [
            {"slot": 3, "qdev_id": "root-port-3", "pci_bridge": {"devices": [{"slot": 0, "qdev_id": "nic-a"}]}},
            {"slot": 4, "qdev_id": "root-port-4", "pci_bridge": {"devices": []}},
            {"slot": 31, "qdev_id": ""},
        ]}]);
        assert_eq!(
            bus0_devices(&reply),
            [(3, "nic-a".to_owned()), (31, String::new())]
        );
        // Only the ports' slots are free for a hot-add, and 3 is taken.
        let reserved: Vec<u8> = (0..32).filter(|s| ![3, 4].contains(s)).collect();
        assert_eq!(find_free_slot(bus0_slots(&reply), [], &reserved), Ok(4));
    }

    #[test]
    fn each_taken_slot_counts_once() {
        let reply = json!([{ "bus": 0, "devices": [
            {"slot": 5, "function": 0, "qdev_id": "nic-a"},
            {"slot": 1, "function": 0, "qdev_id": ""},
            {"slot": 1, "function": 1, "qdev_id": ""},
            {"slot": 3, "function": 0, "qdev_id": "balloon0"},
        ]}]);

        assert_eq!(bus0_slots(&reply), [1, 3, 5]);
    }

    #[test]
    fn first_free_slot_follows_reserved_and_used_ones() {
        let reply = pci(&[(0, ""), (1, ""), (3, "disk-a")]);

        assert_eq!(find_free_slot(bus0_slots(&reply), [], &RESERVED), Ok(4));
    }

    #[test]
    fn slot_finder_skips_devices_unknown_to_runtime() {
        let reply = pci(&[(3, "added-behind-our-back")]);

        assert_eq!(find_free_slot(bus0_slots(&reply), [4], &RESERVED), Ok(5));
    }

    #[test]
    fn slot_finder_skips_runtime_slots_qemu_no_longer_shows() {
        let reply = pci(&[]);

        assert_eq!(find_free_slot(bus0_slots(&reply), [3, 4], &RESERVED), Ok(5));
    }

    #[test]
    fn full_bus_is_no_free_slot_with_counts() {
        let used: Vec<(u64, &str)> = (3..32).map(|s| (s, "x")).collect();

        assert_eq!(
            find_free_slot(bus0_slots(&pci(&used)), [], &RESERVED),
            Err(SlotError::NoFreeSlot {
                used: 29,
                usable: 29
            })
        );
    }

    #[test]
    fn other_buses_do_not_count() {
        let reply = json!([{ "bus": 1, "devices": [{"slot": 3, "qdev_id": "x"}] }]);

        assert_eq!(find_free_slot(bus0_slots(&reply), [], &RESERVED), Ok(3));
    }

    #[test]
    fn states_are_reported() {
        let mut map = SlotMap::new(&RESERVED);
        map.mark_allocated(5).unwrap();

        assert_eq!(map.state(0), SlotState::Reserved);
        assert_eq!(map.state(5), SlotState::Allocated);
        assert_eq!(map.state(6), SlotState::Free);
        assert_eq!(map.state(40), SlotState::Reserved);
    }

    #[test]
    fn out_of_range_slot_is_an_error() {
        assert_eq!(
            SlotMap::new(&[]).mark_allocated(32),
            Err(SlotError::OutOfRange(32))
        );
    }

    #[test]
    fn allocation_never_repeats_a_slot() {
        let mut map = SlotMap::new(&RESERVED);
        let mut seen = std::collections::HashSet::new();
        while let Ok(slot) = map.allocate() {
            assert!(!RESERVED.contains(&slot));
            assert!(seen.insert(slot));
        }
        assert_eq!(seen.len(), 29);
    }
}
