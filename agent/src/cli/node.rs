//! `kvm-agent node`: facts about the node.

use clap::Subcommand;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Debug, Subcommand)]
pub(super) enum NodeCommand {
    /// Show QEMU, KVM, memory and CPUs.
    Info,
}

/// Runs `kvm-agent node`.
pub(super) async fn run(
    mut client: NodeAgentClient<Channel>,
    command: NodeCommand,
    json_out: bool,
) -> anyhow::Result<()> {
    let NodeCommand::Info = command;
    let n = client
        .get_node_info(pb::GetNodeInfoRequest {})
        .await?
        .into_inner();
    if json_out {
        println!(
            "{}",
            json!({
                "hostname": n.hostname, "qemu_path": n.qemu_path, "qemu_version": n.qemu_version,
                "qemu_error": n.qemu_error, "kvm_available": n.kvm_available, "kvm_detail": n.kvm_detail,
                "memory_total_mib": n.memory_total_mib, "memory_available_mib": n.memory_available_mib,
                "cpus": n.cpus, "instance_count": n.instance_count, "agent_version": n.agent_version,
            })
        );
    } else {
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
    }
    Ok(())
}
