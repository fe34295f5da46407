//! The QEMU guest agent in a running instance's guest: whether it answers,
//! and freezing and thawing the guest's filesystems around a snapshot.
//!
//! No operation lock is taken: the channel serves one client at a time by
//! itself, and a thaw must never wait behind a long operation while the
//! guest's filesystems are frozen.

use std::time::Duration;

use hypervisor::guest_agent::{self, GuestAgentError};
use hypervisor::lifecycle::files;

use super::Agent;
use crate::error::AgentError;

/// What to ask the guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestAgentCall {
    /// `guest-ping`.
    Ping,
    /// `guest-fsfreeze-freeze`.
    Freeze,
    /// `guest-fsfreeze-thaw`.
    Thaw,
}

impl GuestAgentCall {
    fn command(self) -> &'static str {
        match self {
            GuestAgentCall::Ping => "guest-ping",
            GuestAgentCall::Freeze => "guest-fsfreeze-freeze",
            GuestAgentCall::Thaw => "guest-fsfreeze-thaw",
        }
    }

    /// How long a call waits when the caller doesn't say: a ping is quick
    /// or not answered at all; a freeze flushes every filesystem first.
    pub fn default_timeout(self) -> Duration {
        match self {
            GuestAgentCall::Ping => Duration::from_secs(5),
            GuestAgentCall::Freeze | GuestAgentCall::Thaw => Duration::from_secs(60),
        }
    }
}

impl Agent {
    /// Asks the guest agent of running instance `name`; returns how many
    /// filesystems a freeze or thaw reached (0 for a ping).
    pub async fn guest_agent(
        &self,
        name: &str,
        call: GuestAgentCall,
        timeout: Duration,
    ) -> Result<u32, AgentError> {
        let inst = self.instance(name)?;
        let (_, record) = Self::running(&inst)?;
        let failed = |source| AgentError::GuestAgent {
            instance: name.to_owned(),
            source,
        };
        if record.runtime.guest_agent_slot.is_none() {
            return Err(failed(GuestAgentError::NoChannel));
        }
        let socket = self.cfg.run_dir(name).join(files::GUEST_AGENT);
        let reply = guest_agent::execute(&socket, call.command(), timeout)
            .await
            .map_err(failed)?;
        let filesystems = reply
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        tracing::info!(instance = %name, command = call.command(), filesystems, "guest agent answered");
        Ok(filesystems)
    }
}
