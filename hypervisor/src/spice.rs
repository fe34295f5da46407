//! SPICE, the remote display Ganeti offers beside VNC: where it listens,
//! TLS with the node's certificate, a password set on the running QEMU
//! (never in a spec or a runtime, as for VNC), its compression settings,
//! and the channel of the guest's SPICE agent. Pure.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::tls_files::TlsFile;

/// A SPICE server of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpiceSpec {
    /// The TCP port: plain, or TLS when `tls` is set (only TLS then).
    pub port: u16,
    /// The address it listens on; none is 127.0.0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// Clients must give the password set on the running instance; until
    /// then none gets in. Without it, SPICE asks for none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub password: bool,
    /// TLS with the node's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<SpiceTls>,
    /// How images are compressed: auto_glz, auto_lz, quic, glz, lz or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_compression: Option<String>,
    /// JPEG over slow links: auto, never or always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jpeg_wan_compression: Option<String>,
    /// zlib-glz over slow links: auto, never or always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zlib_glz_wan_compression: Option<String>,
    /// Video stream detection: off, all or filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streaming_video: Option<String>,
    /// Audio compressed on its way to the client (QEMU's default).
    #[serde(default = "on", skip_serializing_if = "is_on")]
    pub playback_compression: bool,
    /// The channel of the SPICE agent in the guest (a virtio-serial
    /// controller in a slot of its own), for the client's mouse and
    /// clipboard.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vdagent: bool,
}

fn on() -> bool {
    true
}

fn is_on(value: &bool) -> bool {
    *value
}

/// SPICE's TLS: the node's files, which the agent copies where only the
/// instance's QEMU reads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpiceTls {
    /// The node's certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM); may be the certificate's file, as Ganeti keeps both.
    pub key: PathBuf,
    /// The CA (PEM).
    pub ca: PathBuf,
    /// OpenSSL's cipher list, e.g. `HIGH:-DES:-3DES`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphers: Option<String>,
}

/// The files to copy, by the names QEMU's `x509-dir` looks for.
pub fn x509_files(tls: &SpiceTls) -> Vec<TlsFile<'static>> {
    [
        (&tls.ca, "ca-cert.pem"),
        (&tls.cert, "server-cert.pem"),
        (&tls.key, "server-key.pem"),
    ]
    .into_iter()
    .map(|(source, name)| TlsFile {
        source: source.clone(),
        name,
        required: true,
    })
    .collect()
}

/// Why a SPICE setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiceError {
    /// A setting outside its values.
    #[error("SPICE {setting} {value:?}: use one of {choices}")]
    Setting {
        /// Which setting.
        setting: &'static str,
        /// As given.
        value: String,
        /// What it takes.
        choices: &'static str,
    },
    /// A cipher list with characters OpenSSL's syntax doesn't use.
    #[error("SPICE TLS ciphers {0:?} are not an OpenSSL cipher list")]
    Ciphers(String),
    /// Port 0.
    #[error("SPICE needs a port")]
    Port,
}

const IMAGE_COMPRESSIONS: &str = "auto_glz, auto_lz, quic, glz, lz, off";
const WAN_COMPRESSIONS: &str = "auto, never, always";
const STREAMING_VIDEO: &str = "off, all, filter";

/// Checks the settings. Pure.
pub fn check(spice: &SpiceSpec) -> Result<(), SpiceError> {
    if spice.port == 0 {
        return Err(SpiceError::Port);
    }
    let settings = [
        (
            "image compression",
            &spice.image_compression,
            IMAGE_COMPRESSIONS,
        ),
        (
            "JPEG WAN compression",
            &spice.jpeg_wan_compression,
            WAN_COMPRESSIONS,
        ),
        (
            "zlib-glz WAN compression",
            &spice.zlib_glz_wan_compression,
            WAN_COMPRESSIONS,
        ),
        ("streaming video", &spice.streaming_video, STREAMING_VIDEO),
    ];
    for (setting, value, choices) in settings {
        if let Some(value) = value
            && !choices.split(", ").any(|c| c == value)
        {
            return Err(SpiceError::Setting {
                setting,
                value: value.clone(),
                choices,
            });
        }
    }
    if let Some(ciphers) = spice.tls.as_ref().and_then(|t| t.ciphers.as_ref()) {
        let cipher_char = |c: char| c.is_ascii_alphanumeric() || ":+-!@_.=".contains(c);
        if ciphers.is_empty() || !ciphers.chars().all(cipher_char) {
            return Err(SpiceError::Ciphers(ciphers.clone()));
        }
    }
    Ok(())
}

/// The chardev and port names of the SPICE agent's channel.
const VDAGENT_CHARDEV: &str = "spicechannel0";
/// The virtio-serial controller of that channel.
pub const VDAGENT_SERIAL: &str = "spice";

/// `-spice`'s value, with the TLS files reached through `x509_dir` (the
/// agent's copy) or, without it, named by their paths.
pub fn spice_option(spice: &SpiceSpec, x509_dir: Option<&str>) -> String {
    let address = spice
        .address
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let mut option = format!("addr={address}");
    match &spice.tls {
        Some(tls) => {
            option.push_str(&format!(",tls-port={}", spice.port));
            match x509_dir {
                Some(dir) => option.push_str(&format!(",x509-dir={dir}")),
                None => option.push_str(&format!(
                    ",x509-cacert-file={},x509-key-file={},x509-cert-file={}",
                    tls.ca.display(),
                    tls.key.display(),
                    tls.cert.display()
                )),
            }
            if let Some(ciphers) = &tls.ciphers {
                option.push_str(&format!(",tls-ciphers={ciphers}"));
            }
        }
        None => option.push_str(&format!(",port={}", spice.port)),
    }
    if !spice.password {
        option.push_str(",disable-ticketing=on");
    }
    for (key, value) in [
        ("image-compression", &spice.image_compression),
        ("jpeg-wan-compression", &spice.jpeg_wan_compression),
        ("zlib-glz-wan-compression", &spice.zlib_glz_wan_compression),
        ("streaming-video", &spice.streaming_video),
    ] {
        if let Some(value) = value {
            option.push_str(&format!(",{key}={value}"));
        }
    }
    if !spice.playback_compression {
        option.push_str(",playback-compression=off");
    }
    if !spice.vdagent {
        option.push_str(",agent-mouse=off");
    }
    option
}

/// The SPICE agent's channel: its virtio-serial controller `at` its PCI
/// place, the port the guest's agent looks for, and the chardev QEMU's
/// SPICE server feeds.
pub fn vdagent_devices(at: &str) -> [String; 6] {
    [
        "-device".into(),
        format!("virtio-serial-pci,id={VDAGENT_SERIAL},{at}"),
        "-device".into(),
        format!(
            "virtserialport,bus={VDAGENT_SERIAL}.0,chardev={VDAGENT_CHARDEV},name=com.redhat.spice.0"
        ),
        "-chardev".into(),
        format!("spicevmc,id={VDAGENT_CHARDEV},name=vdagent"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spice() -> SpiceSpec {
        SpiceSpec {
            port: 11000,
            address: None,
            password: false,
            tls: None,
            image_compression: None,
            jpeg_wan_compression: None,
            zlib_glz_wan_compression: None,
            streaming_video: None,
            playback_compression: true,
            vdagent: false,
        }
    }

    #[test]
    fn plain_spice_needs_no_ticket_and_tls_takes_the_port() {
        assert_eq!(
            spice_option(&spice(), None),
            "addr=127.0.0.1,port=11000,disable-ticketing=on,agent-mouse=off"
        );
        let secured = SpiceSpec {
            password: true,
            tls: Some(SpiceTls {
                cert: "/var/lib/ganeti/spice.pem".into(),
                key: "/var/lib/ganeti/spice.pem".into(),
                ca: "/var/lib/ganeti/spice-ca.pem".into(),
                ciphers: Some("HIGH:-DES".into()),
            }),
            image_compression: Some("quic".into()),
            playback_compression: false,
            vdagent: true,
            ..spice()
        };
        assert_eq!(
            spice_option(&secured, Some("/proc/self/fd/7")),
            "addr=127.0.0.1,tls-port=11000,x509-dir=/proc/self/fd/7,tls-ciphers=HIGH:-DES,image-compression=quic,playback-compression=off"
        );
        assert_eq!(check(&secured), Ok(()));
    }

    #[test]
    fn settings_outside_their_values_are_refused() {
        let bad = SpiceSpec {
            streaming_video: Some("sometimes".into()),
            ..spice()
        };
        assert!(matches!(
            check(&bad),
            Err(SpiceError::Setting {
                setting: "streaming video",
                ..
            })
        ));
        assert_eq!(
            check(&SpiceSpec { port: 0, ..spice() }),
            Err(SpiceError::Port)
        );
    }
}
