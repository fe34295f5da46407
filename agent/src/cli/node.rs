//! `kvm-agent node`: facts about the node.

use clap::Subcommand;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

use super::Printer;

#[derive(Debug, Subcommand)]
pub(super) enum NodeCommand {
    /// Show QEMU, KVM, memory and CPUs.
    Info,
}

/// Runs `kvm-agent node`.
pub(super) async fn run(
    mut client: NodeAgentClient<Channel>,
    command: NodeCommand,
    out: Printer,
) -> anyhow::Result<()> {
    let NodeCommand::Info = command;
    let node = client
        .get_node_info(pb::GetNodeInfoRequest {})
        .await?
        .into_inner();
    out.show(&node, |n| {
        println!("hostname:   {}", n.hostname);
        println!(
            "qemu:       {} {}{}",
            n.qemu_path, n.qemu_version, n.qemu_error
        );
        println!("kvm:        {} ({})", n.kvm_available, n.kvm_detail);
        println!(
            "memory:     {} MiB total, {} MiB available",
            n.memory_total_mib, n.memory_available_mib
        );
        println!("cpus:       {}", n.cpus);
        println!("instances:  {}", n.instance_count);
        println!(
            "agent:      {} (peer protocol {})",
            n.agent_version, n.peer_protocol
        );
    });
    Ok(())
}
