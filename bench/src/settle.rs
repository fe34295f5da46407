//! Waiting for a fresh QEMU's firmware to finish.
//!
//! The guests here have no OS. For their first seconds SeaBIOS runs its
//! POST and then tries every boot device (about 3.3 s under KVM on these
//! machines), and the vCPU is busy all that time; afterwards it halts. An
//! operation timed meanwhile shares the two cores with that vCPU, and each
//! process it wakes may wait a scheduler slice behind it, which says more
//! about the firmware than about the operation.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a fresh QEMU's firmware may keep its vCPU busy (TCG is slow).
const FIRMWARE_LIMIT: Duration = Duration::from_secs(60);
/// Over how long a QEMU's CPU time is sampled.
const WINDOW: Duration = Duration::from_millis(200);
/// The CPU time, in clock ticks (100 a second), a QEMU may use in a window
/// and count as idle: a tenth of a CPU.
const IDLE_TICKS: u64 = 2;

/// User and system time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading the CPU time of QEMU {pid}"))?;
    // The command name, in parentheses, may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("a /proc stat line without a command name")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are the 14th and 15th fields, the 12th and 13th
    // after the command name.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .context("a short /proc stat line")?
            .parse::<u64>()?)
    };
    Ok(ticks(11)? + ticks(12)?)
}

/// Waits until every QEMU of `pids` has been idle for a window, checking
/// them together so their firmware runs at the same time; fails after
/// [`FIRMWARE_LIMIT`].
pub async fn until_idle(pids: &[u32]) -> anyhow::Result<()> {
    let started = Instant::now();
    let all_ticks = || {
        pids.iter()
            .map(|&pid| cpu_ticks(pid))
            .collect::<anyhow::Result<Vec<_>>>()
    };
    let mut before = all_ticks()?;
    loop {
        tokio::time::sleep(WINDOW).await;
        let now = all_ticks()?;
        if now.iter().zip(&before).all(|(n, b)| n - b <= IDLE_TICKS) {
            return Ok(());
        }
        if started.elapsed() > FIRMWARE_LIMIT {
            bail!("QEMUs {pids:?} were still busy {FIRMWARE_LIMIT:?} after they started");
        }
        before = now;
    }
}
