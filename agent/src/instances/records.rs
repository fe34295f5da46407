//! The durable side of an instance: reading and writing its record, and
//! deleting or renaming a stopped one.

use std::sync::Arc;

use hypervisor::lifecycle::files;
use hypervisor::process;

use super::{Agent, Instance, InstanceRecord, InstanceView, RecordedState, State, lock};
use crate::error::AgentError;
use crate::events::EventKind;

impl Agent {
    /// The persisted record of an instance, as stored.
    pub async fn record(&self, name: &str) -> Result<(InstanceRecord, u64), AgentError> {
        self.instance(name)?;
        let store = self.store.clone();
        let owned = name.to_owned();
        let loaded = tokio::task::spawn_blocking(move || store.load::<InstanceRecord>(&owned))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??;
        let rec = loaded.ok_or_else(|| AgentError::NotFound(name.to_owned()))?;
        Ok((rec.value, rec.revision))
    }

    pub(super) async fn save_record(
        &self,
        name: &str,
        record: &InstanceRecord,
    ) -> Result<(), AgentError> {
        let store = self.store.clone();
        let (name, record) = (name.to_owned(), record.clone());
        tokio::task::spawn_blocking(move || store.save(&name, &record))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??;
        Ok(())
    }

    /// Saves a record and makes it the instance's current one.
    pub(crate) async fn write_record(
        &self,
        inst: &Instance,
        record: &InstanceRecord,
    ) -> Result<(), AgentError> {
        self.save_record(&inst.name, record).await?;
        lock(&inst.status).record = Some(record.clone());
        Ok(())
    }

    pub(super) async fn remove_record(&self, name: &str) -> Result<(), AgentError> {
        let store = self.store.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || store.remove(&name))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??;
        Ok(())
    }

    /// Updates the state in an instance's record.
    pub(super) async fn persist_state(
        &self,
        inst: &Instance,
        state: RecordedState,
        detail: &str,
    ) -> Result<(), AgentError> {
        let record = {
            let mut st = lock(&inst.status);
            let Some(record) = st.record.as_mut() else {
                return Ok(());
            };
            record.state = state;
            record.detail = detail.to_owned();
            record.clone()
        };
        self.save_record(&inst.name, &record).await
    }

    /// DeleteInstance: forgets a stopped instance, its record and its run
    /// directory.
    pub async fn delete(&self, name: &str) -> Result<(), AgentError> {
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        self.check_stopped(&inst)?;
        self.remove_record(name).await?;
        self.registry_mut().remove(name);
        let _ = std::fs::remove_dir_all(self.cfg.run_dir(name));
        inst.announce(EventKind::Deleted {
            detail: "deleted".into(),
        });
        tracing::info!(instance = %name, "instance deleted");
        Ok(())
    }

    /// RenameInstance: a stopped instance takes `new_name`, with the same
    /// runtime (uuid, devices, slots) made runnable under that name.
    pub async fn rename(&self, name: &str, new_name: &str) -> Result<InstanceView, AgentError> {
        let inst = self.instance(name)?;
        let _op = inst.lock_ops().await?;
        self.check_stopped(&inst)?;
        let (_, record) = inst.process_and_record();
        let record = record.ok_or_else(|| AgentError::NotFound(name.to_owned()))?;
        let mut runtime = (*record.runtime).clone();
        runtime.name = new_name.to_owned();
        runtime.argv = hypervisor::argv::render_base(&runtime);
        // Checks the new name as a spec would, and confines the runtime the
        // way this node does for that name.
        let runtime = self.adopt_runtime(&runtime).await?;
        let renamed = InstanceRecord {
            runtime: Arc::new(runtime),
            ..record
        };
        let (state, detail) = (lock(&inst.status).state, format!("renamed from {name}"));
        let new = {
            let mut registry = self.registry_mut();
            if registry.contains_key(new_name) {
                return Err(AgentError::NameTaken(new_name.to_owned()));
            }
            let new = Instance::new(
                new_name,
                Some(renamed.clone()),
                state,
                detail.clone(),
                self.events.clone(),
            );
            registry.insert(new_name.to_owned(), new.clone());
            new
        };
        let _new_op = new.lock_ops().await?;
        if let Err(e) = self.save_record(new_name, &renamed).await {
            self.registry_mut().remove(new_name);
            return Err(e);
        }
        if let Err(e) = self.remove_record(name).await {
            // Both names would have a record of one guest: keep the old.
            let _ = self.remove_record(new_name).await;
            self.registry_mut().remove(new_name);
            return Err(e);
        }
        self.registry_mut().remove(name);
        let _ = std::fs::remove_dir_all(self.cfg.run_dir(name));
        inst.announce(EventKind::Deleted {
            detail: format!("renamed to {new_name}"),
        });
        new.set_state(state, detail);
        tracing::info!(instance = %name, %new_name, "instance renamed");
        Ok(new.view())
    }

    /// Delete and rename take only an instance no QEMU runs for, and that
    /// no migration or restore is bringing in.
    fn check_stopped(&self, inst: &Instance) -> Result<(), AgentError> {
        let not_stopped = |why: String| AgentError::NotStopped {
            name: inst.name.clone(),
            why,
        };
        let (process, record) = inst.process_and_record();
        if let Some(process) = process {
            return Err(not_stopped(format!("runs (pid {})", process.pid)));
        }
        let st = lock(&inst.status);
        if let Some(pid) = st.quarantined_pid {
            return Err(not_stopped(format!(
                "is quarantined, and its QEMU (pid {pid}) runs"
            )));
        }
        if st.state == State::Incoming || st.incoming.is_some() {
            return Err(not_stopped(
                "is coming in from a migration or a restore".into(),
            ));
        }
        drop(st);
        // A QEMU the agent lost track of still holds the disks.
        let pidfile = self.cfg.run_dir(&inst.name).join(files::PIDFILE);
        if let Some(record) = record
            && let Some(pid) = process::live_instance_pid(&pidfile, record.runtime.uuid)
        {
            return Err(not_stopped(format!("runs (pid {pid})")));
        }
        Ok(())
    }
}
