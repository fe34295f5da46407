//! Reaching another agent: the command line reaches the local one, and a
//! migration's source reaches its target.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// A unix socket on this machine.
    Unix(PathBuf),
    /// `http://host:port`.
    Tcp(String),
}

impl AgentAddress {
    /// Reads `unix:/path`, `/path` or `http://host:port`.
    pub fn parse(text: &str) -> Result<AgentAddress, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = path.trim_start_matches("//");
            if path.starts_with('/') {
                return Ok(AgentAddress::Unix(path.into()));
            }
        } else if text.starts_with('/') {
            return Ok(AgentAddress::Unix(text.into()));
        } else if text.starts_with("http://") && text.len() > "http://".len() {
            return Ok(AgentAddress::Tcp(text.to_owned()));
        }
        Err(format!(
            "agent address {text:?} is neither unix:/path/to/agent.sock nor http://host:port"
        ))
    }
}

impl std::fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            AgentAddress::Tcp(url) => f.write_str(url),
        }
    }
}

/// Connects now (not lazily), so a failure here means nothing was sent.
/// With a `timeout`, connecting and every call give up after it.
pub async fn connect(
    address: &AgentAddress,
    timeout: Option<Duration>,
) -> Result<NodeAgentClient<Channel>, tonic::transport::Error> {
    let limit = |endpoint: Endpoint| match timeout {
        Some(t) => endpoint.connect_timeout(t).timeout(t),
        None => endpoint,
    };
    let channel = match address {
        AgentAddress::Unix(socket) => {
            let socket = socket.clone();
            // The URI is required by the API but unused: the connector
            // dials the socket.
            limit(Endpoint::from_static("http://localhost"))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move { UnixStream::connect(socket).await.map(TokioIo::new) }
                }))
                .await?
        }
        AgentAddress::Tcp(url) => limit(Endpoint::from_shared(url.clone())?).connect().await?,
    };
    Ok(NodeAgentClient::new(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read() {
        assert_eq!(
            AgentAddress::parse("unix:/var/lib/kvm-agent/agent.sock"),
            Ok(AgentAddress::Unix("/var/lib/kvm-agent/agent.sock".into()))
        );
        assert_eq!(
            AgentAddress::parse("/run/a.sock"),
            Ok(AgentAddress::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            AgentAddress::parse("http://10.0.0.2:7070"),
            Ok(AgentAddress::Tcp("http://10.0.0.2:7070".into()))
        );
        for bad in ["", "unix:relative", "10.0.0.2:7070", "http://", "ftp://x"] {
            assert!(AgentAddress::parse(bad).is_err(), "{bad:?}");
        }
    }
}
