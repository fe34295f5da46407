//! Applying a [`CpuPinning`] to a running QEMU: its vCPU threads, found
//! with `query-cpus-fast`, get their affinity. Planning which thread gets
//! which CPUs is pure; [`pin_vcpus`] asks QMP and the kernel.

use std::collections::HashMap;

use crate::pinning::{CpuList, CpuPinning};
use crate::qmp::{QmpClient, QmpError};

/// Why pinning a running QEMU failed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// `query-cpus-fast` failed.
    #[error("can't list the vCPU threads")]
    Qmp(#[source] QmpError),
    /// The reply wasn't what QMP documents.
    #[error("query-cpus-fast reply is malformed: {0}")]
    Reply(String),
    /// Several vCPUs run on one thread (TCG without multi-threading), so
    /// they can't have different masks.
    #[error(
        "vCPUs {first} and {second} share thread {thread} (TCG without multi-threading), so they can't be pinned apart; give one CPU list for all vCPUs"
    )]
    SharedThread {
        /// One vCPU.
        first: i64,
        /// Another.
        second: i64,
        /// Their thread.
        thread: i64,
    },
    /// The kernel refused the affinity.
    #[error("can't pin vCPU {vcpu} (thread {thread}) to CPUs {cpus}")]
    Affinity {
        /// The vCPU.
        vcpu: i64,
        /// Its thread.
        thread: i64,
        /// The CPUs asked for.
        cpus: String,
        /// The OS error.
        #[source]
        source: nix::Error,
    },
}

/// Pins each vCPU thread of a running QEMU, found with `query-cpus-fast`.
/// vCPUs whose entry is `all` are left as they are.
pub async fn pin_vcpus(qmp: &QmpClient, pinning: &CpuPinning) -> Result<(), PinError> {
    let reply = qmp
        .execute("query-cpus-fast", None)
        .await
        .map_err(PinError::Qmp)?;
    let threads = vcpu_threads(&reply).map_err(PinError::Reply)?;
    for (vcpu, thread, list) in affinity_plan(&threads, pinning)? {
        let affinity = |source| PinError::Affinity {
            vcpu,
            thread,
            cpus: list.to_string(),
            source,
        };
        let mut set = nix::sched::CpuSet::new();
        for cpu in list.cpus() {
            set.set(cpu as usize).map_err(affinity)?;
        }
        let tid = nix::unistd::Pid::from_raw(i32::try_from(thread).unwrap_or(-1));
        nix::sched::sched_setaffinity(tid, &set).map_err(affinity)?;
    }
    Ok(())
}

/// `(vcpu, thread, cpus)` for each thread to pin; refuses vCPUs that
/// share a thread but not a mask. Pure.
pub fn affinity_plan<'a>(
    threads: &[(i64, i64)],
    pinning: &'a CpuPinning,
) -> Result<Vec<(i64, i64, &'a CpuList)>, PinError> {
    let mut thread_owner = HashMap::new();
    for &(vcpu, thread) in threads {
        if let Some(&other) = thread_owner.get(&thread)
            && pinning.for_vcpu(index(other)) != pinning.for_vcpu(index(vcpu))
        {
            return Err(PinError::SharedThread {
                first: other,
                second: vcpu,
                thread,
            });
        }
        thread_owner.insert(thread, vcpu);
    }
    Ok(threads
        .iter()
        .filter_map(|&(vcpu, thread)| {
            let list = pinning.for_vcpu(index(vcpu)).filter(|l| !l.is_any())?;
            Some((vcpu, thread, list))
        })
        .collect())
}

fn index(vcpu: i64) -> usize {
    usize::try_from(vcpu).unwrap_or(usize::MAX)
}

/// `(cpu-index, thread-id)` of each vCPU in a `query-cpus-fast` reply. Pure.
pub fn vcpu_threads(reply: &serde_json::Value) -> Result<Vec<(i64, i64)>, String> {
    let cpus = reply.as_array().ok_or("not an array")?;
    cpus.iter()
        .map(|cpu| {
            let field = |name: &str| {
                cpu.get(name)
                    .and_then(serde_json::Value::as_i64)
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| format!("a vCPU without a valid {name}: {cpu}"))
            };
            Ok((field("cpu-index")?, field("thread-id")?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn list(text: &str) -> CpuList {
        match text.parse() {
            Ok(CpuPinning::All(list)) => list,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn threads_come_from_query_cpus_fast() {
        let reply = json!([
            {"cpu-index": 0, "thread-id": 4100, "qom-path": "/machine/unattached/device[0]", "target": "x86_64"},
            {"cpu-index": 1, "thread-id": 4101, "qom-path": "/machine/unattached/device[1]", "target": "x86_64"}
        ]);
        assert_eq!(vcpu_threads(&reply), Ok(vec![(0, 4100), (1, 4101)]));
        assert!(vcpu_threads(&json!([{"cpu-index": 0}])).is_err());
        assert!(vcpu_threads(&json!({"return": []})).is_err());
    }

    #[test]
    fn each_restricted_vcpu_thread_gets_its_own_list() {
        let pinning: CpuPinning = "1:all:0".parse().unwrap();
        let plan = affinity_plan(&[(0, 10), (1, 11), (2, 12)], &pinning).unwrap();
        assert_eq!(plan, vec![(0, 10, &list("1")), (2, 12, &list("0"))]);
    }

    #[test]
    fn vcpus_sharing_a_thread_must_share_a_list() {
        let apart: CpuPinning = "1:0".parse().unwrap();
        assert!(matches!(
            affinity_plan(&[(0, 10), (1, 10)], &apart),
            Err(PinError::SharedThread {
                first: 0,
                second: 1,
                thread: 10
            })
        ));
        let together: CpuPinning = "0-1".parse().unwrap();
        assert_eq!(
            affinity_plan(&[(0, 10), (1, 10)], &together).unwrap().len(),
            2
        );
    }
}
