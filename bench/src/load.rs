//! Read load: many concurrent clients calling GetInstance and
//! ListInstances against an agent with running instances, for a fixed time.
//! Reports latency percentiles, errors and the agent's peak RSS.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_agent_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::{interval, local_client, spec, start_agent};

/// Latency of one kind of call under load.
#[derive(Debug, Serialize, Deserialize)]
pub struct CallStats {
    pub calls: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// 95% intervals of p50 and p99, resampling the run a second at a
    /// time (see `interval::quantile_interval`).
    #[serde(default)]
    pub p50_interval_ms: Option<(f64, f64)>,
    #[serde(default)]
    pub p99_interval_ms: Option<(f64, f64)>,
}

/// What one load run measured.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub instances: usize,
    pub clients: usize,
    pub seconds: f64,
    pub get_instance: CallStats,
    pub list_instances: CallStats,
    pub agent_peak_rss_mib: f64,
}

/// One call: when it began, counted from the start of the load, and how
/// long it took.
#[derive(Debug, Clone, Copy)]
struct Call {
    began: Duration,
    took: Duration,
}

/// The calls of each second of a load run are resampled together.
const BLOCK: Duration = Duration::from_secs(1);

fn call_stats(calls: &[Call], errors: usize) -> CallStats {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut sorted: Vec<f64> = calls.iter().map(|c| ms(c.took)).collect();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| {
        sorted
            .get(((sorted.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let mut blocks: Vec<Vec<f64>> = Vec::new();
    for call in calls {
        let block = (call.began.as_secs_f64() / BLOCK.as_secs_f64()) as usize;
        if blocks.len() <= block {
            blocks.resize_with(block + 1, Vec::new);
        }
        blocks[block].push(ms(call.took));
    }
    CallStats {
        calls: calls.len(),
        errors,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        p50_interval_ms: interval::quantile_interval(&blocks, 0.5),
        p99_interval_ms: interval::quantile_interval(&blocks, 0.99),
    }
}

/// Peak resident memory of a process (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    proc_status_kib(pid, "VmHWM:") as f64 / 1024.0
}

/// Current resident memory of a process (VmRSS), in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    proc_status_kib(pid, "VmRSS:") as f64 / 1024.0
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Starts `count` instances through the agent, `batch` at a time.
pub async fn start_instances(
    socket: &Path,
    prefix: &str,
    count: usize,
    batch: usize,
) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    for chunk in names.chunks(batch) {
        let mut starts = tokio::task::JoinSet::new();
        for name in chunk {
            let mut client = local_client(socket).await?;
            let s = spec(name, &uuid::Uuid::new_v4().to_string());
            starts.spawn(async move {
                client
                    .start_instance(pb::StartInstanceRequest {
                        spec: Some(pb::InstanceSpec {
                            memory_mib: LOAD_MEMORY_MIB,
                            accelerator: pb::Accelerator::Tcg as i32,
                            ..s
                        }),
                        paused: false,
                    })
                    .await
            });
        }
        while let Some(done) = starts.join_next().await {
            done??;
        }
    }
    Ok(names)
}

/// Memory of each instance in load and scale runs.
pub const LOAD_MEMORY_MIB: u64 = 64;

/// `clients` tasks, each on its own connection, alternate GetInstance (on
/// the instances in turn) and ListInstances until `duration` is over: back
/// to back, or one pair per `pace` when given (spread over the period, so
/// the clients don't all call at the same instant).
pub async fn hammer(
    socket: &Path,
    names: &[String],
    clients: usize,
    duration: Duration,
    pace: Option<Duration>,
) -> anyhow::Result<(CallStats, CallStats)> {
    let stop = Arc::new(AtomicBool::new(false));
    let names = Arc::new(names.to_vec());
    let load_began = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..clients {
        let mut client = local_client(socket).await?;
        let stop = stop.clone();
        let names = names.clone();
        let mut ticks = pace.map(|period| {
            let offset = period * worker as u32 / clients as u32;
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        workers.spawn(async move {
            let (mut gets, mut lists) = (Vec::new(), Vec::new());
            let (mut get_errors, mut list_errors) = (0, 0);
            let mut i = worker;
            while !stop.load(Ordering::Relaxed) {
                if let Some(ticks) = &mut ticks {
                    ticks.tick().await;
                }
                let name = names[i % names.len()].clone();
                let call = |began: Instant| Call {
                    began: began - load_began,
                    took: began.elapsed(),
                };
                let began = Instant::now();
                match client.get_instance(pb::GetInstanceRequest { name }).await {
                    Ok(_) => gets.push(call(began)),
                    Err(_) => get_errors += 1,
                }
                let began = Instant::now();
                match client.list_instances(pb::ListInstancesRequest {}).await {
                    Ok(r) if r.get_ref().instances.len() == names.len() => lists.push(call(began)),
                    _ => list_errors += 1,
                }
                i += 1;
            }
            (gets, get_errors, lists, list_errors)
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let (mut gets, mut lists) = (Vec::new(), Vec::new());
    let (mut get_errors, mut list_errors) = (0, 0);
    while let Some(done) = workers.join_next().await {
        let (g, ge, l, le) = done?;
        gets.extend(g);
        lists.extend(l);
        get_errors += ge;
        list_errors += le;
    }
    Ok((
        call_stats(&gets, get_errors),
        call_stats(&lists, list_errors),
    ))
}

/// The load test: `instances` running, `clients` concurrent readers.
pub async fn measure(
    binary: &Path,
    work: &Path,
    instances: usize,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<LoadReport> {
    let agent = start_agent(binary, &work.join("load-state")).await?;
    let names = start_instances(&agent.socket, "load", instances, 10).await?;
    let (get_instance, list_instances) =
        hammer(&agent.socket, &names, clients, duration, None).await?;
    let seconds = duration.as_secs_f64();
    let agent_peak_rss_mib = peak_rss_mib(agent.child.id());
    let mut client = local_client(&agent.socket).await?;
    for name in &names {
        client
            .stop_instance(pb::StopInstanceRequest {
                name: name.clone(),
                force: true,
                powerdown_timeout_ms: 0,
            })
            .await?;
    }
    Ok(LoadReport {
        instances,
        clients,
        seconds,
        get_instance,
        list_instances,
        agent_peak_rss_mib,
    })
}
