//! The `kvm-agent` binary.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = kvm_agent::cli::Cli::parse();
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
