//! SetMemory: moving a running guest's memory with its balloon.

use std::time::{Duration, Instant};

use hypervisor::balloon;
use hypervisor::qmp::QmpError;

use super::{Agent, State, lock};
use crate::error::AgentError;
use crate::model::MemoryReport;

/// How often a waiting SetMemory reads the guest's memory.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Checks a target against the runtime's memory. Pure.
pub fn check_target(target_mib: u64, maximum_mib: u64) -> Result<(), AgentError> {
    if target_mib == 0 || target_mib > maximum_mib {
        return Err(AgentError::BadRequest(format!(
            "memory {target_mib} MiB is out of range: the balloon can move this instance between 1 and its runtime's {maximum_mib} MiB; more needs a hard reboot with a bigger spec"
        )));
    }
    Ok(())
}

impl Agent {
    /// Sets a running guest's memory target and, with `wait`, waits until
    /// the guest has reached it.
    pub async fn set_memory(
        &self,
        name: &str,
        target_mib: u64,
        wait: Option<Duration>,
    ) -> Result<MemoryReport, AgentError> {
        let inst = self.instance(name)?;
        let qmp_error = |source: QmpError| AgentError::Qmp {
            instance: name.to_owned(),
            source,
        };
        let (process, maximum_mib) = {
            let _op = inst.lock_ops().await?;
            let state = lock(&inst.status).state;
            let (process, record) = inst.process_and_record();
            let (Some(process), Some(record)) = (
                process.filter(|_| matches!(state, State::Running | State::Paused)),
                record,
            ) else {
                return Err(AgentError::NotRunning(name.to_owned()));
            };
            if record.runtime.balloon_slot.is_none() {
                return Err(AgentError::NoBalloon(name.to_owned()));
            }
            let maximum_mib = record.runtime.memory_mib;
            check_target(target_mib, maximum_mib)?;
            balloon::set_target(process.qmp(), target_mib)
                .await
                .map_err(qmp_error)?;
            tracing::info!(instance = %name, target_mib, maximum_mib, "memory target set");
            (process, maximum_mib)
        };
        // The guest moves at its own pace; waiting holds no lock, so a stop
        // or a migration can go ahead meanwhile.
        let started = Instant::now();
        loop {
            let actual_mib = balloon::actual_mib(process.qmp())
                .await
                .map_err(qmp_error)?;
            process.set_balloon_mib(actual_mib);
            let report = MemoryReport {
                target_mib,
                actual_mib,
                maximum_mib,
            };
            let Some(limit) = wait.filter(|_| actual_mib != target_mib) else {
                return Ok(report);
            };
            if started.elapsed() >= limit {
                return Err(AgentError::BalloonTargetNotReached {
                    instance: name.to_owned(),
                    target_mib,
                    actual_mib,
                    waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_stay_between_one_mib_and_the_runtime_memory() {
        assert!(check_target(1, 256).is_ok());
        assert!(check_target(256, 256).is_ok());
        for bad in [0, 257, u64::MAX] {
            let err = check_target(bad, 256).unwrap_err();
            assert!(matches!(err, AgentError::BadRequest(_)), "{bad}");
            assert!(err.to_string().contains("256 MiB"), "{err}");
        }
    }
}
