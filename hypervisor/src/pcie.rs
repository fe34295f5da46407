//! Where a device with a PCI slot sits. On i440fx (`pc`) every device is on
//! the root bus `pci.0`, at its slot. On q35 a device can only be hot-added
//! behind a PCIe root port, so each one sits alone behind the root port in
//! its slot of `pcie.0`; spare ports wait for hot-adds. A runtime records
//! its ports, so a soft reboot and a migration keep the topology. Pure.

/// How the QEMU id of every root port starts; the id is also the name of
/// the bus behind it.
pub const ROOT_PORT_PREFIX: &str = "root-port-";
/// Spare root ports of a q35 instance when its spec doesn't say.
pub const DEFAULT_HOTPLUG_PORTS: u32 = 4;
/// The most spare root ports a spec can ask for.
pub const MAX_HOTPLUG_PORTS: u32 = 16;
/// The last slot of `pcie.0` a root port may take: 29 to 31 hold the
/// ICH9's USB controllers, bridge, SATA and SMBus functions.
pub const MAX_ROOT_PORT_SLOT: u8 = 28;

/// Whether a machine type (an alias or a versioned name) is a q35.
pub fn is_q35(machine_type: &str) -> bool {
    machine_type == "q35" || machine_type.starts_with("pc-q35-")
}

/// How a runtime's devices sit on PCI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciLayout {
    /// On `pci.0` at their slots (i440fx).
    RootBus,
    /// Alone behind the root port in their slot of `pcie.0` (q35).
    RootPorts,
}

impl PciLayout {
    /// The layout of a machine type.
    pub fn of(machine_type: &str) -> PciLayout {
        if is_q35(machine_type) {
            PciLayout::RootPorts
        } else {
            PciLayout::RootBus
        }
    }

    /// The machine's root bus.
    pub fn root_bus(self) -> &'static str {
        match self {
            PciLayout::RootBus => "pci.0",
            PciLayout::RootPorts => "pcie.0",
        }
    }

    /// The bus and address of the device that has `slot`.
    pub fn place(self, slot: u8) -> (String, u8) {
        match self {
            PciLayout::RootBus => (self.root_bus().to_owned(), slot),
            PciLayout::RootPorts => (root_port_id(slot), 0),
        }
    }
}

/// QEMU id of the root port in `slot`.
pub fn root_port_id(slot: u8) -> String {
    format!("{ROOT_PORT_PREFIX}{slot}")
}

/// `-device` options for the root ports in `slots`. Each port's chassis and
/// physical slot number are its slot, so every pair is unique.
pub fn render_root_ports(slots: &[u8]) -> Vec<String> {
    slots
        .iter()
        .flat_map(|&slot| {
            [
                "-device".to_owned(),
                format!(
                    "pcie-root-port,id={},bus=pcie.0,chassis={slot},slot={slot},addr={slot:#x}",
                    root_port_id(slot)
                ),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_q35_device_sits_behind_the_port_in_its_slot() {
        assert!(is_q35("q35") && is_q35("pc-q35-7.2") && !is_q35("pc-i440fx-7.2"));
        assert_eq!(PciLayout::RootBus.place(5), ("pci.0".to_owned(), 5));
        assert_eq!(PciLayout::RootPorts.place(5), ("root-port-5".to_owned(), 0));
        assert_eq!(
            render_root_ports(&[3]),
            [
                "-device",
                "pcie-root-port,id=root-port-3,bus=pcie.0,chassis=3,slot=3,addr=0x3"
            ]
        );
    }
}
