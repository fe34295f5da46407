//! The displays of a wire spec: VNC with its TLS and password, or SPICE.

use std::path::PathBuf;

use hypervisor::spec::{SpiceSpec, SpiceTls, VncTls};
use kvm_agent_proto::v1 as pb;

use crate::error::AgentError;

/// A display's (VNC's or SPICE's) listen address: an IP address, or empty
/// for the default.
fn display_address_from_proto(
    display: &str,
    address: &str,
) -> Result<Option<std::net::IpAddr>, AgentError> {
    if address.is_empty() {
        return Ok(None);
    }
    address.parse().map(Some).map_err(|_| {
        AgentError::BadRequest(format!(
            "{display} address {address:?} is not an IP address (e.g. 0.0.0.0, or empty for 127.0.0.1)"
        ))
    })
}

/// The VNC fields of a spec.
#[derive(Default)]
pub(super) struct Vnc {
    pub(super) display: Option<u32>,
    pub(super) address: Option<std::net::IpAddr>,
    pub(super) keymap: Option<String>,
    pub(super) password: bool,
    pub(super) tls: Option<VncTls>,
}

/// The VNC fields of a wire VNC, or none.
pub(super) fn vnc_from_proto(vnc: Option<&pb::VncSpec>) -> Result<Vnc, AgentError> {
    let Some(vnc) = vnc else {
        return Ok(Vnc::default());
    };
    Ok(Vnc {
        display: Some(vnc.display),
        address: display_address_from_proto("VNC", &vnc.address)?,
        keymap: Some(vnc.keymap.clone()).filter(|k| !k.is_empty()),
        password: vnc.password,
        tls: vnc.tls.as_ref().map(|t| VncTls {
            x509_dir: Some(PathBuf::from(&t.x509_dir)).filter(|d| !d.as_os_str().is_empty()),
            verify_client: t.verify_client,
        }),
    })
}

/// A wire SPICE server.
pub(super) fn spice_from_proto(s: &pb::SpiceSpec) -> Result<SpiceSpec, AgentError> {
    let given = |text: &str| Some(text.to_owned()).filter(|t| !t.is_empty());
    Ok(SpiceSpec {
        port: u16::try_from(s.port)
            .map_err(|_| AgentError::BadRequest(format!("SPICE port {} is not a port", s.port)))?,
        address: display_address_from_proto("SPICE", &s.address)?,
        password: s.password,
        tls: s.tls.as_ref().map(|t| SpiceTls {
            cert: PathBuf::from(&t.cert),
            key: PathBuf::from(&t.key),
            ca: PathBuf::from(&t.ca),
            ciphers: given(&t.ciphers),
        }),
        image_compression: given(&s.image_compression),
        jpeg_wan_compression: given(&s.jpeg_wan_compression),
        zlib_glz_wan_compression: given(&s.zlib_glz_wan_compression),
        streaming_video: given(&s.streaming_video),
        playback_compression: !s.no_playback_compression,
        vdagent: s.vdagent,
    })
}
