//! Reaching another agent: the command line reaches the local one, and a
//! migration's source reaches its target.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hypervisor::Runtime;
use hypervisor::runtime::format;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tokio::net::UnixStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::convert;
use crate::model::{State, StreamRequest};
use crate::tls::TlsMaterial;

/// The metadata key that carries an operation's request id, both ways.
/// An agent's service puts it on every answer, so its presence tells an
/// answer of the other agent from a connection that broke.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The newest protocol this agent speaks to its peers. Each release
/// speaks every protocol from [`OLDEST_PEER_PROTOCOL`] on, so that during
/// a rolling upgrade a node migrates to and from the release before.
/// Protocol 1 (releases without a version in their calls) sends runtimes
/// in format 1; protocol 2 in format 2. Protocol 3 adds streams the two
/// QEMUs encrypt.
pub const PEER_PROTOCOL: u32 = 3;
/// The oldest protocol this agent speaks to its peers.
pub const OLDEST_PEER_PROTOCOL: u32 = 1;

/// A peer's protocol as it states it: unset is protocol 1.
pub fn stated_protocol(wire: u32) -> u32 {
    wire.max(1)
}

/// The protocol to speak with a peer whose newest is `theirs`, this
/// agent's being `ours`: the lower of the two, which both must speak.
pub fn negotiate(theirs: u32, ours: u32) -> Result<u32, String> {
    let agreed = theirs.min(ours);
    if agreed < OLDEST_PEER_PROTOCOL {
        return Err(format!(
            "the other agent speaks peer protocols up to {theirs}, and this one {OLDEST_PEER_PROTOCOL} to {ours}"
        ));
    }
    Ok(agreed)
}

/// Whether this agent, whose newest is `ours`, speaks `protocol`, as a
/// source asked for it.
pub fn check_spoken(protocol: u32, ours: u32) -> Result<(), String> {
    if (OLDEST_PEER_PROTOCOL..=ours).contains(&protocol) {
        return Ok(());
    }
    Err(format!(
        "the source agent speaks peer protocol {protocol}, and this one {OLDEST_PEER_PROTOCOL} to {ours}"
    ))
}

/// The runtime format a peer protocol carries.
pub fn runtime_format(protocol: u32) -> u32 {
    match protocol {
        1 => 1,
        _ => 2,
    }
}

/// Whether `status` is an answer of the other agent's service, rather
/// than a failure of the connection to it.
pub fn answered_by_agent(status: &tonic::Status) -> bool {
    status.metadata().get(REQUEST_ID_HEADER).is_some()
}

/// Where an agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// A unix socket on this machine.
    Unix(PathBuf),
    /// `http://host:port` (loopback) or `https://host:port` (mutual TLS).
    Tcp(String),
}

impl AgentAddress {
    /// Reads `unix:/path`, `/path`, `http://host:port` or `https://host:port`.
    pub fn parse(text: &str) -> Result<AgentAddress, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = path.trim_start_matches("//");
            if path.starts_with('/') {
                return Ok(AgentAddress::Unix(path.into()));
            }
        } else if text.starts_with('/') {
            return Ok(AgentAddress::Unix(text.into()));
        } else if ["http://", "https://"]
            .iter()
            .any(|scheme| text.len() > scheme.len() && text.starts_with(scheme))
        {
            return Ok(AgentAddress::Tcp(text.to_owned()));
        }
        Err(format!(
            "agent address {text:?} is neither unix:/path/to/agent.sock nor https://host:port"
        ))
    }

    fn wants_tls(&self) -> bool {
        matches!(self, AgentAddress::Tcp(url) if url.starts_with("https://"))
    }

    /// The host an `https://` agent is reached at, which its certificate
    /// names: what a stream to it is checked against. An IPv6 address
    /// comes without its brackets.
    pub fn tls_host(&self) -> Option<&str> {
        let AgentAddress::Tcp(url) = self else {
            return None;
        };
        let authority = url.strip_prefix("https://")?.split('/').next()?;
        match authority.strip_prefix('[') {
            Some(bracketed) => bracketed.split(']').next(),
            None => Some(
                authority
                    .rsplit_once(':')
                    .map_or(authority, |(host, _)| host),
            ),
        }
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

/// Why another agent can't be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// An `https://` address, but no certificate to show it.
    #[error(
        "{address} needs mutual TLS: give --tls-cert, --tls-key and --tls-ca (or their KVM_AGENT_TLS_* variables)"
    )]
    TlsRequired {
        /// The address.
        address: String,
    },
    /// Connecting failed; the text carries every cause, since tonic's own
    /// top-level message ("transport error") says little.
    #[error("{}", chain(.0))]
    Transport(tonic::transport::Error),
}

// Not `#[from]`: that would also make the error the source, and reports
// that print the source chain would repeat every cause.
impl From<tonic::transport::Error> for ConnectError {
    fn from(e: tonic::transport::Error) -> Self {
        ConnectError::Transport(e)
    }
}

fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// Connects now (not lazily), so a failure here means nothing was sent.
/// With a `timeout`, connecting and every call give up after it. `tls` is
/// used for `https://` addresses, which need it.
pub async fn connect(
    address: &AgentAddress,
    timeout: Option<Duration>,
    tls: Option<&TlsMaterial>,
) -> Result<NodeAgentClient<Channel>, ConnectError> {
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
        AgentAddress::Tcp(url) => {
            let mut endpoint = limit(Endpoint::from_shared(url.clone())?);
            if address.wants_tls() {
                let tls = tls.ok_or_else(|| ConnectError::TlsRequired {
                    address: address.to_string(),
                })?;
                endpoint = endpoint.tls_config(tls.client_config())?;
            }
            endpoint.connect().await?
        }
    };
    Ok(NodeAgentClient::new(channel))
}

/// What another agent says of one of its instances.
#[derive(Debug, Clone)]
pub struct PeerInstance {
    /// The instance's uuid there.
    pub uuid: String,
    /// Its state there; `None` when the peer names a state this agent
    /// doesn't know.
    pub state: Option<State>,
    /// Why it is in that state.
    pub detail: String,
}

/// The agent a migration goes to, as its source calls it: the target's
/// calls in the agent's own terms, so the operations don't handle wire
/// messages.
#[derive(Debug, Clone)]
pub struct TargetAgent {
    client: NodeAgentClient<Channel>,
}

impl TargetAgent {
    /// Connects now; see [`connect`].
    pub async fn connect(
        address: &AgentAddress,
        timeout: Option<Duration>,
        tls: Option<&TlsMaterial>,
    ) -> Result<Self, ConnectError> {
        let client = connect(address, timeout, tls).await?;
        Ok(Self { client })
    }

    /// The target's view of `name`; `None` when it has no such instance.
    pub async fn instance(&mut self, name: &str) -> Result<Option<PeerInstance>, tonic::Status> {
        let request = pb::GetInstanceRequest { name: name.into() };
        match self.client.get_instance(request).await {
            Ok(info) => {
                let info = info.into_inner();
                Ok(Some(PeerInstance {
                    uuid: info.uuid,
                    state: convert::state_from_proto(info.state),
                    detail: info.state_detail,
                }))
            }
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(status),
        }
    }

    /// The peer protocol to speak with the target, from its newest and
    /// `ours`.
    pub async fn protocol(&mut self, ours: u32) -> Result<u32, tonic::Status> {
        let info = self.client.get_node_info(pb::GetNodeInfoRequest {}).await?;
        negotiate(stated_protocol(info.into_inner().peer_protocol), ours)
            .map_err(tonic::Status::failed_precondition)
    }

    /// Asks the target to wait for `runtime`'s guest, sent in the format
    /// of the protocol both speak (this agent's newest being `ours`), over
    /// `stream`; returns the address its QEMU listens on.
    pub async fn accept_migration(
        &mut self,
        runtime: &Runtime,
        source: String,
        ours: u32,
        stream: StreamRequest,
    ) -> Result<String, tonic::Status> {
        let protocol = self.protocol(ours).await?;
        if stream.multifd_channels.is_some() && protocol < 2 {
            return Err(tonic::Status::failed_precondition(format!(
                "the target agent speaks peer protocol {protocol}, which has no multifd channels; migrate without them"
            )));
        }
        if stream.encrypted && protocol < 3 {
            return Err(tonic::Status::failed_precondition(format!(
                "the target agent speaks peer protocol {protocol}, which can't receive an encrypted \
                 stream; upgrade it, or migrate unencrypted"
            )));
        }
        if stream.postcopy && protocol < 3 {
            return Err(tonic::Status::failed_precondition(format!(
                "the target agent speaks peer protocol {protocol}, which has no postcopy; migrate \
                 without it"
            )));
        }
        let runtime_json = format::write_as(runtime, runtime_format(protocol))
            .map_err(|e| tonic::Status::failed_precondition(e.to_string()))?
            .to_string();
        let mut request = pb::AcceptMigrationRequest {
            runtime_json,
            source,
            protocol_version: protocol,
            ..Default::default()
        };
        convert::stream_request_to_proto(stream, &mut request);
        let answer = self.client.accept_migration(request).await?;
        Ok(answer.into_inner().address)
    }

    /// Hands the instance over: the target owns it once this succeeds.
    pub async fn finalize_migration(
        &mut self,
        name: &str,
        uuid: &str,
        resume: bool,
    ) -> Result<(), tonic::Status> {
        let request = pb::FinalizeMigrationRequest {
            name: name.into(),
            uuid: uuid.into(),
            resume,
        };
        self.client.finalize_migration(request).await.map(drop)
    }

    /// Has the target listen for the rest of `name`'s broken postcopy
    /// stream; returns where.
    pub async fn recover_postcopy(&mut self, name: &str) -> Result<String, tonic::Status> {
        let request = pb::RecoverPostcopyRequest { name: name.into() };
        let answer = self.client.recover_postcopy(request).await?;
        Ok(answer.into_inner().address)
    }

    /// Tells the target to drop its incoming copy of `name`.
    pub async fn cancel_migration(&mut self, name: &str) -> Result<(), tonic::Status> {
        let request = pb::CancelMigrationRequest { name: name.into() };
        self.client.cancel_migration(request).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_speak_the_lower_of_their_newest_protocols_or_refuse_naming_both() {
        assert_eq!(negotiate(stated_protocol(0), PEER_PROTOCOL), Ok(1));
        assert_eq!(stated_protocol(0), 1);
        assert_eq!(negotiate(PEER_PROTOCOL, PEER_PROTOCOL), Ok(PEER_PROTOCOL));
        assert_eq!(
            negotiate(PEER_PROTOCOL + 5, PEER_PROTOCOL),
            Ok(PEER_PROTOCOL)
        );
        assert_eq!(negotiate(PEER_PROTOCOL, 1), Ok(1));
        assert_eq!(runtime_format(1), 1);
        assert_eq!(
            runtime_format(PEER_PROTOCOL),
            hypervisor::runtime::RUNTIME_FORMAT_VERSION
        );
        assert!(check_spoken(1, PEER_PROTOCOL).is_ok());
        assert!(check_spoken(PEER_PROTOCOL, PEER_PROTOCOL).is_ok());
        assert!(check_spoken(2, 1).is_err());
        let refused = check_spoken(PEER_PROTOCOL + 1, PEER_PROTOCOL).unwrap_err();
        assert!(
            refused.contains(&format!("protocol {}", PEER_PROTOCOL + 1))
                && refused.contains(&format!("1 to {PEER_PROTOCOL}")),
            "{refused}"
        );
    }

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
        let tls = AgentAddress::parse("https://node2.example:7070").unwrap();
        assert!(tls.wants_tls());
        assert_eq!(tls.tls_host(), Some("node2.example"));
        for bad in [
            "",
            "unix:relative",
            "10.0.0.2:7070",
            "http://",
            "https://",
            "ftp://x",
        ] {
            assert!(AgentAddress::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_encrypted_stream_is_checked_against_the_host_the_target_is_reached_at() {
        let host = |url: &str| {
            AgentAddress::parse(url)
                .unwrap()
                .tls_host()
                .map(str::to_owned)
        };
        assert_eq!(host("https://10.0.0.2:7070"), Some("10.0.0.2".into()));
        assert_eq!(host("https://[fd00::2]:7070/"), Some("fd00::2".into()));
        assert_eq!(host("https://node2"), Some("node2".into()));
        // Agents on this machine have no certificate to check.
        assert_eq!(host("http://127.0.0.1:7070"), None);
        assert_eq!(host("unix:/run/agent.sock"), None);
    }
}
