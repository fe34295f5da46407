//! A guest this node took over in postcopy: followed until the last of its
//! memory has come, and listened for again when its stream breaks, so the
//! source can send the rest (the target's side; the source's is in
//! `migration`).

use std::sync::Arc;

use hypervisor::migration::MigrationPhase;
use hypervisor::qmp::{QmpError, QmpEvent};
use tokio::sync::broadcast;

use super::{Agent, Instance, Process, State, lock};
use crate::error::AgentError;

/// Follows a guest taken over in postcopy until the last of its memory has
/// come, from QEMU's `MIGRATION` events: while the stream is broken the
/// guest's vCPUs wait for pages that don't come, and QEMU's main loop may
/// wait with them, so a query could hang where an event still arrives.
/// The state says the guest is paused until the stream resumes.
/// `events` was subscribed before the incoming stream reached postcopy.
pub(super) async fn watch(
    inst: Arc<Instance>,
    process: Arc<Process>,
    mut events: broadcast::Receiver<QmpEvent>,
) {
    let mut broken = false;
    loop {
        let event = tokio::select! {
            () = process.pidfd.exited() => return,
            event = events.recv() => event,
        };
        let status = match event {
            Ok(event) if event.name == "MIGRATION" => {
                event.data["status"].as_str().unwrap_or_default().to_owned()
            }
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(instance = %inst.name, missed, "missed QMP events while following postcopy");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        match MigrationPhase::from_status(&status) {
            MigrationPhase::Completed => {
                if broken {
                    inst.set_state(State::Running, "the postcopy stream resumed");
                }
                tracing::info!(instance = %inst.name, "the last of the guest's memory came");
                return;
            }
            MigrationPhase::Postcopy if broken => {
                tracing::info!(instance = %inst.name, "the postcopy stream resumed");
                inst.set_state(State::Running, "the postcopy stream resumed");
                broken = false;
            }
            MigrationPhase::PostcopyPaused if !broken && status == "postcopy-paused" => {
                let detail = "the postcopy stream from the source broke: the guest waits for \
                              memory the source still holds, and can't run until the stream resumes";
                tracing::error!(instance = %inst.name, "{detail}");
                inst.set_state(State::Paused, detail);
                broken = true;
            }
            MigrationPhase::Failed | MigrationPhase::Cancelled => {
                let detail = format!(
                    "the postcopy stream from the source ended {status}: part of the guest's \
                     memory never came, and it can't run"
                );
                tracing::error!(instance = %inst.name, "{detail}");
                inst.set_state(State::Paused, detail);
                return;
            }
            _ => {}
        }
    }
}

impl Agent {
    /// RecoverPostcopy: has the QEMU of a guest whose postcopy stream
    /// broke listen for the rest of it; returns where.
    pub async fn recover_postcopy(&self, name: &str) -> Result<String, AgentError> {
        let inst = self.instance(name)?;
        let Some(process) = inst.process() else {
            return Err(AgentError::NotRunning(name.to_owned()));
        };
        // No query first: it could hang behind the stuck guest. QEMU
        // refuses `migrate-recover` unless the stream is broken.
        let host = self.migration_host();
        let ports = self.cfg.migration.ports.clone();
        let port = match self.listen_on(&inst, &process, &host, ports, true).await {
            Ok(port) => port,
            Err(AgentError::Qmp {
                source: QmpError::Qemu { desc, .. },
                ..
            }) if desc.contains("paused") => return Err(AgentError::NoMigration(name.to_owned())),
            Err(e) => return Err(e),
        };
        // QEMU holds the port now; nothing else waits on the mark.
        lock(&self.incoming_ports).remove(&port);
        let address = format!("tcp:{host}:{port}");
        tracing::info!(instance = %name, %address, "listening for the rest of a postcopy stream");
        Ok(address)
    }
}
