//! TLS on a migration stream between two QEMUs. Each side loads the
//! node's certificate, key and CA into a `tls-creds-x509` object just
//! before the stream starts: the sender as a client that checks the
//! receiver's certificate against the CA and the name the receiver is
//! reached by, the receiver as a server that asks for the sender's.
//!
//! QEMU reads the files when the object is made and keeps them in memory,
//! so the copies it reads exist only for that one call. A chrooted QEMU
//! finds them loose in the root of its chroot: a directory there would let
//! it chroot again and walk out (see `host_files::stage_option_roms`).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::host_files::{self, AllowedRoots, HostFileError};
use crate::identity::QemuUser;
use crate::qmp::{QmpClient, QmpError};
use crate::tls_files::TlsFile;

/// The node's identity on migration streams: PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCredentials {
    /// This node's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA the other node's certificate must be signed by.
    pub ca: PathBuf,
}

/// Which end of the stream a QEMU is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The source: a TLS client.
    Sender,
    /// The target: a TLS server.
    Receiver,
}

impl Endpoint {
    /// QEMU's word for the endpoint, which also begins the names of its
    /// certificate and key files.
    fn qemu_word(self) -> &'static str {
        match self {
            Endpoint::Sender => "client",
            Endpoint::Receiver => "server",
        }
    }

    /// The id of the endpoint's credentials object in QEMU.
    pub fn object_id(self) -> &'static str {
        match self {
            Endpoint::Sender => "kvma-stream-tls-out",
            Endpoint::Receiver => "kvma-stream-tls-in",
        }
    }
}

/// Why a QEMU can't have the stream's credentials.
#[derive(Debug, thiserror::Error)]
pub enum StreamTlsError {
    /// The node's files can't be copied for QEMU.
    #[error(transparent)]
    Files(#[from] HostFileError),
    /// QEMU refused them (a file that is no certificate, a key that
    /// doesn't match, a CA that isn't one).
    #[error("QEMU can't load the migration stream's TLS credentials: {0}")]
    Refused(#[source] QmpError),
}

/// The files `endpoint` reads, under the names QEMU looks for. Pure.
pub fn files(credentials: &StreamCredentials, endpoint: Endpoint) -> [TlsFile<'static>; 3] {
    let (cert, key) = match endpoint {
        Endpoint::Sender => ("client-cert.pem", "client-key.pem"),
        Endpoint::Receiver => ("server-cert.pem", "server-key.pem"),
    };
    let file = |source: &Path, name| TlsFile {
        source: source.to_owned(),
        name,
        required: true,
    };
    [
        file(&credentials.ca, "ca-cert.pem"),
        file(&credentials.cert, cert),
        file(&credentials.key, key),
    ]
}

/// `object-add`'s arguments for `endpoint`'s credentials in `dir`, as
/// QEMU sees that directory. Both ends check the other's certificate.
/// Pure.
pub fn object(endpoint: Endpoint, dir: &str) -> Value {
    json!({
        "qom-type": "tls-creds-x509",
        "id": endpoint.object_id(),
        "endpoint": endpoint.qemu_word(),
        "dir": dir,
        "verify-peer": true,
    })
}

/// Where a QEMU's copies go: on the host, and as QEMU sees the place.
struct Place {
    host: PathBuf,
    seen_by_qemu: String,
    /// Whether the copies lie loose in a directory that stays.
    loose: bool,
}

/// The copies' place for a QEMU whose run directory is `run_dir`.
fn place(run_dir: &Path, chroot: Option<&Path>) -> Place {
    match chroot {
        Some(root) => Place {
            host: root.to_owned(),
            seen_by_qemu: "/".into(),
            loose: true,
        },
        None => {
            let host = run_dir.join(STAGED_DIR);
            Place {
                seen_by_qemu: host.to_string_lossy().into_owned(),
                host,
                loose: false,
            }
        }
    }
}

/// The directory the copies go in for a QEMU without a chroot.
const STAGED_DIR: &str = "stream-tls";

/// Gives the QEMU whose run directory is `run_dir` (shut in `chroot`, if
/// it is) `endpoint`'s credentials object, replacing any earlier one. Its
/// user is `user`. The copies are gone when this returns.
pub async fn load(
    qmp: &QmpClient,
    credentials: &StreamCredentials,
    endpoint: Endpoint,
    run_dir: &Path,
    chroot: Option<&Path>,
    user: Option<QemuUser>,
) -> Result<(), StreamTlsError> {
    const WHAT: &str = "migration stream TLS file";
    let place = place(run_dir, chroot);
    let files = files(credentials, endpoint);
    let roots = AllowedRoots::default();
    let copies = if place.loose {
        // Left by a load that was cut short; nothing else writes there.
        for file in &files {
            let _ = std::fs::remove_file(place.host.join(file.name));
        }
        host_files::copy_credentials(WHAT, &files, &place.host, user, &roots)?
    } else {
        drop(host_files::stage_credentials(
            WHAT,
            &files,
            &place.host,
            user,
            &roots,
        )?);
        Vec::new()
    };
    let _ = unload(qmp, endpoint).await;
    let added = qmp
        .execute("object-add", Some(object(endpoint, &place.seen_by_qemu)))
        .await;
    for copy in copies {
        let _ = std::fs::remove_file(copy);
    }
    if !place.loose {
        let _ = std::fs::remove_dir_all(&place.host);
    }
    added.map(drop).map_err(StreamTlsError::Refused)
}

/// Drops `endpoint`'s credentials object, if the QEMU has one.
pub async fn unload(qmp: &QmpClient, endpoint: Endpoint) -> Result<(), QmpError> {
    qmp.execute("object-del", Some(json!({ "id": endpoint.object_id() })))
        .await
        .map(drop)
}

/// Makes a receiving QEMU ask for TLS on the stream, with the credentials
/// [`load`] gave it.
pub async fn receive_encrypted(qmp: &QmpClient) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "tls-creds": Endpoint::Receiver.object_id() })),
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> StreamCredentials {
        StreamCredentials {
            cert: "/etc/kvm-agent/tls/node1.pem".into(),
            key: "/etc/kvm-agent/tls/node1-key.pem".into(),
            ca: "/etc/kvm-agent/tls/ca.pem".into(),
        }
    }

    #[test]
    fn each_end_reads_the_node_files_under_its_own_names() {
        let names = |endpoint| files(&credentials(), endpoint).map(|f| (f.name, f.source));
        assert_eq!(
            names(Endpoint::Sender),
            [
                ("ca-cert.pem", "/etc/kvm-agent/tls/ca.pem".into()),
                ("client-cert.pem", "/etc/kvm-agent/tls/node1.pem".into()),
                ("client-key.pem", "/etc/kvm-agent/tls/node1-key.pem".into()),
            ]
        );
        assert_eq!(names(Endpoint::Receiver)[1].0, "server-cert.pem");
        assert_eq!(names(Endpoint::Receiver)[2].0, "server-key.pem");
    }

    #[test]
    fn both_ends_check_the_other_and_have_ids_of_their_own() {
        assert_eq!(
            object(Endpoint::Receiver, "/"),
            json!({
                "qom-type": "tls-creds-x509",
                "id": "kvma-stream-tls-in",
                "endpoint": "server",
                "dir": "/",
                "verify-peer": true,
            })
        );
        assert_eq!(object(Endpoint::Sender, "/run/x")["endpoint"], "client");
        assert_ne!(Endpoint::Sender.object_id(), Endpoint::Receiver.object_id());
    }

    #[test]
    fn a_chrooted_qemu_finds_the_copies_loose_in_its_root() {
        let chrooted = place(Path::new("/run/a"), Some(Path::new("/run/a/root")));
        assert_eq!(chrooted.host, Path::new("/run/a/root"));
        assert_eq!(chrooted.seen_by_qemu, "/");
        assert!(chrooted.loose);
        let free = place(Path::new("/run/a"), None);
        assert_eq!(free.seen_by_qemu, "/run/a/stream-tls");
        assert!(!free.loose);
    }
}
