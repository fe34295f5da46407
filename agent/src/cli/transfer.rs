//! `kvm-agent migrate`, `cancel-migration`, `save` and `restore`: moving
//! a guest to another node or to a file. The long ones show a progress bar
//! on a terminal and plain or JSON lines otherwise.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::Printer;
use super::instance::print_instance;
use super::options::parse_size;
use super::wire::{enum_type, label};

/// `kvm-agent migrate`.
#[derive(Debug, Args)]
pub(super) struct MigrateArgs {
    /// Instance name.
    name: String,
    /// The target agent: https://host:port (mutual TLS) or unix:/path/to/agent.sock.
    #[arg(long)]
    to: String,
    /// Pause the guest first; it doesn't run during the migration.
    #[arg(long)]
    offline: bool,
    /// Cap in bytes per second; K, M and G suffixes are binary (100M = 100 MiB/s).
    #[arg(long, value_parser = parse_size)]
    max_bandwidth: Option<u64>,
    /// The longest pause at switch-over, in milliseconds.
    #[arg(long)]
    downtime_limit_ms: Option<u32>,
    /// Don't throttle a guest that dirties memory faster than it can be sent.
    #[arg(long)]
    no_auto_converge: bool,
    /// Send changed pages as XBZRLE deltas against a cache of this size on the source (e.g. 64M).
    #[arg(long, value_parser = parse_size)]
    xbzrle_cache: Option<u64>,
    /// Send memory over this many connections besides the main one (multifd; the target must be an agent).
    #[arg(long)]
    multifd_channels: Option<u32>,
    /// Send the stream to another node in the clear instead of with TLS between the two QEMUs.
    #[arg(long)]
    unencrypted: bool,
    /// The share of vCPU time auto-converge takes from the guest first, in percent [default: 20].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=99))]
    throttle_initial: Option<u32>,
    /// What auto-converge adds at each pass that still doesn't converge, in percent [default: 10].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=99))]
    throttle_increment: Option<u32>,
    /// Give up after this many passes over memory in a row without progress (with auto-converge: at its highest throttle) [default: 10].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    stalled_passes: Option<u32>,
    /// Allow postcopy: the guest moves to the target once precopy stalls (or at `switch-to-postcopy`) and fetches the rest of its memory from here; a broken link then loses it.
    #[arg(long)]
    postcopy: bool,
}

#[derive(Debug, Args)]
pub(super) struct SwitchArgs {
    /// Instance name.
    name: String,
}

#[derive(Debug, Args)]
pub(super) struct CancelArgs {
    /// Instance name.
    name: String,
}

#[derive(Debug, Args)]
pub(super) struct SaveArgs {
    /// Instance name.
    name: String,
    /// Absolute path of the file to create (must not exist).
    path: String,
}

#[derive(Debug, Args)]
pub(super) struct RestoreArgs {
    /// Absolute path of the save file.
    path: String,
    /// Stay paused until `kvm-agent instance resume`.
    #[arg(long)]
    paused: bool,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn phase_name(phase: i32) -> String {
    label(&enum_type("MigrationPhase"), phase)
}

pub(super) fn progress_line(p: &pb::MigrationProgress) -> String {
    let mut line = format!("{:<10}", phase_name(p.phase));
    if !p.qemu_status.is_empty() {
        line.push_str(&format!(
            " {:<10} {:>8.1} MiB sent, {:>8.1} MiB left of {:.0} MiB",
            p.qemu_status,
            mib(p.transferred_bytes),
            mib(p.remaining_bytes),
            mib(p.total_bytes)
        ));
        if p.passes > 1 {
            line.push_str(&format!(", pass {}", p.passes));
        }
        if p.dirty_rate_bytes_per_second > 0 {
            line.push_str(&format!(
                ", dirtying {:.1} MiB/s",
                mib(p.dirty_rate_bytes_per_second)
            ));
        }
        if p.throttle_percent > 0 {
            line.push_str(&format!(", throttled {}%", p.throttle_percent));
        }
        if p.postcopy {
            line.push_str(", postcopy");
        }
        if p.downtime_ms > 0 {
            line.push_str(&format!(", downtime {} ms", p.downtime_ms));
        } else if p.expected_downtime_ms > 0 {
            line.push_str(&format!(
                ", expected downtime {} ms",
                p.expected_downtime_ms
            ));
        }
    }
    line.push_str(&format!(
        " ({:.1} s, {})",
        p.elapsed_ms as f64 / 1000.0,
        stream_kind(p)
    ));
    line
}

fn stream_kind(p: &pb::MigrationProgress) -> &'static str {
    if p.encrypted { "encrypted" } else { "plain" }
}

/// Runs `kvm-agent migrate`.
pub(super) async fn migrate(
    mut client: NodeAgentClient<Channel>,
    args: MigrateArgs,
    out: Printer,
) -> anyhow::Result<()> {
    let request = pb::MigrateInstanceRequest {
        name: args.name.clone(),
        target: args.to.clone(),
        options: Some(pb::MigrationOptions {
            offline: args.offline,
            max_bandwidth: args.max_bandwidth.unwrap_or(0),
            downtime_limit_ms: args.downtime_limit_ms.unwrap_or(0),
            auto_converge: args.no_auto_converge.then_some(false),
            xbzrle_cache_bytes: args.xbzrle_cache.unwrap_or(0),
            multifd_channels: args.multifd_channels.unwrap_or(0),
            unencrypted: args.unencrypted,
            throttle_initial_percent: args.throttle_initial.unwrap_or(0),
            throttle_increment_percent: args.throttle_increment.unwrap_or(0),
            stalled_passes_limit: args.stalled_passes.unwrap_or(0),
            postcopy: args.postcopy,
            postcopy_recovery_window_ms: 0,
        }),
    };
    let mut stream = client.migrate_instance(request).await?.into_inner();
    let bar = (!out.json && std::io::stdout().is_terminal()).then(progress_bar);
    let mut last = None;
    while let Some(item) = stream.next().await {
        let progress = match item {
            Ok(p) => p,
            Err(status) => {
                if let Some(bar) = &bar {
                    bar.abandon_with_message("failed");
                }
                return Err(status.into());
            }
        };
        match &bar {
            Some(bar) => {
                bar.set_length(progress.total_bytes.max(progress.transferred_bytes));
                bar.set_position(progress.transferred_bytes);
                bar.set_message(phase_name(progress.phase));
            }
            None => out.show(&progress, |p| println!("{}", progress_line(p))),
        }
        last = Some(progress);
    }
    if let Some(bar) = &bar {
        bar.finish_with_message("completed");
    }
    let done = last
        .filter(|p| p.phase == pb::MigrationPhase::Completed as i32)
        .context(
            "the migration stream ended without an outcome; check the instance on both nodes",
        )?;
    if !out.json {
        println!(
            "{} migrated to {} in {:.1} s (downtime {} ms, {} stream)",
            args.name,
            args.to,
            done.elapsed_ms as f64 / 1000.0,
            done.downtime_ms,
            stream_kind(&done)
        );
    }
    Ok(())
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:12} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {elapsed})",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Runs `kvm-agent switch-to-postcopy`.
pub(super) async fn switch_to_postcopy(
    mut client: NodeAgentClient<Channel>,
    SwitchArgs { name }: SwitchArgs,
    out: Printer,
) -> anyhow::Result<()> {
    let request = pb::SwitchToPostcopyRequest { name: name.clone() };
    let switched = client.switch_to_postcopy(request).await?.into_inner();
    out.show_named(&name, &switched, |_| {
        println!("{name}: switching to postcopy");
    });
    Ok(())
}

/// Runs `kvm-agent cancel-migration`.
pub(super) async fn cancel(
    mut client: NodeAgentClient<Channel>,
    CancelArgs { name }: CancelArgs,
    out: Printer,
) -> anyhow::Result<()> {
    let request = pb::CancelMigrationRequest { name: name.clone() };
    let cancelled = client.cancel_migration(request).await?.into_inner();
    out.show_named(&name, &cancelled, |c| {
        println!("{name}: {} migration cancelled", c.cancelled);
    });
    Ok(())
}

/// Shows a spinner on a terminal while `work` runs.
async fn with_spinner<T>(message: String, out: Printer, work: impl Future<Output = T>) -> T {
    if out.json || !std::io::stderr().is_terminal() {
        return work.await;
    }
    let spinner = ProgressBar::new_spinner().with_message(message);
    spinner.enable_steady_tick(Duration::from_millis(100));
    let result = work.await;
    spinner.finish_and_clear();
    result
}

/// Runs `kvm-agent save`.
pub(super) async fn save(
    mut client: NodeAgentClient<Channel>,
    SaveArgs { name, path }: SaveArgs,
    out: Printer,
) -> anyhow::Result<()> {
    let request = pb::SaveInstanceRequest {
        name: name.clone(),
        path: path.clone(),
    };
    let saved = with_spinner(
        format!("saving {name} to {path}"),
        out,
        client.save_instance(request),
    )
    .await?
    .into_inner();
    out.show(&saved, |saved| {
        println!(
            "{name} saved to {path}: {:.1} MiB in {:.2} s",
            mib(saved.file_bytes),
            saved.duration_ms as f64 / 1000.0
        );
    });
    Ok(())
}

/// Runs `kvm-agent restore`.
pub(super) async fn restore(
    mut client: NodeAgentClient<Channel>,
    RestoreArgs { path, paused }: RestoreArgs,
    out: Printer,
) -> anyhow::Result<()> {
    let request = pb::RestoreInstanceRequest {
        path: path.clone(),
        paused,
    };
    let restored = with_spinner(
        format!("restoring from {path}"),
        out,
        client.restore_instance(request),
    )
    .await?
    .into_inner();
    out.show(&restored, |restored| {
        println!(
            "restored from {path} in {:.2} s",
            restored.duration_ms as f64 / 1000.0
        );
        print_instance(&restored.instance.clone().unwrap_or_default());
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_line_says_what_a_person_wants() {
        let line = progress_line(&pb::MigrationProgress {
            phase: pb::MigrationPhase::Active as i32,
            qemu_status: "active".into(),
            transferred_bytes: 64 << 20,
            remaining_bytes: 192 << 20,
            total_bytes: 256 << 20,
            expected_downtime_ms: 300,
            elapsed_ms: 1500,
            passes: 3,
            throttle_percent: 40,
            ..Default::default()
        });
        assert!(
            line.contains("pass 3") && line.contains("throttled 40%"),
            "{line}"
        );
        assert!(line.contains("64.0 MiB sent"), "{line}");
        assert!(line.contains("192.0 MiB left of 256 MiB"), "{line}");
        assert!(line.contains("expected downtime 300 ms"), "{line}");
        assert!(line.ends_with("(1.5 s, plain)"), "{line}");
    }
}
