//! ChangeMedium: another image in a running instance's CD-ROM or floppy
//! drive, or none, kept in the runtime so a soft reboot and a migration's
//! target have the same medium.
//!
//! QEMU changes first and the record follows. An agent killed in between
//! leaves the record with the old medium, which the next launch puts back;
//! the guest notices nothing until then.

use std::path::PathBuf;
use std::sync::Arc;

use hypervisor::qmp::QmpClient;
use hypervisor::spec::MediaDrive;

use super::{Agent, InstanceView};
use crate::error::AgentError;

impl Agent {
    /// Puts `image` into the drive named `drive` of running instance
    /// `name`, or ejects its medium when `image` is none.
    pub async fn change_medium(
        &self,
        name: &str,
        drive: &str,
        image: Option<PathBuf>,
    ) -> Result<InstanceView, AgentError> {
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        let (process, record) = Self::running(&inst)?;
        let index = record
            .runtime
            .media
            .iter()
            .position(|d| d.name == drive)
            .ok_or_else(|| AgentError::DeviceNotFound {
                instance: name.to_owned(),
                device: drive.to_owned(),
            })?;
        let mut updated = record.clone();
        Arc::make_mut(&mut updated.runtime).media[index].image = image;
        updated.runtime.to_spec().validate()?;
        let before = &record.runtime.media[index];
        let after = &updated.runtime.media[index];
        self.put_medium(name, process.qmp(), after, index).await?;
        if let Err(e) = self.write_record(&inst, &updated).await {
            // Back to what the record says, so QEMU and the record agree.
            if let Err(undo) = self.put_medium(name, process.qmp(), before, index).await {
                tracing::error!(instance = %name, drive, error = %undo, "can't put the old medium back");
            }
            return Err(e);
        }
        tracing::info!(instance = %name, drive, from = ?before.image, to = ?after.image, "medium changed");
        Ok(inst.view())
    }

    /// Makes QEMU's drive hold the medium `drive` (the drive at `index` in
    /// the runtime) names, or none.
    async fn put_medium(
        &self,
        instance: &str,
        qmp: &QmpClient,
        drive: &MediaDrive,
        index: usize,
    ) -> Result<(), AgentError> {
        let hotplug_error = |source| AgentError::Hotplug {
            instance: instance.to_owned(),
            source,
        };
        let Some(path) = &drive.image else {
            return hotplug::medium::eject(qmp, drive, index)
                .await
                .map_err(hotplug_error);
        };
        let roots = &self.config().allowed_roots;
        roots.check(&drive.what(), path)?;
        let image = hypervisor::host_files::open_medium(drive, path, roots)
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        hotplug::medium::insert(qmp, drive, index, &image)
            .await
            .map_err(hotplug_error)
    }
}
