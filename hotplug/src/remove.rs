//! Device removal: `device_del`, wait for the guest to release the device
//! (QEMU's DEVICE_DELETED), then delete its backend.

use std::time::Duration;

use hypervisor::argv::{
    disk_device_id, disk_file_node, disk_format_node, netdev_id, nic_device_id,
};
use hypervisor::qmp::{QmpClient, QmpError};
use hypervisor::runtime::Uuid;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::HotplugError;
use crate::pipeline::undo;

/// Which kind of device, by uuid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// A NIC and its netdev.
    Nic(Uuid),
    /// A disk and its block nodes.
    Disk(Uuid),
}

impl Device {
    /// The QEMU device id.
    pub fn id(&self) -> String {
        match self {
            Device::Nic(u) => nic_device_id(*u),
            Device::Disk(u) => disk_device_id(*u),
        }
    }
}

/// True for the DEVICE_DELETED event of device `id`.
pub fn is_deleted_event(name: &str, data: &Value, id: &str) -> bool {
    name == "DEVICE_DELETED" && data.get("device").and_then(Value::as_str) == Some(id)
}

/// Removes a device. If the guest doesn't release it within `timeout`, the
/// device stays and [`HotplugError::GuestDidNotRelease`] says so.
pub async fn remove(
    qmp: &QmpClient,
    device: Device,
    timeout: Duration,
) -> Result<(), HotplugError> {
    let id = device.id();
    // Subscribe first: the event may come before device_del's reply.
    let mut events = qmp.subscribe();
    qmp.execute("device_del", Some(json!({ "id": id })))
        .await
        .map_err(HotplugError::qmp("device_del"))?;
    let released = tokio::time::timeout(timeout, async {
        loop {
            match events.recv().await {
                Ok(e) if is_deleted_event(&e.name, &e.data, &id) => return Ok(()),
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return Err(QmpError::Disconnected { reason: None }),
            }
        }
    })
    .await;
    match released {
        Err(_) => {
            return Err(HotplugError::GuestDidNotRelease { id, after: timeout });
        }
        Ok(Err(source)) => {
            return Err(HotplugError::Qmp {
                step: "waiting for DEVICE_DELETED",
                source,
            });
        }
        Ok(Ok(())) => {}
    }
    // The device is gone; a backend that can't be deleted only leaks inside
    // QEMU, so it is logged rather than failing the removal.
    delete_backend(qmp, device).await;
    Ok(())
}

/// Deletes a device's netdev or block nodes, best effort (failures are
/// logged): after a removal, or when recovery finds a backend whose device
/// never made it.
pub async fn delete_backend(qmp: &QmpClient, device: Device) {
    match device {
        Device::Nic(u) => undo(qmp, "netdev_del", json!({ "id": netdev_id(u) })).await,
        Device::Disk(u) => {
            undo(
                qmp,
                "blockdev-del",
                json!({ "node-name": disk_format_node(u) }),
            )
            .await;
            undo(
                qmp,
                "blockdev-del",
                json!({ "node-name": disk_file_node(u) }),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_devices_own_event_counts() {
        let id = "nic-000000000abc";

        assert!(is_deleted_event(
            "DEVICE_DELETED",
            &json!({"device": id, "path": "/machine/peripheral/nic-000000000abc"}),
            id
        ));
        assert!(!is_deleted_event(
            "DEVICE_DELETED",
            &json!({"path": "/machine/peripheral/nic-000000000abc/virtio-backend"}),
            id
        ));
        assert!(!is_deleted_event(
            "DEVICE_DELETED",
            &json!({"device": "other"}),
            id
        ));
        assert!(!is_deleted_event("RESET", &json!({"device": id}), id));
    }
}
