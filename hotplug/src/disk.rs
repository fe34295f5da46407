//! Disk hot-add: the image fd through `add-fd`, one `blockdev-add` of a
//! format node over a file node on `/dev/fdset/N`, `device_add` at an
//! explicit slot or SCSI target, then `remove-fd`.

use std::fs::File;
use std::os::fd::AsFd;

use hypervisor::argv::{cache_flags, disk_driver, disk_format_node};
use hypervisor::disk::{ImageKind, SCSI_CONTROLLER_ID};
use hypervisor::pcie::PciLayout;
use hypervisor::qmp::{Command, QmpClient};
use hypervisor::runtime::RuntimeDisk;
use hypervisor::spec::{DiskAio, DiskFormat};
use serde_json::{Value, json};

use crate::HotplugError;
use crate::pipeline::{self, Step, Undo};

/// `blockdev-add` arguments of the disk's format node with its file node
/// inside. Pure.
///
/// One command instead of two, since QEMU reads QMP input one byte per
/// turn of its main loop: every byte and every command sent is time in
/// the hot-add. For the same reason the options leave out QEMU's defaults
/// (writable, no `O_DIRECT`, flushes, the thread pool for I/O), and the
/// file node has no name: it belongs to the format node, goes with it, and
/// nothing addresses it. The nodes come out as `-blockdev` makes them.
pub fn node_arguments(disk: &RuntimeDisk, fdset_id: u64, kind: ImageKind) -> Value {
    let driver = match disk.spec.format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    let args = json!({
        "driver": driver,
        "node-name": disk_format_node(disk.spec.uuid),
        "file": file_node_arguments(disk, fdset_id, kind),
    });
    shared_node_options(disk, args)
}

/// The file node inside [`node_arguments`]. Pure.
fn file_node_arguments(disk: &RuntimeDisk, fdset_id: u64, kind: ImageKind) -> Value {
    let (direct, no_flush, _) = cache_flags(disk.spec.cache);
    let mut args = json!({
        "driver": kind.protocol_driver(),
        "filename": format!("/dev/fdset/{fdset_id}"),
    });
    if direct || no_flush {
        args["cache"] = json!({ "direct": direct, "no-flush": no_flush });
    }
    if disk.spec.aio != DiskAio::Threads {
        args["aio"] = json!(disk.spec.aio.as_str());
    }
    shared_node_options(disk, args)
}

/// The options both block nodes of a disk take, where not QEMU's default.
fn shared_node_options(disk: &RuntimeDisk, mut args: Value) -> Value {
    if disk.spec.read_only {
        args["read-only"] = json!(true);
    }
    if disk.spec.discard {
        args["discard"] = json!("unmap");
    }
    args
}

/// Where a hot-added disk goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskPlace {
    /// A virtio disk's PCI slot.
    Slot(u8),
    /// A SCSI disk's target on the controller.
    ScsiTarget(u8),
}

impl DiskPlace {
    /// The place a runtime's disk records, if it can be hot-plugged there.
    pub fn of(disk: &RuntimeDisk) -> Option<Self> {
        match (disk.slot, disk.scsi_target) {
            (Some(slot), _) => Some(DiskPlace::Slot(slot)),
            (None, Some(target)) => Some(DiskPlace::ScsiTarget(target)),
            (None, None) => None,
        }
    }
}

/// `device_add` arguments of a disk at `place`. Pure.
pub fn device_arguments(disk: &RuntimeDisk, place: DiskPlace, layout: PciLayout) -> Value {
    let (_, _, write_cache) = cache_flags(disk.spec.cache);
    let mut args = json!({
        "driver": disk_driver(disk),
        "id": disk.device_id(),
        "drive": disk_format_node(disk.spec.uuid),
    });
    match place {
        DiskPlace::Slot(slot) => crate::place_in_slot(&mut args, layout, slot),
        DiskPlace::ScsiTarget(target) => {
            args["bus"] = json!(format!("{SCSI_CONTROLLER_ID}.0"));
            args["channel"] = json!(0);
            args["scsi-id"] = json!(target);
            args["lun"] = json!(0);
        }
    }
    if !disk.spec.bus.passes_through() {
        args["write-cache"] = json!(if write_cache { "on" } else { "off" });
    }
    args
}

/// Hot-adds `disk` from an image the caller opened (read-only or
/// read-write, as the disk asks). After `add-fd`, the block nodes, the
/// device and `remove-fd` go out as one pipeline. On failure every step
/// that succeeded is undone.
pub async fn add(
    qmp: &QmpClient,
    disk: &RuntimeDisk,
    image: &File,
    kind: ImageKind,
    layout: PciLayout,
) -> Result<(), HotplugError> {
    attach(qmp, disk, pass_image(qmp, image).await?, kind, layout).await
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
    pipeline::undo(qmp, "remove-fd", json!({ "fdset-id": fdset })).await;
}

/// Attaches `disk` from the image in `fdset`, then releases the fdset.
pub async fn attach(
    qmp: &QmpClient,
    disk: &RuntimeDisk,
    fdset: u64,
    kind: ImageKind,
    layout: PciLayout,
) -> Result<(), HotplugError> {
    let Some(place) = DiskPlace::of(disk) else {
        return Err(HotplugError::Unsupported(
            "IDE can't take a disk while the guest runs; hot-add it on virtio or SCSI".into(),
        ));
    };
    let id = disk.device_id();
    let steps = vec![
        Step::new(
            "blockdev-add",
            Command::new("blockdev-add", node_arguments(disk, fdset, kind)),
            // Its file node goes with it.
            Undo::IfDone(vec![(
                "blockdev-del",
                json!({ "node-name": disk_format_node(disk.spec.uuid) }),
            )]),
        ),
        Step::new(
            "device_add",
            Command::new("device_add", device_arguments(disk, place, layout)),
            Undo::IfDone(vec![("device_del", json!({ "id": id }))]),
        ),
    ];
    // The nodes hold their own dup of the fd, so the set can go now,
    // whatever happened before it. `device_add` with an explicit place
    // and drive realizes the disk there or fails: its success is the
    // check.
    let release = Command::new("remove-fd", json!({ "fdset-id": fdset }));
    pipeline::run(qmp, steps, Some(release)).await
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
    use hypervisor::runtime::Uuid;
    use hypervisor::spec::{DiskCache, DiskSpec};

    use super::*;
    use crate::pipeline::tests::{executed, fake_qemu};

    fn disk(read_only: bool, cache: DiskCache) -> RuntimeDisk {
        RuntimeDisk::new(
            DiskSpec {
                name: "data".into(),
                uuid: Uuid::from_u128(0xd1),
                path: "/srv/data.img".into(),
                format: DiskFormat::Qcow2,
                read_only,
                cache,
                aio: DiskAio::Threads,
                discard: false,
                bus: Default::default(),
            },
            Some(9),
        )
    }

    #[test]
    fn native_aio_and_discard_reach_both_block_nodes() {
        let mut d = disk(false, DiskCache::None);
        assert!(
            node_arguments(&d, 4, ImageKind::File)["file"]
                .get("discard")
                .is_none()
        );
        d.spec.aio = DiskAio::Native;
        d.spec.discard = true;
        let args = node_arguments(&d, 4, ImageKind::File);
        assert_eq!(args["file"]["aio"], "native");
        assert_eq!(args["file"]["discard"], "unmap");
        assert_eq!(args["discard"], "unmap");
    }

    #[test]
    fn file_node_opens_the_fdset_not_the_path() {
        let args = node_arguments(&disk(true, DiskCache::Writeback), 4, ImageKind::Device);

        assert_eq!(args["file"]["filename"], "/dev/fdset/4");
        // A block device: QEMU's file driver takes only regular files.
        assert_eq!(args["file"]["driver"], "host_device");
        assert_eq!(args["file"]["read-only"], true);
        assert_eq!(args["read-only"], true);
    }

    #[test]
    fn block_nodes_leave_out_what_qemu_defaults_to() {
        let d = disk(false, DiskCache::Writeback);

        let args = node_arguments(&d, 4, ImageKind::File);

        assert_eq!(
            args,
            json!({
                "driver": "qcow2",
                "node-name": disk_format_node(d.spec.uuid),
                "file": { "driver": "file", "filename": "/dev/fdset/4" },
            })
        );
        let bypassing = node_arguments(&disk(false, DiskCache::None), 4, ImageKind::File);
        assert_eq!(
            bypassing["file"]["cache"],
            json!({ "direct": true, "no-flush": false })
        );
        let unsafe_cache = node_arguments(&disk(false, DiskCache::Unsafe), 4, ImageKind::File);
        assert_eq!(
            unsafe_cache["file"]["cache"],
            json!({ "direct": false, "no-flush": true })
        );
    }

    #[test]
    fn a_scsi_disk_goes_to_its_target_on_the_controller() {
        let mut d = disk(false, DiskCache::None);
        d.spec.bus = hypervisor::spec::DiskBus::ScsiHd;
        let args = device_arguments(&d, DiskPlace::ScsiTarget(5), PciLayout::RootPorts);
        assert_eq!(args["driver"], "scsi-hd");
        assert_eq!(args["bus"], "scsi.0");
        assert_eq!(args["scsi-id"], 5);
        assert_eq!(args["lun"], 0);
        assert!(args.get("addr").is_none());
        d.spec.bus = hypervisor::spec::DiskBus::ScsiGeneric;
        let args = device_arguments(&d, DiskPlace::ScsiTarget(5), PciLayout::RootBus);
        assert!(args.get("write-cache").is_none(), "{args}");
    }

    #[test]
    fn the_file_node_sits_inside_the_format_node_without_a_name() {
        let d = disk(false, DiskCache::None);

        let args = node_arguments(&d, 4, ImageKind::File);

        assert_eq!(args["driver"], "qcow2");
        assert_eq!(args["node-name"], disk_format_node(d.spec.uuid));
        assert!(args["file"].get("node-name").is_none(), "{args}");
    }

    #[tokio::test]
    async fn a_refused_device_takes_back_the_nodes_after_releasing_the_set() {
        let (qmp, seen) = fake_qemu(&["device_add"]).await;
        let d = disk(false, DiskCache::None);

        let result = attach(&qmp, &d, 4, ImageKind::File, PciLayout::RootBus).await;

        assert!(
            matches!(
                result,
                Err(HotplugError::Qmp {
                    step: "device_add",
                    ..
                })
            ),
            "{result:?}"
        );
        let requests = seen.lock().unwrap().clone();
        let names: Vec<&str> = requests.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            ["blockdev-add", "device_add", "remove-fd", "blockdev-del"]
        );
        assert_eq!(requests[2].1, json!({ "fdset-id": 4 }));
        assert_eq!(requests[3].1["node-name"], disk_format_node(d.spec.uuid));
    }

    #[tokio::test]
    async fn refused_nodes_leave_nothing_to_take_back() {
        let (qmp, seen) = fake_qemu(&["blockdev-add"]).await;

        let result = attach(
            &qmp,
            &disk(true, DiskCache::None),
            4,
            ImageKind::File,
            PciLayout::RootBus,
        )
        .await;

        assert!(
            matches!(
                result,
                Err(HotplugError::Qmp {
                    step: "blockdev-add",
                    ..
                })
            ),
            "{result:?}"
        );
        assert_eq!(
            executed(&seen).last().map(String::as_str),
            Some("remove-fd")
        );
    }

    #[test]
    fn writethrough_turns_the_device_write_cache_off() {
        let args = device_arguments(
            &disk(false, DiskCache::Writethrough),
            DiskPlace::Slot(9),
            PciLayout::RootBus,
        );

        assert_eq!(args["write-cache"], "off");
        assert_eq!(args["addr"], "0x9");
    }
}
