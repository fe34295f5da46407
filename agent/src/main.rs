//! The `kvm-agent` binary.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = kvm_agent::cli::Cli::parse();
    if !cli.serves() {
        // A client command piped into `head` ends quietly once the reader
        // has gone, as Unix tools do, instead of failing on every print.
        // Sockets don't raise SIGPIPE (Rust sends with MSG_NOSIGNAL), so
        // a broken connection to the agent is still an error. The agent
        // itself keeps SIGPIPE ignored.
        // SAFETY: SIG_DFL installs no handler; it only sets the process's
        // disposition of SIGPIPE, which nothing in a client relies on.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Err(e) = kvm_agent::cli::run(cli).await {
        // A refusal from the agent reads as its code and message, not as
        // the Debug form of a gRPC status.
        match e.downcast_ref::<tonic::Status>() {
            Some(status) => {
                eprintln!("kvm-agent: {:?}: {}", status.code(), status.message());
                if let Some(hint) = kvm_agent::cli::hint(status) {
                    eprintln!("kvm-agent: {hint}");
                }
            }
            None => eprintln!("kvm-agent: {e:#}"),
        }
        std::process::exit(1);
    }
}
