//! Measures each operation through the agent and the same operation on raw
//! QEMU, interleaved in the same run, and writes `report.md` and
//! `report.json`. Every goal is a ratio of medians (agent / raw), because
//! absolute times on shared machines drift from run to run.

mod busy;
mod encryption;
mod figures;
mod interval;
mod libvirt;
mod load;
mod operations;
mod plot;
mod profile;
mod raw;
mod removal;
mod scale;
mod settle;
mod takeover;
mod transfer;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use serde::Serialize;
use tonic::transport::Channel;

use crate::figures::{FIGURES, FigureKind, growth};
use crate::raw::machine_args;

/// Benchmark the agent against raw QEMU.
#[derive(Debug, Parser)]
struct Args {
    /// Directory for report.md and report.json.
    #[arg(long, default_value = "bench/report")]
    out: PathBuf,
    /// Fewer rounds (a few minutes).
    #[arg(long)]
    quick: bool,
    /// Other managers to measure in the same rounds: `libvirt` (set up by
    /// `scripts/libvirt-env`, installed where it is missing).
    #[arg(long, value_enum)]
    peers: Vec<Peer>,
    /// The agent binary (default: next to this one).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Directory with the test guest's vmlinuz and initrd.gz (default:
    /// what `scripts/build-test-guest` prints).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// A QEMU newer than the system's, for the cross-version migration
    /// (default: what `scripts/qemu-env` prints).
    #[arg(long)]
    newer_qemu: Option<PathBuf>,
    /// Measure nothing: draw the charts of this earlier report.json into
    /// the output directory.
    #[arg(long, value_name = "REPORT_JSON")]
    charts_from: Option<PathBuf>,
}

/// A manager measured beside the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Peer {
    Libvirt,
}

/// Powerdown wait used by both sides in graceful stops: the guests here have
/// no OS, so this only measures the escalation's own cost.
const POWERDOWN_WAIT: Duration = Duration::from_millis(20);
const MEMORY_MIB: u64 = 128;
/// Time given to a fresh QEMU before it is taken over, on both sides.
const SETTLE: Duration = Duration::from_millis(300);

#[derive(Debug, Serialize)]
struct Stats {
    n: usize,
    p50_ms: f64,
    p90_ms: f64,
    max_ms: f64,
    /// Every round's time, in the order the rounds ran: a slow round can
    /// then be set beside the other rows' same round.
    rounds_ms: Vec<f64>,
}

fn stats(samples: &mut [Duration]) -> Stats {
    let rounds_ms = millis(samples);
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(samples[((samples.len() as f64 - 1.0) * q).round() as usize]);
    Stats {
        n: samples.len(),
        p50_ms: at(0.5),
        p90_ms: at(0.9),
        max_ms: samples.last().map_or(0.0, |d| ms(*d)),
        rounds_ms,
    }
}

#[derive(Debug, Serialize)]
struct Row {
    operation: &'static str,
    agent: Stats,
    raw: Stats,
    ratio_p50: f64,
    /// The 95% bootstrap interval of `ratio_p50` over the rounds.
    ratio_ci95: Option<(f64, f64)>,
    goal: f64,
}

impl Row {
    /// Where the row stands against its goal; `None` without one.
    fn verdict(&self) -> Option<interval::Verdict> {
        let ratio = (self.ratio_p50, self.ratio_p50);
        (!self.goal.is_nan())
            .then(|| interval::verdict(self.ratio_ci95.unwrap_or(ratio), self.goal))
    }
}

/// The goal of every operation row with one: agent/raw at the median.
const GOAL: f64 = 1.10;

/// How many rounds a section runs: `least`, then more up to `most` while
/// one of its rows still has its goal inside its interval.
#[derive(Debug, Clone, Copy)]
struct Rounds {
    least: usize,
    most: usize,
}

impl Rounds {
    /// `least` rounds, up to twice as many for an undecided row; the quick
    /// run takes no more.
    fn new(least: usize, quick: bool) -> Self {
        let most = if quick { least } else { 2 * least };
        Self { least, most }
    }

    /// Whether to run another round after `done`, given whether a row is
    /// still undecided.
    fn another(self, done: usize, undecided: bool) -> bool {
        done < self.least || (done < self.most && undecided)
    }

    /// The progress line's suffix for round `round` (counted from 1).
    fn label(self, round: usize) -> String {
        match round > self.least {
            true => format!("{round}/{}, more for an undecided row", self.least),
            false => format!("{round}/{}", self.least),
        }
    }
}

#[derive(Default)]
struct Samples {
    agent: Vec<Duration>,
    raw: Vec<Duration>,
    /// libvirt's, where it is measured.
    libvirt: Vec<Duration>,
}

impl Samples {
    /// Whether `goal` lies inside the samples' interval so far.
    fn undecided(&self, goal: f64) -> bool {
        interval::ratio_interval(&millis(&self.agent), &millis(&self.raw))
            .is_some_and(|i| interval::verdict(i, goal) == interval::Verdict::Undecided)
    }

    /// The row with libvirt beside the agent, if it was measured.
    fn libvirt_row(&self, operation: &'static str) -> Option<libvirt::PeerRow> {
        libvirt::PeerRow::new(operation, &self.agent, &self.raw, &self.libvirt)
    }

    fn row(mut self, operation: &'static str, goal: f64) -> Row {
        // Before the samples are sorted: rounds pair by index.
        let ratio_ci95 = interval::ratio_interval(&millis(&self.agent), &millis(&self.raw));
        let agent = stats(&mut self.agent);
        let raw = stats(&mut self.raw);
        Row {
            operation,
            ratio_p50: agent.p50_ms / raw.p50_ms,
            ratio_ci95,
            agent,
            raw,
            goal,
        }
    }
}

fn millis(samples: &[Duration]) -> Vec<f64> {
    samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect()
}

struct AgentProcess {
    child: Child,
    socket: PathBuf,
    cgroup_parent: String,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its instances are stopped by now; only their parent is left.
        for hierarchy in ["", "memory", "cpu"] {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(hierarchy)
                    .join(&self.cgroup_parent),
            );
        }
    }
}

/// A cgroup parent per agent: the source and the target of a migration
/// on one host hold instances of the same name, which must not share a
/// cgroup and its memory limit.
fn cgroup_parent() -> String {
    static AGENTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = AGENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("kvm-agent-bench/{}-{n}", std::process::id())
}

/// The rows that need the test guest: a device's removal, and a busy
/// guest's migrations (on agents of their own).
async fn guest_rows(
    client: &mut NodeAgentClient<Channel>,
    metrics: std::net::SocketAddr,
    binary: &Path,
    work: &Path,
    args: &Args,
) -> anyhow::Result<(Vec<Row>, profile::Profile)> {
    let guest = removal::Guest::locate(args.guest.as_deref())?;
    let removal_rounds = if args.quick { 3 } else { 10 };
    let run_dir = work.join("state").join("run");
    let (removals, removal_profile) =
        removal::measure(client, metrics, &run_dir, work, &guest, removal_rounds).await?;
    let mut rows = vec![removals.row(removal::ROW, GOAL)];
    rows.extend(busy::measure(binary, work, &guest, args.quick).await?);
    Ok((rows, removal_profile))
}

/// Save, restore and migration, plain and encrypted.
async fn transfers(
    binary: &Path,
    work: &Path,
    newer_qemu: Option<&Path>,
    accel: &str,
    args: &Args,
    libvirt: Option<&mut libvirt::Libvirt>,
) -> anyhow::Result<(Vec<Row>, Vec<libvirt::PeerRow>)> {
    let rounds = Rounds::new(if args.quick { 2 } else { 5 }, args.quick);
    let (mut rows, peer_rows) =
        transfer::measure(binary, work, newer_qemu, accel, rounds, libvirt).await?;
    rows.extend(encryption::measure(binary, work, accel, rounds).await?);
    Ok((rows, peer_rows))
}

async fn start_agent(binary: &Path, state: &Path) -> anyhow::Result<AgentProcess> {
    start_agent_with(binary, state, &[]).await
}

/// Starts an agent with `extra` `serve` arguments.
async fn start_agent_with(
    binary: &Path,
    state: &Path,
    extra: &[&std::ffi::OsStr],
) -> anyhow::Result<AgentProcess> {
    let cgroup_parent = cgroup_parent();
    let child = Command::new(binary)
        .arg("serve")
        .args(extra)
        .arg("--state-dir")
        .arg(state)
        .args(["--cgroup-parent", &cgroup_parent])
        .args([
            "--powerdown-timeout-ms",
            &POWERDOWN_WAIT.as_millis().to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let socket = state.join("agent.sock");
    let agent = AgentProcess {
        child,
        socket,
        cgroup_parent,
    };
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(&agent.socket).is_ok() {
            return Ok(agent);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the agent did not come up")
}

/// Draws the charts of an earlier `report.json` into `out`.
fn redraw_charts(report: &Path, out: &Path) -> anyhow::Result<()> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(report)?)?;
    let levels: Vec<scale::Level> = serde_json::from_value(json["scale"].clone())
        .with_context(|| format!("{} has no scale section", report.display()))?;
    std::fs::create_dir_all(out)?;
    write_plots(out, &levels)
}

/// libvirt, when `--peers` asks for it.
async fn libvirt_peer(
    args: &Args,
    work: &Path,
    accel: &str,
) -> anyhow::Result<Option<libvirt::Libvirt>> {
    if !args.peers.contains(&Peer::Libvirt) {
        return Ok(None);
    }
    // libvirt's QEMUs run as a user of their own and open the disk images
    // themselves.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o711))?;
    Ok(Some(libvirt::Libvirt::start(accel).await?))
}

/// Starts an agent that serves its metrics, for the step profiles; returns
/// it with the metrics' address.
async fn start_profiled_agent(
    binary: &Path,
    state: &Path,
) -> anyhow::Result<(AgentProcess, std::net::SocketAddr)> {
    let metrics = free_loopback_address()?;
    let listen = std::ffi::OsString::from(format!("--metrics-listen={metrics}"));
    Ok((start_agent_with(binary, state, &[&listen]).await?, metrics))
}

/// A loopback address with a port nobody listens on now.
fn free_loopback_address() -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// A client on an agent's unix socket.
async fn local_client(
    socket: &Path,
) -> anyhow::Result<
    kvm_agent_proto::v1::node_agent_client::NodeAgentClient<tonic::transport::Channel>,
> {
    let address = kvm_agent::peer::AgentAddress::Unix(socket.to_owned());
    Ok(kvm_agent::peer::connect(&address, None, None).await?)
}

fn spec(name: &str, uuid: &str) -> pb::InstanceSpec {
    pb::InstanceSpec {
        name: name.into(),
        uuid: uuid.into(),
        memory_mib: MEMORY_MIB,
        vcpus: 1,
        ..Default::default()
    }
}

async fn timed<T>(
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(Duration, T)> {
    let t = Instant::now();
    let v = f.await?;
    Ok((t.elapsed(), v))
}

async fn agent_stop(
    client: &mut NodeAgentClient<Channel>,
    name: &str,
    force: bool,
) -> anyhow::Result<()> {
    client
        .stop_instance(pb::StopInstanceRequest {
            name: name.into(),
            force,
            powerdown_timeout_ms: 0,
        })
        .await?;
    Ok(())
}

async fn agent_start(
    client: &mut NodeAgentClient<Channel>,
    spec: &pb::InstanceSpec,
) -> anyhow::Result<u32> {
    Ok(client
        .start_instance(pb::StartInstanceRequest {
            spec: Some(spec.clone()),
            paused: false,
        })
        .await?
        .into_inner()
        .pid)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(report) = &args.charts_from {
        return redraw_charts(report, &args.out);
    }
    let (rounds, rtt_calls) = if args.quick { (5, 200) } else { (20, 1000) };
    let binary = match args.agent.clone() {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("kvm-agent"),
    };
    let work = tempfile::Builder::new().prefix("kab").tempdir()?;
    let (agent, metrics) = start_profiled_agent(&binary, &work.path().join("state")).await?;
    let mut client = local_client(&agent.socket).await?;
    let node = client
        .get_node_info(pb::GetNodeInfoRequest {})
        .await?
        .into_inner();
    let accel = if node.kvm_available { "kvm" } else { "tcg" };
    let uuid = uuid::Uuid::new_v4().to_string();
    let raw_args = machine_args("raw", &uuid::Uuid::new_v4().to_string(), accel, MEMORY_MIB);
    let raw_dir = work.path().join("raw");
    std::fs::create_dir_all(&raw_dir)?;
    let s = spec("bench", &uuid);
    let mut libvirt = libvirt_peer(&args, work.path(), accel).await?;
    let mut setup = operations::Setup {
        client: &mut client,
        spec: &s,
        raw_dir: &raw_dir,
        raw_args: &raw_args,
        agent_image: work.path().join("agent-disk.img"),
        raw_image: work.path().join("raw-disk.img"),
        libvirt_image: work.path().join("libvirt-disk.img"),
        rtt_calls,
        metrics,
        libvirt: libvirt.as_mut(),
    };
    let operations =
        operations::Operations::measure(&mut setup, Rounds::new(rounds, args.quick)).await?;
    let (mut profiles, mut peer_rows) = (operations.profiles(), operations.libvirt_rows());
    let mut rows = operations.rows();
    let (removal_rows, removal_profile) =
        guest_rows(&mut client, metrics, &binary, work.path(), &args).await?;
    rows.extend(removal_rows);
    profiles.push(removal_profile);
    drop(client);
    drop(agent);
    let newer_qemu = args.newer_qemu.as_deref();
    let (transfer_rows, transfer_peer_rows) = transfers(
        &binary,
        work.path(),
        newer_qemu,
        accel,
        &args,
        libvirt.as_mut(),
    )
    .await?;
    rows.extend(transfer_rows);
    peer_rows.extend(transfer_peer_rows);
    drop(libvirt);
    let (takeover_rows, takeover_pauses) =
        takeover::measure(&binary, work.path(), rounds.min(10)).await?;
    rows.extend(takeover_rows);
    let (load, scale) = load_and_scale(&binary, work.path(), args.quick).await?;
    write_report(
        &args.out,
        &node,
        accel,
        rounds,
        &Results {
            operations: rows,
            profiles,
            libvirt: peer_rows,
            takeover_pauses,
            load,
            scale,
        },
    )
}

/// The read load and the scale sweep, each on agents of their own.
async fn load_and_scale(
    binary: &Path,
    work: &Path,
    quick: bool,
) -> anyhow::Result<(load::LoadReport, Vec<scale::Level>)> {
    let load_time = Duration::from_secs(if quick { 3 } else { 10 });
    eprintln!("read load: {LOAD_CLIENTS} clients, {LOAD_INSTANCES} instances");
    let load = load::measure(binary, work, LOAD_INSTANCES, LOAD_CLIENTS, load_time).await?;
    let (levels, read_time, settle): (&[usize], _, _) = if quick {
        (&[5, 10], Duration::from_secs(2), Duration::from_secs(3))
    } else {
        (
            &[10, 50, 100],
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
    };
    let scale = scale::measure(binary, work, levels, read_time, settle).await?;
    Ok((load, scale))
}

/// The read load test: this many concurrent clients against this many
/// running instances.
const LOAD_CLIENTS: usize = 200;
const LOAD_INSTANCES: usize = 20;

/// Everything one run measured.
#[derive(Debug, Serialize)]
struct Results {
    operations: Vec<Row>,
    /// Where the time of a start and of the hot-adds goes.
    profiles: Vec<profile::Profile>,
    /// libvirt beside the agent, where it was measured.
    libvirt: Vec<libvirt::PeerRow>,
    /// Guests stopped while the agent took their QEMU over from Ganeti's
    /// KVM driver (the goal is none).
    takeover_pauses: takeover::Pauses,
    load: load::LoadReport,
    scale: Vec<scale::Level>,
}

pub(crate) fn yes_no(met: bool) -> &'static str {
    if met { "yes" } else { "**no**" }
}

fn write_report(
    out: &Path,
    node: &pb::NodeInfo,
    accel: &str,
    rounds: usize,
    results: &Results,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let machine = serde_json::json!({
        "hostname": node.hostname,
        "kernel": kernel.trim(),
        "cpus": node.cpus,
        "memory_total_mib": node.memory_total_mib,
        "qemu": node.qemu_version,
        "accelerator": accel,
        "memory_per_instance_mib": MEMORY_MIB,
        "rounds": rounds,
    });
    let mut json = serde_json::to_value(results)?;
    json["machine"] = machine;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;

    let mut md = String::new();
    md.push_str("# kvm-agent benchmark\n\n");
    md.push_str(&format!(
        "{} CPUs, kernel {}, {}, accelerator {accel}, {MEMORY_MIB} MiB per instance, {rounds} rounds of the operations and fewer of the saves and migrations, each up to twice as many while a row's goal lies inside its interval (report.json has each row's count and every round's time); agent and raw interleaved in the same run.\n\n",
        node.cpus,
        kernel.trim(),
        node.qemu_version
    ));
    operations_table(&mut md, &results.operations);
    md.push_str(&format!(
        "\nTaking over a QEMU that Ganeti's own KVM driver started (daemonized with its command line, pidfile, monitors and runtime file) is measured against what a direct driver does at least to take one over: check the pid's command line, connect QMP, ask `query-status` and `query-pci`. The {} at once are one AdoptGanetiInstances call against that done for each in turn. A second monitor on each QEMU watched {} takeovers of one: the guest stopped {} times (goal: never).\n",
        takeover::NODE_INSTANCES,
        results.takeover_pauses.watched,
        results.takeover_pauses.stops
    ));
    profile::section(&mut md, &results.profiles);
    libvirt::section(&mut md, &results.libvirt);
    load_section(&mut md, &results.load);
    scale_section(&mut md, &results.scale);
    goals_section(&mut md, results);
    write_plots(out, &results.scale)?;
    std::fs::write(out.join("report.md"), &md)?;
    print!("{md}");
    Ok(())
}

fn operations_table(md: &mut String, rows: &[Row]) {
    md.push_str("| operation | agent p50 / p90 / max (ms) | raw p50 / p90 / max (ms) | agent/raw p50 [95% interval] | goal |\n|---|---|---|---|---|\n");
    for r in rows {
        let goal = if r.goal.is_nan() {
            "—".to_owned()
        } else {
            format!("≤ {:.2}", r.goal)
        };
        let verdict = match r.verdict() {
            Some(interval::Verdict::Missed) => " ✗",
            Some(interval::Verdict::Undecided) => " ?",
            _ => "",
        };
        let interval = r
            .ratio_ci95
            .map(|(low, high)| format!(" [{low:.2}–{high:.2}]"))
            .unwrap_or_default();
        md.push_str(&format!(
            "| {} | {:.3} / {:.3} / {:.3} | {:.3} / {:.3} / {:.3} | {:.2}{interval}{verdict} | {goal} |\n",
            r.operation,
            r.agent.p50_ms,
            r.agent.p90_ms,
            r.agent.max_ms,
            r.raw.p50_ms,
            r.raw.p90_ms,
            r.raw.max_ms,
            r.ratio_p50
        ));
    }
    md.push_str(&format!(
        "\nThe interval is a bootstrap over the rounds, each resampled with its agent and raw halves together, since both ran in the same moment of a shared machine. A row misses its goal (✗) only when the whole interval lies above it; ? marks a goal inside the interval, where more rounds would tell. Graceful stops and soft reboots include a {} ms powerdown wait on both sides (the guests have no OS, so the ACPI request is ignored). The raw side speaks QMP directly over the same kind of socket, with the same argv. Device removal boots the test guest under TCG on each side, since only a guest releases a device. Hot-adds go into instances whose firmware is done: the guests have no OS, and SeaBIOS keeps the vCPU busy for its first seconds (POST, then every boot device), so the agent's instance and the raw QEMU start together and each hot-add waits until both use under a tenth of a CPU over 200 ms; libvirt's domain waits the same way.\n",
        POWERDOWN_WAIT.as_millis()
    ));
}

fn load_section(md: &mut String, load: &load::LoadReport) {
    md.push_str(&format!(
        "\n## Read load\n\n{} clients, each on its own connection, alternate GetInstance and ListInstances for {:.0} s against {} running instances (TCG, {} MiB each).\n\n",
        load.clients, load.seconds, load.instances, load::LOAD_MEMORY_MIB
    ));
    md.push_str(
        "| call | calls | errors | p50 (ms) | p99 (ms) | max (ms) |\n|---|---|---|---|---|---|\n",
    );
    for (call, s) in [
        ("GetInstance", &load.get_instance),
        ("ListInstances", &load.list_instances),
    ] {
        md.push_str(&format!(
            "| {call} | {} | {} | {:.3} | {:.3} | {:.3} |\n",
            s.calls, s.errors, s.p50_ms, s.p99_ms, s.max_ms
        ));
    }
    md.push_str(&format!(
        "\nThe agent's peak RSS during this test: {:.1} MiB.\n",
        load.agent_peak_rss_mib
    ));
}

fn scale_section(md: &mut String, levels: &[scale::Level]) {
    md.push_str(&format!(
        "\n## Scale\n\nAt each level, N instances (TCG, {} MiB, no OS) are started {} at a time, raw QEMU first and then through the agent. Once the fresh QEMUs' firmware has settled, {} clients alternate GetInstance and ListInstances, first paced (each client one pair per {} ms) and then back to back. Back to back, the two cores are saturated and latency is mostly time spent in line: by Little's law it is the client count over the throughput. Then the agent is killed with SIGKILL and started again on the same state directory, and all instances are force-stopped at once. Growth compares the last level with the first; it is linear or better when it is at most the growth of the instance count. Where raw QEMU does the same work (starting and stopping them all), growth no faster than raw's also passes: then the machine, not the agent, sets the pace.\n\n",
        load::LOAD_MEMORY_MIB,
        scale::START_BATCH,
        scale::SCALE_CLIENTS,
        scale::PACE.as_millis(),
    ));
    md.push_str("| figure |");
    for l in levels {
        md.push_str(&format!(" {} |", l.instances));
    }
    md.push_str(" growth | linear or better |\n|---|");
    md.push_str(&"---|".repeat(levels.len() + 2));
    md.push('\n');
    for f in &FIGURES {
        md.push_str(&format!("| {} |", f.label));
        for l in levels {
            md.push_str(&format!(" {:.2} |", (f.value)(l)));
        }
        match growth(levels, f) {
            Some(g) if f.kind == FigureKind::Agent => {
                let met = yes_no(g.linear_or_as_raw());
                match g.raw {
                    Some(raw) => {
                        md.push_str(&format!(" ×{:.2} | {met} (raw ×{raw:.2}) |\n", g.grew))
                    }
                    None => md.push_str(&format!(" ×{:.2} | {met} |\n", g.grew)),
                }
            }
            Some(g) => md.push_str(&format!(" ×{:.2} | (context) |\n", g.grew)),
            None => md.push_str(" — | — |\n"),
        }
    }
    md.push_str("\n![paced read latency against instance count](scale-latency-paced.svg)\n\n![back-to-back read latency against instance count](scale-latency-saturated.svg)\n\n![start time against instance count](scale-start.svg)\n\n![stop and adoption time against instance count](scale-stop-adopt.svg)\n");
    scale::stop_section(md, levels);
}

fn goals_section(md: &mut String, results: &Results) {
    md.push_str("\n## Goals\n\nA latency under load is given with its 95% interval, a bootstrap over the seconds of the read run (a stall of the machine delays every call made during it); like a ratio, it misses its goal (**no**) only when the whole interval lies above it, and ? marks a goal inside the interval.\n\n| goal | measured | met |\n|---|---|---|\n");
    let ratio_rows: Vec<&Row> = results
        .operations
        .iter()
        .filter(|r| !r.goal.is_nan())
        .collect();
    let judged = |verdict: interval::Verdict| -> Vec<&str> {
        ratio_rows
            .iter()
            .filter(|r| r.verdict() == Some(verdict))
            .map(|r| r.operation)
            .collect()
    };
    let (missed, undecided) = (
        judged(interval::Verdict::Missed),
        judged(interval::Verdict::Undecided),
    );
    let listed = |what: &str, rows: &[&str]| match rows.is_empty() {
        true => String::new(),
        false => format!("; {what}: {}", rows.join(", ")),
    };
    md.push_str(&format!(
        "| agent/raw p50 ≤ 1.10 for every operation, the 95% interval above it being a miss | {} of {} rows{}{} | {} |\n",
        ratio_rows.len() - missed.len(),
        ratio_rows.len(),
        listed("over", &missed),
        listed("undecided", &undecided),
        yes_no(missed.is_empty())
    ));
    if let Some(top) = results.scale.last() {
        scale::goals(md, top);
    }
    let growths: Vec<(&str, bool)> = FIGURES
        .iter()
        .filter(|f| f.kind == FigureKind::Agent)
        .filter_map(|f| growth(&results.scale, f).map(|g| (f.label, g.linear_or_as_raw())))
        .collect();
    let faster: Vec<&str> = growths.iter().filter(|g| !g.1).map(|g| g.0).collect();
    md.push_str(&format!(
        "| no figure grows faster than linearly, or than raw QEMU's for the same work | {} of {} figures{} | {} |\n",
        growths.len() - faster.len(),
        growths.len(),
        if faster.is_empty() {
            String::new()
        } else {
            format!("; faster: {}", faster.join(", "))
        },
        yes_no(faster.is_empty())
    ));
}

fn write_plots(out: &Path, levels: &[scale::Level]) -> anyhow::Result<()> {
    let line = |label, value: fn(&scale::Level) -> f64| plot::Series {
        label,
        points: levels
            .iter()
            .map(|l| (l.instances as f64, value(l)))
            .collect(),
    };
    let clients = scale::SCALE_CLIENTS;
    let charts = [
        (
            "scale-latency-paced.svg",
            format!(
                "Reads, {clients} clients each calling every {} ms",
                scale::PACE.as_millis()
            ),
            "latency (ms)",
            vec![
                line("GetInstance p50", |l| l.get_instance_paced.p50_ms),
                line("GetInstance p99", |l| l.get_instance_paced.p99_ms),
                line("ListInstances p50", |l| l.list_instances_paced.p50_ms),
                line("ListInstances p99", |l| l.list_instances_paced.p99_ms),
            ],
        ),
        (
            "scale-latency-saturated.svg",
            format!("Reads, {clients} clients back to back"),
            "latency (ms)",
            vec![
                line("GetInstance p50", |l| l.get_instance.p50_ms),
                line("GetInstance p99", |l| l.get_instance.p99_ms),
                line("ListInstances p50", |l| l.list_instances.p50_ms),
                line("ListInstances p99", |l| l.list_instances.p99_ms),
            ],
        ),
        (
            "scale-start.svg",
            "Starting every instance".to_owned(),
            "time (ms)",
            vec![
                line("agent", |l| l.start_all.agent_ms),
                line("raw QEMU", |l| l.start_all.raw_ms),
            ],
        ),
        (
            "scale-stop-adopt.svg",
            "Stopping every instance, adopting every instance".to_owned(),
            "time (ms)",
            vec![
                line("stop all (agent)", |l| l.stop_all.agent_ms),
                line("stop all (raw)", |l| l.stop_all.raw_ms),
                line("adopt all after kill -9", |l| l.reconcile_ms),
            ],
        ),
    ];
    for (file, title, y_label, series) in charts {
        let chart = plot::line_chart(&title, "instances", y_label, &series);
        std::fs::write(out.join(file), chart)?;
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_undecided_row_gets_more_rounds_up_to_twice_as_many() {
        let rounds = Rounds::new(5, false);

        assert!(rounds.another(4, false));
        assert!(!rounds.another(5, false));
        assert!(rounds.another(5, true));
        assert!(rounds.another(9, true));
        assert!(!rounds.another(10, true));
        assert_eq!(rounds.label(6), "6/5, more for an undecided row");
    }

    #[test]
    fn a_quick_run_takes_no_more_rounds() {
        let rounds = Rounds::new(2, true);

        assert!(rounds.another(1, true));
        assert!(!rounds.another(2, true));
        assert_eq!(rounds.label(2), "2/2");
    }
}
