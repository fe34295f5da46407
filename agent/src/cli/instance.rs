//! `kvm-agent instance`: start, stop, reboot, show and list instances.

use anyhow::Context;
use clap::{Args, Subcommand};
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

use super::Printer;
use super::device::print_device;
use super::options::EnumParser;
use super::spec::{SpecArgs, SpecOptions};
use super::wire::{enum_type, label, state_label};

#[derive(Debug, Subcommand)]
pub(super) enum InstanceCommand {
    /// Start an instance from a spec given by flags.
    Start {
        #[command(flatten)]
        spec: SpecArgs,
        /// Start with the vCPUs stopped, until `instance resume`.
        #[arg(long)]
        paused: bool,
    },
    /// Stop an instance.
    Stop {
        /// Instance name.
        name: String,
        /// SIGKILL at once.
        #[arg(long)]
        force: bool,
        /// Override the powerdown timeout.
        #[arg(long)]
        powerdown_timeout_ms: Option<u32>,
    },
    /// Reboot an instance.
    Reboot {
        /// Instance name.
        name: String,
        /// soft replays the saved runtime, hard applies the spec, reset is system_reset.
        #[arg(long, default_value = "soft", value_parser = EnumParser::new("RebootMode", "reboot mode"))]
        mode: i32,
        #[command(flatten)]
        stop: RebootStop,
        #[command(
            flatten,
            next_help_heading = "The spec a hard reboot applies (--mode hard only)"
        )]
        spec: SpecOptions,
    },
    /// Show one instance.
    Info {
        /// Instance name.
        name: String,
    },
    /// List instances.
    List,
    /// Print an instance's saved runtime.
    Runtime {
        /// Instance name.
        name: String,
    },
    /// Stop a guest's vCPUs; QEMU keeps running.
    Pause {
        /// Instance name.
        name: String,
    },
    /// Let a paused guest run again.
    Resume {
        /// Instance name.
        name: String,
    },
    /// Ask the QEMU guest agent in a guest: ping, freeze or thaw its filesystems.
    GuestAgent {
        /// ping, freeze or thaw.
        #[arg(value_parser = ["ping", "freeze", "thaw"])]
        call: String,
        /// Instance name.
        name: String,
        /// How long to wait for the guest, in milliseconds (default: 5 s for a ping, 60 s otherwise).
        #[arg(long, default_value_t = 0)]
        timeout_ms: u32,
    },
    /// Set the password VNC asks viewers for, read from the first line of a
    /// file or of standard input.
    SetDisplayPassword {
        /// Instance name.
        name: String,
        /// The file; standard input when not given.
        #[arg(long)]
        password_file: Option<std::path::PathBuf>,
    },
    /// Take a quarantined instance's QEMU back, once QEMU shows it is the
    /// runtime of the record that was set aside.
    Adopt {
        /// Instance name.
        name: String,
    },
    /// Forget a stopped instance: its record and run directory.
    Delete {
        /// Instance name.
        name: String,
    },
    /// Give a stopped instance a new name; its uuid, devices and slots stay.
    Rename {
        /// Instance name.
        name: String,
        /// The name it takes.
        new_name: String,
    },
    /// Move a running guest's memory with its balloon, up to the memory it
    /// was started with; waits until the guest has got there.
    SetMemory {
        /// Instance name.
        name: String,
        /// Target in MiB.
        memory_mib: u64,
        /// Set the target and return at once.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the guest.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
}

/// The state, or `reconciling` while the agent, just restarted, has only
/// the record's word for it.
fn shown_state(i: &pb::InstanceInfo) -> String {
    if i.reconciling {
        "reconciling".into()
    } else {
        state_label(i.state)
    }
}

pub(super) fn print_instance(i: &pb::InstanceInfo) {
    println!("name:        {}", i.name);
    println!("uuid:        {}", i.uuid);
    println!("state:       {}", shown_state(i));
    if !i.state_detail.is_empty() {
        println!("detail:      {}", i.state_detail);
    }
    if !i.unconfined.is_empty() {
        println!("unconfined:  {}", i.unconfined);
    }
    if i.pid != 0 {
        println!("pid:         {}  (up {}s)", i.pid, i.uptime_seconds);
    }
    println!("memory:      {} MiB, {} vcpus", i.memory_mib, i.vcpus);
    if i.balloon_mib != 0 && i.balloon_mib != i.memory_mib {
        println!("balloon:     the guest has {} MiB now", i.balloon_mib);
    }
    if !i.cpu_mask.is_empty() {
        println!("cpu mask:    {}", i.cpu_mask);
    }
    println!(
        "machine:     {} ({}), QEMU {}",
        i.machine_type, i.accelerator, i.qemu_version
    );
    println!("generation:  {}", i.runtime_generation);
    for d in &i.devices {
        print!("  ");
        print_device(d);
    }
}

/// Runs `kvm-agent instance`.
// Long: one arm per subcommand, a dispatch table that reads best whole.
pub(super) async fn run(
    mut client: NodeAgentClient<Channel>,
    command: InstanceCommand,
    out: Printer,
) -> anyhow::Result<()> {
    let instance = match command {
        InstanceCommand::Start { spec, paused } => {
            let spec = Some(spec.to_proto());
            client
                .start_instance(pb::StartInstanceRequest { spec, paused })
                .await?
        }
        InstanceCommand::Stop {
            name,
            force,
            powerdown_timeout_ms,
        } => {
            let request = pb::StopInstanceRequest {
                name,
                force,
                powerdown_timeout_ms: powerdown_timeout_ms.unwrap_or(0),
            };
            return stop(&mut client, request, out).await;
        }
        InstanceCommand::Reboot {
            name,
            mode,
            stop,
            spec,
        } => {
            let request = reboot(name, mode, &stop, &spec)?;
            client.reboot_instance(request).await?
        }
        InstanceCommand::Info { name } => {
            client.get_instance(pb::GetInstanceRequest { name }).await?
        }
        InstanceCommand::List => {
            let list = client.list_instances(pb::ListInstancesRequest {}).await?;
            out.show_all(&list.into_inner().instances, print_table);
            return Ok(());
        }
        InstanceCommand::Runtime { name } => {
            let r = client.get_runtime(pb::GetRuntimeRequest { name }).await?;
            println!("{}", r.into_inner().runtime_json);
            return Ok(());
        }
        InstanceCommand::Pause { name } => {
            client
                .pause_instance(pb::PauseInstanceRequest { name })
                .await?
        }
        InstanceCommand::Resume { name } => {
            client
                .resume_instance(pb::ResumeInstanceRequest { name })
                .await?
        }
        InstanceCommand::Adopt { name } => {
            client
                .adopt_instance(pb::AdoptInstanceRequest { name })
                .await?
        }
        InstanceCommand::Delete { name } => return delete(&mut client, name, out).await,
        InstanceCommand::Rename { name, new_name } => {
            client
                .rename_instance(pb::RenameInstanceRequest { name, new_name })
                .await?
        }
        InstanceCommand::GuestAgent {
            call,
            name,
            timeout_ms,
        } => {
            let request = pb::GuestAgentRequest { name, timeout_ms };
            let answer = match call.as_str() {
                "ping" => client.ping_guest_agent(request).await?,
                "freeze" => client.freeze_guest_filesystems(request).await?,
                _ => client.thaw_guest_filesystems(request).await?,
            };
            out.show(&answer.into_inner(), |a| match call.as_str() {
                "ping" => println!("the guest agent answers"),
                "freeze" => println!("{} filesystems frozen", a.filesystems),
                _ => println!("{} filesystems thawed", a.filesystems),
            });
            return Ok(());
        }
        InstanceCommand::SetDisplayPassword {
            name,
            password_file,
        } => {
            let text = match &password_file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
                None => std::io::read_to_string(std::io::stdin())?,
            };
            let password = text.lines().next().unwrap_or_default().to_owned();
            let answer = client
                .set_display_password(pb::SetDisplayPasswordRequest { name, password })
                .await?;
            out.show(&answer.into_inner(), |_| println!("VNC password set"));
            return Ok(());
        }
        InstanceCommand::SetMemory {
            name,
            memory_mib,
            no_wait,
            timeout_ms,
        } => {
            let request = pb::SetMemoryRequest {
                name,
                memory_mib,
                wait: !no_wait,
                timeout_ms,
            };
            return set_memory(&mut client, request, out).await;
        }
    };
    out.show(&instance.into_inner(), print_instance);
    Ok(())
}

async fn stop(
    client: &mut NodeAgentClient<Channel>,
    request: pb::StopInstanceRequest,
    out: Printer,
) -> anyhow::Result<()> {
    let stopped = client.stop_instance(request).await?.into_inner();
    out.show(&stopped, |r| {
        println!("stopped ({})", label(&enum_type("StopMethod"), r.method));
    });
    Ok(())
}

async fn delete(
    client: &mut NodeAgentClient<Channel>,
    name: String,
    out: Printer,
) -> anyhow::Result<()> {
    let request = pb::DeleteInstanceRequest { name: name.clone() };
    let deleted = client.delete_instance(request).await?.into_inner();
    out.show_named(&name, &deleted, |_| println!("deleted {name}"));
    Ok(())
}

async fn set_memory(
    client: &mut NodeAgentClient<Channel>,
    request: pb::SetMemoryRequest,
    out: Printer,
) -> anyhow::Result<()> {
    let name = request.name.clone();
    let r = client.set_memory(request).await?.into_inner();
    out.show_named(&name, &r, |r| {
        println!(
            "{name}: {} MiB of {} MiB (target {} MiB)",
            r.actual_mib, r.maximum_mib, r.target_mib
        );
    });
    Ok(())
}

/// How `instance reboot` stops the guest (soft and hard reboots).
#[derive(Debug, Args)]
pub(super) struct RebootStop {
    /// soft and hard: end QEMU at once instead of asking the guest to
    /// power down.
    #[arg(long)]
    force: bool,
    /// soft and hard: override the powerdown timeout.
    #[arg(long)]
    powerdown_timeout_ms: Option<u32>,
}

/// The request of `instance reboot`: spec options only with `--mode hard`.
fn reboot(
    name: String,
    mode: i32,
    stop: &RebootStop,
    spec: &SpecOptions,
) -> anyhow::Result<pb::RebootInstanceRequest> {
    let spec = if mode == pb::RebootMode::Hard as i32 {
        Some(spec.to_proto(&name))
    } else if spec.any_given() {
        anyhow::bail!("spec options apply to a hard reboot only; add --mode hard")
    } else {
        None
    };
    Ok(pb::RebootInstanceRequest {
        name,
        mode,
        spec,
        powerdown_timeout_ms: stop.powerdown_timeout_ms.unwrap_or(0),
        force: stop.force,
    })
}

fn print_table(list: &[pb::InstanceInfo]) {
    println!(
        "{:<20} {:<11} {:>8} {:>8} {:>5} {:>4}  NOTE",
        "NAME", "STATE", "PID", "MEM_MIB", "VCPUS", "GEN"
    );
    for i in list {
        println!(
            "{:<20} {:<11} {:>8} {:>8} {:>5} {:>4}  {}",
            i.name,
            shown_state(i),
            i.pid,
            i.memory_mib,
            i.vcpus,
            i.runtime_generation,
            if i.unconfined.is_empty() {
                ""
            } else {
                "unconfined"
            }
        );
    }
}
