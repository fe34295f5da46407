//! Taking over QEMUs that Ganeti's own KVM driver started: one at a time,
//! and a whole node's worth in one call, against what a direct driver must
//! do at least to take over a running QEMU (check its pid, connect QMP,
//! ask its state and devices). The guest must not stop meanwhile: a second
//! monitor on each QEMU, as Ganeti's `kvmd` has, counts the STOP events.
//!
//! The QEMUs are started the way Ganeti's driver starts them, daemonized
//! with its command line, pidfile, monitors and runtime file, under a
//! directory of the benchmark's own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hypervisor::qmp::{QmpClient, QmpConfig};
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use serde::Serialize;
use tonic::transport::Channel;

use crate::{MEMORY_MIB, Row, Samples, local_client, start_agent};

/// How many QEMUs the node-at-once row takes over.
pub const NODE_INSTANCES: usize = 20;
/// Time given to that many fresh QEMUs before either side is measured.
const NODE_SETTLE: Duration = Duration::from_secs(5);

/// Whether any guest stopped while it was taken over.
#[derive(Debug, Default, Serialize)]
pub struct Pauses {
    /// Takeovers watched.
    pub watched: usize,
    /// STOP events seen during them.
    pub stops: usize,
}

/// A QEMU as Ganeti's KVM driver starts it.
struct GanetiQemu {
    name: String,
    pid: u32,
}

impl GanetiQemu {
    /// Under TCG (Ganeti's `kvm_flag` off), as the scale sweep runs its
    /// guests: firmware without an OS settles there, and twenty of them
    /// leave the CPUs to what is measured.
    fn start(dir: &Path, name: &str) -> anyhow::Result<GanetiQemu> {
        let ctrl = dir.join("ctrl").join(name);
        let pidfile = dir.join("pid").join(name);
        let uuid = uuid::Uuid::new_v4().to_string();
        let kvm_cmd: Vec<String> = [
            "qemu-system-x86_64",
            "-name",
            name,
            "-m",
            &MEMORY_MIB.to_string(),
            "-smp",
            "1",
            "-pidfile",
            &pidfile.to_string_lossy(),
            "-device",
            "virtio-balloon",
            "-daemonize",
            "-machine",
            "pc-i440fx-7.2",
            "-monitor",
            &format!("unix:{}.monitor,server,nowait", ctrl.display()),
            "-serial",
            "none",
            "-usb",
            "-display",
            "none",
            "-uuid",
            &uuid,
        ]
        .map(str::to_owned)
        .to_vec();
        let runtime = serde_json::json!([kvm_cmd, [], {}, []]);
        std::fs::write(
            dir.join("conf").join(format!("{name}.runtime")),
            runtime.to_string(),
        )?;
        let status = Command::new(&kvm_cmd[0])
            .args(&kvm_cmd[1..])
            .args(["-net", "none"])
            .arg("-qmp")
            .arg(format!("unix:{}.qmp,server,nowait", ctrl.display()))
            .arg("-qmp")
            .arg(format!("unix:{}.kvmd,server,nowait", ctrl.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("starting a QEMU as Ganeti's driver does")?;
        if !status.success() {
            bail!("QEMU {name} did not start: {status}");
        }
        let pid = std::fs::read_to_string(&pidfile)?.trim().parse()?;
        Ok(GanetiQemu {
            name: name.to_owned(),
            pid,
        })
    }

    /// Removes its files, as Ganeti's cleanup does once it is gone.
    fn remove_files(&self, dir: &Path) {
        let _ = std::fs::remove_file(dir.join("conf").join(format!("{}.runtime", self.name)));
        let _ = std::fs::remove_file(dir.join("pid").join(&self.name));
        for socket in ["monitor", "qmp", "kvmd"] {
            let _ = std::fs::remove_file(dir.join("ctrl").join(format!("{}.{socket}", self.name)));
        }
    }
}

/// What a direct driver does at least to take a running QEMU over: check
/// the pid is that QEMU, connect QMP and ask its state and its devices.
async fn raw_takeover(dir: &Path, qemu: &GanetiQemu) -> anyhow::Result<()> {
    let pid: u32 = std::fs::read_to_string(dir.join("pid").join(&qemu.name))?
        .trim()
        .parse()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    if !cmdline
        .split(|&b| b == 0)
        .any(|a| a == qemu.name.as_bytes())
    {
        bail!("pid {pid} is not {}", qemu.name);
    }
    let qmp = QmpClient::connect(&qmp_socket(dir, &qemu.name, "qmp"), QmpConfig::default()).await?;
    qmp.execute("query-status", None).await?;
    qmp.execute("query-pci", None).await?;
    Ok(())
}

fn qmp_socket(dir: &Path, name: &str, kind: &str) -> PathBuf {
    dir.join("ctrl").join(format!("{name}.{kind}"))
}

/// Counts STOP events on a QEMU's second monitor until dropped.
struct PauseWatch {
    qmp: QmpClient,
    events: tokio::sync::broadcast::Receiver<hypervisor::qmp::QmpEvent>,
}

impl PauseWatch {
    async fn start(dir: &Path, name: &str) -> anyhow::Result<PauseWatch> {
        let qmp = QmpClient::connect(&qmp_socket(dir, name, "kvmd"), QmpConfig::default()).await?;
        let events = qmp.subscribe();
        Ok(PauseWatch { qmp, events })
    }

    /// STOP events so far, and whether QEMU still runs the guest.
    async fn stops(mut self) -> anyhow::Result<usize> {
        let status = self.qmp.execute("query-status", None).await?;
        let mut stops = usize::from(status["status"] != "running");
        while let Ok(event) = self.events.try_recv() {
            stops += usize::from(event.name == "STOP");
        }
        Ok(stops)
    }
}

async fn adopt(
    client: &mut NodeAgentClient<Channel>,
    dir: &Path,
    name: Option<&str>,
    expected: usize,
) -> anyhow::Result<()> {
    let answer = client
        .adopt_ganeti_instances(pb::AdoptGanetiInstancesRequest {
            ganeti_dir: dir.to_string_lossy().into_owned(),
            name: name.unwrap_or_default().to_owned(),
            dry_run: false,
        })
        .await?
        .into_inner();
    let adopted = answer
        .instances
        .iter()
        .filter(|a| a.outcome == pb::GanetiAdoptionOutcome::Adopted as i32)
        .count();
    if adopted != expected {
        bail!("{adopted} of {expected} taken over: {:?}", answer.instances);
    }
    Ok(())
}

async fn stop_all(
    client: &mut NodeAgentClient<Channel>,
    dir: &Path,
    qemus: &[GanetiQemu],
) -> anyhow::Result<()> {
    for qemu in qemus {
        crate::agent_stop(client, &qemu.name, true).await?;
        client
            .delete_instance(pb::DeleteInstanceRequest {
                name: qemu.name.clone(),
            })
            .await?;
        qemu.remove_files(dir);
    }
    Ok(())
}

/// One takeover at a time, then a node's worth at once.
pub async fn measure(
    binary: &Path,
    work: &Path,
    rounds: usize,
) -> anyhow::Result<(Vec<Row>, Pauses)> {
    let dir = work.join("ganeti-kvm");
    for sub in ["conf", "pid", "ctrl"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let agent = start_agent(binary, &work.join("takeover-state")).await?;
    let mut client = local_client(&agent.socket).await?;
    let mut pauses = Pauses::default();
    let mut one = Samples::default();
    for round in 0..rounds {
        let qemu = GanetiQemu::start(&dir, &format!("hv-one-{round}"))?;
        tokio::time::sleep(crate::SETTLE).await;
        let t = Instant::now();
        raw_takeover(&dir, &qemu).await?;
        one.raw.push(t.elapsed());
        let watch = PauseWatch::start(&dir, &qemu.name).await?;
        let t = Instant::now();
        adopt(&mut client, &dir, Some(&qemu.name), 1).await?;
        one.agent.push(t.elapsed());
        pauses.stops += watch.stops().await?;
        pauses.watched += 1;
        stop_all(&mut client, &dir, &[qemu]).await?;
    }
    let mut node = Samples::default();
    for round in 0..rounds.div_ceil(3) {
        let qemus = (0..NODE_INSTANCES)
            .map(|i| GanetiQemu::start(&dir, &format!("hv-node-{round}-{i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Both sides measured once the firmware of every fresh QEMU is
        // done, not while it competes for the CPUs.
        tokio::time::sleep(NODE_SETTLE).await;
        let t = Instant::now();
        for qemu in &qemus {
            raw_takeover(&dir, qemu).await?;
        }
        node.raw.push(t.elapsed());
        let t = Instant::now();
        adopt(&mut client, &dir, None, NODE_INSTANCES).await?;
        node.agent.push(t.elapsed());
        stop_all(&mut client, &dir, &qemus).await?;
        // Killed by the agent, reaped by init: wait, so the next round's
        // QEMUs don't overlap these in memory.
        settle(&qemus).await;
    }
    Ok((
        vec![
            one.row("take over one hv_kvm QEMU", f64::NAN),
            node.row("take over 20 hv_kvm QEMUs at once", f64::NAN),
        ],
        pauses,
    ))
}

async fn settle(qemus: &[GanetiQemu]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while qemus
        .iter()
        .any(|q| Path::new(&format!("/proc/{}", q.pid)).exists())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
