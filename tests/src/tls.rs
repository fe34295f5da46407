//! A cluster CA made for one test, and the certificates it signs.

use std::path::PathBuf;

use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A CA with its files in a temporary directory.
pub struct TestCa {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// The PEM files of one party: its certificate and key, and the CA it
/// trusts.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    /// Certificate.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// The trusted CA.
    pub ca: PathBuf,
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        let dir = tempfile::Builder::new()
            .prefix("kaca")
            .tempdir()
            .expect("CA dir");
        std::fs::write(dir.path().join("ca.pem"), &pem).expect("write CA");
        TestCa {
            dir,
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// The CA certificate (PEM).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Issues a certificate for `name`, valid for the host names and IP
    /// addresses in `sans`, usable by servers and clients alike (an agent
    /// is both).
    pub fn issue(&self, name: &str, sans: &[&str]) -> TlsPaths {
        self.issue_with(name, sans, |_| {})
    }

    /// Like [`issue`](Self::issue), for a certificate that expired in 2021.
    pub fn issue_expired(&self, name: &str, sans: &[&str]) -> TlsPaths {
        self.issue_with(name, sans, |params| {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
    }

    fn issue_with(
        &self,
        name: &str,
        sans: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> TlsPaths {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans).expect("certificate params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        adjust(&mut params);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let paths = TlsPaths {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
            ca: self.dir.path().join("ca.pem"),
        };
        std::fs::write(&paths.cert, cert.pem()).expect("write certificate");
        std::fs::write(&paths.key, key.serialize_pem()).expect("write key");
        paths
    }
}

impl TlsPaths {
    /// The `--tls-*` arguments of `kvm-agent` for these files.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, path) in [
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
            ("--tls-ca", &self.ca),
        ] {
            args.push(flag.to_owned());
            args.push(path.display().to_string());
        }
        args
    }

    /// A client presenting this certificate and trusting this CA.
    pub fn client_config(&self) -> ClientTlsConfig {
        let read = |p: &PathBuf| std::fs::read(p).expect("read PEM");
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)))
            .identity(Identity::from_pem(read(&self.cert), read(&self.key)))
    }
}

/// Connects to `url` (`https://…` with `tls`, `http://…` without) and makes
/// one call, since a refused handshake may only show on first use.
pub async fn tls_client(
    url: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<NodeAgentClient<Channel>, String> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| format!("{e:?}"))?;
    }
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    let mut client = NodeAgentClient::new(channel);
    client
        .get_node_info(kvm_agent_proto::v1::GetNodeInfoRequest {})
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(client)
}

/// An agent serving loopback TCP with mutual TLS, its certificate valid
/// for 127.0.0.1 and localhost; returns it and its port.
pub async fn agent_on_loopback_tcp(ca: &TestCa) -> (crate::TestAgent, u16) {
    let node = ca.issue("node1", &["127.0.0.1", "localhost"]);
    let port = crate::free_port();
    let mut options = crate::AgentOptions::default();
    options
        .args
        .extend(["--listen".into(), format!("tcp://127.0.0.1:{port}")]);
    options.args.extend(node.args());
    (crate::TestAgent::start_with(options).await, port)
}

/// How a TLS server answered a client's handshake and first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// It let the client in and answered with HTTP/2 frames.
    Admitted,
    /// It sent this TLS alert.
    Alert(rustls::AlertDescription),
    /// The client gave up on the server, or something else went wrong.
    Failed(String),
}

/// Shakes hands with the TLS server on `127.0.0.1:port` as a client that
/// trusts `ca_pem` and shows `identity` (certificate and key files), if
/// any, then sends the HTTP/2 preface and reads the answer. With TLS 1.3
/// the server judges the client's certificate after the client's side of
/// the handshake is done, so its verdict arrives as an alert on that read.
pub async fn handshake(port: u16, ca_pem: &str, identity: Option<&TlsPaths>) -> Handshake {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some(paths) => {
            let chain = CertificateDer::pem_file_iter(&paths.cert)
                .expect("certificate PEM")
                .collect::<Result<Vec<_>, _>>()
                .expect("certificate");
            let key = PrivateKeyDer::from_pem_file(&paths.key).expect("key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client identity")
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let outcome = async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let name = ServerName::try_from("localhost").expect("server name");
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        tls.flush().await?;
        let mut first = [0u8; 9];
        tls.read_exact(&mut first).await?;
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), outcome).await {
        Ok(Ok(())) => Handshake::Admitted,
        Ok(Err(e)) => match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::AlertReceived(alert)) => Handshake::Alert(*alert),
            _ => Handshake::Failed(e.to_string()),
        },
        Err(_) => Handshake::Failed("no answer within 5 s".into()),
    }
}
