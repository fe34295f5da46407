//! Watching a running QEMU: its exit (asked for, a guest's poweroff or a
//! crash) and the resets its guest does by itself.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hypervisor::lifecycle::{self, files};
use hypervisor::process;
use hypervisor::qmp::QmpEvent;
use tokio::sync::broadcast;

use super::{Agent, Instance, Process, lock};
use crate::events::EventKind;
use crate::model::{RecordedState, State};

impl Agent {
    /// Installs a process as the instance's and watches for its exit.
    pub(super) fn supervise(
        self: &Arc<Self>,
        inst: &Arc<Instance>,
        process: Arc<Process>,
        events: broadcast::Receiver<QmpEvent>,
        state: State,
    ) {
        let detail = {
            let mut st = lock(&inst.status);
            st.process = Some(process.clone());
            st.state = state;
            if state != State::Incoming {
                st.detail.clear();
            }
            st.detail.clone()
        };
        inst.announce_state(state, detail, false);
        tokio::spawn(watch_guest(
            inst.clone(),
            process.clone(),
            process.qmp.subscribe(),
        ));
        tokio::spawn(self.clone().watch_exit(inst.clone(), process, events));
    }

    async fn watch_exit(
        self: Arc<Self>,
        inst: Arc<Instance>,
        process: Arc<Process>,
        mut events: broadcast::Receiver<QmpEvent>,
    ) {
        process.pidfd.exited().await;
        let exit_status = process
            .reap()
            .unwrap_or_else(|| "exit status unknown".into());
        if process.stop_requested.load(Ordering::SeqCst) {
            return;
        }
        // QEMU announces a guest's own power-off with SHUTDOWN guest=true
        // before exiting; let the reader deliver it before deciding.
        let _ = tokio::time::timeout(self.cfg.exit_drain_timeout, process.qmp.closed()).await;
        let mut guest_shutdown = None;
        while let Ok(event) = events.try_recv() {
            if event.name == "SHUTDOWN"
                && event.data.get("guest").and_then(|g| g.as_bool()) == Some(true)
            {
                guest_shutdown = Some(event.data["reason"].as_str().unwrap_or_default().to_owned());
            }
        }
        let run_dir = self.cfg.run_dir(&inst.name);
        let (state, recorded, detail) =
            why_it_ended(&inst, &run_dir, guest_shutdown.as_deref(), &exit_status);
        let guest_shutdown = guest_shutdown.is_some();
        {
            let mut st = lock(&inst.status);
            if !st
                .process
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, &process))
            {
                return;
            }
            st.process = None;
            st.state = state;
            st.detail = detail.clone();
        }
        inst.announce_state(state, detail.clone(), guest_shutdown);
        lifecycle::remove_run_files(&run_dir).await;
        if guest_shutdown {
            tracing::info!(instance = %inst.name, "guest powered off");
        } else {
            tracing::warn!(instance = %inst.name, pid = process.pid, %exit_status, "QEMU crashed");
        }
        // Persist under the operation lock so this write can't interleave
        // with an operation's own, unless an operation already moved on.
        // An incoming instance isn't this node's: whoever finalizes or
        // cancels it decides what its record becomes.
        let _op = inst.ops.lock().await;
        if inst.process().is_none()
            && !inst.is_incoming()
            && lock(&inst.status).state == state
            && let Err(e) = self.persist_state(&inst, recorded, &detail).await
        {
            tracing::error!(instance = %inst.name, error = %e, "can't record the instance's exit");
        }
    }
}

/// What a QEMU exit that nobody asked for means: the guest powered off
/// (or rebooted, where a reboot ends QEMU), the kernel killed it for
/// memory, or it crashed (its log's end says how). `guest_shutdown` is
/// the reason of the guest's SHUTDOWN event, if there was one.
fn why_it_ended(
    inst: &Instance,
    run_dir: &Path,
    guest_shutdown: Option<&str>,
    exit_status: &str,
) -> (State, RecordedState, String) {
    if let Some(reason) = guest_shutdown {
        let detail = match reason {
            // QEMU's reason for a reboot under -no-reboot.
            "guest-reset" => "the guest rebooted, and the instance stops when its guest reboots",
            _ => "the guest powered itself off",
        };
        (
            State::Stopped,
            RecordedState::StoppedByGuest,
            detail.to_owned(),
        )
    } else if lifecycle::oom_kills(run_dir) > 0 {
        let limit = lock(&inst.status)
            .record
            .as_ref()
            .and_then(|r| r.runtime.cgroup)
            .map_or_else(String::new, |c| format!(" of {} MiB", c.memory_limit_mib));
        (
            State::Crashed,
            RecordedState::Crashed,
            format!(
                "QEMU was killed by the kernel's OOM killer ({exit_status}): its cgroup's memory \
                 limit{limit} was reached; start it with less memory, or find what grew in QEMU"
            ),
        )
    } else {
        let tail = process::log_tail(&run_dir.join(files::LOG), lifecycle::LOG_TAIL_BYTES);
        (
            State::Crashed,
            RecordedState::Crashed,
            format!("QEMU exited unexpectedly ({exit_status}); its log ends with:\n{tail}"),
        )
    }
}

/// Follows what a guest does by itself while the same QEMU keeps running:
/// the resets it does (QEMU's RESET with `guest: true`), published as
/// events, and the memory its balloon driver gives back or takes
/// (BALLOON_CHANGE), kept for GetInstance. Ends with the connection.
async fn watch_guest(
    inst: Arc<Instance>,
    process: Arc<Process>,
    mut events: broadcast::Receiver<QmpEvent>,
) {
    loop {
        match events.recv().await {
            Ok(e)
                if e.name == "RESET"
                    && e.data.get("guest").and_then(|g| g.as_bool()) == Some(true) =>
            {
                tracing::info!(instance = %inst.name, "guest rebooted itself");
                inst.announce(EventKind::Rebooted {
                    how: "guest",
                    guest_initiated: true,
                });
            }
            Ok(e) if e.name == "BALLOON_CHANGE" => {
                if let Some(actual) = e.data.get("actual").and_then(|a| a.as_u64()) {
                    process.set_balloon_mib(actual >> 20);
                }
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
