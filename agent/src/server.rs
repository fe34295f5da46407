//! Serving the API: the unix socket (default) or loopback TCP, plus the
//! standard health and reflection services.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use kvm_agent_proto::v1::FILE_DESCRIPTOR_SET;
use kvm_agent_proto::v1::node_agent_server::NodeAgentServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;

use crate::instances::Agent;
use crate::service::NodeAgentService;

/// Where the API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket, mode 0600.
    Unix(PathBuf),
    /// TCP; only loopback until mutual TLS is configured.
    Tcp(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Listen::Unix(path.into()));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            return addr
                .parse()
                .map(Listen::Tcp)
                .map_err(|e| format!("bad TCP address {addr:?}: {e}"));
        }
        Err(format!(
            "listen address {s:?} must start with unix: or tcp:"
        ))
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, serve until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down; instances keep running");
}

/// Recovers instances, then serves until SIGTERM or SIGINT.
pub async fn serve(agent: Arc<Agent>, listen: Listen) -> anyhow::Result<()> {
    agent.recover().await;

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<NodeAgentServer<NodeAgentService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let router = Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(NodeAgentServer::new(NodeAgentService::new(agent)));

    match listen {
        Listen::Unix(path) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            // A socket left by an agent that died; nothing listens on it.
            let _ = std::fs::remove_file(&path);
            let listener =
                UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            tracing::info!(socket = %path.display(), "serving");
            let result = router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
                .await;
            let _ = std::fs::remove_file(&path);
            result?;
        }
        Listen::Tcp(addr) => {
            if !addr.ip().is_loopback() {
                bail!(
                    "refusing to listen on {addr} without mutual TLS; use a loopback address or the unix socket"
                );
            }
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(%addr, "serving");
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown_signal())
                .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(Listen::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:7000".parse(),
            Ok(Listen::Tcp("127.0.0.1:7000".parse().unwrap()))
        );
        assert!("127.0.0.1:7000".parse::<Listen>().is_err());
    }
}
