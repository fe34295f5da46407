//! Mutual TLS between the agents of a cluster and their clients.
//!
//! Every agent and every client holds a certificate signed by the
//! cluster's CA. An agent serving TCP asks each client for such a
//! certificate, and a client (the command line, or a migration's source
//! agent) checks the agent's certificate against the same CA.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Paths of the PEM files that make up a node's or a client's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate (chain).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA that signed the other side's certificate.
    pub ca: PathBuf,
}

/// A TLS file that can't be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file can't be read.
    #[error("can't read the TLS {what} {path}: {source}")]
    Read {
        /// Which file: certificate, key or CA.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why it can't be read.
        source: std::io::Error,
    },
    /// The file holds no PEM block of the kind needed.
    #[error("the TLS {what} {path} holds no PEM {label}")]
    NotPem {
        /// Which file: certificate, key or CA.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The PEM label expected.
        label: &'static str,
    },
}

/// Loaded TLS material, ready for servers and clients.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    identity: Identity,
    ca: Certificate,
}

impl TlsMaterial {
    /// Reads the three files. Each must hold PEM of the right kind; the
    /// certificates themselves are parsed when the first handshake is set
    /// up, which the server does at startup.
    pub fn load(files: &TlsFiles) -> Result<TlsMaterial, TlsError> {
        let cert = read_pem(&files.cert, "certificate", &["CERTIFICATE"])?;
        let key = read_pem(
            &files.key,
            "key",
            &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"],
        )?;
        let ca = read_pem(&files.ca, "CA", &["CERTIFICATE"])?;
        Ok(TlsMaterial {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
        })
    }

    /// A server that presents this identity and accepts only clients whose
    /// certificate the CA signed.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// A client that presents this identity and trusts only servers whose
    /// certificate the CA signed.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
    }
}

fn read_pem(path: &Path, what: &'static str, labels: &[&'static str]) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    if labels
        .iter()
        .any(|label| text.contains(&format!("-----BEGIN {label}-----")))
    {
        Ok(bytes)
    } else {
        Err(TlsError::NotPem {
            what,
            path: path.to_owned(),
            label: labels[0],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_without_the_right_pem_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not a key").unwrap();
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: cert.clone(),
        };
        let err = TlsMaterial::load(&files).unwrap_err().to_string();
        assert!(
            err.contains("key.pem") && err.contains("PRIVATE KEY"),
            "{err}"
        );

        let missing = TlsFiles {
            ca: dir.path().join("missing.pem"),
            ..files
        };
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = TlsMaterial::load(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.pem") && err.contains("CA"), "{err}");
    }
}
