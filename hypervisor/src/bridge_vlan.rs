//! VLANs on a tap's bridge port, set over rtnetlink the way `bridge vlan
//! add` does: the bridge must filter VLANs, the port carries exactly the
//! NIC's VLANs (its default VLAN removed), and the bridge's other ports
//! that aren't taps (its uplinks) carry them tagged, as Ganeti's
//! `kvm-ifup` arranges it.
//!
//! The messages are built and the replies read by pure functions; only
//! [`apply`] touches the kernel.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

use crate::spec::Vlan;

const NLMSG_ERROR: u16 = 2;
const RTM_DELLINK: u16 = 17;
const RTM_SETLINK: u16 = 19;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const AF_BRIDGE: u8 = 7;
const IFLA_AF_SPEC: u16 = 26;
const NLA_F_NESTED: u16 = 0x8000;
const IFLA_BRIDGE_FLAGS: u16 = 0;
const IFLA_BRIDGE_VLAN_INFO: u16 = 2;
/// The request is for the bridge the port belongs to (`master`).
const BRIDGE_FLAGS_MASTER: u16 = 1;
const BRIDGE_VLAN_INFO_PVID: u16 = 0x2;
const BRIDGE_VLAN_INFO_UNTAGGED: u16 = 0x4;
const NLMSG_HEADER_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// Why a port's VLANs couldn't be set.
#[derive(Debug, thiserror::Error)]
pub enum VlanError {
    /// The bridge forwards every frame whatever its tag.
    #[error(
        "bridge {bridge} doesn't filter VLANs, so tap {tap} would carry every VLAN; \
         turn filtering on (ip link set {bridge} type bridge vlan_filtering 1) or give the NIC no VLAN"
    )]
    FilteringOff {
        /// Tap name.
        tap: String,
        /// Bridge name.
        bridge: String,
    },
    /// The kernel refused a change.
    #[error("can't set VLANs {vlan} on {port} of bridge {bridge}")]
    Netlink {
        /// The port: the tap, or an uplink.
        port: String,
        /// Bridge name.
        bridge: String,
        /// The VLANs, in Ganeti's syntax.
        vlan: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
}

/// One VLAN of a port and how the port carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortVlan {
    /// VLAN id.
    pub id: u16,
    /// Frames without a tag from the port go to this VLAN.
    pub pvid: bool,
    /// This VLAN's frames leave the port without a tag.
    pub untagged: bool,
}

/// What the tap's port must carry for `vlan`.
pub fn port_vlans(vlan: &Vlan) -> Vec<PortVlan> {
    let access = vlan.untagged.map(|id| PortVlan {
        id,
        pvid: true,
        untagged: true,
    });
    let trunk = vlan.tagged.iter().map(|&id| PortVlan {
        id,
        pvid: false,
        untagged: false,
    });
    access.into_iter().chain(trunk).collect()
}

/// An `RTM_SETLINK` (add) or `RTM_DELLINK` (remove) request for the VLANs
/// `vlans` of the bridge port with index `port`.
pub fn vlan_request(add: bool, sequence: u32, port: u32, vlans: &[PortVlan]) -> Vec<u8> {
    let mut spec = Vec::new();
    push_attribute(
        &mut spec,
        IFLA_BRIDGE_FLAGS,
        &BRIDGE_FLAGS_MASTER.to_ne_bytes(),
    );
    for v in vlans {
        let mut flags = 0;
        if v.pvid {
            flags |= BRIDGE_VLAN_INFO_PVID;
        }
        if v.untagged {
            flags |= BRIDGE_VLAN_INFO_UNTAGGED;
        }
        let mut info = flags.to_ne_bytes().to_vec();
        info.extend_from_slice(&v.id.to_ne_bytes());
        push_attribute(&mut spec, IFLA_BRIDGE_VLAN_INFO, &info);
    }
    let mut body = Vec::with_capacity(IFINFOMSG_LEN + spec.len() + 4);
    // struct ifinfomsg: family, pad, type, index, flags, change.
    body.extend_from_slice(&[AF_BRIDGE, 0, 0, 0]);
    body.extend_from_slice(&(port as i32).to_ne_bytes());
    body.extend_from_slice(&[0; 8]);
    push_attribute(&mut body, IFLA_AF_SPEC | NLA_F_NESTED, &spec);

    let kind = if add { RTM_SETLINK } else { RTM_DELLINK };
    let length = (NLMSG_HEADER_LEN + body.len()) as u32;
    let mut message = Vec::with_capacity(length as usize);
    message.extend_from_slice(&length.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    message.extend_from_slice(&sequence.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&body);
    message
}

/// Appends a netlink attribute, padded to four bytes.
fn push_attribute(buffer: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let length = 4 + payload.len();
    buffer.extend_from_slice(&(length as u16).to_ne_bytes());
    buffer.extend_from_slice(&kind.to_ne_bytes());
    buffer.extend_from_slice(payload);
    buffer.resize(buffer.len() + (length.next_multiple_of(4) - length), 0);
}

/// Reads the kernel's answer to request `sequence`: `Ok(())` for an
/// acknowledgement, the errno it reports otherwise. `None` if the buffer
/// holds no answer to that request.
pub fn read_ack(reply: &[u8], sequence: u32) -> Option<Result<(), i32>> {
    let mut rest = reply;
    while rest.len() >= NLMSG_HEADER_LEN + 4 {
        let field = |at: usize| u32::from_ne_bytes(rest[at..at + 4].try_into().unwrap());
        let length = field(0) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if length < NLMSG_HEADER_LEN || length > rest.len() {
            return None;
        }
        if kind == NLMSG_ERROR && field(8) == sequence {
            let errno = i32::from_ne_bytes(rest[16..20].try_into().unwrap());
            return Some(if errno == 0 { Ok(()) } else { Err(-errno) });
        }
        rest = &rest[length.next_multiple_of(4).min(rest.len())..];
    }
    None
}

/// Whether `bridge` filters VLANs.
pub fn filters_vlans(bridge: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{bridge}/bridge/vlan_filtering"))
        .is_ok_and(|v| v.trim() == "1")
}

/// The VLAN a port joins when it joins `bridge`; 0 for none.
fn default_pvid(bridge: &str) -> u16 {
    std::fs::read_to_string(format!("/sys/class/net/{bridge}/bridge/default_pvid"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The bridge's ports that aren't taps: the way out to the network.
fn uplinks(bridge: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(format!("/sys/class/net/{bridge}/brif")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|port| !Path::new(&format!("/sys/class/net/{port}/tun_flags")).exists())
        .collect()
}

/// Sets the VLANs of `tap`, a port of `bridge`: its default VLAN goes
/// unless asked for, the NIC's VLANs come, and the bridge's uplinks carry
/// them tagged.
pub fn apply(tap: &str, bridge: &str, vlan: &Vlan) -> Result<(), VlanError> {
    if !filters_vlans(bridge) {
        return Err(VlanError::FilteringOff {
            tap: tap.to_owned(),
            bridge: bridge.to_owned(),
        });
    }
    let wanted = port_vlans(vlan);
    let failed = |port: &str| {
        let (port, bridge, vlan) = (port.to_owned(), bridge.to_owned(), vlan.to_string());
        move |source| VlanError::Netlink {
            port,
            bridge,
            vlan,
            source,
        }
    };
    let pvid = default_pvid(bridge);
    if pvid != 0 && !vlan.ids().any(|id| id == pvid) {
        let default = PortVlan {
            id: pvid,
            pvid: false,
            untagged: false,
        };
        change(tap, false, &[default]).map_err(failed(tap))?;
    }
    change(tap, true, &wanted).map_err(failed(tap))?;
    let trunk: Vec<PortVlan> = vlan
        .ids()
        .map(|id| PortVlan {
            id,
            pvid: false,
            untagged: false,
        })
        .collect();
    for uplink in uplinks(bridge) {
        change(&uplink, true, &trunk).map_err(failed(&uplink))?;
    }
    Ok(())
}

/// Sends one request and waits for its acknowledgement.
fn change(port: &str, add: bool, vlans: &[PortVlan]) -> io::Result<()> {
    let index = nix::net::if_::if_nametoindex(port)?;
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let sequence = 1;
    let request = vlan_request(add, sequence, index, vlans);
    sendto(
        sock.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut reply = vec![0u8; 8192];
    loop {
        let n = recv(sock.as_raw_fd(), &mut reply, MsgFlags::empty())?;
        match read_ack(&reply[..n], sequence) {
            Some(Ok(())) => return Ok(()),
            Some(Err(errno)) => return Err(io::Error::from_raw_os_error(errno)),
            None => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_access_vlan_is_the_pvid_and_untagged_and_a_trunk_is_tagged() {
        let vlan: Vlan = ".100:200:300".parse().unwrap();
        let ports = port_vlans(&vlan);
        assert_eq!(
            ports,
            [
                PortVlan {
                    id: 100,
                    pvid: true,
                    untagged: true
                },
                PortVlan {
                    id: 200,
                    pvid: false,
                    untagged: false
                },
                PortVlan {
                    id: 300,
                    pvid: false,
                    untagged: false
                },
            ]
        );
    }

    #[test]
    fn a_request_has_the_layout_the_kernel_reads() {
        let vlans = [PortVlan {
            id: 100,
            pvid: true,
            untagged: true,
        }];
        let m = vlan_request(true, 7, 42, &vlans);
        let u16_at = |at: usize| u16::from_ne_bytes([m[at], m[at + 1]]);
        let u32_at = |at: usize| u32::from_ne_bytes(m[at..at + 4].try_into().unwrap());
        // Header: length, RTM_SETLINK, request + ack, sequence.
        assert_eq!(u32_at(0) as usize, m.len());
        assert_eq!(u16_at(4), RTM_SETLINK);
        assert_eq!(u16_at(6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(8), 7);
        // ifinfomsg: AF_BRIDGE, port index 42.
        assert_eq!(m[16], AF_BRIDGE);
        assert_eq!(u32_at(20), 42);
        // IFLA_AF_SPEC, nested: flags (master), then one VLAN entry.
        assert_eq!(u16_at(34), IFLA_AF_SPEC | NLA_F_NESTED);
        assert_eq!(u16_at(32) as usize, m.len() - 32);
        assert_eq!((u16_at(36), u16_at(38)), (6, IFLA_BRIDGE_FLAGS));
        assert_eq!(u16_at(40), BRIDGE_FLAGS_MASTER);
        assert_eq!((u16_at(44), u16_at(46)), (8, IFLA_BRIDGE_VLAN_INFO));
        assert_eq!(
            u16_at(48),
            BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED
        );
        assert_eq!(u16_at(50), 100);
        assert_eq!(m.len(), 52);
        assert_eq!(u16_at(4), RTM_SETLINK);
        assert_eq!(
            u16::from_ne_bytes([vlan_request(false, 1, 1, &vlans)[4], 0]),
            RTM_DELLINK
        );
    }

    #[test]
    fn the_kernel_reads_a_request_and_answers_it() {
        // A kernel with VLAN filtering sets the VLAN; one without says it
        // can't. Neither may call the message malformed (EINVAL).
        let bridge = format!("kbn{}", std::process::id());
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .expect("run ip")
        };
        assert!(ip(&["link", "add", &bridge, "type", "bridge"]).success());
        let tap = crate::tap::Tap::create("kvvlan%d", 1).unwrap();
        tap.join_bridge(&bridge, None).unwrap();
        let trunk = [PortVlan {
            id: 100,
            pvid: false,
            untagged: false,
        }];
        let result = change(tap.name(), true, &trunk);
        let supported =
            Path::new(&format!("/sys/class/net/{bridge}/bridge/vlan_filtering")).exists();
        ip(&["link", "del", &bridge]);
        match result {
            Ok(()) => assert!(supported, "VLAN set on a kernel without filtering"),
            Err(e) => {
                assert!(!supported, "{e}");
                assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
            }
        }
    }

    fn error_message(sequence: u32, errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&sequence.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&errno.to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        m
    }

    #[test]
    fn acks_and_errors_are_told_apart_and_matched_by_sequence() {
        assert_eq!(read_ack(&error_message(3, 0), 3), Some(Ok(())));
        assert_eq!(
            read_ack(&error_message(3, -libc::EINVAL), 3),
            Some(Err(libc::EINVAL))
        );
        assert_eq!(read_ack(&error_message(2, 0), 3), None);
        let mut two = error_message(2, -libc::EPERM);
        two.extend(error_message(3, 0));
        assert_eq!(read_ack(&two, 3), Some(Ok(())));
        assert_eq!(read_ack(&[0; 8], 3), None);
        let mut lying = error_message(3, 0);
        lying[0] = 200;
        assert_eq!(read_ack(&lying, 3), None);
    }
}
