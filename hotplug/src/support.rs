//! What an instance's QEMU and the node offer for hotplug. Pure apart from
//! [`check`], which reads the QMP command list and looks for /dev/vhost-net.

use hypervisor::qmp::QmpClient;

/// QMP commands a NIC hot-add needs.
pub const NIC_COMMANDS: [&str; 4] = ["getfd", "netdev_add", "device_add", "query-pci"];
/// QMP commands a disk hot-add needs.
pub const DISK_COMMANDS: [&str; 5] = [
    "add-fd",
    "remove-fd",
    "blockdev-add",
    "device_add",
    "query-pci",
];
/// QMP commands a removal needs.
pub const REMOVE_COMMANDS: [&str; 3] = ["device_del", "netdev_del", "blockdev-del"];

/// Each capability, `Ok` or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Support {
    /// NIC hot-add.
    pub nic: Result<(), String>,
    /// Disk hot-add.
    pub disk: Result<(), String>,
    /// Device removal.
    pub remove: Result<(), String>,
    /// vhost-net for hot-added NICs.
    pub vhost: Result<(), String>,
}

fn needs(what: &str, commands: &[&str], has: &impl Fn(&str) -> bool) -> Result<(), String> {
    let missing: Vec<&str> = commands.iter().copied().filter(|c| !has(c)).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what} needs the QMP commands {} that this QEMU lacks",
            missing.join(", ")
        ))
    }
}

/// Decides support from the QMP commands QEMU has and whether the node has
/// /dev/vhost-net. Pure.
pub fn evaluate(has_command: impl Fn(&str) -> bool, vhost_net: bool) -> Support {
    Support {
        nic: needs("NIC hot-add", &NIC_COMMANDS, &has_command),
        disk: needs("disk hot-add", &DISK_COMMANDS, &has_command),
        remove: needs("device removal", &REMOVE_COMMANDS, &has_command),
        vhost: if vhost_net {
            Ok(())
        } else {
            Err(format!(
                "{} is missing on this node; load the vhost_net module",
                hypervisor::tap::VHOST_NET_DEVICE
            ))
        },
    }
}

/// Support of a running instance on this node.
pub fn check(qmp: &QmpClient) -> Support {
    evaluate(|c| qmp.supports(c), hypervisor::tap::vhost_net_available())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_qemu_supports_everything_but_missing_vhost() {
        let support = evaluate(|_| true, false);

        assert_eq!(support.nic, Ok(()));
        assert_eq!(support.disk, Ok(()));
        assert_eq!(support.remove, Ok(()));
        assert!(support.vhost.unwrap_err().contains("/dev/vhost-net"));
    }

    #[test]
    fn missing_commands_are_named() {
        let support = evaluate(|c| c != "add-fd" && c != "blockdev-add", true);

        assert_eq!(support.nic, Ok(()));
        let reason = support.disk.unwrap_err();
        assert!(reason.contains("add-fd, blockdev-add"), "{reason}");
    }
}
