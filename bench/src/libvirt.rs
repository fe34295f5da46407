//! libvirt beside the agent and raw QEMU: the same operations on the same
//! QEMU, through libvirt's Python API, in the same rounds. A Python helper
//! (`bench/libvirt_peer.py`) keeps one connection to libvirtd and times
//! each API call; this side sends it one JSON request per line.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::interval;

/// The helper and its pipes.
pub struct Libvirt {
    _child: Child,
    requests: ChildStdin,
    replies: Lines<BufReader<ChildStdout>>,
}

/// The pid of the QEMU that libvirt runs for domain `name`, from the
/// pidfile its QEMU driver keeps.
pub fn domain_pid(name: &str) -> anyhow::Result<u32> {
    let file = format!("/run/libvirt/qemu/{name}.pid");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    Ok(text.trim().parse()?)
}

impl Libvirt {
    /// Sets libvirt up (`scripts/libvirt-env` installs and starts it where
    /// it is missing) and starts the helper.
    pub async fn start(accel: &str) -> anyhow::Result<Self> {
        let env = std::process::Command::new("scripts/libvirt-env")
            .stderr(Stdio::inherit())
            .output()
            .context("running scripts/libvirt-env")?;
        if !env.status.success() {
            bail!("scripts/libvirt-env failed; libvirt can't be measured");
        }
        let python = String::from_utf8(env.stdout)?.trim().to_owned();
        let mut child = Command::new(&python)
            .arg("bench/libvirt_peer.py")
            .args(["--accel", accel])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting bench/libvirt_peer.py with {python}"))?;
        let requests = child.stdin.take().context("the helper's stdin")?;
        let replies = BufReader::new(child.stdout.take().context("the helper's stdout")?).lines();
        Ok(Libvirt {
            _child: child,
            requests,
            replies,
        })
    }

    /// Sends one request and returns the time libvirt took for it.
    async fn call(&mut self, request: Value) -> anyhow::Result<Duration> {
        let line = format!("{request}\n");
        self.requests.write_all(line.as_bytes()).await?;
        self.requests.flush().await?;
        let reply = self
            .replies
            .next_line()
            .await?
            .context("the libvirt helper ended")?;
        let reply: Value = serde_json::from_str(&reply)
            .with_context(|| format!("the libvirt helper's reply {reply:?}"))?;
        if reply["ok"] != true {
            bail!("libvirt: {} failed: {}", request["op"], reply["error"]);
        }
        let ms = reply["ms"].as_f64().context("a reply without a time")?;
        Ok(Duration::from_secs_f64(ms / 1000.0))
    }

    /// Defines and starts a domain like the raw QEMU, its RAM loaded from
    /// `random_ram` when given.
    pub async fn start_domain(
        &mut self,
        name: &str,
        memory_mib: u64,
        random_ram: Option<&Path>,
    ) -> anyhow::Result<Duration> {
        let mut request = json!({
            "op": "start", "name": name, "uuid": uuid::Uuid::new_v4().to_string(),
            "memory_mib": memory_mib,
        });
        if let Some(file) = random_ram {
            request["random_ram_file"] = json!(file);
        }
        self.call(request).await
    }

    /// Hot-adds a virtio NIC on a tap libvirt makes.
    pub async fn add_nic(&mut self, name: &str, index: u32, slot: u8) -> anyhow::Result<Duration> {
        let mac = format!("52:54:00:97:00:{:02x}", index % 256);
        self.call(
            json!({ "op": "add_nic", "name": name, "index": index, "slot": slot, "mac": mac }),
        )
        .await
    }

    /// Hot-adds a raw file as a virtio disk.
    pub async fn add_disk(
        &mut self,
        name: &str,
        index: u32,
        slot: u8,
        path: &Path,
    ) -> anyhow::Result<Duration> {
        self.call(
            json!({ "op": "add_disk", "name": name, "index": index, "slot": slot, "path": path }),
        )
        .await
    }

    /// Saves a running domain to `path`; its QEMU ends.
    pub async fn save(&mut self, name: &str, path: &Path) -> anyhow::Result<Duration> {
        self.call(json!({ "op": "save", "name": name, "path": path }))
            .await
    }

    /// Restores a saved domain, to running.
    pub async fn restore(&mut self, path: &Path) -> anyhow::Result<Duration> {
        self.call(json!({ "op": "restore", "path": path })).await
    }

    /// Reads a running domain's state `calls` times in a row; returns one
    /// read's mean.
    pub async fn state_reads(&mut self, name: &str, calls: u32) -> anyhow::Result<Duration> {
        self.call(json!({ "op": "state", "name": name, "calls": calls }))
            .await
    }

    /// Ends and forgets a domain.
    pub async fn destroy(&mut self, name: &str) -> anyhow::Result<()> {
        self.call(json!({ "op": "destroy", "name": name }))
            .await
            .map(drop)
    }
}

/// One operation with libvirt beside the agent and raw QEMU.
#[derive(Debug, Serialize)]
pub struct PeerRow {
    pub operation: &'static str,
    pub agent_p50_ms: f64,
    pub raw_p50_ms: f64,
    pub libvirt_p50_ms: f64,
    pub libvirt_over_raw: f64,
    pub libvirt_over_raw_ci95: Option<(f64, f64)>,
    pub agent_over_libvirt: f64,
    pub agent_over_libvirt_ci95: Option<(f64, f64)>,
}

impl PeerRow {
    /// The row of samples taken in the same rounds (paired by index).
    pub fn new(
        operation: &'static str,
        agent: &[Duration],
        raw: &[Duration],
        libvirt: &[Duration],
    ) -> Option<Self> {
        if libvirt.is_empty() {
            return None;
        }
        let (agent, raw, libvirt) = (ms(agent), ms(raw), ms(libvirt));
        let (a, r, l) = (median(&agent), median(&raw), median(&libvirt));
        Some(PeerRow {
            operation,
            agent_p50_ms: a,
            raw_p50_ms: r,
            libvirt_p50_ms: l,
            libvirt_over_raw: l / r,
            libvirt_over_raw_ci95: interval::ratio_interval(&libvirt, &raw),
            agent_over_libvirt: a / l,
            agent_over_libvirt_ci95: interval::ratio_interval(&agent, &libvirt),
        })
    }
}

fn ms(samples: &[Duration]) -> Vec<f64> {
    samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The report's section on libvirt, when it was measured.
pub fn section(md: &mut String, rows: &[PeerRow]) {
    if rows.is_empty() {
        return;
    }
    md.push_str("\n## libvirt in the same run\n\n");
    md.push_str("libvirt 9.0 from Debian's packages, driven through its Python API on one connection to `qemu:///system` (the time of the API call, taken in the Python helper), on the same QEMU, each round right after the agent and raw QEMU. The daemon runs with Debian's configuration as `scripts/libvirt-env` sets it up (see that script for any change). Its domains match the raw QEMU's: the same machine type, CPU, memory and balloon, no other devices; for save and restore, the RAM is loaded with random bytes at boot by QEMU's generic loader device (through `<qemu:commandline>`), since libvirt can't be handed a prefilled RAM file, and the restore is given the saved definition without that device, so QEMU doesn't read the file again for the stream to overwrite. libvirt's save also syncs its file.\n\n");
    md.push_str("| operation | agent p50 (ms) | raw p50 (ms) | libvirt p50 (ms) | libvirt/raw [95%] | agent/libvirt [95%] |\n|---|---|---|---|---|---|\n");
    let interval = |ci: Option<(f64, f64)>| {
        ci.map(|(low, high)| format!(" [{low:.2}–{high:.2}]"))
            .unwrap_or_default()
    };
    for r in rows {
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.2}{} | {:.2}{} |\n",
            r.operation,
            r.agent_p50_ms,
            r.raw_p50_ms,
            r.libvirt_p50_ms,
            r.libvirt_over_raw,
            interval(r.libvirt_over_raw_ci95),
            r.agent_over_libvirt,
            interval(r.agent_over_libvirt_ci95),
        ));
    }
}
