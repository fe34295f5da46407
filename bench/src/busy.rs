//! A guest that dirties memory faster than its link carries it: the test
//! guest rewrites 16 MiB of random bytes in a loop while it migrates
//! under a cap it outruns, once with auto-converge throttling it and once
//! switching to postcopy when precopy stalls. Through two agents, and
//! between two raw QEMUs driven by the same rules (the agent's own stall
//! rule, `hypervisor::migration::convergence`), each from a fresh boot.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use hypervisor::migration::MigrationStatus;
use hypervisor::migration::convergence::ConvergenceWatch;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::raw::RawQemu;
use crate::removal::{GUEST_MEMORY_MIB, Guest, wait_ready};
use crate::{Row, Samples};

/// The link the guest outruns, in bytes a second.
const LINK: u64 = 8 << 20;
/// Passes without progress before precopy counts as stalled.
const STALLED_PASSES: u32 = 3;
const RAW_PORT: u16 = 49410;
/// Starts the loop; what it prints once it runs is not in its own echo.
const BUSY: &str = "dd if=/dev/urandom of=/tmp/blob bs=1M count=16 2>/dev/null; \
                    (while true; do cp /tmp/blob /tmp/copy; done) >/dev/null 2>&1 & \
                    echo BUSY-$((40+2))\n";
const BUSY_STARTED: &str = "BUSY-42";

/// How the busy guest is made to move.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Throttled from 50% by 25% a pass, with 1.5 s of downtime allowed.
    AutoConverge,
    /// Precopy until it stalls, then postcopy.
    Postcopy,
}

impl Mode {
    fn options(self, link: u64) -> pb::MigrationOptions {
        let common = pb::MigrationOptions {
            max_bandwidth: link,
            ..Default::default()
        };
        match self {
            Mode::AutoConverge => pb::MigrationOptions {
                auto_converge: Some(true),
                throttle_initial_percent: 50,
                throttle_increment_percent: 25,
                downtime_limit_ms: 1500,
                ..common
            },
            Mode::Postcopy => pb::MigrationOptions {
                auto_converge: Some(false),
                postcopy: true,
                stalled_passes_limit: STALLED_PASSES,
                ..common
            },
        }
    }
}

/// Has the guest behind the serial console at `socket` start its loop.
async fn make_busy(socket: &Path) -> anyhow::Result<()> {
    let mut console = UnixStream::connect(socket).await?;
    console.write_all(BUSY.as_bytes()).await?;
    let mut seen = Vec::new();
    let started = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains(BUSY_STARTED) {
            let n = console.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "the guest's console closed");
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await;
    started
        .map_err(|_| anyhow::anyhow!("the guest never started its loop"))?
        .with_context(|| String::from_utf8_lossy(&seen).into_owned())
}

/// A busy guest's migration between the agents: total time and downtime.
async fn through_agents(
    clients: &mut [NodeAgentClient<Channel>; 2],
    run_dir: &Path,
    target: &Path,
    guest: &Guest,
    mode: Mode,
    link: u64,
    name: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let spec = pb::InstanceSpec {
        name: name.into(),
        uuid: uuid::Uuid::new_v4().to_string(),
        memory_mib: GUEST_MEMORY_MIB,
        vcpus: 1,
        accelerator: pb::Accelerator::Tcg as i32,
        serial_console: true,
        boot: Some(guest.boot()),
        ..Default::default()
    };
    clients[0]
        .start_instance(pb::StartInstanceRequest {
            spec: Some(spec),
            paused: false,
        })
        .await?;
    let serial = run_dir.join(name).join("serial.sock");
    wait_ready(&serial).await?;
    make_busy(&serial).await?;
    let started = Instant::now();
    let mut stream = clients[0]
        .migrate_instance(pb::MigrateInstanceRequest {
            name: name.into(),
            target: format!("unix:{}", target.display()),
            options: Some(mode.options(link)),
        })
        .await?
        .into_inner();
    let (mut last, mut switched) = (None, false);
    while let Some(progress) = stream.next().await {
        let progress = progress?;
        switched |= progress.postcopy;
        last = Some(progress);
    }
    let total = started.elapsed();
    let last = last.context("no progress")?;
    anyhow::ensure!(
        last.phase == pb::MigrationPhase::Completed as i32 && switched == (mode == Mode::Postcopy),
        "the migration went otherwise than asked: {last:?}"
    );
    clients[1]
        .stop_instance(pb::StopInstanceRequest {
            name: name.into(),
            force: true,
            ..Default::default()
        })
        .await?;
    Ok((total, Duration::from_millis(last.downtime_ms)))
}

/// The raw QEMU's argv in `dir`, with the test guest and its console.
fn raw_args(dir: &Path, guest: &Guest) -> Vec<String> {
    guest.raw_args("raw-busy", &dir.join("serial.sock"))
}

/// Sets migration capabilities on a raw QEMU.
async fn capabilities(qemu: &mut RawQemu, names: &[&str]) -> anyhow::Result<()> {
    let capabilities: Vec<_> = names
        .iter()
        .map(|name| json!({ "capability": name, "state": true }))
        .collect();
    qemu.execute_args(
        "migrate-set-capabilities",
        json!({ "capabilities": capabilities }),
        None,
    )
    .await
    .map(drop)
}

/// The same migration between two raw QEMUs, as a direct driver with the
/// agent's rules would run it.
async fn raw(
    work: &Path,
    guest: &Guest,
    mode: Mode,
    link: u64,
) -> anyhow::Result<(Duration, Duration)> {
    let (dir_a, dir_b) = (work.join("raw-busy-a"), work.join("raw-busy-b"));
    std::fs::create_dir_all(&dir_a)?;
    std::fs::create_dir_all(&dir_b)?;
    let mut source = RawQemu::start(&dir_a, &raw_args(&dir_a, guest)).await?;
    wait_ready(&dir_a.join("serial.sock")).await?;
    make_busy(&dir_a.join("serial.sock")).await?;
    let started = Instant::now();
    let mut incoming = raw_args(&dir_b, guest);
    incoming.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    let mut target = RawQemu::start(&dir_b, &incoming).await?;
    let uri = format!("tcp:127.0.0.1:{RAW_PORT}");
    let options = mode.options(link);
    let mut parameters = json!({ "max-bandwidth": link });
    match mode {
        Mode::AutoConverge => {
            capabilities(&mut source, &["auto-converge"]).await?;
            parameters["downtime-limit"] = options.downtime_limit_ms.into();
            parameters["cpu-throttle-initial"] = options.throttle_initial_percent.into();
            parameters["cpu-throttle-increment"] = options.throttle_increment_percent.into();
        }
        Mode::Postcopy => {
            capabilities(&mut target, &["postcopy-ram"]).await?;
            capabilities(&mut source, &["postcopy-ram"]).await?;
            parameters["max-postcopy-bandwidth"] = link.into();
        }
    }
    target
        .execute_args("migrate-incoming", json!({ "uri": uri }), None)
        .await?;
    source
        .execute_args("migrate-set-parameters", parameters, None)
        .await?;
    source
        .execute_args("migrate", json!({ "uri": uri }), None)
        .await?;
    let downtime = follow(&mut source, &mut target, mode).await?;
    source.quit().await?;
    let total = started.elapsed();
    target.kill().await?;
    Ok((total, downtime))
}

/// Polls the source as the agent does, switching to postcopy at a stall,
/// and resumes the target when it has the guest; returns the downtime.
async fn follow(
    source: &mut RawQemu,
    target: &mut RawQemu,
    mode: Mode,
) -> anyhow::Result<Duration> {
    let mut watch = ConvergenceWatch::new(STALLED_PASSES, mode == Mode::AutoConverge);
    let mut switched = false;
    let mut resumed = false;
    loop {
        let reply = source.execute("query-migrate").await?;
        let status = MigrationStatus::from_query(&reply["return"]);
        if watch.observe(&status).is_some() && mode == Mode::Postcopy && !switched {
            source.execute("migrate-start-postcopy").await?;
            switched = true;
        }
        match status.status.as_str() {
            "postcopy-active" if !resumed => {
                target.execute("cont").await?;
                resumed = true;
            }
            "completed" => {
                if !resumed {
                    target.wait_migration().await?;
                    target.execute("cont").await?;
                }
                return Ok(Duration::from_millis(
                    reply["return"]["downtime"].as_u64().unwrap_or(0),
                ));
            }
            "failed" | "cancelled" => anyhow::bail!("raw migration ended: {}", reply["return"]),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lets the agents' unprivileged QEMUs receive in postcopy, which needs
/// userfaultfd.
fn allow_postcopy() -> anyhow::Result<()> {
    let setting = hypervisor::migration::UNPRIVILEGED_USERFAULTFD;
    if std::fs::read_to_string(setting)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(setting, "1\n").with_context(|| {
        format!("the postcopy rows need {setting} set to 1, and it can't be set (run as root)")
    })
}

/// The rows: each mode's total time and downtime, agent against raw.
/// `quick`: one round, on a link 4 times as fast, which the guest still
/// outruns.
pub async fn measure(
    binary: &Path,
    work: &Path,
    guest: &Guest,
    quick: bool,
) -> anyhow::Result<Vec<Row>> {
    let (rounds, link) = if quick { (1, 4 * LINK) } else { (3, LINK) };
    allow_postcopy()?;
    let (a, b) = (
        crate::start_agent(binary, &work.join("agent-busy-a")).await?,
        crate::start_agent(binary, &work.join("agent-busy-b")).await?,
    );
    let mut clients = [
        crate::local_client(&a.socket).await?,
        crate::local_client(&b.socket).await?,
    ];
    let run_dir = work.join("agent-busy-a").join("run");
    let mut rows = Vec::new();
    for (mode, label, downtime_label) in [
        (
            Mode::AutoConverge,
            "busy guest, auto-converge (total)",
            "busy guest, auto-converge: downtime",
        ),
        (
            Mode::Postcopy,
            "busy guest, postcopy after a stall (total)",
            "busy guest, postcopy: downtime",
        ),
    ] {
        let (mut total, mut downtime) = (Samples::default(), Samples::default());
        for round in 0..rounds {
            eprintln!("{label} round {}/{rounds}", round + 1);
            let name = format!("busy-{}-{round}", mode as u8);
            let (t, d) =
                through_agents(&mut clients, &run_dir, &b.socket, guest, mode, link, &name).await?;
            total.agent.push(t);
            downtime.agent.push(d);
            let (t, d) = raw(work, guest, mode, link).await?;
            total.raw.push(t);
            downtime.raw.push(d);
        }
        rows.push(total.row(label, crate::GOAL));
        rows.push(downtime.row(downtime_label, f64::NAN));
    }
    Ok(rows)
}
