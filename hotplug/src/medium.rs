//! Changing the medium of a CD-ROM or floppy drive while the guest runs.
//! The image goes to QEMU in an fd set (`add-fd`), `blockdev-change-medium`
//! opens the tray, swaps the medium and closes it again, and the set is
//! released: the new block node holds its own dup of the fd. The medium
//! the drive held since the launch had a named node, which stays open until
//! deleted, so it is.

use std::fs::File;
use std::os::fd::AsFd;

use hypervisor::qmp::{Command, QmpClient};
use hypervisor::spec::MediaDrive;
use serde_json::{Value, json};

use crate::HotplugError;
use crate::pipeline::{self, Step, Undo};

/// `blockdev-change-medium`'s arguments: the image in `fdset`, read-only.
pub fn change_arguments(drive: &MediaDrive, fdset: u64) -> Value {
    json!({
        "id": drive.device_id(),
        "filename": format!("/dev/fdset/{fdset}"),
        "format": "raw",
        "read-only-mode": "read-only",
    })
}

/// Puts `image` (opened read-only by the caller) into `drive`, the drive at
/// `index` in the runtime, replacing whatever medium it held. QEMU refuses
/// while the guest keeps the tray locked, as a guest that has the disc
/// mounted does.
pub async fn insert(
    qmp: &QmpClient,
    drive: &MediaDrive,
    index: usize,
    image: &File,
) -> Result<(), HotplugError> {
    let fdset = qmp
        .add_fd(image.as_fd())
        .await
        .map_err(HotplugError::qmp("add-fd"))?;
    let id = drive.device_id();
    let steps = vec![
        Step::new(
            "blockdev-change-medium",
            Command::new("blockdev-change-medium", change_arguments(drive, fdset)),
            Undo::Nothing,
        ),
        Step::new("query-block", Command::bare("query-block"), Undo::Nothing),
    ];
    let release = Command::new("remove-fd", json!({ "fdset-id": fdset }));
    let expected = format!("/dev/fdset/{fdset}");
    pipeline::run_checked(qmp, steps, Some(release), |replies| match replies {
        [_, blocks] if inserted_file(blocks, &id) == Some(expected.as_str()) => Ok(()),
        _ => Err(HotplugError::MediumNotInserted { id: id.clone() }),
    })
    .await?;
    close_launch_medium(qmp, index).await;
    Ok(())
}

/// Deletes the block node of the medium the drive held since its launch,
/// so QEMU closes its image. Once deleted, or for a drive launched empty,
/// there is no such node, and QEMU's refusal says just that.
async fn close_launch_medium(qmp: &QmpClient, index: usize) {
    let node = hypervisor::media::launch_node(index);
    if let Err(e) = qmp
        .execute("blockdev-del", Some(json!({ "node-name": node })))
        .await
    {
        tracing::debug!(%node, error = %e, "no launch medium to close");
    }
}

/// Takes the medium out of `drive`, the drive at `index` in the runtime,
/// even if the guest locked the tray: an operator's eject is meant to win,
/// as a paperclip in a real drive's emergency hole does.
pub async fn eject(qmp: &QmpClient, drive: &MediaDrive, index: usize) -> Result<(), HotplugError> {
    qmp.execute(
        "eject",
        Some(json!({ "id": drive.device_id(), "force": true })),
    )
    .await
    .map_err(HotplugError::qmp("eject"))?;
    close_launch_medium(qmp, index).await;
    Ok(())
}

/// The file of the medium in the drive whose device is `id`, from
/// `query-block`'s reply; `None` for an empty drive.
pub fn inserted_file<'a>(blocks: &'a Value, id: &str) -> Option<&'a str> {
    blocks
        .as_array()?
        .iter()
        .find(|b| b.get("qdev").and_then(Value::as_str) == Some(id))?
        .pointer("/inserted/file")?
        .as_str()
}

#[cfg(test)]
mod tests {
    use hypervisor::spec::MediaKind;

    use super::*;

    #[test]
    fn the_medium_is_named_by_its_fd_set_and_opened_read_only() {
        let drive = MediaDrive {
            name: "install".into(),
            kind: MediaKind::Cdrom,
            image: None,
        };
        let args = change_arguments(&drive, 5);
        assert_eq!(args["id"], "media-install");
        assert_eq!(args["filename"], "/dev/fdset/5");
        assert_eq!(args["read-only-mode"], "read-only");
    }

    #[test]
    fn an_empty_drive_has_no_inserted_file() {
        let blocks = json!([
            {"qdev": "media-a", "tray_open": false},
            {"qdev": "media-b", "inserted": {"file": "/dev/fdset/4"}},
        ]);
        assert_eq!(inserted_file(&blocks, "media-a"), None);
        assert_eq!(inserted_file(&blocks, "media-b"), Some("/dev/fdset/4"));
        assert_eq!(inserted_file(&blocks, "media-c"), None);
    }
}
