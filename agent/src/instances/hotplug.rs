//! Hotplug on running instances: the agent's side. It validates the
//! device against the instance's runtime, journals the intent in the
//! record, lets the `hotplug` crate change QEMU, and writes the new layout
//! back so that reboot and migration keep it.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

use hotplug::remove::Device;
use hotplug::support::Support;
use hypervisor::InstanceSpec;
use hypervisor::argv::{DISK_ID_PREFIX, NIC_ID_PREFIX, disk_device_id, netdev_id, nic_device_id};
use hypervisor::host_files::{DiskImage, HostFileError};
use hypervisor::lifecycle::files;
use hypervisor::qmp::QmpClient;
use hypervisor::runtime::{Runtime, RuntimeDisk, RuntimeError, RuntimeNic};
use hypervisor::spec::{DiskBus, DiskSpec, NicModel, NicSpec};
use runtime_store::Intent;
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedMutexGuard;
use tracing::{Instrument, debug_span};
use uuid::Uuid;

use super::slots::{SlotPick, Tried, at_most_twice};
use super::{Agent, Instance, InstanceRecord, InstanceView, Process};
use crate::config::FaultPoint;
use crate::convert::free_device_name;
use crate::error::AgentError;
use crate::events::EventKind;
use crate::model::ChangedDevice;

/// A hotplug operation recorded before QEMU is touched, so an agent that
/// dies midway can tell at restart what may have happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum HotplugIntent {
    /// A NIC is being added. Its slot isn't journaled: the journal is
    /// written while the slot is looked up, and QEMU shows it by device id.
    AddNic {
        /// The NIC.
        nic: NicSpec,
    },
    /// A disk is being added (slot as for NICs).
    AddDisk {
        /// The disk.
        disk: DiskSpec,
    },
    /// A device is being removed.
    Remove {
        /// Device name.
        device: String,
    },
}

/// Checks a device against the instance: its spec with the device added
/// must still pass validation, so names, uuids and MACs stay unique.
fn check_addition(
    record: &InstanceRecord,
    add: impl FnOnce(&mut InstanceSpec),
) -> Result<(), AgentError> {
    let mut candidate = record.runtime.to_spec();
    add(&mut candidate);
    Ok(candidate.validate()?)
}

/// The names of the instance's devices, for naming an unnamed one.
fn device_names(record: &InstanceRecord) -> impl Iterator<Item = &str> + Clone {
    let runtime = &record.runtime;
    let disks = runtime.disks.iter().map(|d| d.spec.name.as_str());
    disks.chain(runtime.nics.iter().map(|n| n.spec.name.as_str()))
}

/// The refusal of a hot-add or hot-remove on IDE, which has no hotplug.
fn ide_is_cold(instance: &str) -> AgentError {
    AgentError::Hotplug {
        instance: instance.to_owned(),
        source: hotplug::HotplugError::Unsupported(
            "IDE disks come and go only with a stop and start; hot-plug disks on virtio".into(),
        ),
    }
}

/// The lowest free target of the instance's SCSI controller, for a disk
/// hot-added on SCSI.
fn free_scsi_target(instance: &str, runtime: &Runtime) -> Result<u8, AgentError> {
    let refused = |source| AgentError::Hotplug {
        instance: instance.to_owned(),
        source,
    };
    let Some(controller) = runtime.scsi_controller else {
        return Err(refused(hotplug::HotplugError::Unsupported(
            "the instance has no SCSI controller; give it one (scsi_controller) and restart it"
                .into(),
        )));
    };
    let taken = runtime.disks.iter().filter_map(|d| d.scsi_target);
    hypervisor::disk::free_scsi_target(taken, controller.model).ok_or_else(|| {
        refused(hotplug::HotplugError::NoFreeScsiTarget {
            controller: controller.model.device(),
            targets: controller.model.max_targets(),
        })
    })
}

/// Where a hot-added disk goes.
#[derive(Debug, Clone, Copy)]
enum Placed {
    /// A PCI slot, for virtio.
    Slot(SlotPick),
    /// A target on the SCSI controller.
    ScsiTarget(u8),
}

/// Opens a disk image the way QEMU will use it, so a bad path is refused
/// before anything changes.
fn open_image(
    instance: &str,
    disk: &DiskSpec,
    roots: &hypervisor::host_files::AllowedRoots,
) -> Result<DiskImage, AgentError> {
    hypervisor::host_files::open_disk_image(disk, roots).map_err(|e| match e {
        HostFileError::Disk { disk, path, reason } => AgentError::DiskUnusable {
            instance: instance.to_owned(),
            disk,
            path: path.display().to_string(),
            reason,
        },
        other => AgentError::BadRequest(other.to_string()),
    })
}

impl Agent {
    pub(super) fn running(inst: &Instance) -> Result<(Arc<Process>, InstanceRecord), AgentError> {
        let (process, record) = inst.process_and_record();
        match (process, record) {
            (Some(p), Some(r)) => Ok((p, r)),
            _ => Err(AgentError::NotRunning(inst.name().to_owned())),
        }
    }

    /// What hotplug can do for a running instance.
    pub fn hotplug_support(&self, name: &str) -> Result<Support, AgentError> {
        let inst = self.instance(name)?;
        let (process, _) = Self::running(&inst)?;
        Ok(hotplug::support::check(process.qmp()))
    }

    fn require(instance: &str, capability: &Result<(), String>) -> Result<(), AgentError> {
        capability.clone().map_err(|reason| AgentError::Hotplug {
            instance: instance.to_owned(),
            source: hotplug::HotplugError::Unsupported(reason),
        })
    }

    /// Hot-adds a NIC.
    pub async fn add_nic(
        &self,
        name: &str,
        mut nic: NicSpec,
    ) -> Result<(InstanceView, ChangedDevice), AgentError> {
        let inst = self.instance(name)?;
        let op = inst.lock_ops_owned().await?;
        let (process, record) = Self::running(&inst)?;
        if nic.uuid.is_nil() {
            nic.uuid = Uuid::new_v4();
        }
        if nic.name.is_empty() {
            nic.name = free_device_name("nic", device_names(&record));
        }
        if nic.model.on_isa() {
            return Err(AgentError::Hotplug {
                instance: name.to_owned(),
                source: hotplug::nic::isa_is_cold(),
            });
        }
        debug_span!("step", step = "checks")
            .in_scope(|| Self::check_nic_addition(name, &record, &process, &nic))?;
        if process.chrooted(&record.runtime) && !process.rom_staged(nic.model) {
            let staged = self
                .stage_option_rom(name, nic.model)
                .instrument(debug_span!("step", step = "option ROM"))
                .await;
            if staged {
                process.set_rom_staged(nic.model);
            }
        }
        let (runtime_nic, added) =
            at_most_twice(|first| self.try_add_nic(&inst, &process, &record, &nic, first)).await?;
        process.push_tap(added.tap.clone());
        inst.announce(EventKind::DeviceAdded {
            device: runtime_nic.spec.name.clone(),
            slot: runtime_nic.slot,
            scsi_target: None,
        });
        tracing::info!(instance = %name, nic = %runtime_nic.spec.name, slot = runtime_nic.slot, tap = %added.tap, "NIC added");
        self.clear_journal_after_reply(&inst, op);
        Ok((inst.view(), ChangedDevice::Nic(runtime_nic, added.tap)))
    }

    /// One try at hot-adding `nic`: the intent journaled, then the slot
    /// and the tap, then QEMU and the record. `first` lets a slot taken
    /// behind the agent's back be tried again (see `slots`).
    async fn try_add_nic(
        &self,
        inst: &Instance,
        process: &Process,
        record: &InstanceRecord,
        nic: &NicSpec,
        first: bool,
    ) -> Result<Tried<(RuntimeNic, hotplug::nic::AddedNic)>, AgentError> {
        // The tap's fds and the slot look-up don't depend on each other:
        // the fds are opened while QEMU answers query-pci, if it must be
        // asked. The interface is made later, while QEMU takes the fds.
        self.journal(inst, HotplugIntent::AddNic { nic: nic.clone() })?;
        // Each step's span opens when it is first polled, inside theirs.
        let slot_lookup = async {
            self.free_slot(inst, process, &record.runtime)
                .instrument(debug_span!("step", step = "slot look-up"))
                .await
        };
        let tap =
            async { debug_span!("step", step = "tap fds").in_scope(|| hotplug::nic::prepare(nic)) };
        let (slot, prepared) = async { tokio::join!(slot_lookup, tap) }
            .instrument(debug_span!("step", step = "slot and tap"))
            .await;
        let ready = prepared
            .map_err(|source| AgentError::Hotplug {
                instance: inst.name().to_owned(),
                source,
            })
            .and_then(|p| Ok((p, slot?)));
        let (prepared, pick) = match ready {
            Ok(r) => r,
            Err(e) => {
                self.clear_journal(inst)?;
                return Err(e);
            }
        };
        let runtime_nic = RuntimeNic::new(nic.clone(), Some(pick.slot));
        let mut updated = record.clone();
        Arc::make_mut(&mut updated.runtime)
            .nics
            .push(runtime_nic.clone());
        let attach = hotplug::nic::attach(
            process.qmp(),
            prepared,
            &runtime_nic,
            record.runtime.pci_layout(),
            &self.config().launch.tap_template,
        );
        let added = self.apply(inst, record, &updated, attach).await;
        if self.after_hot_add(inst, process, pick, &added, first).await {
            return Ok(Tried::Again);
        }
        Ok(Tried::Done((runtime_nic, added?)))
    }

    /// Whether `nic` can join the instance: its spec stays valid with it,
    /// and QEMU can hot-add it (with vhost, if asked).
    fn check_nic_addition(
        name: &str,
        record: &InstanceRecord,
        process: &Process,
        nic: &NicSpec,
    ) -> Result<(), AgentError> {
        check_addition(record, |spec| spec.nics.push(nic.clone()))?;
        let support = hotplug::support::check(process.qmp());
        Self::require(name, &support.nic)?;
        if nic.vhost && support.vhost.is_err() {
            return Err(RuntimeError::VhostUnavailable(nic.name.clone()).into());
        }
        Ok(())
    }

    /// Puts the option ROM of `model` in a chrooted QEMU's root, where a
    /// hot-added NIC of that model finds it; whether it is there. Without
    /// it QEMU refuses the device and says which file it missed.
    async fn stage_option_rom(&self, name: &str, model: NicModel) -> bool {
        let root = self.cfg.run_dir(name).join(files::CHROOT);
        let staged = match self.qemu_info().await {
            Ok(info) => hypervisor::host_files::stage_option_roms(&root, &info.data_dirs, [model])
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &staged {
            tracing::warn!(instance = %name, ?model, error = %e, "can't stage the NIC's option ROM");
        }
        staged.is_ok()
    }

    /// SetNicBridge: moves a running NIC's tap to `bridge` (or out of any)
    /// and records it in the runtime. The tap moves first, and back if the
    /// record can't be written.
    pub async fn set_nic_bridge(
        &self,
        name: &str,
        device: &str,
        bridge: Option<String>,
    ) -> Result<(InstanceView, ChangedDevice), AgentError> {
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        let (process, record) = Self::running(&inst)?;
        let index = record
            .runtime
            .nics
            .iter()
            .position(|n| n.spec.name == device)
            .ok_or_else(|| AgentError::DeviceNotFound {
                instance: name.to_owned(),
                device: device.to_owned(),
            })?;
        let mut updated = record.clone();
        Arc::make_mut(&mut updated.runtime).nics[index].spec.bridge = bridge.clone();
        updated.runtime.to_spec().validate()?;
        let from = record.runtime.nics[index].spec.bridge.clone();
        let tap = process.tap(index);
        let vlan = record.runtime.nics[index].spec.vlan.clone();
        let moved = |from: Option<&str>, to: Option<&str>| {
            hypervisor::tap::move_to_bridge(&tap, from, to, vlan.as_ref()).map_err(|source| {
                AgentError::Bridge {
                    instance: name.to_owned(),
                    device: device.to_owned(),
                    source,
                }
            })
        };
        moved(from.as_deref(), bridge.as_deref())?;
        if let Err(e) = self.write_record(&inst, &updated).await {
            let _ = moved(bridge.as_deref(), from.as_deref());
            return Err(e);
        }
        tracing::info!(instance = %name, nic = %device, %tap, from = ?from, to = ?bridge, "NIC moved to another bridge");
        let nic = updated.runtime.nics[index].clone();
        Ok((inst.view(), ChangedDevice::Nic(nic, tap)))
    }

    /// Hot-adds a disk.
    pub async fn add_disk(
        &self,
        name: &str,
        mut disk: DiskSpec,
    ) -> Result<(InstanceView, ChangedDevice), AgentError> {
        let inst = self.instance(name)?;
        let op = inst.lock_ops_owned().await?;
        let (process, record) = Self::running(&inst)?;
        if disk.bus == DiskBus::Ide {
            return Err(ide_is_cold(name));
        }
        if disk.uuid.is_nil() {
            disk.uuid = Uuid::new_v4();
        }
        if disk.name.is_empty() {
            disk.name = free_device_name("disk", device_names(&record));
        }
        let scsi_target = match disk.bus.is_scsi() {
            true => Some(free_scsi_target(name, &record.runtime)?),
            false => None,
        };
        let checks = debug_span!("step", step = "checks").in_scope(|| {
            check_addition(&record, |spec| spec.disks.push(disk.clone()))?;
            self.config()
                .allowed_roots
                .check(&format!("disk {:?}", disk.name), &disk.path)?;
            Self::require(name, &hotplug::support::check(process.qmp()).disk)
        });
        checks?;
        let image = debug_span!("step", step = "image")
            .in_scope(|| open_image(name, &disk, &self.config().allowed_roots))?;
        let runtime_disk = at_most_twice(|first| {
            self.try_add_disk(&inst, &process, &record, &disk, &image, scsi_target, first)
        })
        .await?;
        drop(image);
        inst.announce(EventKind::DeviceAdded {
            device: runtime_disk.spec.name.clone(),
            slot: runtime_disk.slot,
            scsi_target: runtime_disk.scsi_target,
        });
        tracing::info!(instance = %name, disk = %runtime_disk.spec.name, slot = ?runtime_disk.slot, scsi_target = ?runtime_disk.scsi_target, "disk added");
        self.clear_journal_after_reply(&inst, op);
        Ok((inst.view(), ChangedDevice::Disk(runtime_disk)))
    }

    /// One try at hot-adding `disk` from `image`: the intent journaled,
    /// then its place and the image handed to QEMU, then QEMU and the
    /// record. `first` lets a slot taken behind the agent's back be tried
    /// again (see `slots`).
    #[allow(clippy::too_many_arguments)]
    async fn try_add_disk(
        &self,
        inst: &Instance,
        process: &Process,
        record: &InstanceRecord,
        disk: &DiskSpec,
        image: &DiskImage,
        scsi_target: Option<u8>,
        first: bool,
    ) -> Result<Tried<RuntimeDisk>, AgentError> {
        self.journal(inst, HotplugIntent::AddDisk { disk: disk.clone() })?;
        let placed = self
            .place_disk(inst, process, &record.runtime, &image.file, scsi_target)
            .instrument(debug_span!("step", step = "slot and add-fd"))
            .await;
        let (place, fdset) = match placed {
            Ok(ready) => ready,
            Err(e) => {
                self.clear_journal(inst)?;
                return Err(e);
            }
        };
        let runtime_disk = match place {
            Placed::Slot(pick) => RuntimeDisk::new(disk.clone(), Some(pick.slot)),
            Placed::ScsiTarget(target) => RuntimeDisk::on_scsi_target(disk.clone(), target),
        };
        let mut updated = record.clone();
        Arc::make_mut(&mut updated.runtime)
            .disks
            .push(runtime_disk.clone());
        let attach = hotplug::disk::attach(
            process.qmp(),
            &runtime_disk,
            fdset,
            image.kind,
            record.runtime.pci_layout(),
        );
        let added = self.apply(inst, record, &updated, attach).await;
        if let Placed::Slot(pick) = place
            && self.after_hot_add(inst, process, pick, &added, first).await
        {
            return Ok(Tried::Again);
        }
        added.map(|()| Tried::Done(runtime_disk))
    }

    /// Hands QEMU the image and finds the disk's place: the SCSI target
    /// already chosen, or a free PCI slot, looked up while QEMU takes the
    /// image. Releases the image if there is no slot.
    async fn place_disk(
        &self,
        inst: &Instance,
        process: &Process,
        runtime: &Runtime,
        image: &File,
        scsi_target: Option<u8>,
    ) -> Result<(Placed, u64), AgentError> {
        let passed = |source| AgentError::Hotplug {
            instance: inst.name().to_owned(),
            source,
        };
        let pass = hotplug::disk::pass_image(process.qmp(), image)
            .instrument(debug_span!("step", step = "add-fd"));
        if let Some(target) = scsi_target {
            let fdset = pass.await.map_err(passed)?;
            return Ok((Placed::ScsiTarget(target), fdset));
        }
        let slot_lookup = self
            .free_slot(inst, process, runtime)
            .instrument(debug_span!("step", step = "slot look-up"));
        let (slot, fdset) = tokio::join!(slot_lookup, pass);
        match (slot, fdset.map_err(passed)) {
            (Ok(pick), Ok(fdset)) => Ok((Placed::Slot(pick), fdset)),
            (Err(e), Ok(fdset)) => {
                hotplug::disk::release_image(process.qmp(), fdset).await;
                Err(e)
            }
            (_, Err(e)) => Err(e),
        }
    }

    /// Hot-removes a device by name.
    pub async fn remove_device(
        &self,
        name: &str,
        device: &str,
    ) -> Result<(InstanceView, ChangedDevice), AgentError> {
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        let (process, mut record) = Self::running(&inst)?;
        let nic_index = record
            .runtime
            .nics
            .iter()
            .position(|n| n.spec.name == device);
        let disk_index = record
            .runtime
            .disks
            .iter()
            .position(|d| d.spec.name == device);
        let target = match (nic_index, disk_index) {
            (Some(i), _) if record.runtime.nics[i].slot.is_none() => {
                return Err(AgentError::Hotplug {
                    instance: name.to_owned(),
                    source: hotplug::nic::isa_is_cold(),
                });
            }
            (Some(i), _) => Device::nic(&record.runtime.nics[i]),
            (None, Some(i)) if record.runtime.disks[i].spec.bus == DiskBus::Ide => {
                return Err(ide_is_cold(name));
            }
            (None, Some(i)) => Device::disk(&record.runtime.disks[i]),
            (None, None) => {
                return Err(AgentError::DeviceNotFound {
                    instance: name.to_owned(),
                    device: device.to_owned(),
                });
            }
        };
        Self::require(name, &hotplug::support::check(process.qmp()).remove)?;

        self.journal(
            &inst,
            HotplugIntent::Remove {
                device: device.to_owned(),
            },
        )?;
        // QEMU frees the slot once the guest lets go, maybe after the
        // wait: the next hot-add asks.
        process.set_pci_slots(None);
        let removed =
            hotplug::remove::remove(process.qmp(), target.clone(), self.config().unplug_timeout)
                .await;
        if let Err(source) = removed {
            // The device may still be in QEMU; the runtime keeps it, which
            // is what QEMU has until the guest lets go.
            self.clear_journal(&inst)?;
            return Err(AgentError::Hotplug {
                instance: name.to_owned(),
                source,
            });
        }
        let changed = match (target, nic_index, disk_index) {
            (Device::Nic { .. }, Some(i), _) => {
                let tap = process.remove_tap(i);
                ChangedDevice::Nic(Arc::make_mut(&mut record.runtime).nics.remove(i), tap)
            }
            (_, _, Some(i)) => {
                ChangedDevice::Disk(Arc::make_mut(&mut record.runtime).disks.remove(i))
            }
            // `target` was built from one of the two indexes.
            _ => return Err(AgentError::Internal("device index lost".into())),
        };
        self.commit(&inst, &record)
            .instrument(debug_span!("step", step = "record"))
            .await?;
        tracing::info!(instance = %name, device, "device removed");
        inst.announce(EventKind::DeviceRemoved {
            device: device.to_owned(),
        });
        Ok((inst.view(), changed))
    }

    /// Records the intent before QEMU is touched. It is not synced (see
    /// `runtime_store::journal`), so it is a page-cache write and runs here.
    fn journal(&self, inst: &Instance, intent: HotplugIntent) -> Result<(), AgentError> {
        let _step = debug_span!("step", step = "journal").entered();
        Ok(self.journal_store().record(inst.name(), &intent)?)
    }

    /// Clears the intent once the record (or QEMU, after a rollback) says
    /// what happened.
    fn clear_journal(&self, inst: &Instance) -> Result<(), AgentError> {
        let _step = debug_span!("step", step = "journal clear").entered();
        Ok(self.journal_store().clear(inst.name())?)
    }

    /// Clears the intent of a hot-add that is done, on the blocking pool
    /// while the reply goes out. The operation's lock goes with it, so the
    /// instance's next operation finds the journal clear. A clear that
    /// fails leaves a stale intent, which recovery only checks against
    /// QEMU.
    fn clear_journal_after_reply(&self, inst: &Instance, op: OwnedMutexGuard<()>) {
        let journal = self.journal_store();
        let name = inst.name().to_owned();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = journal.clear(&name) {
                tracing::warn!(parent: &span, instance = %name, error = %e, "can't clear the hotplug intent");
            }
            drop(op);
        });
    }

    /// Writes the record with the new layout, then clears the intent.
    async fn commit(&self, inst: &Instance, record: &InstanceRecord) -> Result<(), AgentError> {
        self.write_record(inst, record).await?;
        self.clear_journal(inst)
    }

    /// Stops here for good when told to, so a test can kill the agent at
    /// this point.
    pub(crate) async fn reach(&self, point: FaultPoint) {
        if self.config().fault_point == Some(point) {
            tracing::warn!(?point, "stopped at a fault point");
            std::future::pending::<()>().await;
        }
    }

    /// Runs a hot-add in QEMU and the durable write of the record that
    /// includes the device side by side, so the write adds no latency of
    /// its own. The intent, journaled before, covers the moment where one
    /// is done and the other isn't. If QEMU refuses, the previous record is written
    /// back; if the record can't be written, the intent stays for the next
    /// start to reconcile and the error is returned. On success the intent
    /// stays too, for the caller to clear once it is done with the device.
    async fn apply<T>(
        &self,
        inst: &Instance,
        before: &InstanceRecord,
        after: &InstanceRecord,
        change: impl Future<Output = Result<T, hotplug::HotplugError>>,
    ) -> Result<T, AgentError> {
        let change = async {
            self.reach(FaultPoint::HotplugBeforeQemu).await;
            change.await
        };
        // The two steps' spans open inside the one they are part of.
        let both = async {
            tokio::join!(
                change.instrument(debug_span!("step", step = "QEMU")),
                self.write_record(inst, after)
                    .instrument(debug_span!("step", step = "record")),
            )
        };
        let (changed, written) = both
            .instrument(debug_span!("step", step = "QEMU and record"))
            .await;
        match (changed, written) {
            // The caller clears the intent once it is done with the device.
            (Ok(value), Ok(())) => Ok(value),
            (Err(source), written) => {
                if written.is_ok() {
                    self.write_record(inst, before).await?;
                }
                self.clear_journal(inst)?;
                Err(AgentError::Hotplug {
                    instance: inst.name().to_owned(),
                    source,
                })
            }
            (Ok(_), Err(e)) => {
                tracing::error!(instance = %inst.name(), error = %e, "device added but the record can't say so; the intent is kept for reconciliation");
                Err(e)
            }
        }
    }

    /// Brings the record of an adopted instance in line with what its QEMU
    /// has (`query-pci` and `query-block`): a hotplug the previous agent
    /// left under way is finished or rolled back, whichever matches QEMU,
    /// and a device QEMU no longer has leaves the runtime, so a reboot or a
    /// migration doesn't bring back what the guest lost. A device only QEMU
    /// has is reported: the runtime can't be guessed for it. The caller
    /// holds the operation lock.
    pub(crate) async fn reconcile_devices(&self, inst: &Instance) -> Result<(), AgentError> {
        let (process, mut record) = Self::running(inst)?;
        let intent = match self.journal_store().load::<HotplugIntent>(inst.name())? {
            Intent::None => None,
            Intent::Pending(intent) => Some(intent),
            Intent::Unreadable(e) => {
                tracing::warn!(instance = %inst.name(), error = %e, "unreadable hotplug intent; comparing devices only");
                None
            }
        };
        let qmp = process.qmp();
        let ask = |command: &'static str| async move {
            qmp.execute(command, None)
                .await
                .map_err(|source| AgentError::Qmp {
                    instance: inst.name().to_owned(),
                    source,
                })
        };
        let (pci, blocks) = tokio::try_join!(ask("query-pci"), ask("query-block"))?;
        process.learn_pci_slots(hotplug::slots::bus0_slots(&pci));
        let on_bus: HashMap<String, u8> = hotplug::slots::bus0_devices(&pci)
            .into_iter()
            .map(|(slot, id)| (id, slot))
            .collect();
        // A disk is there when its device is on the bus with its image
        // behind it; a device without its block backend can't be used.
        let in_qemu: HashMap<String, u8> = on_bus
            .into_iter()
            .filter(|(id, _)| !is_disk_id(id) || hotplug::disk::block_attached(&blocks, id))
            .collect();
        let mut changed = match intent {
            Some(intent) => settle_intent(process.qmp(), &mut record, &in_qemu, intent).await,
            None => false,
        };
        let lost = lost_devices(&record, &in_qemu);
        for (name, id) in &lost {
            tracing::warn!(instance = %inst.name(), device = %name, qemu_id = %id, "QEMU no longer has this device; dropping it from the runtime");
            if let Some(i) = record
                .runtime
                .nics
                .iter()
                .position(|n| &n.spec.name == name)
            {
                Arc::make_mut(&mut record.runtime).nics.remove(i);
                process.remove_tap(i);
            }
            Arc::make_mut(&mut record.runtime)
                .disks
                .retain(|d| &d.spec.name != name);
            changed = true;
        }
        let known: Vec<String> = runtime_device_ids(&record).map(|(_, id)| id).collect();
        for id in in_qemu.keys().filter(|id| is_agent_device_id(id)) {
            if !known.contains(id) {
                tracing::warn!(instance = %inst.name(), qemu_id = %id, "QEMU has a device the runtime doesn't; left as it is");
            }
        }
        if changed {
            self.write_record(inst, &record).await?;
        }
        self.clear_journal(inst)?;
        for (name, _) in lost {
            inst.announce(EventKind::DeviceRemoved { device: name });
        }
        Ok(())
    }
}

/// Each runtime device's name and QEMU id.
fn runtime_device_ids(record: &InstanceRecord) -> impl Iterator<Item = (String, String)> + '_ {
    let nics = record
        .runtime
        .nics
        .iter()
        .map(|n| (n.spec.name.clone(), n.device_id()));
    let disks = record
        .runtime
        .disks
        .iter()
        .map(|d| (d.spec.name.clone(), d.device_id()));
    nics.chain(disks)
}

/// Runtime devices (name, QEMU id) that QEMU doesn't have. Pure.
fn lost_devices(record: &InstanceRecord, in_qemu: &HashMap<String, u8>) -> Vec<(String, String)> {
    runtime_device_ids(record)
        .filter(|(_, id)| !in_qemu.contains_key(id))
        .collect()
}

fn is_disk_id(id: &str) -> bool {
    id.starts_with(DISK_ID_PREFIX)
}

/// Whether a QEMU id is one the agent gives its devices.
pub(crate) fn is_agent_device_id(id: &str) -> bool {
    is_disk_id(id) || id.starts_with(NIC_ID_PREFIX)
}

/// Takes back what an unfinished hot-add left in QEMU: the device's
/// backend, and for a NIC the fds it passed, which QEMU holds open (and
/// the tap with them) when no netdev took them.
async fn roll_back(qmp: &QmpClient, device: Device, nic: Option<&NicSpec>) {
    hotplug::remove::delete_backend(qmp, device).await;
    if let Some(nic) = nic {
        hotplug::nic::close_passed_fds(qmp, nic).await;
    }
}

/// Applies what QEMU shows to an unfinished hotplug. Returns whether the
/// record changed.
async fn settle_intent(
    qmp: &QmpClient,
    record: &mut InstanceRecord,
    in_qemu: &HashMap<String, u8>,
    intent: HotplugIntent,
) -> bool {
    let runtime = Arc::make_mut(&mut record.runtime);
    let (device, recorded) = match &intent {
        HotplugIntent::AddNic { nic } => (
            Device::Nic {
                id: nic_device_id(nic.uuid),
                netdev: netdev_id(nic.uuid),
            },
            runtime.nics.iter().position(|n| n.spec.uuid == nic.uuid),
        ),
        HotplugIntent::AddDisk { disk } => (
            Device::Disk {
                id: disk_device_id(disk.uuid),
                uuid: disk.uuid,
            },
            runtime.disks.iter().position(|d| d.spec.uuid == disk.uuid),
        ),
        HotplugIntent::Remove { device } => {
            let nic = runtime.nics.iter().position(|n| &n.spec.name == device);
            let disk = runtime.disks.iter().position(|d| &d.spec.name == device);
            let (target, id) = match (nic, disk) {
                (Some(i), _) => (Device::nic(&runtime.nics[i]), runtime.nics[i].device_id()),
                (None, Some(i)) => (
                    Device::disk(&runtime.disks[i]),
                    runtime.disks[i].device_id(),
                ),
                (None, None) => return false,
            };
            if in_qemu.contains_key(&id) {
                tracing::info!(%id, "unfinished removal: the device is still in QEMU and stays");
                return false;
            }
            tracing::info!(%id, "finishing a removal the guest completed");
            hotplug::remove::delete_backend(qmp, target).await;
            match (nic, disk) {
                (Some(i), _) => drop(runtime.nics.remove(i)),
                (None, Some(i)) => drop(runtime.disks.remove(i)),
                (None, None) => {}
            }
            return true;
        }
    };
    let id = device.id().to_owned();
    let passed_nic = match &intent {
        HotplugIntent::AddNic { nic } => Some(nic.clone()),
        _ => None,
    };
    match (in_qemu.get(&id), recorded) {
        (Some(&slot), None) => {
            tracing::info!(%id, slot, "finishing a hot-add QEMU completed");
            match intent {
                HotplugIntent::AddNic { nic } => {
                    runtime.nics.push(RuntimeNic::new(nic, Some(slot)))
                }
                HotplugIntent::AddDisk { disk } => {
                    runtime.disks.push(RuntimeDisk::new(disk, Some(slot)));
                }
                HotplugIntent::Remove { .. } => {}
            }
            true
        }
        (None, recorded) => {
            tracing::info!(%id, "rolling back a hot-add QEMU never completed");
            let is_nic = matches!(device, Device::Nic { .. });
            roll_back(qmp, device, passed_nic.as_ref()).await;
            match recorded {
                Some(index) if is_nic => drop(runtime.nics.remove(index)),
                Some(index) => drop(runtime.disks.remove(index)),
                None => return false,
            }
            true
        }
        (Some(_), Some(_)) => false,
    }
}
