//! NIC hot-add: tap (and vhost) fds through `getfd`, `netdev_add`,
//! `device_add` at an explicit slot, then a check in `query-pci`.

use std::os::fd::AsFd;

use hypervisor::argv::{PCI_BUS, netdev_id, nic_device_id};
use hypervisor::qmp::QmpClient;
use hypervisor::runtime::RuntimeNic;
use hypervisor::spec::NicModel;
use hypervisor::tap::{self, Tap};
use serde_json::{Value, json};

use crate::{HotplugError, undo, verify_slot};

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

/// Hot-adds `nic` at its slot. On failure every step taken is undone and
/// the tap is closed, so it vanishes.
pub async fn add(
    qmp: &QmpClient,
    nic: &RuntimeNic,
    tap_template: &str,
) -> Result<AddedNic, HotplugError> {
    let tap = Tap::create(tap_template)?;
    tap.set_up()?;
    if let Some(bridge) = &nic.spec.bridge {
        tap.attach_to_bridge(bridge)?;
    }
    let vhost = nic.spec.vhost.then(tap::open_vhost_net).transpose()?;

    let netdev = netdev_id(nic.spec.uuid);
    let vhost_name = format!("{netdev}-vhost");
    qmp.getfd(&netdev, tap.as_fd())
        .await
        .map_err(HotplugError::qmp("getfd"))?;
    let mut netdev_args = json!({ "type": "tap", "id": netdev, "fd": netdev });
    if let Some(vhost) = &vhost {
        if let Err(source) = qmp.getfd(&vhost_name, vhost.as_fd()).await {
            undo(qmp, "closefd", json!({ "fdname": netdev })).await;
            return Err(HotplugError::Qmp {
                step: "getfd",
                source,
            });
        }
        netdev_args["vhost"] = json!(true);
        netdev_args["vhostfd"] = json!(vhost_name);
    }
    if let Err(source) = qmp.execute("netdev_add", Some(netdev_args)).await {
        // netdev_add may or may not have taken the named fds; closing a
        // name that is gone fails harmlessly.
        undo(qmp, "closefd", json!({ "fdname": netdev })).await;
        if vhost.is_some() {
            undo(qmp, "closefd", json!({ "fdname": vhost_name })).await;
        }
        return Err(HotplugError::Qmp {
            step: "netdev_add",
            source,
        });
    }
    if let Err(source) = qmp.execute("device_add", Some(device_arguments(nic))).await {
        undo(qmp, "netdev_del", json!({ "id": netdev })).await;
        return Err(HotplugError::Qmp {
            step: "device_add",
            source,
        });
    }
    let id = nic_device_id(nic.spec.uuid);
    if let Err(e) = verify_slot(qmp, &id, nic.slot).await {
        undo(qmp, "device_del", json!({ "id": id })).await;
        undo(qmp, "netdev_del", json!({ "id": netdev })).await;
        return Err(e);
    }
    Ok(AddedNic {
        tap: tap.name().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::spec::{MacAddr, NicSpec};

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
