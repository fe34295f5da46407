//! The hardware of a QEMU that another manager started and the agent
//! adopted while it ran. Pure.
//!
//! A spec describes the machines the agent builds itself. A QEMU started
//! by Ganeti's KVM driver has more than that: QEMU's default devices (no
//! `-nodefaults`), a balloon placed by QEMU, USB, a display adapter of its
//! choice. The guest has seen that hardware, so every later launch must
//! give it the same again. Those options are kept as they were, but only
//! from a short list whose effect is on the guest alone: a runtime is
//! data that arrives from peers and save files, and must not carry a way
//! to open files or sockets on the host.

use serde::{Deserialize, Serialize};

/// What a runtime keeps of a QEMU it took over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InheritedMachine {
    /// Who started that QEMU, e.g. `ganeti-kvm`.
    pub origin: String,
    /// Options of its command line that shape the guest and that no spec
    /// field describes, in their order there. Each is one of
    /// [`check_options`]'s.
    pub options: Vec<String>,
    /// Slots on pci.0 the original manager keeps for itself (Ganeti's
    /// `kvm_pci_reservations`); hot-add never gives one out.
    pub reserved_slots: Vec<u8>,
}

/// The longest origin name.
const MAX_ORIGIN: usize = 32;

/// Why inherited options were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InheritedError {
    /// An option that isn't on the list, or a value it doesn't allow.
    #[error("option {option:?}{} is not one the agent can keep for the guest", value.as_deref().map(|v| format!(" {v:?}")).unwrap_or_default())]
    Option {
        /// The option.
        option: String,
        /// Its value, if it has one.
        value: Option<String>,
    },
    /// An option without the value it needs.
    #[error("option {0:?} has no value")]
    MissingValue(String),
    /// An origin that isn't a plain name.
    #[error("origin {0:?} is not a plain name")]
    Origin(String),
}

/// How a listed option is checked.
#[derive(Clone, Copy)]
enum Kept {
    /// A flag without a value.
    Flag,
    /// An option whose value must pass the check.
    Value(fn(&str) -> bool),
}

/// Every option on the list, with its check; `None` for the rest.
fn allowed(option: &str) -> Option<Kept> {
    Some(match option {
        "-usb" | "-no-acpi" => Kept::Flag,
        "-usbdevice" => Kept::Value(|v| matches!(v, "tablet" | "mouse")),
        "-vga" => {
            Kept::Value(|v| matches!(v, "std" | "cirrus" | "vmware" | "qxl" | "virtio" | "none"))
        }
        "-boot" => Kept::Value(|v| {
            !v.is_empty() && v.len() <= 4 && v.bytes().all(|b| b"acdn".contains(&b))
        }),
        "-net" | "-serial" => Kept::Value(|v| v == "none"),
        "-k" => Kept::Value(crate::spec::is_keymap),
        "-device" => Kept::Value(is_balloon),
        _ => return None,
    })
}

/// The virtio balloon as Ganeti places it (QEMU picks the slot), or with
/// an explicit id, bus and slot.
fn is_balloon(value: &str) -> bool {
    let mut parts = value.split(',');
    if !matches!(parts.next(), Some("virtio-balloon" | "virtio-balloon-pci")) {
        return false;
    }
    parts.all(|part| match part.split_once('=') {
        Some(("id" | "bus" | "addr", v)) => {
            !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        }
        _ => false,
    })
}

/// Checks inherited options against the list. Pure.
pub fn check_options(options: &[String]) -> Result<(), InheritedError> {
    let mut rest = options.iter();
    while let Some(option) = rest.next() {
        let refused = |value: Option<&String>| InheritedError::Option {
            option: option.clone(),
            value: value.cloned(),
        };
        match allowed(option) {
            None => return Err(refused(None)),
            Some(Kept::Flag) => {}
            Some(Kept::Value(value_ok)) => {
                let value = rest
                    .next()
                    .ok_or_else(|| InheritedError::MissingValue(option.clone()))?;
                if !value_ok(value) {
                    return Err(refused(Some(value)));
                }
            }
        }
    }
    Ok(())
}

impl InheritedMachine {
    /// Checks the origin and the options. Pure.
    pub fn validate(&self) -> Result<(), InheritedError> {
        if !crate::spec::is_safe_identifier(&self.origin, MAX_ORIGIN) {
            return Err(InheritedError::Origin(self.origin.clone()));
        }
        check_options(&self.options)
    }

    /// Whether `option` is on the list; for a translation that sorts a
    /// foreign command line.
    pub fn keeps(option: &str) -> bool {
        allowed(option).is_some()
    }

    /// Whether `option` takes a value.
    pub fn takes_value(option: &str) -> bool {
        matches!(allowed(option), Some(Kept::Value(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|&a| a.to_owned()).collect()
    }

    #[test]
    fn ganetis_guest_options_are_kept() {
        let options = strings(&[
            "-device",
            "virtio-balloon",
            "-usb",
            "-usbdevice",
            "tablet",
            "-boot",
            "c",
            "-vga",
            "std",
            "-net",
            "none",
            "-k",
            "en-us",
            "-no-acpi",
        ]);
        assert_eq!(check_options(&options), Ok(()));
    }

    #[test]
    fn anything_that_reaches_the_host_is_refused() {
        for bad in [
            &["-chardev", "socket,path=/tmp/x"][..],
            &["-device", "virtio-balloon,romfile=/etc/shadow"],
            &["-device", "virtio-serial"],
            &["-serial", "unix:/tmp/s,server"],
            &["-net", "user"],
            &["-drive", "file=/etc/shadow"],
            &["-usbdevice", "disk:/etc/shadow"],
            &["-boot", "c,splash=/etc/shadow"],
            &["-k", "../x"],
            &["-add-fd", "fd=3,set=1"],
        ] {
            assert!(check_options(&strings(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_options(&strings(&["-vga"])),
            Err(InheritedError::MissingValue("-vga".into()))
        );
    }
}
