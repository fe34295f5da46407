//! `kvm-agent adopt-ganeti`: take over the QEMUs Ganeti's own KVM driver
//! started on this node, while they run.

use clap::Args;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

use super::Printer;
use super::instance::print_instance;

/// Arguments of `adopt-ganeti`.
#[derive(Debug, Args)]
pub(super) struct AdoptGanetiArgs {
    /// Only this instance; every one with a runtime file otherwise.
    name: Option<String>,
    /// Check each instance and say what would be done; take nothing over.
    #[arg(long)]
    dry_run: bool,
    /// Ganeti's KVM directory.
    #[arg(long, default_value = crate::ganeti::DEFAULT_DIR)]
    ganeti_dir: String,
}

/// Runs `adopt-ganeti`; fails when any instance was refused, so a script
/// that switches a node over stops there.
pub(super) async fn run(
    mut client: NodeAgentClient<Channel>,
    args: AdoptGanetiArgs,
    out: Printer,
) -> anyhow::Result<()> {
    let request = pb::AdoptGanetiInstancesRequest {
        ganeti_dir: args.ganeti_dir,
        name: args.name.unwrap_or_default(),
        dry_run: args.dry_run,
    };
    let answer = client.adopt_ganeti_instances(request).await?.into_inner();
    out.show_all(&answer.instances, |all| {
        if all.is_empty() {
            println!("Ganeti's KVM driver runs no instance here");
        }
        all.iter().for_each(print_adoption);
    });
    let refused = answer
        .instances
        .iter()
        .filter(|a| a.outcome == pb::GanetiAdoptionOutcome::Refused as i32)
        .count();
    if refused > 0 {
        anyhow::bail!("{refused} instance(s) left to Ganeti's KVM driver; see the reasons above");
    }
    Ok(())
}

fn print_adoption(a: &pb::GanetiAdoption) {
    use pb::GanetiAdoptionOutcome as Outcome;
    let what = match Outcome::try_from(a.outcome) {
        Ok(Outcome::Adopted) => "adopted".to_owned(),
        Ok(Outcome::WouldAdopt) => "would adopt".to_owned(),
        Ok(Outcome::AlreadyAdopted) => "already adopted".to_owned(),
        _ => format!("refused: {}", a.reason),
    };
    println!("{} (pid {}): {what}", a.name, a.pid);
    if let Some(instance) = &a.instance {
        print_instance(instance);
        println!();
    }
}
