//! The operations every round measures on one instance, each through the
//! agent and then driven raw against QEMU, alternating so both see the
//! same machine state.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

use crate::libvirt::{Libvirt, PeerRow};
use crate::profile::{
    self, DISK_STEPS, NIC_STEPS, Profile, RawSteps, START_STEPS, StepSums, mean_ms,
};
use crate::raw::RawQemu;
use crate::{
    GOAL, MEMORY_MIB, POWERDOWN_WAIT, Rounds, Row, Samples, agent_start, agent_stop, settle, timed,
};

/// What the rounds run against: the agent's instance and the raw QEMU's
/// command line, each with a disk image to hot-add.
pub struct Setup<'a> {
    pub client: &'a mut NodeAgentClient<Channel>,
    pub spec: &'a pb::InstanceSpec,
    pub raw_dir: &'a Path,
    pub raw_args: &'a [String],
    pub agent_image: PathBuf,
    pub raw_image: PathBuf,
    pub libvirt_image: PathBuf,
    /// Round trips timed per round.
    pub rtt_calls: u32,
    /// The agent's metrics endpoint, where its step timings are.
    pub metrics: SocketAddr,
    /// libvirt, when it is measured too.
    pub libvirt: Option<&'a mut Libvirt>,
}

/// The samples of every operation, agent beside raw.
#[derive(Default)]
pub struct Operations {
    start: Samples,
    stop_force: Samples,
    stop_quit: Samples,
    soft: Samples,
    reset: Samples,
    rtt: Samples,
    /// One round trip after the machine idled for [`IDLE_GAP`].
    idle_rtt: Samples,
    nic_add: Samples,
    disk_add: Samples,
    /// The agent's step timings before the rounds and after.
    agent_steps: (StepSums, StepSums),
    /// The same, summed over scrapes just before and after each start of
    /// the start row: other rows start instances too, but only this row's
    /// starts are timed by the client.
    start_steps: (StepSums, StepSums),
    raw_start: RawSteps,
    raw_nic: RawSteps,
    raw_disk: RawSteps,
}

impl Operations {
    /// Runs `rounds` of every operation, more while a row's interval
    /// still holds its goal.
    pub async fn measure(setup: &mut Setup<'_>, rounds: Rounds) -> anyhow::Result<Self> {
        for image in [&setup.agent_image, &setup.raw_image, &setup.libvirt_image] {
            std::fs::File::create(image)?.set_len(16 << 20)?;
        }
        let mut ops = Self::default();
        ops.agent_steps.0 = profile::scrape(setup.metrics).await?;
        let mut round = 0;
        while rounds.another(round, ops.undecided()) {
            round += 1;
            eprintln!("round {}", rounds.label(round));
            ops.starts_and_stops(setup).await?;
            ops.reboots_and_round_trips(setup).await?;
            ops.hot_adds(setup, round as u32).await?;
        }
        ops.agent_steps.1 = profile::scrape(setup.metrics).await?;
        Ok(ops)
    }

    /// Whether a row with a goal has that goal inside its interval.
    fn undecided(&self) -> bool {
        [
            &self.start,
            &self.stop_force,
            &self.stop_quit,
            &self.soft,
            &self.reset,
            &self.nic_add,
            &self.disk_add,
        ]
        .iter()
        .any(|s| s.undecided(GOAL))
    }

    /// Start → QMP ready, then a forced and a graceful (powerdown, wait,
    /// quit) stop.
    async fn starts_and_stops(&mut self, s: &mut Setup<'_>) -> anyhow::Result<()> {
        let before = profile::scrape(s.metrics).await?;
        // The scrape woke the agent; a start comes after a quiet moment.
        tokio::time::sleep(IDLE_GAP).await;
        let (t, _) = timed(agent_start(s.client, s.spec)).await?;
        self.start.agent.push(t);
        let after = profile::scrape(s.metrics).await?;
        profile::add_sums(&mut self.start_steps.0, &before);
        profile::add_sums(&mut self.start_steps.1, &after);
        let (t, _) = timed(agent_stop(s.client, "bench", true)).await?;
        self.stop_force.agent.push(t);
        let (t, mut q) = timed(RawQemu::start(s.raw_dir, s.raw_args)).await?;
        self.start.raw.push(t);
        self.raw_start.add(q.take_steps());
        let (t, _) = timed(q.kill()).await?;
        self.stop_force.raw.push(t);

        agent_start(s.client, s.spec).await?;
        let (t, _) = timed(agent_stop(s.client, "bench", false)).await?;
        self.stop_quit.agent.push(t);
        let q = RawQemu::start(s.raw_dir, s.raw_args).await?;
        let (t, _) = timed(q.stop_graceful(POWERDOWN_WAIT)).await?;
        self.stop_quit.raw.push(t);

        if let Some(libvirt) = s.libvirt.as_deref_mut() {
            let t = libvirt
                .start_domain("bench-libvirt", MEMORY_MIB, None)
                .await?;
            self.start.libvirt.push(t);
            libvirt.destroy("bench-libvirt").await?;
        }
        Ok(())
    }

    /// Soft reboot, reset and round trips on a running instance.
    async fn reboots_and_round_trips(&mut self, s: &mut Setup<'_>) -> anyhow::Result<()> {
        agent_start(s.client, s.spec).await?;
        let (t, _) = timed(reboot(s.client, pb::RebootMode::Soft)).await?;
        self.soft.agent.push(t);
        let (t, _) = timed(reboot(s.client, pb::RebootMode::Reset)).await?;
        self.reset.agent.push(t);
        let t0 = Instant::now();
        for _ in 0..s.rtt_calls {
            s.client.get_instance(bench_instance()).await?;
        }
        self.rtt.agent.push(t0.elapsed() / s.rtt_calls);
        let mut idle = Duration::ZERO;
        for _ in 0..IDLE_CALLS {
            tokio::time::sleep(IDLE_GAP).await;
            let read = async { Ok(s.client.get_instance(bench_instance()).await?) };
            idle += timed(read).await?.0;
        }
        self.idle_rtt.agent.push(idle / IDLE_CALLS);
        agent_stop(s.client, "bench", true).await?;

        let q = RawQemu::start(s.raw_dir, s.raw_args).await?;
        let (t, mut q) = timed(async {
            q.stop_graceful(POWERDOWN_WAIT).await?;
            RawQemu::start(s.raw_dir, s.raw_args).await
        })
        .await?;
        self.soft.raw.push(t);
        let (t, _) = timed(q.execute_until_event("system_reset", "RESET")).await?;
        self.reset.raw.push(t);
        let t0 = Instant::now();
        for _ in 0..s.rtt_calls {
            q.execute("query-status").await?;
        }
        self.rtt.raw.push(t0.elapsed() / s.rtt_calls);
        let mut idle = Duration::ZERO;
        for _ in 0..IDLE_CALLS {
            tokio::time::sleep(IDLE_GAP).await;
            idle += timed(q.execute("query-status")).await?.0;
        }
        self.idle_rtt.raw.push(idle / IDLE_CALLS);
        q.kill().await?;
        if let Some(libvirt) = s.libvirt.as_deref_mut() {
            libvirt
                .start_domain("bench-libvirt", MEMORY_MIB, None)
                .await?;
            let t = libvirt.state_reads("bench-libvirt", s.rtt_calls).await?;
            self.rtt.libvirt.push(t);
            libvirt.destroy("bench-libvirt").await?;
        }
        Ok(())
    }

    /// Hot-add of a NIC and a disk into a running instance, once its
    /// firmware is done (see `settle`). The agent's instance and the raw
    /// QEMU start and settle together; then each is measured in turn.
    async fn hot_adds(&mut self, s: &mut Setup<'_>, round: u32) -> anyhow::Result<()> {
        let pid = agent_start(s.client, s.spec).await?;
        let mut q = RawQemu::start(s.raw_dir, s.raw_args).await?;
        // Only the start row's starts are profiled, as on the agent's side.
        q.take_steps();
        settle::until_idle(&[pid, q.pid()?]).await?;

        let nic = pb::NicSpec {
            name: "hp-nic".into(),
            mac: "52:54:00:98:00:01".into(),
            ..Default::default()
        };
        let request = pb::AddNicRequest {
            name: "bench".into(),
            nic: Some(nic),
        };
        let (t, _) = timed(async { Ok(s.client.add_nic(request).await?) }).await?;
        self.nic_add.agent.push(t);
        let disk = pb::DiskSpec {
            name: "hp-disk".into(),
            path: s.agent_image.display().to_string(),
            cache: pb::DiskCache::Writeback as i32,
            ..Default::default()
        };
        let request = pb::AddDiskRequest {
            name: "bench".into(),
            disk: Some(disk),
        };
        let (t, _) = timed(async { Ok(s.client.add_disk(request).await?) }).await?;
        self.disk_add.agent.push(t);
        // The next start regenerates the runtime from the spec, which has
        // no devices, so hotplugged ones don't pile up across rounds.
        agent_stop(s.client, "bench", true).await?;

        // Slot 3 holds the balloon, as in the agent's instance.
        let (t, tap) = timed(q.add_nic(round, 4)).await?;
        self.nic_add.raw.push(t);
        self.raw_nic.add(q.take_steps());
        let (t, _) = timed(q.add_disk(round, 5, &s.raw_image)).await?;
        self.disk_add.raw.push(t);
        self.raw_disk.add(q.take_steps());
        q.kill().await?;
        drop(tap);

        if let Some(libvirt) = s.libvirt.as_deref_mut() {
            libvirt
                .start_domain("bench-libvirt", MEMORY_MIB, None)
                .await?;
            let pid = crate::libvirt::domain_pid("bench-libvirt")?;
            settle::until_idle(&[pid]).await?;
            let t = libvirt.add_nic("bench-libvirt", round, 4).await?;
            self.nic_add.libvirt.push(t);
            let t = libvirt
                .add_disk("bench-libvirt", round, 5, &s.libvirt_image)
                .await?;
            self.disk_add.libvirt.push(t);
            libvirt.destroy("bench-libvirt").await?;
        }
        Ok(())
    }

    /// Where the time of a start and of each hot-add went, on both sides.
    pub fn profiles(&self) -> Vec<Profile> {
        [
            (
                "start → QMP ready",
                "start",
                START_STEPS,
                &self.start_steps,
                &self.start,
                &self.raw_start,
            ),
            (
                "NIC hot-add",
                "add-nic",
                NIC_STEPS,
                &self.agent_steps,
                &self.nic_add,
                &self.raw_nic,
            ),
            (
                "disk hot-add",
                "add-disk",
                DISK_STEPS,
                &self.agent_steps,
                &self.disk_add,
                &self.raw_disk,
            ),
        ]
        .into_iter()
        .map(
            |(operation, op, order, (before, after), samples, raw)| Profile {
                operation,
                agent: profile::agent_steps(before, after, op, order),
                agent_total_ms: mean_ms(&samples.agent),
                agent_operation_ms: profile::operation_ms(before, after, op),
                raw: raw.means(),
                raw_total_ms: mean_ms(&samples.raw),
            },
        )
        .collect()
    }

    /// The rows with libvirt beside the agent, when it was measured.
    pub fn libvirt_rows(&self) -> Vec<PeerRow> {
        [
            ("start → running", &self.start),
            (
                "state read (GetInstance, query-status, dom.state())",
                &self.rtt,
            ),
            ("NIC hot-add", &self.nic_add),
            ("disk hot-add", &self.disk_add),
        ]
        .into_iter()
        .filter_map(|(operation, samples)| samples.libvirt_row(operation))
        .collect()
    }

    /// The report's rows, with each operation's goal.
    pub fn rows(self) -> Vec<Row> {
        vec![
            self.start.row("start → QMP ready", GOAL),
            self.stop_force.row("stop (force)", GOAL),
            self.stop_quit.row("stop (powerdown, quit)", GOAL),
            self.soft.row("soft reboot", GOAL),
            self.reset.row("reset (system_reset → RESET)", GOAL),
            self.rtt
                .row("GetInstance vs query-status round trip", f64::NAN),
            self.idle_rtt.row(IDLE_ROW, f64::NAN),
            self.nic_add.row("NIC hot-add", GOAL),
            self.disk_add.row("disk hot-add", GOAL),
        ]
    }
}

/// The quiet before each idle round trip: long enough for the CPUs to
/// sleep, as they do before most calls a cluster makes.
const IDLE_GAP: Duration = Duration::from_millis(50);
/// Idle round trips timed per round.
const IDLE_CALLS: u32 = 5;
/// The idle round trip's row.
const IDLE_ROW: &str = "GetInstance vs query-status after 50 ms idle";

fn bench_instance() -> pb::GetInstanceRequest {
    pb::GetInstanceRequest {
        name: "bench".into(),
    }
}

async fn reboot(client: &mut NodeAgentClient<Channel>, mode: pb::RebootMode) -> anyhow::Result<()> {
    client
        .reboot_instance(pb::RebootInstanceRequest {
            name: "bench".into(),
            mode: mode as i32,
            spec: None,
            ..Default::default()
        })
        .await?;
    Ok(())
}
