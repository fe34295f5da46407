//! The options Ganeti's KVM driver adds to a runtime file's `kvm_cmd` when
//! it runs it (NICs, disks), for a QEMU the agent starts from such a file
//! rather than finds running: the target of a migration from a node still
//! on that driver. Pure.

use hypervisor::runtime::ResolvedAccelerator;

use super::runtime_file::GanetiRuntime;

/// Disk templates whose data another node reaches as well; Ganeti's driver
/// turns their cache off, except for RBD.
const SHARED_TEMPLATES: [&str; 4] = ["sharedfile", "blockdev", "ext", "gluster"];

/// The command line Ganeti's driver would run for `ganeti`, as far as the
/// guest sees it: `kvm_cmd`, then each NIC on a tap and each disk.
pub fn command_line(ganeti: &GanetiRuntime) -> Vec<String> {
    let mut argv = ganeti.kvm_cmd.clone();
    let vhost = ganeti.param("vhost_net") == "true";
    let queues: u32 = ganeti.param("virtio_net_queues").parse().unwrap_or(1);
    for nic in &ganeti.nics {
        let id = &nic.hvinfo.id;
        let (tap, device_extra) = match (vhost, queues) {
            (true, q) if q > 1 => (
                format!("fds={}", vec!["0"; q as usize].join(":")),
                format!(",mq=on,vectors={}", hypervisor::argv::msix_vectors(q)),
            ),
            _ => ("fd=0".to_owned(), String::new()),
        };
        let vhost = if vhost { ",vhost=on" } else { "" };
        argv.extend([
            "-netdev".into(),
            format!("type=tap,id={id},{tap}{vhost}"),
            "-device".into(),
            format!(
                "{},id={id},bus={},addr={:#x},netdev={id},mac={}{device_extra}",
                nic.hvinfo.driver, nic.hvinfo.bus, nic.hvinfo.slot, nic.mac
            ),
        ]);
    }
    let cache = ganeti.param("disk_cache");
    let discard = ganeti.param("disk_discard");
    for disk in &ganeti.disks {
        let id = &disk.hvinfo.id;
        let cache = if SHARED_TEMPLATES.contains(&disk.dev_type.as_str())
            || ganeti.param("kvm_disk_aio") == "native"
        {
            ",cache=none".to_owned()
        } else if cache.is_empty() || cache == "default" {
            String::new()
        } else {
            format!(",cache={cache}")
        };
        let discard = match discard.as_str() {
            "" | "default" => String::new(),
            other => format!(",discard={other}"),
        };
        argv.extend([
            "-device".into(),
            format!(
                "{},id={id},bus={},addr={:#x},drive={id}",
                disk.hvinfo.driver, disk.hvinfo.bus, disk.hvinfo.slot
            ),
            "-drive".into(),
            format!(
                "file={},format=raw,if=none{cache}{discard},id={id}",
                disk.link
            ),
        ]);
    }
    argv
}

/// The machine type `kvm_cmd` asks for (an alias, maybe).
pub fn machine(ganeti: &GanetiRuntime) -> Option<&str> {
    let at = ganeti
        .kvm_cmd
        .iter()
        .position(|a| a == "-machine" || a == "-M")?;
    ganeti.kvm_cmd.get(at + 1)?.split(',').next()
}

/// The accelerator `kvm_cmd` runs under: KVM when it asks for it, or when
/// its binary is a `kvm` (Debian's `/usr/bin/kvm` adds `-enable-kvm`).
pub fn accelerator(ganeti: &GanetiRuntime) -> ResolvedAccelerator {
    let cmd = &ganeti.kvm_cmd;
    let asked = cmd.iter().any(|a| a == "-enable-kvm")
        || cmd
            .windows(2)
            .any(|w| (w[0] == "-machine" || w[0] == "-M") && w[1].contains("accel=kvm"));
    let kvm_binary = cmd.first().is_some_and(|binary| binary.ends_with("kvm"));
    if asked || kvm_binary {
        ResolvedAccelerator::Kvm
    } else {
        ResolvedAccelerator::Tcg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ganeti::runtime_file::tests::sample;

    #[test]
    fn nics_and_disks_are_added_as_ganetis_driver_adds_them() {
        let ganeti = GanetiRuntime::parse(&sample().to_string()).unwrap();
        let argv = command_line(&ganeti).join(" ");
        assert!(argv.contains("-netdev type=tap,id=nic-5c1b2f0e-8a31-4f5e,fd=0 -device virtio-net-pci,id=nic-5c1b2f0e-8a31-4f5e,bus=pci.0,addr=0xd,netdev=nic-5c1b2f0e-8a31-4f5e,mac=aa:00:00:12:34:56"), "{argv}");
        assert!(argv.contains("-drive file=/var/run/ganeti/instance-disks/web1:0,format=raw,if=none,id=disk-932df160-7a22-4067"), "{argv}");
    }

    #[test]
    fn debians_kvm_wrapper_means_kvm() {
        let mut ganeti = GanetiRuntime::parse(&sample().to_string()).unwrap();
        assert_eq!(accelerator(&ganeti), ResolvedAccelerator::Kvm);
        ganeti.kvm_cmd[0] = "/usr/bin/qemu-system-x86_64".into();
        assert_eq!(accelerator(&ganeti), ResolvedAccelerator::Tcg);
        ganeti
            .kvm_cmd
            .extend(["-machine".into(), "pc,accel=kvm".into()]);
        assert_eq!(accelerator(&ganeti), ResolvedAccelerator::Kvm);
        assert_eq!(machine(&ganeti), Some("pc"));
    }
}
