//! Migration with the stream encrypted between the two QEMUs, through two
//! agents that reach each other over mutual TLS on loopback, beside two
//! raw QEMUs given the same credentials, and beside the agents' own
//! unencrypted migration: what TLS costs, and what the agent adds to it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

use crate::raw::{SYSTEM_QEMU, machine_args_with};
use crate::transfer::{RawMover, RawStream, RawTls, migrate_through, random_file, raw_dirs, spec};
use crate::{AgentProcess, GOAL, Rounds, Row, Samples, settle};

/// The agents' API ports on loopback.
const API_PORTS: [u16; 2] = [49500, 49501];
/// Guest RAM moved each round.
const MIB: u64 = 1024;
/// Encryption may cost at most this much over the same migration in the clear.
const TLS_COST_GOAL: f64 = 1.30;

/// The cluster's CA and a certificate for 127.0.0.1, made by the agent's
/// own `tls` commands; the two agents share the node certificate.
struct Credentials {
    dir: PathBuf,
}

impl Credentials {
    fn make(binary: &Path, dir: &Path) -> anyhow::Result<Credentials> {
        std::fs::create_dir_all(dir)?;
        for args in [
            vec!["tls", "init-ca", "--dir"],
            vec!["tls", "issue", "--ip", "127.0.0.1", "node", "--dir"],
        ] {
            let out = std::process::Command::new(binary)
                .args(&args)
                .arg(dir)
                .output()
                .with_context(|| format!("{} {}", binary.display(), args.join(" ")))?;
            anyhow::ensure!(
                out.status.success(),
                "kvm-agent {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Credentials {
            dir: dir.to_owned(),
        })
    }

    fn agent_args(&self, port: u16) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> =
            vec!["--listen".into(), format!("tcp://127.0.0.1:{port}").into()];
        for (flag, file) in [
            ("--tls-cert", "node.pem"),
            ("--tls-key", "node-key.pem"),
            ("--tls-ca", "ca.pem"),
        ] {
            args.push(flag.into());
            args.push(self.dir.join(file).into());
        }
        args
    }

    /// A directory laid out as QEMU's `tls-creds-x509` reads it for one end.
    fn qemu_dir(&self, endpoint: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join(endpoint);
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(self.dir.join("ca.pem"), dir.join("ca-cert.pem"))?;
        std::fs::copy(
            self.dir.join("node.pem"),
            dir.join(format!("{endpoint}-cert.pem")),
        )?;
        std::fs::copy(
            self.dir.join("node-key.pem"),
            dir.join(format!("{endpoint}-key.pem")),
        )?;
        Ok(dir)
    }
}

/// A migration between the agents, to the other's `https://` address.
async fn agent_migrate(
    source: &mut NodeAgentClient<Channel>,
    name: &str,
    port: u16,
    unencrypted: bool,
) -> anyhow::Result<Duration> {
    let target = format!("https://127.0.0.1:{port}");
    let options = pb::MigrationOptions {
        unencrypted,
        ..Default::default()
    };
    let (total, last) = migrate_through(source, name, target, Some(options)).await?;
    anyhow::ensure!(
        last.encrypted != unencrypted,
        "the stream was not what was asked: {last:?}"
    );
    Ok(total)
}

/// Two agents on mutual TLS.
async fn agents(
    binary: &Path,
    work: &Path,
    credentials: &Credentials,
) -> anyhow::Result<[AgentProcess; 2]> {
    let mut started = Vec::new();
    for (side, port) in ["a", "b"].into_iter().zip(API_PORTS) {
        let args = credentials.agent_args(port);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let state = work.join(format!("agent-tls-{side}"));
        started.push(crate::start_agent_with(binary, &state, &args).await?);
    }
    let [a, b]: [AgentProcess; 2] = started.try_into().ok().context("two agents")?;
    Ok([a, b])
}

/// The rows: encrypted migration against raw QEMU doing the same, and
/// against the agents' own unencrypted migration.
pub async fn measure(
    binary: &Path,
    work: &Path,
    accel: &str,
    rounds: Rounds,
) -> anyhow::Result<Vec<Row>> {
    let credentials = Credentials::make(binary, &work.join("tls"))?;
    let (client, server) = (
        credentials.qemu_dir("client")?,
        credentials.qemu_dir("server")?,
    );
    let tls = RawTls {
        client: &client,
        server: &server,
    };
    let processes = agents(binary, work, &credentials).await?;
    let mut clients = [
        crate::local_client(&processes[0].socket).await?,
        crate::local_client(&processes[1].socket).await?,
    ];
    let (ram, raw_ram) = (work.join("ram-tls"), work.join("raw-ram-tls"));
    random_file(&ram, MIB)?;
    random_file(&raw_ram, MIB)?;
    let uuid = uuid::Uuid::new_v4().to_string();
    let raw_args = machine_args_with("raw", &uuid, accel, MIB, Some(&raw_ram));
    let name = "sealed";
    let pid = crate::agent_start(&mut clients[0], &spec(name, MIB, &ram)).await?;
    let mut raw = RawMover::start(raw_dirs(work, "raw-tls")?, &raw_args).await?;
    settle::until_idle(&[pid, raw.pid()?]).await?;
    let (mut against_raw, mut against_plain) = (Samples::default(), Samples::default());
    let mut holder = 0;
    let mut round = 0;
    let undecided =
        |raw: &Samples, plain: &Samples| raw.undecided(GOAL) || plain.undecided(TLS_COST_GOAL);
    while rounds.another(round, undecided(&against_raw, &against_plain)) {
        round += 1;
        eprintln!("encrypted migration round {}", rounds.label(round));
        // Encrypted, then in the clear: the instance goes there and back.
        for unencrypted in [false, true] {
            let to = 1 - holder;
            let t = agent_migrate(&mut clients[holder], name, API_PORTS[to], unencrypted).await?;
            match unencrypted {
                false => against_raw.agent.push(t),
                true => against_plain.raw.push(t),
            }
            holder = to;
        }
        against_plain
            .agent
            .push(*against_raw.agent.last().context("a round")?);
        let stream = RawStream {
            tls: Some(tls),
            ..Default::default()
        };
        let (t, _) = raw.migrate(Path::new(SYSTEM_QEMU), &[], stream).await?;
        against_raw.raw.push(t);
    }
    raw.kill().await?;
    clients[holder]
        .stop_instance(pb::StopInstanceRequest {
            name: name.into(),
            force: true,
            ..Default::default()
        })
        .await?;
    std::fs::remove_file(&ram)?;
    std::fs::remove_file(&raw_ram)?;
    Ok(vec![
        against_raw.row("migrate 1 GiB random RAM, encrypted (total)", GOAL),
        against_plain.row(
            "TLS cost: migrate 1 GiB encrypted ÷ unencrypted, both through the agent",
            TLS_COST_GOAL,
        ),
    ])
}
