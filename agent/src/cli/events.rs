//! `kvm-agent events`: follow what happens to instances.

use clap::Args;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use serde_json::json;
use tonic::transport::Channel;

use super::state_name;
use super::transfer::{progress_json, progress_line};

#[derive(Debug, Args)]
pub(super) struct EventsArgs {
    /// Only this instance.
    #[arg(long)]
    instance: Option<String>,
    /// Replay the kept events after this sequence number first.
    #[arg(long)]
    after: Option<u64>,
}

/// Runs `kvm-agent events`.
pub(super) async fn run(
    mut client: NodeAgentClient<Channel>,
    EventsArgs { instance, after }: EventsArgs,
    json_out: bool,
) -> anyhow::Result<()> {
    let request = pb::WatchEventsRequest {
        instance: instance.unwrap_or_default(),
        after_sequence: after,
    };
    let mut stream = client.watch_events(request).await?.into_inner();
    while let Some(event) = stream.message().await? {
        let kind = pb::EventKind::try_from(event.kind)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("EVENT_KIND_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        if json_out {
            println!(
                "{}",
                json!({
                    "sequence": event.sequence, "unix_millis": event.unix_millis, "instance": event.instance,
                    "kind": kind, "state": state_name(event.state), "state_detail": event.state_detail,
                    "guest_initiated": event.guest_initiated, "device": event.device,
                    "pci_slot": event.pci_slot, "reboot": event.reboot,
                    "migration": event.migration.as_ref().map(progress_json),
                })
            );
            continue;
        }
        let what = match event.kind {
            k if k == pb::EventKind::StateChanged as i32 => {
                let by_guest = if event.guest_initiated {
                    " (by the guest)"
                } else {
                    ""
                };
                format!("{}{by_guest}", state_name(event.state))
            }
            k if k == pb::EventKind::Rebooted as i32 => format!("rebooted ({})", event.reboot),
            k if k == pb::EventKind::MigrationProgress as i32 => event
                .migration
                .as_ref()
                .map(progress_line)
                .unwrap_or_default(),
            _ => format!("{kind} {}", event.device),
        };
        println!("{:>6} {:<20} {what}", event.sequence, event.instance);
    }
    Ok(())
}
