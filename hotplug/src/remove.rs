//! Device removal: `device_del`, wait for the guest to release the device
//! (QEMU's DEVICE_DELETED), then delete its backend.

use std::time::Duration;

use hypervisor::argv::{disk_file_node, disk_format_node};
use hypervisor::qmp::{QmpClient, QmpError};
use hypervisor::runtime::{RuntimeDisk, RuntimeNic, Uuid};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tracing::{Instrument, debug_span};

use crate::HotplugError;
use crate::pipeline::undo;

/// A device to remove, by its QEMU ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// A NIC and its netdev.
    Nic {
        /// Device id.
        id: String,
        /// Netdev id.
        netdev: String,
    },
    /// A disk and its block nodes, named after its uuid.
    Disk {
        /// Device id.
        id: String,
        /// The disk's uuid.
        uuid: Uuid,
    },
}

impl Device {
    /// A runtime's NIC.
    pub fn nic(nic: &RuntimeNic) -> Self {
        Device::Nic {
            id: nic.device_id(),
            netdev: nic.netdev_id(),
        }
    }

    /// A runtime's disk.
    pub fn disk(disk: &RuntimeDisk) -> Self {
        Device::Disk {
            id: disk.device_id(),
            uuid: disk.spec.uuid,
        }
    }

    /// The QEMU device id.
    pub fn id(&self) -> &str {
        match self {
            Device::Nic { id, .. } | Device::Disk { id, .. } => id,
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
    let id = device.id().to_owned();
    // Subscribe first: the event may come before device_del's reply.
    let mut events = qmp.subscribe();
    qmp.execute("device_del", Some(json!({ "id": id })))
        .instrument(debug_span!("step", step = "device_del"))
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
    .instrument(debug_span!("step", step = "guest release"))
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
    delete_backend(qmp, device)
        .instrument(debug_span!("step", step = "backend"))
        .await;
    Ok(())
}

/// Deletes a device's netdev or block nodes, best effort (failures are
/// logged): after a removal, or when recovery finds a backend whose device
/// never made it.
pub async fn delete_backend(qmp: &QmpClient, device: Device) {
    match device {
        Device::Nic { netdev, .. } => undo(qmp, "netdev_del", json!({ "id": netdev })).await,
        // A disk QEMU had before the agent adopted it has a drive of its
        // own instead, which QEMU deletes with the device; these then
        // fail, harmlessly.
        Device::Disk { uuid, .. } => {
            undo(
                qmp,
                "blockdev-del",
                json!({ "node-name": disk_format_node(uuid) }),
            )
            .await;
            // Only a disk from the command line has a file node of its own
            // to delete; a hot-added one's went with its format node.
            let file_node = disk_file_node(uuid);
            let deleted = qmp
                .execute("blockdev-del", Some(json!({ "node-name": file_node })))
                .await;
            if let Err(e) = deleted {
                tracing::debug!(node = %file_node, error = %e, "no file node of its own to delete");
            }
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
