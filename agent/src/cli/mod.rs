//! The `kvm-agent` command line: `serve`, and client commands that call
//! the API over the agent's socket.
//!
//! This file holds the global flags, the command groups and the
//! connection; each group has a file of its own.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use serde_json::Value;
use tonic::transport::Channel;

use self::wire::ApiMessage;
use crate::config::{DEFAULT_STATE_DIR, SOCKET_NAME};
use crate::peer::AgentAddress;
use crate::tls::{TlsFiles, TlsMaterial};

mod certificates;
mod console;
mod device;
mod events;
mod ganeti;
mod instance;
mod node;
mod options;
mod serve;
mod spec;
mod transfer;
mod wire;

/// kvm-agent: a node agent for QEMU/KVM clusters.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// The agent's unix socket: where `serve` creates it, and what client
    /// commands call (default: agent.sock in the state directory).
    #[arg(long, global = true, env = "KVM_AGENT_SOCKET")]
    socket: Option<PathBuf>,
    /// The agent client commands call, when not the local socket:
    /// https://HOST:PORT (mutual TLS), http://127.0.0.1:PORT or a socket path.
    #[arg(long, global = true, env = "KVM_AGENT_ADDRESS", value_parser = AgentAddress::parse)]
    agent: Option<AgentAddress>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Output format of client commands.
    #[arg(long, short, global = true, value_enum, default_value = "human")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// Mutual TLS on TCP. With `serve`: the agent's certificate, and the CA
/// its clients' and migration targets' certificates must be signed by.
/// With client commands: the client's certificate, and the agent's CA.
#[derive(Debug, Args)]
struct TlsArgs {
    /// Certificate (PEM) this side presents.
    #[arg(long, global = true, env = "KVM_AGENT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of that certificate.
    #[arg(long, global = true, env = "KVM_AGENT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The cluster's CA (PEM), which signed the other side's certificate.
    #[arg(
        long,
        global = true,
        env = "KVM_AGENT_TLS_CA",
        visible_alias = "client-ca"
    )]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn load(&self) -> anyhow::Result<Option<TlsMaterial>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => {
                let files = TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                };
                Ok(Some(TlsMaterial::load(&files)?))
            }
            _ => bail!("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca"),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Serve(serve::ServeArgs),
    /// Check the agent's settings.
    Config {
        #[command(subcommand)]
        command: serve::ConfigCommand,
    },
    /// Facts about the node.
    Node {
        #[command(subcommand)]
        command: node::NodeCommand,
    },
    /// Manage instances.
    Instance {
        // Boxed: a spec's options make it the largest command by far.
        #[command(subcommand)]
        command: Box<instance::InstanceCommand>,
    },
    /// Hot-add, remove and list the devices of running instances.
    Device {
        #[command(subcommand)]
        command: device::DeviceCommand,
    },
    /// Attach to an instance's serial console (on the node; Ctrl-] detaches).
    Console(console::ConsoleArgs),
    /// Move a running instance to another node's agent.
    Migrate(transfer::MigrateArgs),
    /// Cancel an outgoing migration (the instance stays), or drop an incoming one.
    CancelMigration(transfer::CancelArgs),
    /// Switch an outgoing migration started with --postcopy to postcopy now.
    SwitchToPostcopy(transfer::SwitchArgs),
    /// Save a guest's state to a new file on the node; its QEMU then ends.
    Save(transfer::SaveArgs),
    /// Start an instance from a save file.
    Restore(transfer::RestoreArgs),
    /// Follow the agent's events (one line each; JSON lines with --output json).
    Events(events::EventsArgs),
    /// Take over, while they run, the QEMUs that Ganeti's own KVM driver
    /// started on this node.
    AdoptGaneti(ganeti::AdoptGanetiArgs),
    /// Make the cluster's CA and the certificates it signs.
    Tls {
        #[command(subcommand)]
        command: certificates::TlsCommand,
    },
    /// Print a completion script, e.g. `kvm-agent completions bash >
    /// /etc/bash_completion.d/kvm-agent`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

impl Cli {
    /// Whether this runs the agent itself rather than a client command.
    pub fn serves(&self) -> bool {
        matches!(self.command, Command::Serve(_))
    }
}

/// Runs the command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        socket,
        agent,
        tls,
        output,
        command,
    } = cli;
    let out = Printer {
        json: matches!(output, Output::Json),
    };
    let connect = async || connect_agent(agent.as_ref(), socket.as_ref(), &tls).await;
    match command {
        Command::Completions { shell } => completions(shell),
        Command::Tls { command } => certificates::run(command),
        Command::Serve(args) => serve::serve(args.settings(socket.as_ref(), &tls)?).await,
        Command::Config { command } => serve::config(command, socket.as_ref(), &tls, out),
        Command::Node { command } => node::run(connect().await?, command, out).await,
        Command::Instance { command } => instance::run(connect().await?, *command, out).await,
        Command::Device { command } => device::run(connect().await?, command, out).await,
        Command::Console(args) => console::run(connect().await?, args, out).await,
        Command::Events(args) => events::run(connect().await?, args, out).await,
        Command::Migrate(args) => transfer::migrate(connect().await?, args, out).await,
        Command::CancelMigration(args) => transfer::cancel(connect().await?, args, out).await,
        Command::SwitchToPostcopy(args) => {
            transfer::switch_to_postcopy(connect().await?, args, out).await
        }
        Command::Save(args) => transfer::save(connect().await?, args, out).await,
        Command::Restore(args) => transfer::restore(connect().await?, args, out).await,
        Command::AdoptGaneti(args) => ganeti::run(connect().await?, args, out).await,
    }
}

/// What to do next at the command line, for a refusal whose own hint
/// names API methods: the command that does it.
pub fn hint(status: &tonic::Status) -> Option<&'static str> {
    let message = status.message();
    let hints = [
        (
            tonic::Code::NotFound,
            "has no device",
            "`kvm-agent device list INSTANCE` lists its devices",
        ),
        (
            tonic::Code::NotFound,
            "not found",
            "`kvm-agent instance list` lists the instances",
        ),
        (
            tonic::Code::FailedPrecondition,
            "forced StopInstance",
            "`kvm-agent instance stop NAME --force` is the forced stop",
        ),
    ];
    hints
        .into_iter()
        .find(|(code, phrase, _)| status.code() == *code && message.contains(phrase))
        .map(|(_, _, hint)| hint)
}

/// Connects to the agent client commands call: `--agent`, or else the
/// local socket.
async fn connect_agent(
    agent: Option<&AgentAddress>,
    socket: Option<&PathBuf>,
    tls: &TlsArgs,
) -> anyhow::Result<NodeAgentClient<Channel>> {
    let tls = tls.load()?;
    let address = agent.cloned().unwrap_or_else(|| {
        AgentAddress::Unix(
            socket
                .cloned()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR).join(SOCKET_NAME)),
        )
    });
    crate::peer::connect(&address, None, tls.as_ref())
        .await
        .with_context(|| {
            format!("can't reach the agent at {address}; is `kvm-agent serve` running?")
        })
}

fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "kvm-agent", &mut script);
    print_to_pipe(&script)
}

/// Writes output meant for files and pipes; a reader that stops early
/// (`| head`) is not an error.
fn print_to_pipe(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// How client commands print the agent's answers.
#[derive(Debug, Clone, Copy)]
struct Printer {
    /// One line of JSON per answer, made from the answer's proto fields.
    json: bool,
}

impl Printer {
    /// Prints one answer: as JSON, or as `human` writes it.
    fn show<M: ApiMessage>(self, message: &M, human: impl FnOnce(&M)) {
        if self.json {
            println!("{}", wire::to_json(message));
        } else {
            human(message);
        }
    }

    /// Prints a list of answers: a JSON array, or as `human` writes it.
    fn show_all<M: ApiMessage>(self, messages: &[M], human: impl FnOnce(&[M])) {
        if self.json {
            let array = messages.iter().map(wire::to_json).collect();
            println!("{}", Value::Array(array));
        } else {
            human(messages);
        }
    }

    /// Like `show`, for an answer that doesn't say which instance it is
    /// about: its JSON gets the instance's name.
    fn show_named<M: ApiMessage>(self, name: &str, message: &M, human: impl FnOnce(&M)) {
        if self.json {
            let mut json = wire::to_json(message);
            json["name"] = Value::from(name);
            println!("{json}");
        } else {
            human(message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_get_the_command_that_helps() {
        let missing = tonic::Status::not_found(
            "instance \"web1\" not found (ListInstances shows those there are)",
        );
        let other = tonic::Status::invalid_argument("vcpus 100000 is out of range");

        assert_eq!(
            hint(&missing),
            Some("`kvm-agent instance list` lists the instances")
        );
        assert_eq!(hint(&other), None);
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
