//! Save, restore and migration of guests whose RAM is random bytes (a
//! guest without an OS has almost all-zero RAM, which QEMU sends in
//! milliseconds), through agents and driven raw, interleaved.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::libvirt::{Libvirt, PeerRow};
use crate::raw::{RawQemu, SYSTEM_QEMU, machine_args_with};
use crate::{GOAL, Rounds, Row, Samples, settle, start_agent};

/// Port of the raw migrations; the agents use their own range.
const RAW_MIGRATION_PORT: u16 = 49400;
/// The multifd rows' connections besides the main one.
const MULTIFD_CHANNELS: u8 = 4;

/// Fills a file with random bytes, the RAM a guest starts with.
pub(crate) fn random_file(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    let mut out = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        std::io::Read::read_exact(&mut urandom, &mut buf)?;
        out.write_all(&buf)?;
    }
    Ok(())
}

pub(crate) fn spec(name: &str, memory_mib: u64, ram: &Path) -> pb::InstanceSpec {
    pb::InstanceSpec {
        name: name.into(),
        uuid: uuid::Uuid::new_v4().to_string(),
        memory_mib,
        vcpus: 1,
        memory: Some(pb::MemoryBacking {
            file: ram.display().to_string(),
            // Private: each QEMU reads the random bytes, and the target's
            // writes during the migration don't land in the source's RAM.
            share: false,
            hugepages: false,
        }),
        ..Default::default()
    }
}

/// Runs a migration through the agents, over `multifd_channels` more
/// connections when given; returns total time and downtime.
async fn agent_migrate(
    source: &mut NodeAgentClient<Channel>,
    name: &str,
    target: &Path,
    multifd_channels: Option<u8>,
) -> anyhow::Result<(Duration, Duration)> {
    let target = format!("unix:{}", target.display());
    let options = multifd_channels.map(|channels| pb::MigrationOptions {
        multifd_channels: channels.into(),
        ..Default::default()
    });
    let (total, last) = migrate_through(source, name, target, options).await?;
    Ok((total, Duration::from_millis(last.downtime_ms)))
}

/// Runs a migration to the agent at `target` with `options` until it
/// completes; returns its total time and last report.
pub(crate) async fn migrate_through(
    source: &mut NodeAgentClient<Channel>,
    name: &str,
    target: String,
    options: Option<pb::MigrationOptions>,
) -> anyhow::Result<(Duration, pb::MigrationProgress)> {
    let started = Instant::now();
    let mut stream = source
        .migrate_instance(pb::MigrateInstanceRequest {
            name: name.into(),
            target,
            options,
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(progress) = stream.next().await {
        last = Some(progress?);
    }
    let total = started.elapsed();
    let last = last.context("no progress")?;
    anyhow::ensure!(
        last.phase == pb::MigrationPhase::Completed as i32,
        "migration ended in {last:?}"
    );
    Ok((total, last))
}

/// How a raw migration's stream goes: encrypted, over more connections.
#[derive(Clone, Copy, Default)]
pub(crate) struct RawStream<'a> {
    /// Encrypted with these credentials.
    pub(crate) tls: Option<RawTls<'a>>,
    /// Memory over this many more connections (multifd), on both QEMUs.
    pub(crate) multifd_channels: Option<u8>,
}

/// The x509 directories of an encrypted raw migration, laid out as QEMU's
/// `tls-creds-x509` reads them.
#[derive(Clone, Copy)]
pub(crate) struct RawTls<'a> {
    /// The source's: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
    pub(crate) client: &'a Path,
    /// The target's: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub(crate) server: &'a Path,
}

/// Gives a raw QEMU the credentials object `id` for `endpoint` from
/// `dir`, and has its migrations use it.
async fn raw_tls(
    qemu: &mut RawQemu,
    id: &str,
    endpoint: &str,
    dir: &Path,
    parameters: serde_json::Value,
) -> anyhow::Result<()> {
    let object = serde_json::json!({
        "qom-type": "tls-creds-x509", "id": id, "endpoint": endpoint,
        "dir": dir.display().to_string(), "verify-peer": true,
    });
    qemu.execute_args("object-add", object, None).await?;
    qemu.execute_args("migrate-set-parameters", parameters, None)
        .await
        .map(drop)
}

/// Has a raw QEMU send or expect memory over `channels` more connections.
async fn raw_multifd(qemu: &mut RawQemu, channels: u8) -> anyhow::Result<()> {
    let capabilities = serde_json::json!({
        "capabilities": [{ "capability": "multifd", "state": true }]
    });
    qemu.execute_args("migrate-set-capabilities", capabilities, None)
        .await?;
    let parameters = serde_json::json!({ "multifd-channels": channels });
    qemu.execute_args("migrate-set-parameters", parameters, None)
        .await
        .map(drop)
}

/// A raw QEMU moved between two directories by a direct driver on
/// loopback, the way the agents move their instance: each migration
/// starts a target in the other directory, listens, migrates, waits,
/// resumes the target and quits the source, and the target then holds
/// the guest.
pub(crate) struct RawMover {
    holder: RawQemu,
    dirs: [PathBuf; 2],
    at: usize,
    args: Vec<String>,
}

impl RawMover {
    /// Starts the guest of `args` in the first of `dirs`.
    pub(crate) async fn start(dirs: [PathBuf; 2], args: &[String]) -> anyhow::Result<RawMover> {
        let holder = RawQemu::start(&dirs[0], args).await?;
        Ok(RawMover {
            holder,
            dirs,
            at: 0,
            args: args.to_vec(),
        })
    }

    /// The pid of the QEMU holding the guest.
    pub(crate) fn pid(&self) -> anyhow::Result<u32> {
        self.holder.pid()
    }

    /// Migrates the guest to a QEMU of `binary`, given `target_args` too,
    /// with the `stream` asked for; returns total time and downtime.
    pub(crate) async fn migrate(
        &mut self,
        binary: &Path,
        target_args: &[String],
        stream: RawStream<'_>,
    ) -> anyhow::Result<(Duration, Duration)> {
        let RawStream {
            tls,
            multifd_channels,
        } = stream;
        let started = Instant::now();
        let mut incoming = self.args.clone();
        incoming.extend(target_args.iter().cloned());
        incoming.extend(["-S".into(), "-incoming".into(), "defer".into()]);
        let there = 1 - self.at;
        let mut target = RawQemu::start_binary(binary, &self.dirs[there], &incoming).await?;
        if let Some(tls) = tls {
            let parameters = serde_json::json!({ "tls-creds": "tls-in" });
            raw_tls(&mut target, "tls-in", "server", tls.server, parameters).await?;
        }
        if let Some(channels) = multifd_channels {
            raw_multifd(&mut target, channels).await?;
            raw_multifd(&mut self.holder, channels).await?;
        }
        let uri = format!("tcp:127.0.0.1:{RAW_MIGRATION_PORT}");
        target
            .execute_args("migrate-incoming", serde_json::json!({ "uri": uri }), None)
            .await?;
        self.holder.uncap().await?;
        if let Some(tls) = tls {
            let parameters =
                serde_json::json!({ "tls-creds": "tls-out", "tls-hostname": "127.0.0.1" });
            raw_tls(
                &mut self.holder,
                "tls-out",
                "client",
                tls.client,
                parameters,
            )
            .await?;
        }
        self.holder
            .execute_args("migrate", serde_json::json!({ "uri": uri }), None)
            .await?;
        let downtime = self.holder.wait_migration().await?;
        target.wait_migration().await?;
        target.execute("cont").await?;
        let source = std::mem::replace(&mut self.holder, target);
        self.at = there;
        source.quit().await?;
        Ok((started.elapsed(), downtime))
    }

    /// Kills the QEMU holding the guest.
    pub(crate) async fn kill(self) -> anyhow::Result<()> {
        self.holder.kill().await
    }
}

/// Two directories for raw QEMUs under `work`, named after `prefix`: a
/// migration's source and target are in different ones.
pub(crate) fn raw_dirs(work: &Path, prefix: &str) -> anyhow::Result<[PathBuf; 2]> {
    let dirs = [
        work.join(format!("{prefix}-a")),
        work.join(format!("{prefix}-b")),
    ];
    for dir in &dirs {
        std::fs::create_dir_all(dir)?;
    }
    Ok(dirs)
}

/// Whose turn it is to hold the migrating instance.
struct Agents {
    work: PathBuf,
    sockets: [PathBuf; 2],
    clients: [NodeAgentClient<Channel>; 2],
    _processes: [crate::AgentProcess; 2],
}

impl Agents {
    async fn start(binary: &Path, work: &Path) -> anyhow::Result<Agents> {
        let a = start_agent(binary, &work.join("agent-a")).await?;
        let b = start_agent(binary, &work.join("agent-b")).await?;
        let clients = [
            crate::local_client(&a.socket).await?,
            crate::local_client(&b.socket).await?,
        ];
        Ok(Agents {
            work: work.to_owned(),
            sockets: [a.socket.clone(), b.socket.clone()],
            clients,
            _processes: [a, b],
        })
    }
}

/// The rows of this part of the report; the cross-version migration's
/// newer QEMU is `newer_qemu`, or what `scripts/qemu-env` unpacks.
pub async fn measure(
    binary: &Path,
    work: &Path,
    newer_qemu: Option<&Path>,
    accel: &str,
    rounds: Rounds,
    libvirt: Option<&mut Libvirt>,
) -> anyhow::Result<(Vec<Row>, Vec<PeerRow>)> {
    let mut agents = Agents::start(binary, work).await?;
    let (mut rows, peer_rows) = save_and_restore(&mut agents, accel, rounds, libvirt).await?;
    for (mib, label, downtime_label) in [
        (
            256,
            "migrate 256 MiB random RAM (total)",
            "migrate 256 MiB: downtime",
        ),
        (
            1024,
            "migrate 1 GiB random RAM (total)",
            "migrate 1 GiB: downtime",
        ),
    ] {
        let [total, downtime] = migrations(&mut agents, accel, rounds, mib, None).await?;
        rows.push(total.row(label, GOAL));
        rows.push(downtime.row(downtime_label, f64::NAN));
    }
    let channels = Some(MULTIFD_CHANNELS);
    let [total, _] = migrations(&mut agents, accel, rounds, 1024, channels).await?;
    rows.push(total.row("migrate 1 GiB random RAM, multifd 4 (total)", GOAL));
    let newer_qemu = locate_newer_qemu(newer_qemu)?;
    rows.push(cross_version(binary, work, &newer_qemu, accel, rounds).await?);
    Ok((rows, peer_rows))
}

/// Save to a file and restore from it, through the agent and raw, and
/// through libvirt when it is measured.
async fn save_and_restore(
    agents: &mut Agents,
    accel: &str,
    rounds: Rounds,
    mut libvirt: Option<&mut Libvirt>,
) -> anyhow::Result<(Vec<Row>, Vec<PeerRow>)> {
    let mut rows = Vec::new();
    let (mut save, mut restore) = (Samples::default(), Samples::default());
    let ram = agents.work.join("ram-256");
    random_file(&ram, 256)?;
    let raw_ram = agents.work.join("raw-ram-256");
    random_file(&raw_ram, 256)?;
    let raw_args = machine_args_with(
        "raw",
        &uuid::Uuid::new_v4().to_string(),
        accel,
        256,
        Some(&raw_ram),
    );
    let [raw_a, _] = raw_dirs(&agents.work, "raw")?;
    // Loaded above the first MiB, where the firmware's holes end.
    let libvirt_ram = agents.work.join("libvirt-ram-255");
    if libvirt.is_some() {
        random_file(&libvirt_ram, 255)?;
    }
    let s = spec("saved", 256, &ram);
    let mut round = 0;
    while rounds.another(round, save.undecided(GOAL) || restore.undecided(GOAL)) {
        round += 1;
        eprintln!("save/restore round {}", rounds.label(round));
        let file = agents.work.join(format!("agent-{round}.save"));
        let (t_save, t_restore) = agent_save_and_restore(&mut agents.clients[0], &s, &file).await?;
        save.agent.push(t_save);
        restore.agent.push(t_restore);

        let file = agents.work.join(format!("raw-{round}.save"));
        let (t_save, t_restore) = raw_save_and_restore(&raw_a, &raw_args, &file).await?;
        save.raw.push(t_save);
        restore.raw.push(t_restore);

        if let Some(libvirt) = libvirt.as_deref_mut() {
            let file = agents.work.join(format!("libvirt-{round}.save"));
            let (t_save, t_restore) =
                libvirt_save_and_restore(libvirt, &libvirt_ram, &file).await?;
            save.libvirt.push(t_save);
            restore.libvirt.push(t_restore);
        }
    }
    let peer_rows = [
        save.libvirt_row("save 256 MiB random RAM"),
        restore.libvirt_row("restore 256 MiB random RAM (to running)"),
    ];
    rows.push(save.row("save 256 MiB random RAM (file fsynced, QEMU quit)", GOAL));
    rows.push(restore.row("restore 256 MiB random RAM (to running)", GOAL));
    std::fs::remove_file(&ram)?;
    std::fs::remove_file(&raw_ram)?;
    let _ = std::fs::remove_file(&libvirt_ram);
    Ok((rows, peer_rows.into_iter().flatten().collect()))
}

/// The agent starts `spec`, saves it to `file` and restores it.
async fn agent_save_and_restore(
    client: &mut NodeAgentClient<Channel>,
    spec: &pb::InstanceSpec,
    file: &Path,
) -> anyhow::Result<(Duration, Duration)> {
    client
        .start_instance(pb::StartInstanceRequest {
            spec: Some(spec.clone()),
            paused: false,
        })
        .await?;
    let t = Instant::now();
    client
        .save_instance(pb::SaveInstanceRequest {
            name: spec.name.clone(),
            path: file.display().to_string(),
        })
        .await?;
    let saved = t.elapsed();
    let t = Instant::now();
    client
        .restore_instance(pb::RestoreInstanceRequest {
            path: file.display().to_string(),
            paused: false,
        })
        .await?;
    let restored = t.elapsed();
    client
        .stop_instance(pb::StopInstanceRequest {
            name: spec.name.clone(),
            force: true,
            ..Default::default()
        })
        .await?;
    std::fs::remove_file(file)?;
    Ok((saved, restored))
}

/// Raw QEMU saves to `file` and restores from it, into a QEMU started
/// with `-incoming defer`.
async fn raw_save_and_restore(
    dir: &Path,
    args: &[String],
    file: &Path,
) -> anyhow::Result<(Duration, Duration)> {
    let q = RawQemu::start(dir, args).await?;
    let t = Instant::now();
    q.save_to(file).await?;
    let saved = t.elapsed();
    let mut incoming = args.to_vec();
    incoming.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    let t = Instant::now();
    let mut q = RawQemu::start(dir, &incoming).await?;
    q.restore_from(file).await?;
    let restored = t.elapsed();
    q.kill().await?;
    std::fs::remove_file(file)?;
    Ok((saved, restored))
}

/// libvirt saves a domain whose RAM holds `ram`'s random bytes to `file`,
/// and restores it.
async fn libvirt_save_and_restore(
    libvirt: &mut Libvirt,
    ram: &Path,
    file: &Path,
) -> anyhow::Result<(Duration, Duration)> {
    libvirt
        .start_domain("saved-libvirt", 256, Some(ram))
        .await?;
    let saved = libvirt.save("saved-libvirt", file).await?;
    let restored = libvirt.restore(file).await?;
    libvirt.destroy("saved-libvirt").await?;
    std::fs::remove_file(file)?;
    Ok((saved, restored))
}

/// Migrations of `mib` of random RAM there and back between the two
/// agents, beside the same between two raw QEMUs, over `multifd_channels`
/// more connections when given: total times, then downtimes.
async fn migrations(
    agents: &mut Agents,
    accel: &str,
    rounds: Rounds,
    mib: u64,
    multifd_channels: Option<u8>,
) -> anyhow::Result<[Samples; 2]> {
    let ram = agents.work.join(format!("ram-{mib}"));
    random_file(&ram, mib)?;
    let raw_ram = agents.work.join(format!("raw-ram-{mib}"));
    random_file(&raw_ram, mib)?;
    let raw_args = machine_args_with(
        "raw",
        &uuid::Uuid::new_v4().to_string(),
        accel,
        mib,
        Some(&raw_ram),
    );
    let (mut total, mut downtime) = (Samples::default(), Samples::default());
    let name = format!("mover{mib}-{}", multifd_channels.unwrap_or(0));
    let pid = crate::agent_start(&mut agents.clients[0], &spec(&name, mib, &ram)).await?;
    let mut raw = RawMover::start(raw_dirs(&agents.work, "raw")?, &raw_args).await?;
    // Both guests move once their firmware is done, as a running
    // instance's would be (see `settle`).
    settle::until_idle(&[pid, raw.pid()?]).await?;
    let mut round = 0;
    while rounds.another(round, total.undecided(GOAL)) {
        eprintln!("migration {mib} MiB round {}", rounds.label(round + 1));
        // There and back: the instance alternates between the agents.
        let (from, to) = (round % 2, 1 - round % 2);
        let target = agents.sockets[to].clone();
        let (t, d) =
            agent_migrate(&mut agents.clients[from], &name, &target, multifd_channels).await?;
        total.agent.push(t);
        downtime.agent.push(d);
        let stream = RawStream {
            multifd_channels,
            ..Default::default()
        };
        let (t, d) = raw.migrate(Path::new(SYSTEM_QEMU), &[], stream).await?;
        total.raw.push(t);
        downtime.raw.push(d);
        round += 1;
    }
    raw.kill().await?;
    let holder = round % 2;
    agents.clients[holder]
        .stop_instance(pb::StopInstanceRequest {
            name: name.clone(),
            force: true,
            ..Default::default()
        })
        .await?;
    std::fs::remove_file(&ram)?;
    std::fs::remove_file(&raw_ram)?;
    Ok([total, downtime])
}

/// The newer QEMU: `given`, or what `scripts/qemu-env` unpacks.
fn locate_newer_qemu(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    let script = Path::new("scripts/qemu-env");
    let out = std::process::Command::new(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| {
            format!(
                "running {} (run the bench from the repository root, or pass --newer-qemu PATH)",
                script.display()
            )
        })?;
    anyhow::ensure!(out.status.success(), "unpacking the newer QEMU failed");
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Migrations of 256 MiB of random RAM from an agent on the system's QEMU
/// to one on `newer`, a new instance each round, beside the same between
/// two raw QEMUs of those versions; the machine type is the older QEMU's.
async fn cross_version(
    binary: &Path,
    work: &Path,
    newer: &Path,
    accel: &str,
    rounds: Rounds,
) -> anyhow::Result<Row> {
    const MIB: u64 = 256;
    let older = crate::start_agent(binary, &work.join("agent-older")).await?;
    let newer_agent = crate::start_agent_with(
        binary,
        &work.join("agent-newer"),
        &["--qemu-binary".as_ref(), newer.as_os_str()],
    )
    .await?;
    let mut source = crate::local_client(&older.socket).await?;
    let mut target = crate::local_client(&newer_agent.socket).await?;
    let raw_dirs = raw_dirs(work, "raw")?;
    let (ram, raw_ram) = (work.join("ram-cross"), work.join("raw-ram-cross"));
    random_file(&ram, MIB)?;
    random_file(&raw_ram, MIB)?;
    let raw_args = machine_args_with(
        "raw",
        &uuid::Uuid::new_v4().to_string(),
        accel,
        MIB,
        Some(&raw_ram),
    );
    // Driven directly, the newer QEMU needs its own firmware named.
    let firmware = newer
        .parent()
        .and_then(Path::parent)
        .map(|prefix| prefix.join("share/qemu"))
        .context("the newer QEMU's prefix")?;
    let firmware_args = ["-L".to_owned(), firmware.display().to_string()];
    let mut total = Samples::default();
    let mut round = 0;
    while rounds.another(round, total.undecided(GOAL)) {
        round += 1;
        eprintln!("cross-version migration round {}", rounds.label(round));
        let name = format!("upgraded{round}");
        let pid = crate::agent_start(&mut source, &spec(&name, MIB, &ram)).await?;
        let mut raw = RawMover::start(raw_dirs.clone(), &raw_args).await?;
        settle::until_idle(&[pid, raw.pid()?]).await?;
        let (t, _) = agent_migrate(&mut source, &name, &newer_agent.socket, None).await?;
        total.agent.push(t);
        target
            .stop_instance(pb::StopInstanceRequest {
                name,
                force: true,
                ..Default::default()
            })
            .await?;
        let (t, _) = raw
            .migrate(newer, &firmware_args, RawStream::default())
            .await?;
        total.raw.push(t);
        raw.kill().await?;
    }
    std::fs::remove_file(&ram)?;
    std::fs::remove_file(&raw_ram)?;
    Ok(total.row("migrate 256 MiB random RAM to a newer QEMU (total)", GOAL))
}
