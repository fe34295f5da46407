//! Disk hot-add: the image fd through `add-fd`, `blockdev-add` of a file
//! node on `/dev/fdset/N` and a format node on top, `device_add` at an
//! explicit slot, `remove-fd`, then checks in `query-pci` and `query-block`.

use std::fs::File;
use std::os::fd::AsFd;

use hypervisor::argv::{PCI_BUS, disk_device_id, disk_file_node, disk_format_node};
use hypervisor::qmp::QmpClient;
use hypervisor::runtime::RuntimeDisk;
use hypervisor::spec::{DiskCache, DiskFormat};
use serde_json::{Value, json};

use crate::{HotplugError, undo, verify_slot};

/// `(direct, no_flush, write_cache)` for a cache mode, as at start.
fn cache_flags(cache: DiskCache) -> (bool, bool, bool) {
    match cache {
        DiskCache::None => (true, false, true),
        DiskCache::Writeback => (false, false, true),
        DiskCache::Writethrough => (false, false, false),
        DiskCache::Directsync => (true, false, false),
        DiskCache::Unsafe => (false, true, true),
    }
}

/// `blockdev-add` arguments of the file node. Pure.
pub fn file_node_arguments(disk: &RuntimeDisk, fdset_id: u64) -> Value {
    let (direct, no_flush, _) = cache_flags(disk.spec.cache);
    json!({
        "driver": "file",
        "node-name": disk_file_node(disk.spec.uuid),
        "filename": format!("/dev/fdset/{fdset_id}"),
        "read-only": disk.spec.read_only,
        "cache": { "direct": direct, "no-flush": no_flush },
    })
}

/// `blockdev-add` arguments of the format node. Pure.
pub fn format_node_arguments(disk: &RuntimeDisk) -> Value {
    let driver = match disk.spec.format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    json!({
        "driver": driver,
        "node-name": disk_format_node(disk.spec.uuid),
        "file": disk_file_node(disk.spec.uuid),
        "read-only": disk.spec.read_only,
    })
}

/// `device_add` arguments. Pure.
pub fn device_arguments(disk: &RuntimeDisk) -> Value {
    let (_, _, write_cache) = cache_flags(disk.spec.cache);
    json!({
        "driver": "virtio-blk-pci",
        "id": disk_device_id(disk.spec.uuid),
        "drive": disk_format_node(disk.spec.uuid),
        "bus": PCI_BUS,
        "addr": format!("{:#x}", disk.slot),
        "write-cache": if write_cache { "on" } else { "off" },
    })
}

/// Hot-adds `disk` from an image the caller opened (read-only or
/// read-write, as the disk asks). On failure every step is undone.
pub async fn add(qmp: &QmpClient, disk: &RuntimeDisk, image: &File) -> Result<(), HotplugError> {
    let fdset = qmp
        .add_fd(image.as_fd())
        .await
        .map_err(HotplugError::qmp("add-fd"))?;
    let result = add_nodes_and_device(qmp, disk, fdset).await;
    // The nodes hold their own dup of the fd; the set itself can go either
    // way. Failing to release it costs one fd in QEMU, not the operation.
    if let Err(e) = qmp.remove_fd(fdset).await {
        tracing::warn!(fdset, error = %e, "remove-fd failed after disk hot-add");
    }
    result
}

async fn add_nodes_and_device(
    qmp: &QmpClient,
    disk: &RuntimeDisk,
    fdset: u64,
) -> Result<(), HotplugError> {
    let file_node = disk_file_node(disk.spec.uuid);
    let format_node = disk_format_node(disk.spec.uuid);
    qmp.execute("blockdev-add", Some(file_node_arguments(disk, fdset)))
        .await
        .map_err(HotplugError::qmp("blockdev-add (file)"))?;
    if let Err(source) = qmp
        .execute("blockdev-add", Some(format_node_arguments(disk)))
        .await
    {
        undo(qmp, "blockdev-del", json!({ "node-name": file_node })).await;
        return Err(HotplugError::Qmp {
            step: "blockdev-add (format)",
            source,
        });
    }
    let undo_nodes = || async {
        undo(qmp, "blockdev-del", json!({ "node-name": format_node })).await;
        undo(qmp, "blockdev-del", json!({ "node-name": file_node })).await;
    };
    if let Err(source) = qmp
        .execute("device_add", Some(device_arguments(disk)))
        .await
    {
        undo_nodes().await;
        return Err(HotplugError::Qmp {
            step: "device_add",
            source,
        });
    }
    let id = disk_device_id(disk.spec.uuid);
    let verified = match verify_slot(qmp, &id, disk.slot).await {
        Ok(()) => verify_block(qmp, &id).await,
        Err(e) => Err(e),
    };
    if let Err(e) = verified {
        undo(qmp, "device_del", json!({ "id": id })).await;
        undo_nodes().await;
        return Err(e);
    }
    Ok(())
}

async fn verify_block(qmp: &QmpClient, id: &str) -> Result<(), HotplugError> {
    let blocks = qmp
        .execute("query-block", None)
        .await
        .map_err(HotplugError::qmp("query-block"))?;
    let attached = blocks.as_array().into_iter().flatten().any(|b| {
        b.get("qdev")
            .and_then(Value::as_str)
            .is_some_and(|q| q.split('/').any(|part| part == id))
    });
    if attached {
        Ok(())
    } else {
        Err(HotplugError::Verify {
            id: id.to_owned(),
            slot: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::runtime::Uuid;
    use hypervisor::spec::DiskSpec;

    fn disk(read_only: bool, cache: DiskCache) -> RuntimeDisk {
        RuntimeDisk {
            spec: DiskSpec {
                name: "data".into(),
                uuid: Uuid::from_u128(0xd1),
                path: "/srv/data.img".into(),
                format: DiskFormat::Qcow2,
                read_only,
                cache,
            },
            slot: 9,
        }
    }

    #[test]
    fn file_node_opens_the_fdset_not_the_path() {
        let args = file_node_arguments(&disk(true, DiskCache::Writeback), 4);

        assert_eq!(args["filename"], "/dev/fdset/4");
        assert_eq!(args["read-only"], true);
        assert_eq!(args["cache"]["direct"], false);
    }

    #[test]
    fn format_node_sits_on_the_file_node() {
        let d = disk(false, DiskCache::None);

        let args = format_node_arguments(&d);

        assert_eq!(args["driver"], "qcow2");
        assert_eq!(args["file"], disk_file_node(d.spec.uuid));
    }

    #[test]
    fn writethrough_turns_the_device_write_cache_off() {
        let args = device_arguments(&disk(false, DiskCache::Writethrough));

        assert_eq!(args["write-cache"], "off");
        assert_eq!(args["addr"], "0x9");
    }
}
