//! `kvm-agent tls`: the cluster's CA, and the certificates it signs for
//! nodes and clients, written as the files `serve --tls-*` and the client
//! flags take.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

use crate::certs::{self, Issued, Subject};

const DAY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Subcommand)]
pub(super) enum TlsCommand {
    /// Make the cluster's CA: ca.pem and ca-key.pem in DIR. Keep the key on
    /// the machine that issues certificates; nodes need only ca.pem.
    InitCa {
        /// Where the files go.
        #[arg(long, default_value = "/etc/kvm-agent/tls")]
        dir: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "kvm-agent cluster CA")]
        name: String,
        /// How long it is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Sign a certificate for a node or a client with the CA in DIR:
    /// NAME.pem and NAME-key.pem, usable as server and client.
    Issue {
        /// The node's name (a client's, for an operator's certificate).
        name: String,
        /// The directory of the CA's files; the new files go there too.
        #[arg(long, default_value = "/etc/kvm-agent/tls")]
        dir: PathBuf,
        /// An address peers reach the node at (repeatable). For a Ganeti
        /// node, its secondary IP: the address Ganeti names to the class.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// A DNS name peers reach the node by (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// How long it is valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

/// Runs `kvm-agent tls`.
pub(super) fn run(command: TlsCommand) -> anyhow::Result<()> {
    match command {
        TlsCommand::InitCa { dir, name, days } => {
            let ca = certs::new_ca(&name, DAY * days)?;
            let (cert, key) = write_pair(&dir, "ca", &ca)?;
            println!("wrote {} and {}", cert.display(), key.display());
            println!(
                "copy ca.pem to every node and client; keep ca-key.pem where certificates are issued"
            );
        }
        TlsCommand::Issue {
            name,
            dir,
            ips,
            dns,
            days,
        } => {
            let read = |file: &str| {
                let path = dir.join(file);
                std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "can't read {} (make the CA with `kvm-agent tls init-ca`)",
                        path.display()
                    )
                })
            };
            let subject = Subject {
                name: &name,
                dns: &dns,
                ips: &ips,
                valid_for: DAY * days,
            };
            let issued = certs::issue(&read("ca.pem")?, &read("ca-key.pem")?, &subject)?;
            let (cert, key) = write_pair(&dir, &name, &issued)?;
            println!(
                "wrote {} and {}; for the agent's config.toml:",
                cert.display(),
                key.display()
            );
            println!("[tls]");
            println!("cert = {:?}", cert.display().to_string());
            println!("key = {:?}", key.display().to_string());
            println!("ca = {:?}", dir.join("ca.pem").display().to_string());
        }
    }
    Ok(())
}

/// Writes STEM.pem and STEM-key.pem into `dir`, the key readable by its
/// owner only. Never replaces a file: a CA or key overwritten by mistake
/// would cut nodes off the cluster.
fn write_pair(dir: &Path, stem: &str, issued: &Issued) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("can't create {}", dir.display()))?;
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}-key.pem"));
    for path in [&cert, &key] {
        anyhow::ensure!(
            !path.exists(),
            "{} exists already; move it away first, or pick another name",
            path.display()
        );
    }
    write_new(&key, &issued.key_pem, 0o600)?;
    write_new(&cert, &issued.cert_pem, 0o644)?;
    Ok((cert, key))
}

fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("can't create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("can't write {}", path.display()))
}
