//! Disk hot-add: the image fd through `add-fd`, `blockdev-add` of a file
//! node on `/dev/fdset/N` and a format node on top, `device_add` at an
//! explicit slot, `remove-fd`, then checks in `query-pci` and `query-block`.

use std::fs::File;
use std::os::fd::AsFd;

use hypervisor::argv::{PCI_BUS, cache_flags, disk_device_id, disk_file_node, disk_format_node};
use hypervisor::qmp::{Command, QmpClient, QmpError};
use hypervisor::runtime::RuntimeDisk;
use hypervisor::spec::DiskFormat;
use serde_json::{Value, json};

use crate::{HotplugError, slots, undo};

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
/// read-write, as the disk asks). After `add-fd`, the block nodes, the
/// device, the checks and `remove-fd` go out as one pipeline. On failure
/// every step that succeeded is undone.
pub async fn add(qmp: &QmpClient, disk: &RuntimeDisk, image: &File) -> Result<(), HotplugError> {
    attach(qmp, disk, pass_image(qmp, image).await?).await
}

/// Hands QEMU the image fd in a new fdset (`add-fd`). It doesn't depend on
/// the slot, so it can go out beside the slot look-up.
pub async fn pass_image(qmp: &QmpClient, image: &File) -> Result<u64, HotplugError> {
    qmp.add_fd(image.as_fd())
        .await
        .map_err(HotplugError::qmp("add-fd"))
}

/// Releases an fdset whose disk was never attached.
pub async fn release_image(qmp: &QmpClient, fdset: u64) {
    undo(qmp, "remove-fd", json!({ "fdset-id": fdset })).await;
}

/// Attaches `disk` from the image in `fdset`, then releases the fdset.
pub async fn attach(qmp: &QmpClient, disk: &RuntimeDisk, fdset: u64) -> Result<(), HotplugError> {
    let commands = vec![
        Command::new("blockdev-add", file_node_arguments(disk, fdset)),
        Command::new("blockdev-add", format_node_arguments(disk)),
        Command::new("device_add", device_arguments(disk)),
        Command::bare("query-pci"),
        Command::bare("query-block"),
        // The nodes hold their own dup of the fd, so the set can go now,
        // whatever happened before it.
        Command::new("remove-fd", json!({ "fdset-id": fdset })),
    ];
    let mut results = qmp.pipeline(commands).await.into_iter();
    let mut next = || {
        results
            .next()
            .unwrap_or(Err(QmpError::Disconnected { reason: None }))
    };
    let (file_added, format_added, device_added) = (next(), next(), next());
    let (pci, blocks, fdset_removed) = (next(), next(), next());
    if let Err(e) = fdset_removed {
        // It costs one fd in QEMU, not the operation.
        tracing::warn!(fdset, error = %e, "remove-fd failed after disk hot-add");
    }

    let id = disk_device_id(disk.spec.uuid);
    let failure = match (file_added, format_added, device_added) {
        (Ok(_), Ok(_), Ok(_)) => match (pci, blocks) {
            (Ok(pci), Ok(blocks)) => {
                let at_slot = slots::bus0_devices(&pci)
                    .iter()
                    .any(|(s, q)| *s == disk.slot && *q == id);
                if at_slot && block_attached(&blocks, &id) {
                    return Ok(());
                }
                (
                    3,
                    HotplugError::Verify {
                        id: id.clone(),
                        slot: disk.slot,
                    },
                )
            }
            (Err(source), _) => (
                3,
                HotplugError::Qmp {
                    step: "query-pci",
                    source,
                },
            ),
            (_, Err(source)) => (
                3,
                HotplugError::Qmp {
                    step: "query-block",
                    source,
                },
            ),
        },
        (Err(source), ..) => (
            0,
            HotplugError::Qmp {
                step: "blockdev-add (file)",
                source,
            },
        ),
        (_, Err(source), _) => (
            1,
            HotplugError::Qmp {
                step: "blockdev-add (format)",
                source,
            },
        ),
        (_, _, Err(source)) => (
            2,
            HotplugError::Qmp {
                step: "device_add",
                source,
            },
        ),
    };
    let (reached, error) = failure;
    if reached >= 3 {
        undo(qmp, "device_del", json!({ "id": id })).await;
    }
    if reached >= 2 {
        undo(
            qmp,
            "blockdev-del",
            json!({ "node-name": disk_format_node(disk.spec.uuid) }),
        )
        .await;
    }
    if reached >= 1 {
        undo(
            qmp,
            "blockdev-del",
            json!({ "node-name": disk_file_node(disk.spec.uuid) }),
        )
        .await;
    }
    Err(error)
}

/// Whether `query-block` shows a block device attached to device `id`.
/// Pure.
pub fn block_attached(blocks: &Value, id: &str) -> bool {
    blocks.as_array().into_iter().flatten().any(|b| {
        b.get("qdev")
            .and_then(Value::as_str)
            .is_some_and(|q| q.split('/').any(|part| part == id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::runtime::Uuid;
    use hypervisor::spec::{DiskCache, DiskSpec};

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
