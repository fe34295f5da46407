//! Device removal, which needs a guest that answers ACPI: the test guest
//! (a distribution kernel and a busybox initramfs) booted under TCG, once
//! through the agent and once raw. Each round hot-adds a disk, lets the
//! guest take it in, and times its removal up to the deleted backend.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tonic::transport::Channel;

use crate::Samples;
use crate::profile::{self, Profile, REMOVAL_STEPS, RawSteps, mean_ms};
use crate::raw::{RawQemu, machine_args};

/// What the test guest's /init prints on the serial console once its
/// drivers are loaded.
const READY_MARKER: &str = "KVM-AGENT-GUEST-READY";
pub(crate) const GUEST_MEMORY_MIB: u64 = 128;
const CMDLINE: &str = "console=ttyS0 quiet panic=-1";
/// Time the guest gets to take in a hot-added disk before its removal.
const SETTLE: Duration = Duration::from_secs(1);
const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// The test guest's kernel and initramfs.
pub struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Guest {
    /// The guest in `dir`, or the one `scripts/build-test-guest` builds
    /// (or finds in its cache) when no directory is given.
    pub fn locate(dir: Option<&Path>) -> anyhow::Result<Guest> {
        let dir = match dir {
            Some(d) => d.to_owned(),
            None => {
                let script = Path::new("scripts/build-test-guest");
                let out = std::process::Command::new(script)
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .with_context(|| {
                        format!(
                            "running {} (run the bench from the repository root, or pass --guest DIR)",
                            script.display()
                        )
                    })?;
                if !out.status.success() {
                    bail!("building the test guest failed");
                }
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        let guest = Guest {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.gz"),
        };
        for file in [&guest.kernel, &guest.initrd] {
            if !file.is_file() {
                bail!(
                    "{} is missing: build the guest with scripts/build-test-guest",
                    file.display()
                );
            }
        }
        Ok(guest)
    }

    /// How the agent boots it.
    pub(crate) fn boot(&self) -> pb::BootSpec {
        pb::BootSpec {
            kernel: self.kernel.display().to_string(),
            initrd: self.initrd.display().to_string(),
            cmdline: CMDLINE.into(),
            ..Default::default()
        }
    }

    /// The argv of a raw QEMU `name` that boots it, under TCG, with its
    /// console on the unix socket `serial`.
    pub(crate) fn raw_args(&self, name: &str, serial: &Path) -> Vec<String> {
        let uuid = uuid::Uuid::new_v4().to_string();
        let mut args = machine_args(name, &uuid, "tcg", GUEST_MEMORY_MIB);
        args.extend([
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            CMDLINE.into(),
            "-chardev".into(),
            format!(
                "socket,id=serial0,path={},server=on,wait=off",
                serial.display()
            ),
            "-serial".into(),
            "chardev:serial0".into(),
        ]);
        args
    }
}

/// The report's row of a removal.
pub const ROW: &str = "device removal (disk, test guest)";

/// Measures `rounds` disk removals on each side, with where their time
/// went: the agent's steps from its metrics endpoint at `metrics`.
pub async fn measure(
    client: &mut NodeAgentClient<Channel>,
    metrics: SocketAddr,
    run_dir: &Path,
    work: &Path,
    guest: &Guest,
    rounds: usize,
) -> anyhow::Result<(Samples, Profile)> {
    let mut samples = Samples::default();
    let agent_image = work.join("removal-agent.img");
    let raw_image = work.join("removal-raw.img");
    for image in [&agent_image, &raw_image] {
        std::fs::File::create(image)?.set_len(16 << 20)?;
    }

    let before = profile::scrape(metrics).await?;
    samples.agent = through_agent(client, run_dir, guest, &agent_image, rounds).await?;
    let after = profile::scrape(metrics).await?;
    let (raw_samples, raw_steps) = raw(work, guest, &raw_image, rounds).await?;
    samples.raw = raw_samples;
    let profile = Profile {
        operation: ROW,
        agent: profile::agent_steps(&before, &after, "remove-device", REMOVAL_STEPS),
        agent_total_ms: mean_ms(&samples.agent),
        agent_operation_ms: profile::operation_ms(&before, &after, "remove-device"),
        raw: raw_steps.means(),
        raw_total_ms: mean_ms(&samples.raw),
    };
    Ok((samples, profile))
}

/// Removals through the agent, from the test guest it runs.
async fn through_agent(
    client: &mut NodeAgentClient<Channel>,
    run_dir: &Path,
    guest: &Guest,
    image: &Path,
    rounds: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::new();
    let name = "removal";
    client
        .start_instance(pb::StartInstanceRequest {
            spec: Some(pb::InstanceSpec {
                name: name.into(),
                uuid: uuid::Uuid::new_v4().to_string(),
                memory_mib: GUEST_MEMORY_MIB,
                vcpus: 1,
                accelerator: pb::Accelerator::Tcg as i32,
                serial_console: true,
                boot: Some(guest.boot()),
                ..Default::default()
            }),
            paused: false,
        })
        .await?;
    wait_ready(&run_dir.join(name).join("serial.sock")).await?;
    for round in 0..rounds {
        eprintln!("device removal (agent) {}/{rounds}", round + 1);
        client
            .add_disk(pb::AddDiskRequest {
                name: name.into(),
                disk: Some(pb::DiskSpec {
                    name: "rm-disk".into(),
                    path: image.display().to_string(),
                    cache: pb::DiskCache::Writeback as i32,
                    ..Default::default()
                }),
            })
            .await?;
        tokio::time::sleep(SETTLE).await;
        let began = Instant::now();
        client
            .remove_device(pb::RemoveDeviceRequest {
                name: name.into(),
                device: "rm-disk".into(),
            })
            .await?;
        samples.push(began.elapsed());
    }
    client
        .stop_instance(pb::StopInstanceRequest {
            name: name.into(),
            force: true,
            powerdown_timeout_ms: 0,
        })
        .await?;

    Ok(samples)
}

/// Removals from the same guest in a QEMU driven directly, with the
/// steps of each.
async fn raw(
    work: &Path,
    guest: &Guest,
    image: &Path,
    rounds: usize,
) -> anyhow::Result<(Vec<Duration>, RawSteps)> {
    let mut samples = Vec::new();
    let mut steps = RawSteps::default();
    let raw_dir = work.join("removal-raw");
    std::fs::create_dir_all(&raw_dir)?;
    let serial = raw_dir.join("serial.sock");
    let args = guest.raw_args("raw-removal", &serial);
    let mut q = RawQemu::start(&raw_dir, &args).await?;
    wait_ready(&serial).await?;
    for round in 0..rounds {
        eprintln!("device removal (raw) {}/{rounds}", round + 1);
        q.add_disk(round as u32, 4, image).await?;
        tokio::time::sleep(SETTLE).await;
        q.take_steps();
        let began = Instant::now();
        q.remove_disk(round as u32).await?;
        samples.push(began.elapsed());
        steps.add(q.take_steps());
    }
    q.kill().await?;
    Ok((samples, steps))
}

/// Reads the serial console until the guest says it is ready.
pub(crate) async fn wait_ready(socket: &Path) -> anyhow::Result<()> {
    let mut stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let mut seen = Vec::new();
    let waited = tokio::time::timeout(BOOT_LIMIT, async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                bail!("the guest's console closed before it was ready");
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains(READY_MARKER) {
                return Ok(());
            }
        }
    })
    .await;
    match waited {
        Ok(result) => result,
        Err(_) => bail!(
            "the test guest did not boot within {BOOT_LIMIT:?}; its console showed:\n{}",
            String::from_utf8_lossy(&seen)
        ),
    }
}
