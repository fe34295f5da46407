//! Instances whose record was unreadable and set aside while their QEMU
//! still runs: kept in sight so their name can't start a second QEMU on
//! the same disks, until an operator stops that QEMU or adopts it again
//! from what is left of the record, checked against what QEMU reports.

use std::collections::BTreeSet;
use std::sync::Arc;

use hypervisor::lifecycle::{self, StopMethod, files};
use hypervisor::process::{self, PidFd};
use hypervisor::qmp::QmpClient;
use hypervisor::{Runtime, argv};
use serde_json::json;

use super::{Agent, Instance, InstanceRecord, InstanceView, RecordedState, State, lock};
use crate::error::AgentError;

impl Agent {
    /// Keeps an instance whose record was set aside in sight while its
    /// QEMU still runs, so its name can't start a second QEMU on the same
    /// disks. Without a live QEMU there is nothing to keep.
    /// `reason` says why the record was set aside, where this agent did.
    pub(super) fn register_quarantined(&self, name: &str, reason: Option<&str>) {
        if !hypervisor::spec::is_safe_identifier(name, hypervisor::spec::MAX_INSTANCE_NAME) {
            return;
        }
        let Some(pid) = self.live_qemu_by_name(name) else {
            return;
        };
        let why = reason.map(|r| format!(" ({r})")).unwrap_or_default();
        let detail = format!(
            "its record was unreadable{why} and was moved to quarantine/ in the state directory, \
             but its QEMU (pid {pid}) still runs: adopt it (`kvm-agent instance adopt {name}`) \
             or stop it (`kvm-agent instance stop {name} --force`)"
        );
        tracing::error!(instance = %name, pid, "QEMU runs without a readable record; quarantined");
        let inst = Instance::new(name, None, State::Quarantined, detail, self.events.clone());
        lock(&inst.status).quarantined_pid = Some(pid);
        self.registry_mut().insert(name.to_owned(), inst);
    }

    /// The pid in an instance's run directory, if that process is alive
    /// and is a QEMU of that name, whatever its uuid.
    pub(super) fn live_qemu_by_name(&self, name: &str) -> Option<u32> {
        let pid = process::read_pidfile(&self.cfg.run_dir(name).join(files::PIDFILE))?;
        process::runs_instance_named(pid, name).then_some(pid)
    }

    /// Ends the QEMU of a quarantined instance and forgets the instance:
    /// with its record gone, nothing about that QEMU can be trusted to
    /// ask it to stop, so it is killed.
    pub(super) async fn stop_quarantined(
        &self,
        inst: &Instance,
    ) -> Result<Option<StopMethod>, AgentError> {
        let pid = lock(&inst.status)
            .quarantined_pid
            .filter(|&pid| process::runs_instance_named(pid, &inst.name));
        let method = match pid.map(PidFd::open) {
            Some(Ok(pidfd)) => Some(
                lifecycle::stop(None, &pidfd, self.cfg.stop, true)
                    .await
                    .map_err(|source| AgentError::Stop {
                        instance: inst.name.clone(),
                        source,
                    })?,
            ),
            _ => None,
        };
        lifecycle::remove_run_files(&self.cfg.run_dir(&inst.name)).await;
        {
            let mut st = lock(&inst.status);
            st.quarantined_pid = None;
            st.state = State::Stopped;
            st.detail = "its QEMU, left without a record, was stopped".into();
        }
        self.forget_if_unrecorded(inst);
        tracing::info!(instance = %inst.name, "quarantined instance stopped");
        Ok(method)
    }

    /// Adopts the QEMU of a quarantined instance with the runtime of its
    /// record that was set aside, once QEMU shows it is that runtime: the
    /// same uuid, the same machine on its command line, and the same
    /// devices at the same slots with the same MACs and images. Anything
    /// else is refused, and the QEMU is left as it is.
    pub async fn adopt_quarantined(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<InstanceView, AgentError> {
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        let pid = {
            let st = lock(&inst.status);
            st.quarantined_pid
                .filter(|_| st.state == State::Quarantined)
        };
        let Some(pid) = pid else {
            return Err(AgentError::BadRequest(format!(
                "instance {name:?} is not quarantined; there is nothing to adopt"
            )));
        };
        let refuse = |reason: String| AgentError::AdoptionRefused {
            instance: name.to_owned(),
            reason,
        };
        let store = self.store.clone();
        let owned = name.to_owned();
        let (from, record) =
            tokio::task::spawn_blocking(move || store.salvage::<InstanceRecord>(&owned))
                .await
                .map_err(|e| AgentError::Internal(e.to_string()))?
                .map_err(refuse)?;
        let runtime = &record.runtime;
        runtime
            .validate()
            .map_err(|e| refuse(format!("{} holds an invalid runtime: {e}", from.display())))?;
        if runtime.name != name || !process::runs_instance(pid, runtime.uuid) {
            return Err(refuse(format!(
                "{} is the record of {:?} ({}), and QEMU pid {pid} isn't its QEMU",
                from.display(),
                runtime.name,
                runtime.uuid
            )));
        }
        let cmdline: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !argv::machine_part_matches(runtime, &cmdline) {
            return Err(refuse(format!(
                "QEMU's command line doesn't show the machine of the runtime in {}",
                from.display()
            )));
        }
        let run_dir = self.cfg.run_dir(name);
        let (process, events) = self.adopt(pid, &run_dir, runtime).await.map_err(refuse)?;
        devices_match(runtime, &process.qmp).await.map_err(refuse)?;

        let record = InstanceRecord {
            state: RecordedState::Running,
            detail: String::new(),
            outgoing: None,
            ..record
        };
        self.save_record(name, &record).await?;
        {
            let mut st = lock(&inst.status);
            st.record = Some(record);
            st.quarantined_pid = None;
        }
        let state = match hypervisor::migration::guest_running(&process.qmp).await {
            Ok(false) => State::Paused,
            _ => State::Running,
        };
        hypervisor::migration::release_fdsets(&process.qmp).await;
        self.supervise(&inst, process, events, state);
        tracing::warn!(instance = %name, pid, from = %from.display(), "adopted a quarantined instance after checking it against QEMU");
        Ok(inst.view())
    }
}

/// Whether QEMU has exactly the runtime's NICs and disks: each at its
/// slot, NICs with their MACs, disks with an image; and no other.
pub(super) async fn devices_match(rt: &Runtime, qmp: &QmpClient) -> Result<(), String> {
    let failed = |e: hypervisor::qmp::QmpError| format!("QEMU didn't answer: {e}");
    let pci = qmp.execute("query-pci", None).await.map_err(failed)?;
    let present: BTreeSet<(String, u8)> = hotplug::slots::bus0_devices(&pci)
        .into_iter()
        .filter(|(_, id)| super::hotplug::is_agent_device_id(id))
        .map(|(slot, id)| (id, slot))
        .collect();
    let expected: BTreeSet<(String, u8)> = rt
        .disks
        .iter()
        .filter_map(|d| Some((d.device_id(), d.slot?)))
        .chain(
            rt.nics
                .iter()
                .filter_map(|n| Some((n.device_id(), n.slot?))),
        )
        .collect();
    if present != expected {
        return Err(format!(
            "QEMU has the devices {present:?} where the runtime has {expected:?}"
        ));
    }
    for nic in &rt.nics {
        let id = nic.device_id();
        let mac = qmp
            .execute(
                "qom-get",
                Some(json!({ "path": format!("/machine/peripheral/{id}"), "property": "mac" })),
            )
            .await
            .map_err(failed)?;
        if !mac
            .as_str()
            .is_some_and(|m| m.eq_ignore_ascii_case(&nic.spec.mac.to_string()))
        {
            return Err(format!("NIC {:?} has MAC {mac} in QEMU", nic.spec.name));
        }
    }
    let blocks = qmp.execute("query-block", None).await.map_err(failed)?;
    for disk in &rt.disks {
        if !hotplug::disk::block_attached(&blocks, &disk.device_id()) {
            return Err(format!("disk {:?} has no image in QEMU", disk.spec.name));
        }
    }
    Ok(())
}
