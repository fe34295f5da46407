//! The password of an instance's display (VNC or SPICE). It lives in QEMU
//! and in the agent's memory, which gives it to each QEMU the agent
//! launches for the instance (a start, a reboot, a restore); no record,
//! save file or migration carries it. After an agent restart, or on a
//! migration's target, the display lets nobody in until it is set again.

use std::sync::Arc;

use hypervisor::Runtime;
use serde_json::json;

use super::{Agent, Instance, Process, lock};
use crate::error::AgentError;

/// A password, kept out of logs and debug output.
pub(crate) struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// QMP's name of the display of `runtime` that asks for a password.
fn protected_display(runtime: &Runtime) -> Option<&'static str> {
    if runtime.vnc_password {
        Some("vnc")
    } else if runtime.spice.as_ref().is_some_and(|s| s.password) {
        Some("spice")
    } else {
        None
    }
}

impl Agent {
    /// Sets the password viewers must give to the display of running
    /// instance `name`, which asks for one.
    pub async fn set_display_password(&self, name: &str, password: &str) -> Result<(), AgentError> {
        let inst = self.instance(name)?;
        let (process, record) = Self::running(&inst)?;
        let Some(protocol) = protected_display(&record.runtime) else {
            return Err(AgentError::NoDisplayPassword(name.to_owned()));
        };
        if password.is_empty() || password.chars().any(char::is_control) {
            return Err(AgentError::BadRequest(
                "a display password is at least one character, none of them control characters"
                    .into(),
            ));
        }
        set_password(&process, protocol, password)
            .await
            .map_err(|source| AgentError::Qmp {
                instance: name.to_owned(),
                source,
            })?;
        *lock(&inst.display_password) = Some(Secret(password.to_owned()));
        tracing::info!(instance = %name, protocol, "display password set");
        Ok(())
    }

    /// Gives a QEMU just launched for `inst` the display password set
    /// before. A failure leaves the display locked, which is only logged.
    pub(super) async fn give_display_password(
        inst: &Arc<Instance>,
        process: &Process,
        runtime: &Runtime,
    ) {
        let password = lock(&inst.display_password).as_ref().map(|s| s.0.clone());
        let (Some(protocol), Some(password)) = (protected_display(runtime), password) else {
            return;
        };
        if let Err(error) = set_password(process, protocol, &password).await {
            tracing::warn!(instance = %inst.name, %error, "display password not given to the new QEMU; the display stays locked until it is set again");
        }
    }
}

async fn set_password(
    process: &Process,
    protocol: &str,
    password: &str,
) -> Result<serde_json::Value, hypervisor::qmp::QmpError> {
    process
        .qmp()
        .execute(
            "set_password",
            Some(json!({ "protocol": protocol, "password": password })),
        )
        .await
}
