//! `kvm-agent events`: follow what happens to instances.

use clap::Args;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

use super::Printer;
use super::transfer::progress_line;
use super::wire::{enum_type, label, state_label};

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
    out: Printer,
) -> anyhow::Result<()> {
    let request = pb::WatchEventsRequest {
        name: instance.unwrap_or_default(),
        after_sequence: after,
    };
    let mut stream = client.watch_events(request).await?.into_inner();
    while let Some(event) = stream.message().await? {
        out.show(&event, print_event);
    }
    Ok(())
}

fn print_event(event: &pb::Event) {
    let what = match event.kind {
        k if k == pb::EventKind::StateChanged as i32 => {
            let by_guest = if event.guest_initiated {
                " (by the guest)"
            } else {
                ""
            };
            format!("{}{by_guest}", state_label(event.state))
        }
        k if k == pb::EventKind::Rebooted as i32 => format!("rebooted ({})", event.reboot),
        k if k == pb::EventKind::MigrationProgress as i32 => event
            .migration
            .as_ref()
            .map(progress_line)
            .unwrap_or_default(),
        kind => format!("{} {}", label(&enum_type("EventKind"), kind), event.device),
    };
    println!("{:>6} {:<20} {what}", event.sequence, event.instance);
}
