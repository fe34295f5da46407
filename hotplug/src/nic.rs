//! NIC hot-add: tap (and vhost) fds through `getfd`, `netdev_add`,
//! `device_add` at an explicit slot, then a check in `query-pci`.

use std::os::fd::AsFd;

use hypervisor::argv::{PCI_BUS, netdev_id, nic_device_id};
use std::fs::File;

use hypervisor::qmp::{Command, QmpClient, QmpError};
use hypervisor::runtime::RuntimeNic;
use hypervisor::spec::{NicModel, NicSpec};
use hypervisor::tap::{self, Tap};
use serde_json::{Value, json};

use crate::{HotplugError, slots, undo};

/// What a successful NIC hot-add leaves on the host.
#[derive(Debug)]
pub struct AddedNic {
    /// The tap's interface name.
    pub tap: String,
}

/// The `device_add` arguments of a NIC. Pure.
pub fn device_arguments(nic: &RuntimeNic) -> Value {
    let driver = match nic.spec.model {
        NicModel::Virtio => "virtio-net-pci",
        NicModel::E1000 => "e1000",
    };
    json!({
        "driver": driver,
        "id": nic_device_id(nic.spec.uuid),
        "netdev": netdev_id(nic.spec.uuid),
        "mac": nic.spec.mac.to_string(),
        "bus": PCI_BUS,
        "addr": format!("{:#x}", nic.slot),
    })
}

/// A NIC's host side, ready to hand to QEMU.
#[derive(Debug)]
pub struct PreparedNic {
    tap: Tap,
    vhost: Option<File>,
}

impl PreparedNic {
    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }
}

/// Opens the tap (and vhost-net) of a NIC, brings it up and attaches it to
/// its bridge. Touches no QEMU, so it can run beside other preparation.
pub fn prepare(nic: &NicSpec, tap_template: &str) -> Result<PreparedNic, HotplugError> {
    let tap = Tap::create(tap_template)?;
    tap.set_up()?;
    if let Some(bridge) = &nic.bridge {
        tap.attach_to_bridge(bridge)?;
    }
    let vhost = nic.vhost.then(tap::open_vhost_net).transpose()?;
    Ok(PreparedNic { tap, vhost })
}

/// Hot-adds `nic` at its slot: getfd, netdev_add, device_add and the
/// query-pci check go out as one pipeline. On failure every step that
/// succeeded is undone and the tap is closed, so it vanishes.
pub async fn attach(
    qmp: &QmpClient,
    prepared: PreparedNic,
    nic: &RuntimeNic,
) -> Result<AddedNic, HotplugError> {
    let netdev = netdev_id(nic.spec.uuid);
    let vhost_name = format!("{netdev}-vhost");
    let mut netdev_args = json!({ "type": "tap", "id": netdev, "fd": netdev });
    let mut commands =
        vec![Command::new("getfd", json!({ "fdname": netdev })).with_fd(prepared.tap.as_fd())];
    if let Some(vhost) = &prepared.vhost {
        commands
            .push(Command::new("getfd", json!({ "fdname": vhost_name })).with_fd(vhost.as_fd()));
        netdev_args["vhost"] = json!(true);
        netdev_args["vhostfd"] = json!(vhost_name);
    }
    commands.push(Command::new("netdev_add", netdev_args));
    commands.push(Command::new("device_add", device_arguments(nic)));
    commands.push(Command::bare("query-pci"));

    let mut results = qmp.pipeline(commands).await.into_iter();
    let mut next = || {
        results
            .next()
            .unwrap_or(Err(QmpError::Disconnected { reason: None }))
    };
    let tap_fd = next();
    let vhost_fd = prepared.vhost.as_ref().map(|_| next());
    let netdev_added = next();
    let device_added = next();
    let pci = next();

    let id = nic_device_id(nic.spec.uuid);
    let failure = match (tap_fd, vhost_fd.transpose(), netdev_added, device_added) {
        (Ok(_), Ok(_), Ok(_), Ok(_)) => match pci {
            Ok(pci)
                if slots::bus0_devices(&pci)
                    .iter()
                    .any(|(s, q)| *s == nic.slot && *q == id) =>
            {
                None
            }
            Ok(_) => Some((
                3,
                HotplugError::Verify {
                    id: id.clone(),
                    slot: nic.slot,
                },
            )),
            Err(source) => Some((
                3,
                HotplugError::Qmp {
                    step: "query-pci",
                    source,
                },
            )),
        },
        (Err(source), ..) => Some((
            0,
            HotplugError::Qmp {
                step: "getfd",
                source,
            },
        )),
        (_, Err(source), ..) => Some((
            1,
            HotplugError::Qmp {
                step: "getfd (vhost)",
                source,
            },
        )),
        (_, _, Err(source), _) => Some((
            1,
            HotplugError::Qmp {
                step: "netdev_add",
                source,
            },
        )),
        (_, _, _, Err(source)) => Some((
            2,
            HotplugError::Qmp {
                step: "device_add",
                source,
            },
        )),
    };
    let Some((reached, error)) = failure else {
        return Ok(AddedNic {
            tap: prepared.tap.name().to_owned(),
        });
    };
    // Undo in reverse. netdev_add takes the named fds, so they only need
    // closing when it never ran; closing a name that is gone fails harmlessly.
    if reached >= 3 {
        undo(qmp, "device_del", json!({ "id": id })).await;
    }
    if reached >= 2 {
        undo(qmp, "netdev_del", json!({ "id": netdev })).await;
    } else {
        undo(qmp, "closefd", json!({ "fdname": netdev })).await;
        if prepared.vhost.is_some() {
            undo(qmp, "closefd", json!({ "fdname": vhost_name })).await;
        }
    }
    Err(error)
}

/// Prepares and attaches in one go.
pub async fn add(
    qmp: &QmpClient,
    nic: &RuntimeNic,
    tap_template: &str,
) -> Result<AddedNic, HotplugError> {
    attach(qmp, prepare(&nic.spec, tap_template)?, nic).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::spec::MacAddr;

    #[test]
    fn device_is_placed_at_its_slot_on_pci0() {
        let nic = RuntimeNic {
            spec: NicSpec {
                name: "eth1".into(),
                uuid: hypervisor::runtime::Uuid::from_u128(0xabc),
                mac: "52:54:00:00:00:09".parse::<MacAddr>().unwrap(),
                model: NicModel::Virtio,
                bridge: None,
                vhost: false,
            },
            slot: 7,
        };

        let args = device_arguments(&nic);

        assert_eq!(args["addr"], "0x7");
        assert_eq!(args["bus"], "pci.0");
        assert_eq!(args["mac"], "52:54:00:00:00:09");
        assert_eq!(args["netdev"], netdev_id(nic.spec.uuid));
    }
}
