//! How VNC lets viewers in: TLS (VeNCrypt, anonymous or with the node's
//! x509 certificate) and a password. The password itself is never part of
//! a spec or a runtime: it is set on the running QEMU (`set_password`), so
//! no record, save file or migration carries it. Until it is set, a VNC
//! that asks for one lets nobody in. Pure.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tls_files::TlsFile;

/// TLS on the VNC server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VncTls {
    /// A directory with the node's x509 files (`ca-cert.pem`,
    /// `server-cert.pem`, `server-key.pem`); none is anonymous TLS, which
    /// encrypts without proving the node's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_dir: Option<PathBuf>,
    /// Viewers must present a certificate the CA signed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verify_client: bool,
}

/// The files of an x509 directory QEMU reads, and whether each must be
/// there, for a server.
const X509_FILES: [(&str, bool); 5] = [
    ("ca-cert.pem", true),
    ("server-cert.pem", true),
    ("server-key.pem", true),
    ("ca-crl.pem", false),
    ("dh-params.pem", false),
];

/// The files QEMU reads from the x509 directory `dir`.
pub fn x509_files(dir: &Path) -> Vec<TlsFile<'static>> {
    X509_FILES
        .iter()
        .map(|&(name, required)| TlsFile {
            source: dir.join(name),
            name,
            required,
        })
        .collect()
}

/// The QEMU id of the VNC server's TLS credentials.
pub const TLS_CREDS_ID: &str = "vnctls0";

/// The `-object` of the TLS credentials, with the x509 directory reached
/// as `dir` (its path, or where QEMU finds the agent's copy).
pub fn tls_object(tls: &VncTls, dir: Option<&str>) -> String {
    match dir {
        Some(dir) => format!(
            "tls-creds-x509,id={TLS_CREDS_ID},endpoint=server,dir={dir},verify-peer={}",
            if tls.verify_client { "on" } else { "off" }
        ),
        None => format!("tls-creds-anon,id={TLS_CREDS_ID},endpoint=server"),
    }
}

/// What `-vnc` gets after the address for TLS and a password.
pub fn vnc_options(tls: Option<&VncTls>, password: bool) -> String {
    let mut options = String::new();
    if tls.is_some() {
        options.push_str(&format!(",tls-creds={TLS_CREDS_ID}"));
    }
    if password {
        options.push_str(",password=on");
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_tls_needs_no_files_and_x509_names_its_directory() {
        let anonymous = VncTls::default();
        assert_eq!(
            tls_object(&anonymous, None),
            "tls-creds-anon,id=vnctls0,endpoint=server"
        );
        let verified = VncTls {
            x509_dir: Some("/etc/ganeti/x509".into()),
            verify_client: true,
        };
        assert_eq!(
            tls_object(&verified, Some("/proc/self/fd/9")),
            "tls-creds-x509,id=vnctls0,endpoint=server,dir=/proc/self/fd/9,verify-peer=on"
        );
        assert_eq!(
            vnc_options(Some(&verified), true),
            ",tls-creds=vnctls0,password=on"
        );
        assert_eq!(vnc_options(None, false), "");
    }
}
