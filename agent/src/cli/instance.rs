//! `kvm-agent instance`: start, stop, reboot, show and list instances.

use clap::{Subcommand, ValueEnum};
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::device::{device_json, print_device};
use super::spec::{SpecArgs, SpecOptions};
use super::state_name;

#[derive(Debug, Subcommand)]
pub(super) enum InstanceCommand {
    /// Start an instance from a spec given by flags.
    Start(SpecArgs),
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
        #[arg(long, value_enum, default_value = "soft")]
        mode: RebootModeArg,
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
    /// Take a quarantined instance's QEMU back, once QEMU shows it is the
    /// runtime of the record that was set aside.
    Adopt {
        /// Instance name.
        name: String,
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

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum RebootModeArg {
    Soft,
    Hard,
    Reset,
}

/// The state, or `reconciling` while the agent, just restarted, has only
/// the record's word for it.
fn shown_state(i: &pb::InstanceInfo) -> String {
    if i.reconciling {
        "reconciling".into()
    } else {
        state_name(i.state)
    }
}

pub(super) fn instance_json(i: &pb::InstanceInfo) -> Value {
    json!({
        "name": i.name,
        "uuid": i.uuid,
        "state": state_name(i.state),
        "reconciling": i.reconciling,
        "state_detail": i.state_detail,
        "pid": i.pid,
        "uptime_seconds": i.uptime_seconds,
        "memory_mib": i.memory_mib,
        "vcpus": i.vcpus,
        "runtime_generation": i.runtime_generation,
        "machine_type": i.machine_type,
        "accelerator": i.accelerator,
        "qemu_version": i.qemu_version,
        "cpu_mask": i.cpu_mask,
        "devices": i.devices.iter().map(device_json).collect::<Vec<_>>(),
    })
}

pub(super) fn print_instance(i: &pb::InstanceInfo) {
    println!("name:        {}", i.name);
    println!("uuid:        {}", i.uuid);
    println!("state:       {}", shown_state(i));
    if !i.state_detail.is_empty() {
        println!("detail:      {}", i.state_detail);
    }
    if i.pid != 0 {
        println!("pid:         {}  (up {}s)", i.pid, i.uptime_seconds);
    }
    println!("memory:      {} MiB, {} vcpus", i.memory_mib, i.vcpus);
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
pub(super) async fn run(
    mut client: NodeAgentClient<Channel>,
    command: InstanceCommand,
    json_out: bool,
) -> anyhow::Result<()> {
    let show = |i: &pb::InstanceInfo| {
        if json_out {
            println!("{}", instance_json(i));
        } else {
            print_instance(i);
        }
    };
    match command {
        InstanceCommand::Start(spec) => {
            let spec = spec.to_proto()?;
            show(
                &client
                    .start_instance(pb::StartInstanceRequest { spec: Some(spec) })
                    .await?
                    .into_inner(),
            );
        }
        InstanceCommand::Stop {
            name,
            force,
            powerdown_timeout_ms,
        } => {
            let r = client
                .stop_instance(pb::StopInstanceRequest {
                    name,
                    force,
                    powerdown_timeout_ms: powerdown_timeout_ms.unwrap_or(0),
                })
                .await?
                .into_inner();
            let method = pb::StopMethod::try_from(r.method)
                .map(|m| {
                    m.as_str_name()
                        .trim_start_matches("STOP_METHOD_")
                        .to_lowercase()
                })
                .unwrap_or_default();
            if json_out {
                println!(
                    "{}",
                    json!({ "method": method, "instance": r.instance.as_ref().map(instance_json) })
                );
            } else {
                println!("stopped ({method})");
            }
        }
        InstanceCommand::Reboot { name, mode, spec } => {
            let mode = match mode {
                RebootModeArg::Soft => pb::RebootMode::Soft,
                RebootModeArg::Hard => pb::RebootMode::Hard,
                RebootModeArg::Reset => pb::RebootMode::Reset,
            };
            let spec = match mode {
                pb::RebootMode::Hard => Some(spec.to_proto(&name)?),
                _ if spec.any_given() => {
                    anyhow::bail!("spec options apply to a hard reboot only; add --mode hard")
                }
                _ => None,
            };
            show(
                &client
                    .reboot_instance(pb::RebootInstanceRequest {
                        name,
                        mode: mode as i32,
                        spec,
                    })
                    .await?
                    .into_inner(),
            );
        }
        InstanceCommand::Info { name } => show(
            &client
                .get_instance(pb::GetInstanceRequest { name })
                .await?
                .into_inner(),
        ),
        InstanceCommand::List => {
            let list = client
                .list_instances(pb::ListInstancesRequest {})
                .await?
                .into_inner()
                .instances;
            if json_out {
                println!("{}", Value::Array(list.iter().map(instance_json).collect()));
            } else {
                println!(
                    "{:<20} {:<11} {:>8} {:>8} {:>5} {:>4}",
                    "NAME", "STATE", "PID", "MEM_MIB", "VCPUS", "GEN"
                );
                for i in &list {
                    println!(
                        "{:<20} {:<11} {:>8} {:>8} {:>5} {:>4}",
                        i.name,
                        shown_state(i),
                        i.pid,
                        i.memory_mib,
                        i.vcpus,
                        i.runtime_generation
                    );
                }
            }
        }
        InstanceCommand::Runtime { name } => {
            let r = client
                .get_runtime(pb::GetRuntimeRequest { name })
                .await?
                .into_inner();
            println!("{}", r.runtime_json);
        }
        InstanceCommand::Pause { name } => {
            show(
                &client
                    .pause_instance(pb::PauseInstanceRequest { name })
                    .await?
                    .into_inner(),
            );
        }
        InstanceCommand::Resume { name } => {
            show(
                &client
                    .resume_instance(pb::ResumeInstanceRequest { name })
                    .await?
                    .into_inner(),
            );
        }
        InstanceCommand::Adopt { name } => {
            show(
                &client
                    .adopt_instance(pb::AdoptInstanceRequest { name })
                    .await?
                    .into_inner(),
            );
        }
        InstanceCommand::SetMemory {
            name,
            memory_mib,
            no_wait,
            timeout_ms,
        } => {
            let r = client
                .set_memory(pb::SetMemoryRequest {
                    name: name.clone(),
                    memory_mib,
                    wait: !no_wait,
                    timeout_ms,
                })
                .await?
                .into_inner();
            if json_out {
                println!(
                    "{}",
                    json!({
                        "name": name, "target_mib": r.target_mib,
                        "actual_mib": r.actual_mib, "maximum_mib": r.maximum_mib,
                    })
                );
            } else {
                println!(
                    "{name}: {} MiB of {} MiB (target {} MiB)",
                    r.actual_mib, r.maximum_mib, r.target_mib
                );
            }
        }
    }
    Ok(())
}
