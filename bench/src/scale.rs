//! Scale: how the agent's costs grow with the number of instances it runs.
//! At each level, N instances are started in batches (raw QEMU first, then
//! through the agent), 100 concurrent clients read, the agent's memory and
//! open fds are taken, the agent is killed with SIGKILL and restarted to
//! time its reconciliation, and all instances are stopped at once.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kvm_agent_proto::v1 as pb;
use nix::unistd::{SysconfVar, sysconf};
use serde::{Deserialize, Serialize};

use crate::load::{self, CallStats, LOAD_MEMORY_MIB};
use crate::profile::{self, STOP_STEPS, mean_ms};
use crate::raw::{RawQemu, machine_args};
use crate::{AgentProcess, interval, local_client, start_agent, start_profiled_agent, yes_no};

/// Instances started at once, on both sides.
pub const START_BATCH: usize = 10;
/// Concurrent readers at every level.
pub const SCALE_CLIENTS: usize = 100;
/// Each reader's period in the paced run: 100 clients make 2,000 calls a
/// second, far more than a cluster master's polling, yet well below what
/// two cores can serve, so that latency is the agent's and not a queue's.
pub const PACE: Duration = Duration::from_millis(100);

/// One operation on all instances at once, through the agent and raw.
#[derive(Debug, Serialize, Deserialize)]
pub struct Pair {
    pub agent_ms: f64,
    pub raw_ms: f64,
    pub ratio: f64,
}

impl Pair {
    fn new(agent: Duration, raw: Duration) -> Pair {
        let (agent_ms, raw_ms) = (ms(agent), ms(raw));
        Pair {
            agent_ms,
            raw_ms,
            ratio: agent_ms / raw_ms,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What one level measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct Level {
    pub instances: usize,
    /// Starting all instances, `START_BATCH` at a time, to QMP ready.
    pub start_all: Pair,
    /// Readers calling back to back: the agent at saturation, where
    /// latency is mostly waiting in line (clients / throughput).
    pub get_instance: CallStats,
    pub list_instances: CallStats,
    /// Readers each calling once per `PACE`.
    pub get_instance_paced: CallStats,
    pub list_instances_paced: CallStats,
    /// Length of each read run.
    pub read_seconds: f64,
    /// CPU the instances' QEMUs used during the paced reads, in percent of
    /// one core: the machine's share that the agent doesn't get.
    pub qemu_cpu_percent: f64,
    /// The agent's resident memory after the read load, and its peak.
    pub agent_rss_mib: f64,
    pub agent_peak_rss_mib: f64,
    pub agent_open_fds: usize,
    /// From the restarted agent's exec to its first answer.
    pub restart_first_answer_ms: f64,
    /// From the restarted agent's exec until every instance is adopted
    /// (running, no longer reconciling).
    pub reconcile_ms: f64,
    /// Force-stopping all instances at once.
    pub stop_all: Pair,
    /// Where the time of each of those stops went.
    #[serde(default)]
    pub stop_each: StopProfile,
}

/// One forced stop among all at once: the agent's steps, as its metrics
/// endpoint timed them, the whole call as its client timed it, and the raw
/// driver's SIGKILL until the QEMU is reaped.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StopProfile {
    pub agent_steps: Vec<profile::Step>,
    pub agent_call_ms: f64,
    pub raw_kill_ms: f64,
    /// CPU time per stop: the agent process's, and the whole machine's
    /// while the agent stopped them all and while raw QEMUs were killed.
    pub agent_cpu_ms: f64,
    pub machine_cpu_agent_ms: f64,
    pub machine_cpu_raw_ms: f64,
}

/// Runs every level in turn.
/// Runs every level in turn. `settle` is the time fresh instances get to
/// finish their firmware's busy start before the reads are timed.
pub async fn measure(
    binary: &Path,
    work: &Path,
    levels: &[usize],
    read_time: Duration,
    settle: Duration,
) -> anyhow::Result<Vec<Level>> {
    let mut out = Vec::new();
    for &instances in levels {
        eprintln!("scale: {instances} instances");
        out.push(level(binary, work, instances, read_time, settle).await?);
    }
    Ok(out)
}

async fn level(
    binary: &Path,
    work: &Path,
    instances: usize,
    read_time: Duration,
    settle: Duration,
) -> anyhow::Result<Level> {
    // The raw side first, so that the two never share the machine.
    let raw_dir = work.join(format!("scale-raw-{instances}"));
    let began = Instant::now();
    let raw = raw_start_all(&raw_dir, instances).await?;
    let raw_start = began.elapsed();
    let began = Instant::now();
    let busy = machine_busy_ticks();
    let raw_kills = raw_kill_all(raw).await?;
    let raw_kills = RawKills {
        each: raw_kills,
        machine_ticks: machine_busy_ticks() - busy,
    };
    let raw_stop = began.elapsed();

    let state = work.join(format!("scale-state-{instances}"));
    let mut agent = start_agent(binary, &state).await?;
    let began = Instant::now();
    let names = load::start_instances(&agent.socket, "scale", instances, START_BATCH).await?;
    let agent_start = began.elapsed();
    tokio::time::sleep(settle).await;

    let qemus = qemu_pids(&agent.socket).await?;
    let cpu_before = cpu_ticks(&qemus);
    let cpu_began = Instant::now();
    let (get_instance_paced, list_instances_paced) =
        load::hammer(&agent.socket, &names, SCALE_CLIENTS, read_time, Some(PACE)).await?;
    let qemu_cpu_percent = (cpu_ticks(&qemus) - cpu_before) as f64
        / clock_ticks_per_second()
        / cpu_began.elapsed().as_secs_f64()
        * 100.0;
    let (get_instance, list_instances) =
        load::hammer(&agent.socket, &names, SCALE_CLIENTS, read_time, None).await?;
    let pid = agent.child.id();
    let agent_rss_mib = load::rss_mib(pid);
    let agent_peak_rss_mib = load::peak_rss_mib(pid);
    let agent_open_fds = settled_fd_count(pid).await?;

    // kill -9, then a new agent on the same state directory.
    agent.child.kill()?;
    agent.child.wait()?;
    drop(agent);
    let began = Instant::now();
    let (agent, metrics) = start_profiled_agent(binary, &state).await?;
    let restart_first_answer = began.elapsed();
    wait_adopted(&agent.socket, instances).await?;
    let reconcile = began.elapsed();

    let (agent_stop, stop_each) = stop_all_profiled(&agent, metrics, &names, &raw_kills).await?;
    drop(agent);
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_dir_all(&raw_dir);

    Ok(Level {
        instances,
        start_all: Pair::new(agent_start, raw_start),
        get_instance,
        list_instances,
        get_instance_paced,
        list_instances_paced,
        read_seconds: read_time.as_secs_f64(),
        qemu_cpu_percent,
        agent_rss_mib,
        agent_peak_rss_mib,
        agent_open_fds,
        restart_first_answer_ms: ms(restart_first_answer),
        reconcile_ms: ms(reconcile),
        stop_all: Pair::new(agent_stop, raw_stop),
        stop_each,
    })
}

/// The raw side of a level's stops: how long each QEMU took from SIGKILL
/// to reaped, and the machine's CPU time meanwhile.
struct RawKills {
    each: Vec<Duration>,
    machine_ticks: u64,
}

/// Force-stops every instance at once through `agent`, whose metrics are
/// at `metrics`; returns the whole time and where each stop's time and
/// CPU went, beside the raw kills'.
async fn stop_all_profiled(
    agent: &AgentProcess,
    metrics: SocketAddr,
    names: &[String],
    raw: &RawKills,
) -> anyhow::Result<(Duration, StopProfile)> {
    let before = profile::scrape(metrics).await?;
    let agent_ticks = cpu_ticks(&[agent.child.id()]);
    let busy = machine_busy_ticks();
    let began = Instant::now();
    let calls = agent_stop_all(&agent.socket, names).await?;
    let whole = began.elapsed();
    // The run files go after the replies; their time and CPU count too.
    let after =
        profile::scrape_when_done(metrics, &before, ("stop", "run files"), calls.len() as u64)
            .await?;
    let machine_ticks = machine_busy_ticks() - busy;
    let agent_ticks = cpu_ticks(&[agent.child.id()]) - agent_ticks;
    let per_stop_ms = |ticks: u64, stops: usize| {
        ticks as f64 * 1000.0 / clock_ticks_per_second() / stops.max(1) as f64
    };
    let each = StopProfile {
        agent_steps: profile::agent_steps(&before, &after, "stop", STOP_STEPS),
        agent_call_ms: mean_ms(&calls),
        raw_kill_ms: mean_ms(&raw.each),
        agent_cpu_ms: per_stop_ms(agent_ticks, calls.len()),
        machine_cpu_agent_ms: per_stop_ms(machine_ticks, calls.len()),
        machine_cpu_raw_ms: per_stop_ms(raw.machine_ticks, raw.each.len()),
    };
    Ok((whole, each))
}

/// Starts `count` raw QEMUs with the argv the agent renders for the same
/// spec, `START_BATCH` at a time.
async fn raw_start_all(dir: &Path, count: usize) -> anyhow::Result<Vec<RawQemu>> {
    let mut running = Vec::with_capacity(count);
    let indices: Vec<usize> = (0..count).collect();
    for chunk in indices.chunks(START_BATCH) {
        let mut starts = tokio::task::JoinSet::new();
        for &i in chunk {
            let dir = dir.join(i.to_string());
            std::fs::create_dir_all(&dir)?;
            let args = machine_args(
                &format!("raw{i}"),
                &uuid::Uuid::new_v4().to_string(),
                "tcg",
                LOAD_MEMORY_MIB,
            );
            starts.spawn(async move { RawQemu::start(&dir, &args).await });
        }
        while let Some(done) = starts.join_next().await {
            running.push(done??);
        }
    }
    Ok(running)
}

/// Kills every QEMU at once; returns how long each took to be reaped.
async fn raw_kill_all(running: Vec<RawQemu>) -> anyhow::Result<Vec<Duration>> {
    let mut kills = tokio::task::JoinSet::new();
    for q in running {
        kills.spawn(async move {
            let began = Instant::now();
            q.kill().await.map(|()| began.elapsed())
        });
    }
    let mut times = Vec::new();
    while let Some(done) = kills.join_next().await {
        times.push(done??);
    }
    Ok(times)
}

/// Force-stops every instance at once; returns how long each call took.
async fn agent_stop_all(socket: &Path, names: &[String]) -> anyhow::Result<Vec<Duration>> {
    let client = local_client(socket).await?;
    let mut stops = tokio::task::JoinSet::new();
    for name in names {
        let mut client = client.clone();
        let name = name.clone();
        stops.spawn(async move {
            let began = Instant::now();
            client
                .stop_instance(pb::StopInstanceRequest {
                    name,
                    force: true,
                    powerdown_timeout_ms: 0,
                })
                .await
                .map(|_| began.elapsed())
        });
    }
    let mut times = Vec::new();
    while let Some(done) = stops.join_next().await {
        times.push(done?.context("stopping an instance")?);
    }
    Ok(times)
}

/// The table of where each forced stop's time went, level by level.
pub fn stop_section(md: &mut String, levels: &[Level]) {
    md.push_str("\n### One stop among all at once\n\nMean time in ms of one forced stop while all the level's instances stop at once: the agent's steps from its metrics endpoint (the record is written beside QEMU's end, and the run files are removed after the reply), the whole StopInstance call as its client timed it, and the raw driver's SIGKILL until the QEMU is reaped. Then the CPU time per stop, from the kernel's accounting in ticks of 10 ms summed over all the stops: the agent process's, and the whole machine's while the agent stopped them (its client, the QEMUs' ends and the removal of their run files after the replies included) and while the raw driver killed them. With both cores busy, every ms of CPU the agent spends delays the QEMUs' ends.\n\n| step |");
    for l in levels {
        md.push_str(&format!(" {} |", l.instances));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(levels.len()));
    md.push('\n');
    let mut row = |label: &str, value: &dyn Fn(&Level) -> Option<f64>| {
        md.push_str(&format!("| {label} |"));
        for l in levels {
            match value(l) {
                Some(v) => md.push_str(&format!(" {v:.2} |")),
                None => md.push_str(" — |"),
            }
        }
        md.push('\n');
    };
    for step in STOP_STEPS {
        row(&format!("agent: {step}"), &|l: &Level| {
            let found = l.stop_each.agent_steps.iter().find(|s| s.step == *step);
            found.map(|s| s.mean_ms)
        });
    }
    row("agent: **whole call**", &|l: &Level| {
        Some(l.stop_each.agent_call_ms)
    });
    row("raw: **SIGKILL to reaped**", &|l: &Level| {
        Some(l.stop_each.raw_kill_ms)
    });
    row("CPU per stop: the agent process", &|l: &Level| {
        Some(l.stop_each.agent_cpu_ms)
    });
    row(
        "CPU per stop: the machine, through the agent",
        &|l: &Level| Some(l.stop_each.machine_cpu_agent_ms),
    );
    row("CPU per stop: the machine, raw", &|l: &Level| {
        Some(l.stop_each.machine_cpu_raw_ms)
    });
}

/// The pids of the agent's QEMUs.
async fn qemu_pids(socket: &Path) -> anyhow::Result<Vec<u32>> {
    let listed = local_client(socket)
        .await?
        .list_instances(pb::ListInstancesRequest {})
        .await?
        .into_inner()
        .instances;
    Ok(listed.iter().map(|i| i.pid).filter(|&p| p != 0).collect())
}

/// User and system CPU time of these processes, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name, which may hold spaces.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            // utime and stime are fields 14 and 15 of the whole line.
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// The CPU time the whole machine spent busy (not idle, not waiting for
/// I/O) since boot, in clock ticks.
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // "cpu  user nice system idle iowait irq softirq steal guest ...";
    // guest time is already counted in user.
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum()
}

fn clock_ticks_per_second() -> f64 {
    // It can't fail on Linux, where it is USER_HZ, 100.
    sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |ticks| ticks as f64)
}

/// The process's open fds once the readers' connections have closed: the
/// count once it has held for a few polls in a row.
async fn settled_fd_count(pid: u32) -> anyhow::Result<usize> {
    let count =
        || -> anyhow::Result<usize> { Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count()) };
    let (mut last, mut steady) = (count()?, 0);
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = count()?;
        steady = if now == last { steady + 1 } else { 0 };
        last = now;
        if steady == 4 {
            break;
        }
    }
    Ok(last)
}

/// Polls until the agent lists `count` instances, all running and none
/// still reconciling.
async fn wait_adopted(socket: &Path, count: usize) -> anyhow::Result<()> {
    let mut client = local_client(socket).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = client
            .list_instances(pb::ListInstancesRequest {})
            .await?
            .into_inner()
            .instances;
        let adopted = listed
            .iter()
            .filter(|i| i.state == pb::InstanceState::Running as i32 && !i.reconciling)
            .count();
        if adopted == count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {adopted} of {count} instances adopted after a restart");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The read-latency, memory and adoption goals at the sweep's largest
/// level.
pub fn goals(md: &mut String, top: &Level) {
    let n = top.instances;
    let p50 = |stats: &CallStats| (stats.p50_ms, stats.p50_interval_ms);
    let p99 = |stats: &CallStats| (stats.p99_ms, stats.p99_interval_ms);
    let loads = [
        ("paced", &top.get_instance_paced, &top.list_instances_paced),
        ("back to back", &top.get_instance, &top.list_instances),
    ];
    let checks = loads.into_iter().flat_map(|(load, get, list)| {
        [
            ("GetInstance p50 < 1 ms", load, p50(get), 1.0),
            ("GetInstance p99 < 5 ms", load, p99(get), 5.0),
            ("ListInstances p99 < 10 ms", load, p99(list), 10.0),
        ]
    });
    for (goal, load, (value, ci95), limit) in checks {
        // As with the ratios, a latency misses its goal only when the
        // whole interval lies above it.
        let (measured, met) = match ci95 {
            Some((low, high)) => (
                format!("{value:.2} ms [{low:.2}–{high:.2}]"),
                match interval::verdict((low, high), limit) {
                    interval::Verdict::Met => "yes",
                    interval::Verdict::Undecided => "?",
                    interval::Verdict::Missed => "**no**",
                },
            ),
            None => (format!("{value:.2} ms"), yes_no(value < limit)),
        };
        md.push_str(&format!(
            "| {goal} at {n} instances, {} clients {load} | {measured} | {met} |\n",
            SCALE_CLIENTS,
        ));
    }
    md.push_str(&format!(
        "| agent peak RSS < 64 MiB at {n} instances | {:.2} MiB | {} |\n",
        top.agent_peak_rss_mib,
        yes_no(top.agent_peak_rss_mib < 64.0)
    ));
    md.push_str(&format!(
        "| all {n} adopted < 2 s after kill -9 | {:.2} ms | {} |\n",
        top.reconcile_ms,
        yes_no(top.reconcile_ms < 2000.0)
    ));
}
