//! Serving the API: the node's unix socket, and optionally TCP for the
//! cluster (mutual TLS unless loopback), plus the standard health and
//! reflection services.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use kvm_agent_proto::v1::FILE_DESCRIPTOR_SET;
use kvm_agent_proto::v1::node_agent_server::NodeAgentServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Server;
use tonic::transport::server::{Connected, Router};
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::instances::Agent;
use crate::listing::NodeAgentApi;
use crate::service::NodeAgentService;
use crate::tls::TlsMaterial;

/// The largest request the agent reads. The biggest real one, a peer's
/// runtime in AcceptMigration, is a few KiB; anything near this is hostile.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Connections each listener serves at once unless configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// How often a connection that sent nothing is pinged; one that doesn't
/// answer within [`KEEPALIVE_TIMEOUT`] is closed, so a peer that vanished
/// doesn't hold its place for good.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE_INTERVAL`].
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// An accepted connection that holds one of its listener's places while
/// it is open.
struct Limited<IO> {
    io: IO,
    _place: OwnedSemaphorePermit,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Limited<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The connections of `incoming`, at most `max` open at once: one more is
/// closed as soon as it is accepted, rather than left to wait unseen in
/// the kernel's backlog.
fn limited<IO>(
    incoming: impl Stream<Item = std::io::Result<IO>>,
    max: usize,
    listener: &'static str,
) -> impl Stream<Item = std::io::Result<Limited<IO>>> {
    let places = Arc::new(Semaphore::new(max));
    let refused = AtomicU64::new(0);
    incoming.filter_map(move |accepted| {
        let io = match accepted {
            Ok(io) => io,
            Err(e) => return Some(Err(e)),
        };
        match places.clone().try_acquire_owned() {
            Ok(place) => Some(Ok(Limited { io, _place: place })),
            Err(_) => {
                // Once, then every thousandth: a flood mustn't flood the log.
                let count = refused.fetch_add(1, Ordering::Relaxed) + 1;
                if count == 1 || count.is_multiple_of(1000) {
                    tracing::warn!(
                        listener,
                        max,
                        refused = count,
                        "too many connections; closing new ones"
                    );
                }
                None
            }
        }
    })
}

/// Where the API is served.
#[derive(Debug, Clone)]
pub struct Listeners {
    /// The node's own socket, mode 0600, for local tools.
    pub socket: PathBuf,
    /// A TCP address for the cluster.
    pub tcp: Option<SocketAddr>,
    /// Mutual TLS on the TCP address.
    pub tls: Option<TlsMaterial>,
    /// Connections served at once, on each listener.
    pub max_connections: usize,
}

impl Listeners {
    /// Refuses TCP beyond loopback without mutual TLS: anyone who reaches
    /// the port could otherwise start and stop guests.
    pub fn check(&self) -> Result<(), String> {
        check_tcp_exposure(self.tcp, self.tls.is_some())
    }
}

/// Refuses a TCP address beyond loopback unless mutual TLS guards it.
pub fn check_tcp_exposure(tcp: Option<SocketAddr>, mutual_tls: bool) -> Result<(), String> {
    match tcp {
        Some(addr) if !addr.ip().is_loopback() && !mutual_tls => Err(format!(
            "refusing to listen on {addr} without mutual TLS; give --tls-cert, --tls-key and --client-ca, or use a loopback address"
        )),
        _ => Ok(()),
    }
}

/// Reads `tcp://ADDR:PORT` (or `tcp:ADDR:PORT`).
pub fn parse_tcp_listen(text: &str) -> Result<SocketAddr, String> {
    let Some(addr) = text.strip_prefix("tcp:") else {
        return Err(format!(
            "listen address {text:?} must look like tcp://ADDR:PORT"
        ));
    };
    let addr = addr.trim_start_matches("//");
    addr.parse()
        .map_err(|e| format!("bad TCP address {addr:?}: {e}"))
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

/// The agent's gRPC service with health and reflection, on TLS when given.
fn router(
    agent: &Arc<Agent>,
    health: &HealthServer<impl Health>,
    tls: Option<&TlsMaterial>,
) -> anyhow::Result<Router> {
    let mut server = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if let Some(tls) = tls {
        server = server
            .tls_config(tls.server_config())
            .context("setting up TLS")?;
    }
    // The health service too, so that clients that find services by
    // reflection (grpcurl, grpcui) see it.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok(server
        .add_service(health.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(NodeAgentApi::new(
            NodeAgentServer::new(NodeAgentService::new(agent.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
            agent.clone(),
            MAX_REQUEST_BYTES,
        )))
}

/// Binds the local socket, owner-only.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // A socket left by an agent that died; nothing listens on it.
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Recovers instances, then serves until SIGTERM or SIGINT.
pub async fn serve(agent: Arc<Agent>, listeners: Listeners) -> anyhow::Result<()> {
    listeners.check().map_err(anyhow::Error::msg)?;
    // Instances are registered now; their reconciliation goes on while
    // the server already answers.
    let _reconciliation = agent.recover().await;

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<NodeAgentServer<NodeAgentService>>()
        .await;
    let router = |tls| router(&agent, &health, tls);

    let (stop, stopped) = watch::channel(());
    let shutdown = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.changed().await;
        }
    };

    let tcp = match listeners.tcp {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let tls = listeners.tls.as_ref();
            tracing::info!(%addr, tls = tls.is_some(), "serving");
            let incoming = limited(
                TcpListenerStream::new(listener),
                listeners.max_connections,
                "tcp",
            );
            Some(router(tls)?.serve_with_incoming_shutdown(incoming, shutdown()))
        }
        None => None,
    };

    let path = &listeners.socket;
    let listener = bind_socket(path)?;
    tracing::info!(socket = %path.display(), "serving");
    let incoming = limited(
        UnixListenerStream::new(listener),
        listeners.max_connections,
        "unix",
    );
    let unix = router(None)?.serve_with_incoming_shutdown(incoming, shutdown());

    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(());
    });
    let result = match tcp {
        Some(tcp) => tokio::try_join!(unix, tcp).map(drop),
        None => unix.await,
    };
    let _ = std::fs::remove_file(path);
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_listen_addresses_parse() {
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert_eq!(parse_tcp_listen("tcp://127.0.0.1:7000"), Ok(addr));
        assert_eq!(parse_tcp_listen("tcp:127.0.0.1:7000"), Ok(addr));
        assert!(parse_tcp_listen("127.0.0.1:7000").is_err());
        assert!(parse_tcp_listen("tcp://node1:7000").is_err());
    }

    #[test]
    fn only_loopback_tcp_goes_without_tls() {
        let listeners = |tcp: &str| Listeners {
            socket: "/run/kvm-agent.sock".into(),
            tcp: Some(tcp.parse().unwrap()),
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        };
        assert!(listeners("127.0.0.1:7000").check().is_ok());
        assert!(listeners("[::1]:7000").check().is_ok());
        let err = listeners("10.0.0.1:7000").check().unwrap_err();
        assert!(err.contains("--tls-cert"), "{err}");
        assert!(listeners("0.0.0.0:7000").check().is_err());
    }
}
