//! CD-ROM and floppy drives: removable media, whose image can change while
//! the guest runs. Pure: what a drive list may hold, where each drive sits
//! and how it is rendered on QEMU's command line.
//!
//! CD-ROMs are IDE drives on the PIIX's secondary channel (a guest's
//! traditional `hdc` and `hdd`), leaving the primary one to IDE disks.
//! Whatever bus a manager names for a CD-ROM, it stays there: IDE is the
//! bus on which a guest sees a tray, so the medium can be changed and
//! ejected. The floppy is drive A of the machine's own controller.

use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::pcie::PciLayout;

/// How many CD-ROMs an instance can have: the secondary IDE channel's
/// master and slave.
pub const MAX_CDROMS: usize = 2;
/// How many floppy drives an instance can have.
pub const MAX_FLOPPIES: usize = 1;
/// How the QEMU id of every drive starts.
pub const MEDIA_ID_PREFIX: &str = "media-";
/// The IDE bus CD-ROMs sit on.
const CDROM_BUS: &str = "ide.1";

/// Which kind of drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    /// An IDE CD-ROM drive; its media are read-only.
    Cdrom,
    /// A floppy drive; its media are read-only too, so an image is never
    /// written behind the manager's back.
    Floppy,
}

impl MediaKind {
    /// A word for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Cdrom => "CD-ROM",
            MediaKind::Floppy => "floppy",
        }
    }
}

/// A CD-ROM or floppy drive, with the medium in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaDrive {
    /// Unique among the instance's devices.
    pub name: String,
    /// CD-ROM or floppy.
    pub kind: MediaKind,
    /// The image in the drive; none is an empty drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
}

impl MediaDrive {
    /// QEMU's id of the drive's device.
    pub fn device_id(&self) -> String {
        format!("{MEDIA_ID_PREFIX}{}", self.name)
    }

    /// How the drive is named in messages and in host-file checks.
    pub fn what(&self) -> String {
        format!("{} {:?}", self.kind.as_str(), self.name)
    }
}

/// Why a drive list is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// More drives of a kind than the machine has places for.
    #[error("{count} {kind} drives asked for; an instance can have at most {max}")]
    TooMany {
        /// `CD-ROM` or `floppy`.
        kind: &'static str,
        /// As asked.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A boot device the instance doesn't have.
    #[error("boot from {0} asked for, but the instance has no {0} drive")]
    NoBootDrive(&'static str),
    /// A network boot without a NIC.
    #[error("boot from the network asked for, but the instance has no NIC")]
    NoBootNic,
}

/// Checks that the machine has places for the drives and that the drive
/// the guest boots from, if any, is there. Names and image paths are
/// checked with the other devices'. Pure.
pub fn check(drives: &[MediaDrive], boot_from: Option<MediaKind>) -> Result<(), MediaError> {
    for (kind, max) in [
        (MediaKind::Cdrom, MAX_CDROMS),
        (MediaKind::Floppy, MAX_FLOPPIES),
    ] {
        let count = drives.iter().filter(|d| d.kind == kind).count();
        if count > max {
            return Err(MediaError::TooMany {
                kind: kind.as_str(),
                count,
                max,
            });
        }
    }
    match boot_from {
        Some(kind) if !drives.iter().any(|d| d.kind == kind) => {
            Err(MediaError::NoBootDrive(kind.as_str()))
        }
        _ => Ok(()),
    }
}

/// The boot order a drive takes: first for the first drive of the kind the
/// guest boots from, none otherwise.
pub fn boot_index(
    drives: &[MediaDrive],
    index: usize,
    boot_from: Option<MediaKind>,
) -> Option<u32> {
    let kind = boot_from?;
    let first = drives.iter().position(|d| d.kind == kind)?;
    (first == index).then_some(1)
}

/// The block node of the medium the drive at `index` in the runtime holds
/// from its launch. The media put in later have nodes QEMU names, which go
/// with them; this one stays until it is deleted.
pub fn launch_node(index: usize) -> String {
    format!("media{index}")
}

/// `-add-fd`, `-blockdev` and `-device` of the drive at `index` in the
/// runtime: an empty drive without a medium, or one with the image open as
/// `image` and handed to QEMU in fd set `fdset`. Pure.
pub fn render(
    drives: &[MediaDrive],
    index: usize,
    image: Option<(RawFd, u64)>,
    boot_index: Option<u32>,
    layout: PciLayout,
) -> Vec<String> {
    let drive = &drives[index];
    let mut argv = Vec::new();
    let nth = drives[..index]
        .iter()
        .filter(|d| d.kind == drive.kind)
        .count();
    let id = drive.device_id();
    let mut device = match (drive.kind, layout) {
        (MediaKind::Cdrom, PciLayout::RootBus) => {
            format!("ide-cd,id={id},bus={CDROM_BUS},unit={nth}")
        }
        // The ICH9's AHCI has a bus of one unit per port; the first two
        // are left to disks, as the PIIX's primary channel is.
        (MediaKind::Cdrom, PciLayout::RootPorts) => {
            format!("ide-cd,id={id},bus=ide.{},unit=0", 2 + nth)
        }
        (MediaKind::Floppy, PciLayout::RootBus) => format!("floppy,id={id},unit=0"),
        // A q35 has no floppy controller of its own.
        (MediaKind::Floppy, PciLayout::RootPorts) => {
            argv.extend(["-device".into(), "isa-fdc,id=fdc0".into()]);
            format!("floppy,id={id},unit=0")
        }
    };
    if let Some((fd, fdset)) = image {
        let node = launch_node(index);
        argv.extend([
            "-add-fd".into(),
            format!("fd={fd},set={fdset}"),
            "-blockdev".into(),
            format!(
                "driver=raw,node-name={node},read-only=on,file.driver=file,file.filename=/dev/fdset/{fdset},file.read-only=on"
            ),
        ]);
        device.push_str(&format!(",drive={node}"));
    }
    if let Some(order) = boot_index {
        device.push_str(&format!(",bootindex={order}"));
    }
    argv.extend(["-device".into(), device]);
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(name: &str, kind: MediaKind, image: Option<&str>) -> MediaDrive {
        MediaDrive {
            name: name.into(),
            kind,
            image: image.map(PathBuf::from),
        }
    }

    fn sample() -> Vec<MediaDrive> {
        vec![
            drive("install", MediaKind::Cdrom, Some("/srv/iso/debian.iso")),
            drive("drivers", MediaKind::Floppy, Some("/srv/iso/drivers.img")),
            drive("tools", MediaKind::Cdrom, None),
        ]
    }

    #[test]
    fn cdroms_take_the_secondary_channel_in_order_and_an_empty_drive_has_no_node() {
        let drives = sample();
        assert_eq!(
            render(&drives, 0, Some((7, 3)), Some(1), PciLayout::RootBus),
            [
                "-add-fd",
                "fd=7,set=3",
                "-blockdev",
                "driver=raw,node-name=media0,read-only=on,file.driver=file,file.filename=/dev/fdset/3,file.read-only=on",
                "-device",
                "ide-cd,id=media-install,bus=ide.1,unit=0,drive=media0,bootindex=1",
            ]
        );
        assert_eq!(
            render(&drives, 2, None, None, PciLayout::RootBus),
            ["-device", "ide-cd,id=media-tools,bus=ide.1,unit=1"]
        );
        assert_eq!(
            render(&drives, 1, Some((8, 4)), None, PciLayout::RootBus)
                .last()
                .unwrap(),
            "floppy,id=media-drivers,unit=0,drive=media1"
        );
    }

    #[test]
    fn the_first_drive_of_the_boot_kind_boots_first() {
        let drives = sample();
        let cdrom = Some(MediaKind::Cdrom);
        assert_eq!(boot_index(&drives, 0, cdrom), Some(1));
        assert_eq!(boot_index(&drives, 2, cdrom), None);
        assert_eq!(boot_index(&drives, 1, Some(MediaKind::Floppy)), Some(1));
        assert_eq!(boot_index(&drives, 0, None), None);
    }

    #[test]
    fn a_list_beyond_the_machine_or_without_its_boot_drive_is_refused() {
        assert!(check(&sample(), Some(MediaKind::Cdrom)).is_ok());
        let mut three = sample();
        three.push(drive("third", MediaKind::Cdrom, None));
        let err = check(&three, None).unwrap_err().to_string();
        assert!(
            err.contains("3 CD-ROM drives") && err.contains("at most 2"),
            "{err}"
        );
        let err = check(&sample()[..1], Some(MediaKind::Floppy))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no floppy drive"), "{err}");
    }
}
