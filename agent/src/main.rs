//! The `kvm-agent` binary.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = kvm_agent::cli::Cli::parse();
    if let Err(e) = kvm_agent::cli::run(cli).await {
        eprintln!("kvm-agent: {e:#}");
        std::process::exit(1);
    }
}
