//! NIC hot-add: tap (and vhost) fds through `getfd`, `netdev_add`, then
//! `device_add` at an explicit slot.

use std::fs::File;
use std::os::fd::AsFd;

use hypervisor::argv::{msix_vectors, netdev_id};
use hypervisor::pcie::PciLayout;
use hypervisor::qmp::{Command, QmpClient};
use hypervisor::runtime::RuntimeNic;
use hypervisor::spec::NicSpec;
use hypervisor::tap::{self, TapQueues};
use serde_json::{Value, json};

use crate::HotplugError;
use crate::pipeline::{self, Step, Undo};

/// What a successful NIC hot-add leaves on the host.
#[derive(Debug)]
pub struct AddedNic {
    /// The tap's interface name.
    pub tap: String,
}

/// The refusal of a hot-add or hot-remove of a NIC on ISA.
pub fn isa_is_cold() -> HotplugError {
    HotplugError::Unsupported(
        "a NIC on ISA (ne2k_isa) comes and goes only with a stop and start; hot-plug a PCI model"
            .into(),
    )
}

/// The `device_add` arguments of a NIC. No `romfile`: QEMU finds the
/// model's option ROM by its default name, in a chrooted QEMU's root too
/// (see [`hypervisor::host_files::stage_option_roms`]). Pure.
pub fn device_arguments(nic: &RuntimeNic, layout: PciLayout) -> Value {
    let driver = nic.spec.model.qemu_device();
    let mut args = json!({
        "driver": driver,
        "id": nic.device_id(),
        "netdev": nic.netdev_id(),
        "mac": nic.spec.mac.to_string(),
    });
    if let Some(slot) = nic.slot {
        crate::place_in_slot(&mut args, layout, slot);
    }
    if nic.spec.queues > 1 {
        args["mq"] = json!(true);
        args["vectors"] = json!(msix_vectors(nic.spec.queues));
    }
    args
}

/// The names a NIC's tap fds (one per queue) and vhost fds are passed to
/// QEMU under, by `getfd`. Short, since QEMU reads QMP a byte per turn of
/// its main loop; they need no more, since a name lives only from `getfd`
/// to the `netdev_add` that takes its fd, and an instance's hot-adds run
/// one at a time. Pure.
fn passed_fd_names(taps: usize, vhosts: usize) -> (Vec<String>, Vec<String>) {
    (
        (0..taps).map(|q| format!("tap{q}")).collect(),
        (0..vhosts).map(|q| format!("vhost{q}")).collect(),
    )
}

/// The names earlier agents passed a NIC's fds under, after its netdev:
/// one may have left such an fd before the agent was upgraded.
fn legacy_passed_fd_names(netdev: &str, taps: usize, vhosts: usize) -> Vec<String> {
    let taps = (0..taps).map(|q| format!("{netdev}-q{q}"));
    taps.chain((0..vhosts).map(|q| format!("{netdev}-vhost{q}")))
        .collect()
}

/// Closes the fds a hot-add of `nic` passed to QEMU and no netdev took.
/// An agent killed between `getfd` and `netdev_add` leaves them open in
/// QEMU, and its tap with them; names never passed fail harmlessly.
pub async fn close_passed_fds(qmp: &QmpClient, nic: &NicSpec) {
    let queues = nic.queues.max(1) as usize;
    let vhosts = if nic.vhost { queues } else { 0 };
    let (taps, vhost) = passed_fd_names(queues, vhosts);
    let legacy = legacy_passed_fd_names(&netdev_id(nic.uuid), queues, vhosts);
    for name in taps.iter().chain(&vhost).chain(&legacy) {
        if qmp.closefd(name).await.is_ok() {
            tracing::info!(fd = %name, "closed an fd a cut-short hot-add left in QEMU");
        }
    }
}

/// A NIC's host side, ready to hand to QEMU: its tap's queues, not yet
/// an interface, and its vhost-net fds.
#[derive(Debug)]
pub struct PreparedNic {
    queues: TapQueues,
    /// One per queue, or none without vhost.
    vhost: Vec<File>,
}

/// Opens the fds of a NIC's tap (and vhost-net). The interface itself is
/// made by [`attach`], while QEMU takes the fds.
pub fn prepare(nic: &NicSpec) -> Result<PreparedNic, HotplugError> {
    let queues = TapQueues::open(nic.queues)?;
    let vhost_queues = if nic.vhost { nic.queues } else { 0 };
    let vhost = (0..vhost_queues)
        .map(|_| tap::open_vhost_net())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PreparedNic { queues, vhost })
}

/// Hot-adds `nic` at its slot: `getfd` for each fd, then `netdev_add` and
/// `device_add` in one pipeline. While QEMU takes the fds, the tap is
/// made from `tap_template`, brought up and put on its bridge: making an
/// interface costs the kernel a few hundred microseconds, and QEMU needs
/// it only from `netdev_add` on. On failure every step that succeeded is
/// undone and the fds are closed, so the tap vanishes.
pub async fn attach(
    qmp: &QmpClient,
    prepared: PreparedNic,
    nic: &RuntimeNic,
    layout: PciLayout,
    tap_template: &str,
) -> Result<AddedNic, HotplugError> {
    if nic.slot.is_none() {
        return Err(isa_is_cold());
    }
    let netdev = nic.netdev_id();
    let (tap_names, vhost_names) =
        passed_fd_names(prepared.queues.fds().count(), prepared.vhost.len());
    let fds = tap_names.iter().zip(prepared.queues.fds()).chain(
        vhost_names
            .iter()
            .zip(prepared.vhost.iter().map(AsFd::as_fd)),
    );
    let id = nic.device_id();
    let steps = vec![
        Step {
            name: "getfd",
            commands: fds
                .map(|(name, fd)| Command::new("getfd", json!({ "fdname": name })).with_fd(fd))
                .collect(),
            // Closing a name that never arrived fails harmlessly.
            undo: Undo::Always(
                tap_names
                    .iter()
                    .chain(&vhost_names)
                    .map(|name| ("closefd", json!({ "fdname": name })))
                    .collect(),
            ),
        },
        Step::new(
            "netdev_add",
            Command::new(
                "netdev_add",
                netdev_arguments(&netdev, &tap_names, &vhost_names),
            ),
            // It takes the named fds, so deleting it closes them too.
            Undo::TakesOver(vec![("netdev_del", json!({ "id": netdev }))]),
        ),
        Step::new(
            "device_add",
            Command::new("device_add", device_arguments(nic, layout)),
            Undo::IfDone(vec![("device_del", json!({ "id": id }))]),
        ),
    ];
    let interface = async {
        tracing::debug_span!("step", step = "tap interface")
            .in_scope(|| make_interface(&prepared.queues, &nic.spec, tap_template))
    };
    // `device_add` with an explicit bus and address realizes the device
    // there or fails: its success is the check.
    let tap = pipeline::run_beside(qmp, steps, 1, interface).await?;
    Ok(AddedNic { tap })
}

/// Makes `queues` a tap named from `template`, up and on the NIC's bridge;
/// returns its name.
fn make_interface(
    queues: &TapQueues,
    nic: &NicSpec,
    template: &str,
) -> Result<String, HotplugError> {
    let tap = queues.attach(template)?;
    tap::connect(&tap, nic)?;
    Ok(tap)
}

/// The `netdev_add` arguments for named tap (and vhost) fds. Pure.
pub fn netdev_arguments(netdev: &str, tap_names: &[String], vhost_names: &[String]) -> Value {
    let mut args = json!({ "type": "tap", "id": netdev });
    match tap_names {
        [one] => args["fd"] = json!(one),
        many => args["fds"] = json!(many.join(":")),
    }
    match vhost_names {
        [] => {}
        [one] => {
            args["vhost"] = json!(true);
            args["vhostfd"] = json!(one);
        }
        many => {
            args["vhost"] = json!(true);
            args["vhostfds"] = json!(many.join(":"));
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use hypervisor::spec::{MacAddr, NicModel};

    use super::*;

    #[test]
    fn netdev_takes_one_named_fd_per_queue() {
        let names = |p: &str, n: usize| (0..n).map(|i| format!("{p}{i}")).collect::<Vec<_>>();

        let single = netdev_arguments("net-a", &names("t", 1), &[]);
        let multi = netdev_arguments("net-a", &names("t", 3), &names("v", 3));

        assert_eq!(single, json!({ "type": "tap", "id": "net-a", "fd": "t0" }));
        assert_eq!(multi["fds"], "t0:t1:t2");
        assert_eq!(multi["vhostfds"], "v0:v1:v2");
        assert_eq!(multi["vhost"], true);
    }

    #[test]
    fn each_queue_passes_its_fds_under_names_of_its_own() {
        let (taps, vhosts) = passed_fd_names(2, 2);

        assert_eq!(taps, ["tap0", "tap1"]);
        assert_eq!(vhosts, ["vhost0", "vhost1"]);
        assert_eq!(passed_fd_names(1, 0), (vec!["tap0".to_owned()], vec![]));
    }

    fn sample_nic(model: NicModel) -> RuntimeNic {
        RuntimeNic::new(
            NicSpec {
                name: "eth1".into(),
                uuid: hypervisor::runtime::Uuid::from_u128(0xabc),
                mac: "52:54:00:00:00:09".parse::<MacAddr>().unwrap(),
                model,
                bridge: None,
                vhost: false,
                queues: 1,
                vlan: None,
            },
            Some(7),
        )
    }

    #[test]
    fn device_is_placed_at_its_slot_on_pci0() {
        let nic = sample_nic(NicModel::Virtio);

        let args = device_arguments(&nic, PciLayout::RootBus);

        assert_eq!(args["addr"], "0x7");
        // pci.0 is i440fx's only PCI bus: QEMU puts the device there.
        assert!(args.get("bus").is_none(), "{args}");
        assert_eq!(args["mac"], "52:54:00:00:00:09");
        assert_eq!(args["netdev"], nic.netdev_id());
        assert!(args.get("romfile").is_none(), "{args}");
    }

    #[test]
    fn on_q35_the_device_goes_behind_the_root_port_of_its_slot() {
        let args = device_arguments(&sample_nic(NicModel::Virtio), PciLayout::RootPorts);

        assert_eq!(args["bus"], hypervisor::pcie::root_port_id(7));
        assert_eq!(args["addr"], "0x0");
    }
}
