//! Host tap devices, opened by the agent and handed to QEMU as fds.
//!
//! Taps are created non-persistent: the interface lives exactly as long as
//! some process holds its fd, so it disappears when QEMU exits.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

use crate::bridge_vlan;
use crate::spec::{NicSpec, Vlan};

const TUN_DEVICE: &str = "/dev/net/tun";
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const SIOCBRDELIF: libc::c_ulong = 0x89a3;
const IFNAMSIZ: usize = 16;

/// Why a tap couldn't be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun can't be opened.
    #[error("can't open {TUN_DEVICE} (load the tun module; the agent needs CAP_NET_ADMIN)")]
    OpenTun(#[source] io::Error),
    /// /dev/vhost-net can't be opened.
    #[error("can't open {VHOST_NET_DEVICE} (load the vhost_net module, or turn vhost off)")]
    OpenVhost(#[source] io::Error),
    /// TUNSETIFF failed.
    #[error("can't create a tap from template {template:?}")]
    Create {
        /// Name template.
        template: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// Bringing the interface up failed.
    #[error("can't bring tap {tap} up")]
    Up {
        /// Tap name.
        tap: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The port's VLANs couldn't be set.
    #[error(transparent)]
    Vlan(Box<bridge_vlan::VlanError>),
    /// The bridge doesn't exist or refused the port.
    #[error("tap {tap} can't join or leave bridge {bridge} (does the bridge exist?)")]
    Bridge {
        /// Tap name.
        tap: String,
        /// Bridge name.
        bridge: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
}

/// The in-kernel virtio-net backend's control device.
pub const VHOST_NET_DEVICE: &str = "/dev/vhost-net";

/// Whether the node offers vhost-net.
pub fn vhost_net_available() -> bool {
    std::path::Path::new(VHOST_NET_DEVICE).exists()
}

/// Opens /dev/vhost-net for one NIC queue.
pub fn open_vhost_net() -> Result<std::fs::File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(VHOST_NET_DEVICE)
        .map_err(TapError::OpenVhost)
}

/// `struct ifreq` of `<net/if.h>`: a name, then a 24-byte union of which
/// these requests use only the leading `short` flags or `int` ifindex,
/// kept as bytes so that reading them back needs no union access.
#[repr(C)]
struct Ifreq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl Ifreq {
    fn new(name: &str) -> Self {
        let mut req = Ifreq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        let len = name.len().min(IFNAMSIZ - 1);
        req.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        req
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    fn flags(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_flags(&mut self, flags: libc::c_short) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn set_ifindex(&mut self, index: libc::c_int) {
        self.data[..4].copy_from_slice(&index.to_ne_bytes());
    }
}

impl From<bridge_vlan::VlanError> for TapError {
    fn from(e: bridge_vlan::VlanError) -> Self {
        TapError::Vlan(Box::new(e))
    }
}

/// Runs one ioctl that takes a `struct ifreq`. No crate offers these
/// requests safely, so this is the one unsafe call of the module.
fn ifreq_ioctl(fd: BorrowedFd<'_>, request: libc::c_ulong, req: &mut Ifreq) -> io::Result<()> {
    // SAFETY: `req` is a valid, exclusively borrowed `struct ifreq` of the
    // kernel's layout for the whole call, and every request passed here
    // reads or writes only that struct.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, req as *mut Ifreq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An AF_INET datagram socket, the handle interface ioctls are made on.
fn control_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// An open tap interface with one fd per queue. Dropping it closes the
/// agent's fds.
#[derive(Debug)]
pub struct Tap {
    queues: Vec<OwnedFd>,
    name: String,
}

/// The fds of a tap's queues, opened on /dev/net/tun but not yet attached
/// to an interface. They can go to QEMU before [`TapQueues::attach`]
/// makes the interface: QEMU's copy and the agent's are one open file, so
/// the interface is QEMU's too. Dropping it closes the agent's fds.
#[derive(Debug)]
pub struct TapQueues {
    fds: Vec<OwnedFd>,
}

fn open_tun() -> Result<OwnedFd, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(TapError::OpenTun)?;
    Ok(OwnedFd::from(file))
}

/// Attaches an fd of /dev/net/tun to `name` (or a template); returns the
/// interface's name.
fn set_iff(fd: BorrowedFd<'_>, name: &str, flags: libc::c_short) -> Result<String, TapError> {
    let mut req = Ifreq::new(name);
    req.set_flags(flags);
    ifreq_ioctl(fd, TUNSETIFF, &mut req).map_err(|source| TapError::Create {
        template: name.to_owned(),
        source,
    })?;
    Ok(req.name())
}

impl TapQueues {
    /// Opens one fd per queue (at least one).
    pub fn open(queues: u32) -> Result<TapQueues, TapError> {
        let fds = (0..queues.max(1))
            .map(|_| open_tun())
            .collect::<Result<_, _>>()?;
        Ok(TapQueues { fds })
    }

    /// One fd per queue.
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.fds.iter().map(AsFd::as_fd)
    }

    /// Makes the tap: one interface, named from `template` (the kernel
    /// replaces `%d` with the first free number), with vnet headers, and
    /// multiqueue when there is more than one queue. Returns its name.
    pub fn attach(&self, template: &str) -> Result<String, TapError> {
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if self.fds.len() > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut fds = self.fds();
        let first = fds.next().expect("at least one queue");
        let name = set_iff(first, template, flags)?;
        for fd in fds {
            // Every further queue attaches to the interface the first made.
            set_iff(fd, &name, flags)?;
        }
        Ok(name)
    }
}

impl Tap {
    /// Creates a tap with vnet headers and `queues` queues (multiqueue when
    /// more than one). `template` may hold `%d`, which the kernel replaces
    /// with the first free number.
    pub fn create(template: &str, queues: u32) -> Result<Tap, TapError> {
        let queues = TapQueues::open(queues)?;
        let name = queues.attach(template)?;
        Ok(Tap {
            queues: queues.fds,
            name,
        })
    }

    /// One fd per queue.
    pub fn queue_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.queues.iter().map(AsFd::as_fd)
    }

    /// The interface name the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets IFF_UP.
    pub fn set_up(&self) -> Result<(), TapError> {
        set_up(&self.name)
    }

    /// Adds the tap as a port of `bridge`, carrying the VLANs `vlan` (the
    /// bridge's default when `None`).
    pub fn join_bridge(&self, bridge: &str, vlan: Option<&Vlan>) -> Result<(), TapError> {
        join_bridge(&self.name, bridge, vlan)
    }
}

/// Brings the tap `tap` up and, when `nic` has a bridge, makes it a port
/// of that bridge carrying the NIC's VLANs: what a NIC's tap needs before
/// the guest sends on it, at start and at hot-add alike.
pub fn connect(tap: &str, nic: &NicSpec) -> Result<(), TapError> {
    set_up(tap)?;
    if let Some(bridge) = &nic.bridge {
        join_bridge(tap, bridge, nic.vlan.as_ref())?;
    }
    Ok(())
}

/// Sets IFF_UP on the tap `tap`.
fn set_up(tap: &str) -> Result<(), TapError> {
    let err = |source| TapError::Up {
        tap: tap.to_owned(),
        source,
    };
    let sock = control_socket().map_err(err)?;
    let mut req = Ifreq::new(tap);
    ifreq_ioctl(sock.as_fd(), SIOCGIFFLAGS, &mut req).map_err(err)?;
    req.set_flags(req.flags() | libc::IFF_UP as libc::c_short);
    ifreq_ioctl(sock.as_fd(), SIOCSIFFLAGS, &mut req).map_err(err)
}

/// Adds the tap `tap` as a port of `bridge`, carrying the VLANs `vlan`
/// (the bridge's default when `None`).
fn join_bridge(tap: &str, bridge: &str, vlan: Option<&Vlan>) -> Result<(), TapError> {
    bridge_port(SIOCBRADDIF, tap, bridge)?;
    if let Some(vlan) = vlan {
        bridge_vlan::apply(tap, bridge, vlan)?;
    }
    Ok(())
}

/// Moves a tap that QEMU holds from one bridge to another (`None`: no
/// bridge), carrying the VLANs `vlan` there. The guest's link stays up;
/// only where its frames go changes. If joining `to` fails, the tap goes
/// back to `from`, with its VLANs.
pub fn move_to_bridge(
    tap: &str,
    from: Option<&str>,
    to: Option<&str>,
    vlan: Option<&Vlan>,
) -> Result<(), TapError> {
    if from == to {
        return Ok(());
    }
    // A bridge that can't carry the VLANs is refused before the tap moves.
    if let (Some(to), Some(_)) = (to, vlan)
        && !bridge_vlan::filters_vlans(to)
    {
        return Err(bridge_vlan::VlanError::FilteringOff {
            tap: tap.to_owned(),
            bridge: to.to_owned(),
        }
        .into());
    }
    if let Some(from) = from {
        bridge_port(SIOCBRDELIF, tap, from)?;
    }
    let Some(to) = to else {
        return Ok(());
    };
    let joined = bridge_port(SIOCBRADDIF, tap, to).and_then(|()| match vlan {
        Some(vlan) => Ok(bridge_vlan::apply(tap, to, vlan)?),
        None => Ok(()),
    });
    joined.inspect_err(|_| {
        let _ = bridge_port(SIOCBRDELIF, tap, to);
        if let Some(from) = from {
            let _ = bridge_port(SIOCBRADDIF, tap, from);
            if let Some(vlan) = vlan {
                let _ = bridge_vlan::apply(tap, from, vlan);
            }
        }
    })
}

/// Adds (SIOCBRADDIF) or removes (SIOCBRDELIF) `tap` as a port of `bridge`.
fn bridge_port(request: libc::c_ulong, tap: &str, bridge: &str) -> Result<(), TapError> {
    let err = |source| TapError::Bridge {
        tap: tap.to_owned(),
        bridge: bridge.to_owned(),
        source,
    };
    // The request names the bridge and carries the index of the port.
    nix::net::if_::if_nametoindex(bridge).map_err(|e| err(e.into()))?;
    let index = nix::net::if_::if_nametoindex(tap).map_err(|e| err(e.into()))?;
    let sock = control_socket().map_err(err)?;
    let mut req = Ifreq::new(bridge);
    req.set_ifindex(index as libc::c_int);
    ifreq_ioctl(sock.as_fd(), request, &mut req).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<Ifreq>(), 40);
    }

    #[test]
    fn ifreq_data_starts_with_the_flags_or_the_ifindex() {
        let mut req = Ifreq::new("tap0");
        req.set_ifindex(0x0102_0304);
        assert_eq!(req.data[..4], 0x0102_0304_i32.to_ne_bytes());

        req.set_flags(libc::IFF_UP as libc::c_short);
        assert_eq!(req.flags(), libc::IFF_UP as libc::c_short);
        assert_eq!(req.data[..2], (libc::IFF_UP as libc::c_short).to_ne_bytes());
    }

    #[test]
    fn ifreq_name_is_truncated_and_terminated() {
        let req = Ifreq::new("a-very-long-interface-name");

        assert_eq!(req.name(), "a-very-long-int");
    }

    fn assert_may_make_taps() {
        let may = caps::has_cap(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_NET_ADMIN,
        );
        assert!(
            may.unwrap_or(false) && std::path::Path::new(TUN_DEVICE).exists(),
            "this test makes a real tap, so it needs CAP_NET_ADMIN and {TUN_DEVICE}; \
             run the suite with scripts/test as root"
        );
    }

    /// What QEMU does with an fd it was handed: the interface's name and
    /// flags, by TUNGETIFF (`_IOR('T', 210, unsigned int)`).
    fn interface_of(fd: BorrowedFd<'_>) -> (String, libc::c_short) {
        let mut req = Ifreq::new("");
        ifreq_ioctl(fd, 0x8004_54d2, &mut req).unwrap();
        (req.name(), req.flags())
    }

    #[test]
    fn an_fd_handed_out_before_attach_becomes_the_tap() {
        assert_may_make_taps();
        let queues = TapQueues::open(1).unwrap();
        let handed_out = queues.fds().next().unwrap().try_clone_to_owned().unwrap();

        let name = queues.attach("kvtest%d").unwrap();
        drop(queues);

        let (seen, flags) = interface_of(handed_out.as_fd());
        assert_eq!(seen, name);
        assert_eq!(flags & !IFF_VNET_HDR, IFF_TAP | IFF_NO_PI);
        assert!(std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
        drop(handed_out);
        assert!(!std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
    }

    /// Where the process may create interfaces: a real tap, checked from
    /// sysfs, gone again when dropped.
    #[test]
    fn a_multiqueue_tap_is_up_with_vnet_headers_and_no_packet_info() {
        assert_may_make_taps();
        let tap = Tap::create("kvtest%d", 2).unwrap();
        let sysfs = |file: &str| {
            std::fs::read_to_string(format!("/sys/class/net/{}/{file}", tap.name())).unwrap()
        };
        let hex = |text: String| i64::from_str_radix(text.trim().trim_start_matches("0x"), 16);

        tap.set_up().unwrap();

        assert!(tap.name().starts_with("kvtest"), "{}", tap.name());
        assert_eq!(tap.queue_fds().count(), 2);
        let wanted = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;
        assert_eq!(hex(sysfs("tun_flags")), Ok(i64::from(wanted)));
        assert_ne!(hex(sysfs("flags")).unwrap() & i64::from(libc::IFF_UP), 0);
        let name = tap.name().to_owned();
        drop(tap);
        assert!(!std::path::Path::new(&format!("/sys/class/net/{name}")).exists());
    }
}
