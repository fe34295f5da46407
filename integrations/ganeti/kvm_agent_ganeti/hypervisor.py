"""A Ganeti hypervisor class that runs instances through the local kvm-agent.

Ganeti's node daemon calls a hypervisor class for everything it does with
an instance. This one translates each call into calls to the kvm-agent on
the same node: the instance's spec is built from Ganeti's objects and KVM
hvparams, and the agent generates the runtime, runs QEMU, hotplugs devices
and migrates to the target node's agent.

Settings come from ``/etc/kvm-agent/ganeti.toml`` (or the file that
``KVM_AGENT_GANETI_CONFIG`` names), with the node daemon's environment
over it, since Ganeti's daemons may start from an init script that passes
them no environment of the operator's:

``socket`` / ``KVM_AGENT_SOCKET``
    The local agent's socket (default ``/var/lib/kvm-agent/agent.sock``).
``peer`` / ``KVM_AGENT_PEER``
    How to reach the target node's agent for a migration, with ``{target}``
    standing for the address Ganeti gives (default ``https://{target}:7070``).
``state_dir`` / ``KVM_AGENT_GANETI_STATE``
    Where migration outcomes are kept between Ganeti's calls (default
    ``/run/kvm-agent-ganeti``).
"""

import functools
import ipaddress
import json
import logging
import os
import tomllib

from ganeti import constants, errors, objects
from ganeti.hypervisor import hv_base
from ganeti.hypervisor.hv_kvm import KVMHypervisor

import kvm_agent_client as kac
from kvm_agent_client import pb

DEFAULT_PEER = "https://{target}:7070"
DEFAULT_STATE_DIR = "/run/kvm-agent-ganeti"
DEFAULT_CONFIG = "/etc/kvm-agent/ganeti.toml"
# Each setting's key in the file, and its variable in the environment.
SETTINGS = {
    "socket": "KVM_AGENT_SOCKET",
    "peer": "KVM_AGENT_PEER",
    "state_dir": "KVM_AGENT_GANETI_STATE",
}


def load_settings(path=None):
    """The class's settings: the file's, then the environment's over them.
    A missing file is no settings; a file with an unknown key or a value
    that isn't a string is an error that names it."""
    path = path or os.environ.get("KVM_AGENT_GANETI_CONFIG", DEFAULT_CONFIG)
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except FileNotFoundError:
        settings = {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise errors.HypervisorError("kvm-agent: can't read %s: %s" % (path, e))
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise errors.HypervisorError("kvm-agent: %s: unknown keys %s; the keys are %s" %
                                     (path, ", ".join(unknown), ", ".join(sorted(SETTINGS))))
    for key, value in settings.items():
        if not isinstance(value, str):
            raise errors.HypervisorError("kvm-agent: %s: %s must be a string" % (path, key))
    for key, variable in SETTINGS.items():
        if os.environ.get(variable):
            settings[key] = os.environ[variable]
    return settings

# hvparams this class turns into the agent's spec (or call options).
TRANSLATED = frozenset([
    constants.HV_ACPI,
    constants.HV_BOOT_ORDER,
    constants.HV_CDROM_IMAGE_PATH,
    constants.HV_KVM_CDROM2_IMAGE_PATH,
    constants.HV_KVM_FLOPPY_IMAGE_PATH,
    constants.HV_SOUNDHW,
    constants.HV_USB_DEVICES,
    constants.HV_USE_GUEST_AGENT,
    constants.HV_KVM_PCI_RESERVATIONS,
    constants.HV_KVM_MIGRATION_CAPS,
    constants.HV_CPU_CORES,
    constants.HV_CPU_MASK,
    constants.HV_CPU_SOCKETS,
    constants.HV_CPU_THREADS,
    constants.HV_CPU_TYPE,
    constants.HV_DISK_CACHE,
    constants.HV_DISK_TYPE,
    constants.HV_KVM_SCSI_CONTROLLER_TYPE,
    # Passed on; the agent runs only the options its node allows.
    constants.HV_KVM_EXTRA,
    constants.HV_INITRD_PATH,
    constants.HV_KERNEL_ARGS,
    constants.HV_KERNEL_PATH,
    constants.HV_KVM_FLAG,
    constants.HV_KVM_MACHINE_VERSION,
    constants.HV_MEM_PATH,
    constants.HV_NIC_TYPE,
    constants.HV_ROOT_PATH,
    constants.HV_SERIAL_CONSOLE,
    constants.HV_USE_LOCALTIME,
    constants.HV_REBOOT_BEHAVIOR,
    constants.HV_KVM_USER_SHUTDOWN,
    constants.HV_KVM_DISK_AIO,
    constants.HV_DISK_DISCARD,
    constants.HV_KEYMAP,
    constants.HV_USB_MOUSE,
    constants.HV_VGA,
    constants.HV_VHOST_NET,
    constants.HV_VIRTIO_NET_QUEUES,
    constants.HV_VNC_BIND_ADDRESS,
    constants.HV_VNC_TLS,
    constants.HV_VNC_X509,
    constants.HV_VNC_X509_VERIFY,
    # Read by the class at each start and given to the agent, which keeps
    # it in QEMU and in memory only.
    constants.HV_VNC_PASSWORD_FILE,
    # SPICE on the instance's network_port, with the cluster's SPICE
    # certificate for TLS; an interface name resolves to its address here.
    constants.HV_KVM_SPICE_BIND,
    constants.HV_KVM_SPICE_IP_VERSION,
    constants.HV_KVM_SPICE_PASSWORD_FILE,
    constants.HV_KVM_SPICE_USE_TLS,
    constants.HV_KVM_SPICE_TLS_CIPHERS,
    constants.HV_KVM_SPICE_LOSSLESS_IMG_COMPR,
    constants.HV_KVM_SPICE_JPEG_IMG_COMPR,
    constants.HV_KVM_SPICE_ZLIB_GLZ_IMG_COMPR,
    constants.HV_KVM_SPICE_STREAMING_VIDEO_DETECTION,
    constants.HV_KVM_SPICE_AUDIO_COMPR,
    constants.HV_KVM_SPICE_USE_VDAGENT,
    constants.HV_MIGRATION_BANDWIDTH,
    constants.HV_MIGRATION_DOWNTIME,
    constants.HV_MIGRATION_MODE,
])

# hvparams that describe what the agent decides for itself on each node;
# any value is accepted, and the agent's own setting holds.
AGENT_DECIDES = {
    constants.HV_KVM_PATH: "the agent's qemu_binary setting",
    constants.HV_MIGRATION_PORT: "the agent's migration.ports setting",
    constants.HV_SERIAL_SPEED: "the serial console is a socket, without a line speed",
    constants.HV_VNET_HDR: "the agent always opens taps with vnet_hdr",
    # Every QEMU of a confined agent runs unprivileged and chrooted: as the
    # agent's [qemu_user] user, or with a uid of its own from its uid_pool.
    constants.HV_SECURITY_MODEL: "the agent's confinement and [qemu_user] settings",
    constants.HV_SECURITY_DOMAIN: "the agent's [qemu_user] user",
    constants.HV_KVM_USE_CHROOT: "the agent chroots every confined QEMU",
    # A tray to open is what lets a medium change while the guest runs.
    constants.HV_KVM_CDROM_DISK_TYPE: "CD-ROMs are IDE drives, whose media can change",
}

# Ganeti's soundhw (QEMU's old -soundhw names) as the agent's cards.
SOUND_CARDS = {
    "": pb.SOUND_CARD_UNSPECIFIED,
    "hda": pb.SOUND_CARD_HDA,
    "ac97": pb.SOUND_CARD_AC97,
    "es1370": pb.SOUND_CARD_ES1370,
    "sb16": pb.SOUND_CARD_SB16,
    "adlib": pb.SOUND_CARD_ADLIB,
    "gus": pb.SOUND_CARD_GUS,
    "cs4231a": pb.SOUND_CARD_CS4231A,
    "pcspk": pb.SOUND_CARD_PCSPK,
}

# Ganeti's usb_devices (QEMU's -usbdevice names) the agent gives a guest.
USB_DEVICES = {
    "keyboard": pb.USB_DEVICE_KEYBOARD,
    "mouse": pb.USB_DEVICE_MOUSE,
    "tablet": pb.USB_DEVICE_TABLET,
    "wacom-tablet": pb.USB_DEVICE_WACOM_TABLET,
}

# The QEMU migration capabilities of Ganeti's migration_caps the agent's
# migration takes.
MIGRATION_CAPS = frozenset(["xbzrle", "auto-converge", "multifd", "postcopy-ram"])
# QEMU's own XBZRLE cache size, which Ganeti's driver leaves as it is.
XBZRLE_CACHE_BYTES = 64 << 20
# QEMU's own count of multifd channels, which Ganeti's driver leaves as it
# is.
MULTIFD_CHANNELS = 2

# Ganeti's boot_order as the device the agent's guest boots from.
BOOT_DEVICES = {
    constants.HT_BO_DISK: pb.BOOT_DEVICE_DISK,
    constants.HT_BO_CDROM: pb.BOOT_DEVICE_CDROM,
    constants.HT_BO_FLOPPY: pb.BOOT_DEVICE_FLOPPY,
    constants.HT_BO_NETWORK: pb.BOOT_DEVICE_NETWORK,
}

# Each image hvparam, its drive's name and kind.
DRIVES = [
    (constants.HV_CDROM_IMAGE_PATH, "cdrom", pb.MEDIA_KIND_CDROM),
    (constants.HV_KVM_CDROM2_IMAGE_PATH, "cdrom2", pb.MEDIA_KIND_CDROM),
    (constants.HV_KVM_FLOPPY_IMAGE_PATH, "floppy", pb.MEDIA_KIND_FLOPPY),
]

NIC_MODELS = {
    constants.HT_NIC_PARAVIRTUAL: pb.NIC_MODEL_VIRTIO,
    constants.HT_NIC_E1000: pb.NIC_MODEL_E1000,
    constants.HT_NIC_RTL8139: pb.NIC_MODEL_RTL8139,
    constants.HT_NIC_NE2K_PCI: pb.NIC_MODEL_NE2K_PCI,
    constants.HT_NIC_I82551: pb.NIC_MODEL_I82551,
    constants.HT_NIC_I85557B: pb.NIC_MODEL_I82557B,
    constants.HT_NIC_I8259ER: pb.NIC_MODEL_I82559ER,
    constants.HT_NIC_PCNET: pb.NIC_MODEL_PCNET,
    # One per instance, on ISA; Ganeti's own driver puts it on pci.0,
    # which QEMU refuses.
    constants.HT_NIC_NE2K_ISA: pb.NIC_MODEL_NE2K_ISA,
}

# Ganeti's disk_type as the agent's disk bus. Its plain `scsi` is QEMU's
# old `-drive if=scsi`, which current QEMUs refuse on x86 machines; what
# it gave was an emulated SCSI disk, which scsi-hd is.
DISK_BUSES = {
    constants.HT_DISK_PARAVIRTUAL: pb.DISK_BUS_VIRTIO,
    constants.HT_DISK_IDE: pb.DISK_BUS_IDE,
    constants.HT_DISK_SCSI: pb.DISK_BUS_SCSI_HD,
    constants.HT_DISK_SCSI_HD: pb.DISK_BUS_SCSI_HD,
    constants.HT_DISK_SCSI_CD: pb.DISK_BUS_SCSI_CD,
    constants.HT_DISK_SCSI_BLOCK: pb.DISK_BUS_SCSI_BLOCK,
    constants.HT_DISK_SCSI_GENERIC: pb.DISK_BUS_SCSI_GENERIC,
}

SCSI_BUSES = {pb.DISK_BUS_SCSI_HD, pb.DISK_BUS_SCSI_CD, pb.DISK_BUS_SCSI_BLOCK,
              pb.DISK_BUS_SCSI_GENERIC}

SCSI_CONTROLLERS = {
    constants.HT_SCSI_CONTROLLER_VIRTIO: pb.SCSI_CONTROLLER_VIRTIO_SCSI,
    constants.HT_SCSI_CONTROLLER_LSI: pb.SCSI_CONTROLLER_LSI,
    constants.HT_SCSI_CONTROLLER_MEGASAS: pb.SCSI_CONTROLLER_MEGASAS,
}

# The runtime's controller as QEMU's device.
SCSI_CONTROLLER_DEVICES = {
    "virtio_scsi": "virtio-scsi-pci",
    "lsi": "lsi53c895a",
    "megasas": "megasas",
}

# Ganeti 3.0 offers threads and native.
DISK_AIOS = {
    constants.HT_KVM_AIO_THREADS: pb.DISK_AIO_THREADS,
    constants.HT_KVM_AIO_NATIVE: pb.DISK_AIO_NATIVE,
}

USB_POINTERS = {
    "": pb.USB_POINTER_UNSPECIFIED,
    constants.HT_MOUSE_TABLET: pb.USB_POINTER_TABLET,
    constants.HT_MOUSE_MOUSE: pb.USB_POINTER_MOUSE,
}

# Ganeti's vga values (QEMU's -vga names) as the agent's adapters.
DISPLAY_ADAPTERS = {
    "std": pb.DISPLAY_ADAPTER_STD,
    "cirrus": pb.DISPLAY_ADAPTER_CIRRUS,
    "vmware": pb.DISPLAY_ADAPTER_VMWARE,
    "qxl": pb.DISPLAY_ADAPTER_QXL,
    "virtio": pb.DISPLAY_ADAPTER_VIRTIO,
    "none": pb.DISPLAY_ADAPTER_NONE,
}

DISK_CACHES = {
    constants.HT_CACHE_DEFAULT: pb.DISK_CACHE_UNSPECIFIED,
    constants.HT_CACHE_NONE: pb.DISK_CACHE_NONE,
    constants.HT_CACHE_WBACK: pb.DISK_CACHE_WRITEBACK,
    constants.HT_CACHE_WTHROUGH: pb.DISK_CACHE_WRITETHROUGH,
}

ACCELERATORS = {
    "": pb.ACCELERATOR_AUTO,
    constants.HT_KVM_ENABLED: pb.ACCELERATOR_KVM,
    constants.HT_KVM_DISABLED: pb.ACCELERATOR_TCG,
}


def unsupported(param, value, why):
    return errors.HypervisorError(
        "hvparam %s=%r is not supported with kvm-agent: %s" % (param, value, why))


def check_supported(hvparams):
    """Refuses every hvparam value the agent can't honour, naming it.

    Parameters neither translated nor decided by the agent must keep
    Ganeti's default: a changed value would otherwise be ignored silently.
    """
    defaults = constants.HVC_DEFAULTS[constants.HT_KVM]
    for param in sorted(hvparams):
        value = hvparams[param]
        if param in TRANSLATED or param in AGENT_DECIDES:
            continue
        if param in defaults and value != defaults[param]:
            raise unsupported(param, value,
                              "only the default %r is" % (defaults[param],))
    for param, _, _ in DRIVES:
        if "://" in (hvparams.get(param) or ""):
            raise unsupported(param, hvparams[param],
                              "the agent opens every image itself and hands QEMU the file; "
                              "download the image to the node and name its path")
    if hvparams.get(constants.HV_DISK_TYPE) not in DISK_BUSES:
        raise unsupported(constants.HV_DISK_TYPE, hvparams.get(constants.HV_DISK_TYPE),
                          "x86 machines have no SD card or MTD bus, and their pflash "
                          "holds the firmware, so QEMU refuses such disks; use "
                          "paravirtual, ide or a SCSI type")
    if hvparams.get(constants.HV_NIC_TYPE) not in NIC_MODELS:
        raise unsupported(constants.HV_NIC_TYPE, hvparams.get(constants.HV_NIC_TYPE),
                          "use one of %s" % ", ".join(sorted(NIC_MODELS)))
    if hvparams.get(constants.HV_DISK_CACHE) not in DISK_CACHES:
        raise unsupported(constants.HV_DISK_CACHE, hvparams.get(constants.HV_DISK_CACHE),
                          "use default, none, writeback or writethrough")
    if hvparams.get(constants.HV_KVM_FLAG, "") not in ACCELERATORS:
        raise unsupported(constants.HV_KVM_FLAG, hvparams.get(constants.HV_KVM_FLAG),
                          "use enabled, disabled or leave it empty")
    if int(hvparams.get(constants.HV_KVM_PCI_RESERVATIONS) or 0) > 31:
        raise unsupported(constants.HV_KVM_PCI_RESERVATIONS,
                          hvparams[constants.HV_KVM_PCI_RESERVATIONS],
                          "leave at least slot 31 to disks and NICs")
    for cap in migration_caps(hvparams):
        if cap not in MIGRATION_CAPS:
            raise unsupported(constants.HV_KVM_MIGRATION_CAPS,
                              hvparams[constants.HV_KVM_MIGRATION_CAPS],
                              "%r isn't among the capabilities the agent's migration takes (%s)" %
                              (cap, ", ".join(sorted(MIGRATION_CAPS))))
    sound = hvparams.get(constants.HV_SOUNDHW) or ""
    if sound not in SOUND_CARDS:
        raise unsupported(constants.HV_SOUNDHW, sound,
                          "name one card: %s" % ", ".join(sorted(c for c in SOUND_CARDS if c)))
    for device in usb_device_names(hvparams):
        if device not in USB_DEVICES:
            raise unsupported(constants.HV_USB_DEVICES, hvparams[constants.HV_USB_DEVICES],
                              "%r isn't a device QEMU emulates on its own; use %s" %
                              (device, ", ".join(sorted(USB_DEVICES))))
    vga = hvparams.get(constants.HV_VGA) or "std"
    if vga not in DISPLAY_ADAPTERS:
        raise unsupported(constants.HV_VGA, vga, "use %s" % ", ".join(sorted(DISPLAY_ADAPTERS)))
    if hvparams.get(constants.HV_VNC_TLS) and hvparams.get(constants.HV_VNC_X509_VERIFY) and \
        not hvparams.get(constants.HV_VNC_X509):
        raise unsupported(constants.HV_VNC_X509_VERIFY, True,
                          "verifying viewers' certificates needs the CA in vnc_x509_path")
    vnc = hvparams.get(constants.HV_VNC_BIND_ADDRESS, "") or ""
    if vnc_address(vnc) is None:
        raise unsupported(constants.HV_VNC_BIND_ADDRESS, vnc,
                          "name an IP address (0.0.0.0 for every address); "
                          "an interface's name isn't resolved")


def migration_caps(hvparams):
    """Ganeti's migration_caps, a list joined with ':'."""
    return [c for c in (hvparams.get(constants.HV_KVM_MIGRATION_CAPS) or "").split(":") if c]


def migration_options(hvparams, live):
    """The agent's options for a migration with Ganeti's hvparams. Pure."""
    options = pb.MigrationOptions(
        offline=not live,
        max_bandwidth=int(hvparams[constants.HV_MIGRATION_BANDWIDTH]) << 20,
        downtime_limit_ms=int(hvparams[constants.HV_MIGRATION_DOWNTIME]))
    caps = migration_caps(hvparams)
    if caps:
        # Given, they are all the capabilities, as with Ganeti's driver.
        options.auto_converge = "auto-converge" in caps
        if "xbzrle" in caps:
            options.xbzrle_cache_bytes = XBZRLE_CACHE_BYTES
        if "multifd" in caps:
            options.multifd_channels = MULTIFD_CHANNELS
        # Like Ganeti's driver, switch once precopy stops converging.
        options.postcopy = "postcopy-ram" in caps
    return options


def usb_device_names(hvparams):
    return [d.strip() for d in (hvparams.get(constants.HV_USB_DEVICES) or "").split(",")
            if d.strip()]


def vnc_address(value):
    """The agent's VNC address for Ganeti's vnc_bind_address: "" (the
    agent's 127.0.0.1) for loopback, the address itself for an IP address,
    None for anything else."""
    if value in ("", "localhost", "127.0.0.1"):
        return ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def device_name(kind, device):
    """The agent's name of a Ganeti NIC or disk: its Ganeti name if it has
    one the agent accepts, else one made from its uuid."""
    if device.name and len(device.name) <= 63 and \
        device.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        return device.name
    return "%s-%s" % (kind, device.uuid.split("-")[0])


def nic_spec(nic, hvparams):
    mode = nic.nicparams.get(constants.NIC_MODE, constants.NIC_MODE_BRIDGED)
    if mode != constants.NIC_MODE_BRIDGED:
        raise unsupported("nicparams mode", mode,
                          "NICs are bridged (the agent attaches the tap to nicparams link)")
    queues = int(hvparams.get(constants.HV_VIRTIO_NET_QUEUES, 1) or 1)
    spec = pb.NicSpec(
        name=device_name("nic", nic),
        uuid=nic.uuid,
        mac=nic.mac,
        model=NIC_MODELS[hvparams[constants.HV_NIC_TYPE]],
        bridge=nic.nicparams.get(constants.NIC_LINK, "") or "",
        vhost=bool(hvparams.get(constants.HV_VHOST_NET)),
        queues=queues,
    )
    vlan = nic.nicparams.get(constants.NIC_VLAN, "") or ""
    if vlan:
        spec.vlan.CopyFrom(vlan_spec(vlan))
    return spec


def vlan_spec(text):
    """Ganeti's `vlan` nicparam as the agent's VlanSpec: `.100` (or `100`)
    untagged, `:100:200` tagged, `.100:200:300` both. The agent checks the
    ids; a bridge that doesn't filter VLANs is refused there, so a NIC
    meant for a VLAN never lands on the bridge untagged."""
    untagged, trunk = 0, text
    if not text.startswith(":"):
        first, _, trunk = text.lstrip(".").partition(":")
        untagged = vlan_id(first, text)
    elif text == ":":
        raise errors.HypervisorError("nicparams vlan %r names no VLAN" % text)
    else:
        trunk = text[1:]
    tagged = [vlan_id(part, text) for part in trunk.split(":")] if trunk else []
    return pb.VlanSpec(untagged=untagged, tagged=tagged)


def vlan_id(part, text):
    if not part.isdigit():
        raise errors.HypervisorError(
            "nicparams vlan %r: %r is not a VLAN id" % (text, part))
    return int(part)


def disk_spec(disk, link_name, hvparams):
    # Ganeti's own checks allow native AIO with cache none only.
    aio = DISK_AIOS[hvparams.get(constants.HV_KVM_DISK_AIO) or constants.HT_KVM_AIO_THREADS]
    return pb.DiskSpec(
        name=device_name("disk", disk),
        uuid=disk.uuid,
        path=link_name,
        format=pb.DISK_FORMAT_RAW,
        read_only=disk.mode == constants.DISK_RDONLY,
        cache=DISK_CACHES[hvparams[constants.HV_DISK_CACHE]],
        aio=aio,
        discard=hvparams.get(constants.HV_DISK_DISCARD) == constants.HT_DISCARD_UNMAP,
        bus=DISK_BUSES[hvparams[constants.HV_DISK_TYPE]],
    )


def scsi_controller(hvparams):
    """The agent's SCSI controller: the one Ganeti names, where its disks
    are on SCSI, as Ganeti's driver adds it only then."""
    if DISK_BUSES[hvparams[constants.HV_DISK_TYPE]] not in SCSI_BUSES:
        return pb.SCSI_CONTROLLER_UNSPECIFIED
    return SCSI_CONTROLLERS[hvparams.get(constants.HV_KVM_SCSI_CONTROLLER_TYPE) or
                            constants.HT_SCSI_CONTROLLER_LSI]


def media_specs(hvparams):
    """The agent's drives for Ganeti's image hvparams, in Ganeti's order:
    a drive for each image given."""
    return [pb.MediaDriveSpec(name=name, kind=kind, image=hvparams[param])
            for param, name, kind in DRIVES if hvparams.get(param)]


def boot_spec(hvp):
    """Ganeti's kernel or boot_order as the agent's BootSpec. As Ganeti's
    KVM driver does, a kernel wins over boot_order."""
    kernel = hvp.get(constants.HV_KERNEL_PATH)
    if not kernel:
        return pb.BootSpec(device=BOOT_DEVICES[hvp.get(constants.HV_BOOT_ORDER) or
                                               constants.HT_BO_DISK])
    cmdline = hvp.get(constants.HV_KERNEL_ARGS, "") or ""
    if hvp.get(constants.HV_ROOT_PATH):
        cmdline = "root=%s %s" % (hvp[constants.HV_ROOT_PATH], cmdline)
    if hvp[constants.HV_SERIAL_CONSOLE]:
        cmdline = "console=ttyS0 %s" % cmdline
    return pb.BootSpec(kernel=kernel, initrd=hvp.get(constants.HV_INITRD_PATH) or "",
                       cmdline=cmdline.strip())


def has_vnc(instance):
    """Whether the instance gets VNC: an address, and a port Ganeti gave
    it, as Ganeti's driver decides."""
    return bool(instance.hvparams.get(constants.HV_VNC_BIND_ADDRESS)) and \
        instance.network_port > constants.VNC_BASE_PORT


def display_password_file(instance):
    """The file of the password the instance's display (VNC or SPICE)
    asks for, if any."""
    hvp = instance.hvparams
    if has_vnc(instance):
        return hvp.get(constants.HV_VNC_PASSWORD_FILE) or None
    if hvp.get(constants.HV_KVM_SPICE_BIND):
        return hvp.get(constants.HV_KVM_SPICE_PASSWORD_FILE) or None
    return None


def spice_address(bind, ip_version):
    """SPICE's address for Ganeti's spice_bind: an IP address as it is, an
    interface's address as Ganeti's driver picks it (of the IP version
    asked for, else IPv4 before IPv6)."""
    try:
        return str(ipaddress.ip_address(bind))
    except ValueError:
        pass
    from ganeti import netutils
    addresses = netutils.GetInterfaceIpAddresses(bind)
    versions = [ip_version] if ip_version else [constants.IP4_VERSION, constants.IP6_VERSION]
    for version in versions:
        if addresses.get(version):
            return addresses[version][0]
    raise errors.HypervisorError("SPICE: no IPv%s address on %s" %
                                 (ip_version or "4 or 6", bind))


def spice_spec(instance):
    """The agent's SpiceSpec for Ganeti's spice_* hvparams, on the
    instance's network_port."""
    hvp = instance.hvparams
    spec = pb.SpiceSpec(
        port=instance.network_port,
        address=spice_address(hvp[constants.HV_KVM_SPICE_BIND],
                              int(hvp.get(constants.HV_KVM_SPICE_IP_VERSION) or 0)),
        password=bool(display_password_file(instance)),
        image_compression=hvp.get(constants.HV_KVM_SPICE_LOSSLESS_IMG_COMPR) or "",
        jpeg_wan_compression=hvp.get(constants.HV_KVM_SPICE_JPEG_IMG_COMPR) or "",
        zlib_glz_wan_compression=hvp.get(constants.HV_KVM_SPICE_ZLIB_GLZ_IMG_COMPR) or "",
        streaming_video=hvp.get(constants.HV_KVM_SPICE_STREAMING_VIDEO_DETECTION) or "",
        no_playback_compression=not hvp.get(constants.HV_KVM_SPICE_AUDIO_COMPR, True),
        vdagent=bool(hvp.get(constants.HV_KVM_SPICE_USE_VDAGENT, True)))
    if hvp.get(constants.HV_KVM_SPICE_USE_TLS):
        from ganeti import pathutils
        spec.tls.CopyFrom(pb.SpiceTls(
            cert=pathutils.SPICE_CERT_FILE, key=pathutils.SPICE_CERT_FILE,
            ca=pathutils.SPICE_CACERT_FILE,
            ciphers=hvp.get(constants.HV_KVM_SPICE_TLS_CIPHERS) or ""))
    return spec


def instance_spec(instance, block_devices):
    """The agent's spec for a Ganeti instance and its block devices. Pure."""
    hvp = instance.hvparams
    check_supported(hvp)
    spec = pb.InstanceSpec(
        name=instance.name,
        uuid=instance.uuid,
        memory_mib=int(instance.beparams[constants.BE_MAXMEM]),
        vcpus=int(instance.beparams[constants.BE_VCPUS]),
        disks=[disk_spec(disk, link, hvp) for disk, link, _ in block_devices],
        nics=[nic_spec(nic, hvp) for nic in instance.nics],
        machine_type=hvp.get(constants.HV_KVM_MACHINE_VERSION, "") or "",
        accelerator=ACCELERATORS[hvp.get(constants.HV_KVM_FLAG, "")],
        serial_console=bool(hvp[constants.HV_SERIAL_CONSOLE]),
        cpu_model=hvp.get(constants.HV_CPU_TYPE, "") or "",
        cpu_mask="" if hvp[constants.HV_CPU_MASK] == constants.CPU_PINNING_ALL
        else hvp[constants.HV_CPU_MASK],
        rtc_localtime=bool(hvp.get(constants.HV_USE_LOCALTIME)),
        exit_on_reboot=(hvp.get(constants.HV_REBOOT_BEHAVIOR) ==
                        constants.INSTANCE_REBOOT_EXIT),
    )
    # 0 is Ganeti's "not set", as it is the agent's.
    topology = [int(hvp.get(p) or 0) for p in (constants.HV_CPU_SOCKETS,
                                               constants.HV_CPU_CORES,
                                               constants.HV_CPU_THREADS)]
    if any(topology):
        spec.cpu_topology.CopyFrom(pb.CpuTopology(sockets=topology[0], cores=topology[1],
                                                  threads=topology[2]))
    spec.boot.CopyFrom(boot_spec(hvp))
    spec.media.extend(media_specs(hvp))
    spec.usb_devices.extend(USB_DEVICES[d] for d in usb_device_names(hvp))
    spec.sound_card = SOUND_CARDS[hvp.get(constants.HV_SOUNDHW) or ""]
    spec.guest_agent = bool(hvp.get(constants.HV_USE_GUEST_AGENT))
    spec.scsi_controller = scsi_controller(hvp)
    # Split on spaces, as Ganeti's driver does.
    spec.extra_args.extend((hvp.get(constants.HV_KVM_EXTRA) or "").split())
    # Disks and NICs where Ganeti's driver puts them: from the first slot
    # past its reservations, so a guest moved over keeps its interface names.
    reservations = int(hvp.get(constants.HV_KVM_PCI_RESERVATIONS) or 0)
    spec.first_device_slot = reservations if reservations > 3 else 0
    if has_vnc(instance):
        spec.vnc.CopyFrom(pb.VncSpec(
            display=instance.network_port - constants.VNC_BASE_PORT,
            address=vnc_address(hvp[constants.HV_VNC_BIND_ADDRESS]),
            keymap=hvp.get(constants.HV_KEYMAP) or "",
            password=bool(display_password_file(instance))))
        # As Ganeti's driver: the x509 files only with TLS.
        if hvp.get(constants.HV_VNC_TLS):
            spec.vnc.tls.CopyFrom(pb.VncTls(
                x509_dir=hvp.get(constants.HV_VNC_X509) or "",
                verify_client=bool(hvp.get(constants.HV_VNC_X509_VERIFY))))
    elif hvp.get(constants.HV_KVM_SPICE_BIND) and instance.network_port:
        spec.spice.CopyFrom(spice_spec(instance))
    # As Ganeti's KVM driver: the mouse asked for, or a tablet for VNC.
    pointer = hvp.get(constants.HV_USB_MOUSE) or \
        (constants.HT_MOUSE_TABLET if hvp.get(constants.HV_VNC_BIND_ADDRESS) else "")
    spec.usb_pointer = USB_POINTERS[pointer]
    # Its guests have QEMU's default VGA unless vga names another.
    spec.display_adapter = DISPLAY_ADAPTERS[hvp.get(constants.HV_VGA) or "std"]
    if hvp.get(constants.HV_MEM_PATH):
        spec.memory.CopyFrom(pb.MemoryBacking(file=hvp[constants.HV_MEM_PATH]))
    return spec


# The key of this class's own part of a migration's info.
AGENT_INFO = "kvm_agent"
# QEMU's device for each model of the agent's runtime.
NIC_DEVICES = {"virtio": "virtio-net-pci"}


def from_hv_kvm(migration_info):
    """Whether a migration's info comes from Ganeti's own KVM driver: its
    runtime file, a JSON list, without this class's part at the end."""
    try:
        info = json.loads(migration_info)
    except (TypeError, ValueError):
        return False
    return isinstance(info, list) and not (
        len(info) > 4 and isinstance(info[4], dict) and AGENT_INFO in info[4])


def uri_host(address):
    return "[%s]" % address if ":" in address else address


def qemu_id(device, prefix):
    """The QEMU id of a device of the agent's runtime."""
    return device.get("qemu_id") or prefix + device["uuid"].replace("-", "")[:12]


def hv_kvm_runtime(runtime, instance, hv_kvm):
    """What Ganeti's own KVM driver keeps in its runtime file for the
    machine the agent runs: [kvm_cmd, nics, hvparams, disks], so that driver
    can start a QEMU that takes this one's state (a migration to a node
    switched back to it). kvm_cmd is the agent's machine with that driver's
    monitor, pidfile and console; the devices keep their slots. Pure."""
    name = instance.name
    argv = runtime["argv"]
    cmd = [instance.hvparams[constants.HV_KVM_PATH]]
    skip = 0
    for option in argv:
        if skip:
            skip -= 1
        elif option == "-name":
            # That driver finds its QEMU by a plain -name.
            cmd += ["-name", name]
            skip = 1
        elif option == "-sandbox":
            # It daemonizes QEMU, which the sandbox forbids.
            skip = 1
        elif option.startswith("size=") and cmd[-1] == "-m":
            # It reads the memory back as a number of MiB.
            cmd.append(option[len("size="):].rstrip("M"))
        else:
            cmd.append(option)
    place = functools.partial(pci_place, runtime)
    controller = runtime.get("scsi_controller")
    if controller:
        # Ganeti's driver names its controller `scsi` too.
        cmd += ["-device", "%s,id=scsi,bus=%s,addr=%#x" %
                ((SCSI_CONTROLLER_DEVICES[controller["model"]],) + place(controller["slot"]))]
    if runtime.get("balloon_slot") is not None:
        cmd += ["-device", "virtio-balloon-pci,id=balloon0,bus=%s,addr=%#x" %
                place(runtime["balloon_slot"])]
    cmd += ["-pidfile", hv_kvm._InstancePidFile(name), "-daemonize",
            "-monitor", "unix:%s,server,nowait" % hv_kvm._InstanceMonitor(name)]
    if runtime.get("serial_console"):
        cmd += ["-serial", "unix:%s,server,nowait" % hv_kvm._InstanceSerial(name)]
    cmd += media_drives(runtime.get("media", []))
    if runtime.get("guest_agent_slot") is not None:
        # The channel where the agent's was, on that driver's socket.
        cmd += ["-chardev", "socket,path=%s,server,nowait,id=qga0" %
                hv_kvm._InstanceQemuGuestAgentMonitor(name),
                "-device", "virtio-serial-pci,id=qga-serial,bus=%s,addr=%#x" %
                place(runtime["guest_agent_slot"]),
                "-device", "virtserialport,bus=qga-serial.0,chardev=qga0,"
                "name=org.qemu.guest_agent.0"]
    ganeti_nics = {nic.uuid: nic for nic in instance.nics}
    nics = []
    for nic in runtime["nics"]:
        known = ganeti_nics.get(nic["uuid"])
        entry = known.ToDict() if known else {
            "mac": nic["mac"], "uuid": nic["uuid"],
            "nicparams": {constants.NIC_MODE: constants.NIC_MODE_BRIDGED,
                          constants.NIC_LINK: nic.get("bridge") or ""}}
        entry["hvinfo"] = {"driver": NIC_DEVICES.get(nic["model"], nic["model"]),
                           "id": qemu_id(nic, "nic-")}
        # A NIC on ISA has no slot, and its device takes no bus.
        if "slot" in nic:
            bus, addr = place(nic["slot"])
            entry["hvinfo"].update({"bus": bus, "addr": hex(addr)})
        nics.append(entry)
    disks = []
    for disk in runtime["disks"]:
        entry = {"uuid": disk["uuid"], "dev_type": constants.DT_PLAIN, "params": {},
                 "mode": constants.DISK_RDONLY if disk.get("read_only") else constants.DISK_RDWR,
                 "size": 0, "hvinfo": disk_hvinfo(disk, place)}
        disks.append([entry, disk["path"], None])
    return [cmd, nics, instance.hvparams, disks]


def disk_hvinfo(disk, place):
    """Ganeti's hvinfo of the agent's disk: at its slot, or at its target
    on the controller's bus `scsi.0`, as that driver places SCSI disks.
    That driver puts IDE disks (disk_type ide) on the primary channel in
    order, as the agent does; their hvinfo isn't read."""
    hvinfo = {"id": qemu_id(disk, "disk-")}
    if "scsi_target" in disk:
        hvinfo.update({"driver": disk["bus"].replace("_", "-"), "bus": "scsi.0",
                       "channel": 0, "scsi-id": disk["scsi_target"], "lun": 0})
        return hvinfo
    bus, addr = place(disk["slot"]) if "slot" in disk else ("ide.0", 0)
    hvinfo.update({"driver": "virtio-blk-pci", "bus": bus, "addr": hex(addr)})
    return hvinfo


def pci_place(runtime, slot):
    """(bus, address) of the agent's device in `slot`: on pci.0, or on a
    q35 alone behind the root port in that slot, as the agent puts it."""
    if runtime.get("pcie_root_ports"):
        return ("root-port-%d" % slot, 0)
    return ("pci.0", slot)


def media_drives(media):
    """-drive options for the agent's CD-ROM and floppy drives, at the same
    places: CD-ROMs on the secondary IDE channel (indexes 2 and 3), the
    floppy as drive A."""
    options = []
    cdroms = 0
    for drive in media:
        image = drive.get("image")
        medium = "file=%s,format=raw,readonly=on," % image if image else ""
        if drive["kind"] == "cdrom":
            options += ["-drive", "%smedia=cdrom,if=ide,index=%d" % (medium, 2 + cdroms)]
            cdroms += 1
        else:
            options += ["-drive", "%sif=floppy,index=0" % medium]
    return options


def qemu_version(text):
    """(major, minor, micro) from "QEMU emulator version 7.2.22 (...)"."""
    words = text.split()
    if len(words) < 4:
        return (0, 0, 0)
    parts = (words[3].split(".") + ["0", "0"])[:3]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        return (0, 0, 0)


def agent_error(what, error):
    return errors.HypervisorError("kvm-agent: %s: %s" % (what, error))


class KvmAgentHypervisor(hv_base.BaseHypervisor):
    """Ganeti's KVM hypervisor, with the kvm-agent doing the work."""

    CAN_MIGRATE = True
    # Ganeti's own KVM parameters and their checks.
    PARAMETERS = KVMHypervisor.PARAMETERS

    def __init__(self, socket=None, peer=None, state_dir=None, hv_kvm=KVMHypervisor):
        super().__init__()
        settings = load_settings()
        self._socket = socket or settings.get("socket", kac.DEFAULT_SOCKET)
        self._peer = peer or settings.get("peer", DEFAULT_PEER)
        self._state_dir = state_dir or settings.get("state_dir", DEFAULT_STATE_DIR)
        # Ganeti's own KVM driver, for the QEMUs it started before this
        # class took its place.
        self._hv_kvm = hv_kvm

    def _call(self, method, request, what, timeout=120):
        with kac.Client.unix(self._socket) as client:
            try:
                return getattr(client, method)(request, timeout=timeout)
            except kac.AgentError as e:
                raise agent_error(what, e)

    def _find(self, name):
        """The agent's view of an instance, or None if it has none."""
        with kac.Client.unix(self._socket) as client:
            try:
                return client.get_instance(pb.GetInstanceRequest(name=name), timeout=30)
            except kac.NotFound:
                return None
            except kac.AgentError as e:
                raise agent_error("instance %s" % name, e)

    # ----------------------------------------------------------- parameters

    @classmethod
    def CheckParameterSyntax(cls, hvparams):
        KVMHypervisor.CheckParameterSyntax(hvparams)
        check_supported(hvparams)

    @classmethod
    def ValidateParameters(cls, hvparams):
        # Ganeti's node-side checks (files exist, ...), without running
        # kvm_path: the agent owns the QEMU binary.
        hv_base.BaseHypervisor.ValidateParameters.__func__(cls, hvparams)
        check_supported(hvparams)

    # -------------------------------------------------------------- lifecycle

    # ------------------------------------------------------- user shutdown

    def _user_shutdown_file(self, name):
        return os.path.join(self._state_dir, "%s.user-shutdown" % name)

    def _note_user_shutdown(self, instance):
        """Keeps whether the instance has user_shutdown, which Ganeti asks
        about later without its parameters: a guest that powers itself off
        is then down by its user's will, and the watcher leaves it."""
        path = self._user_shutdown_file(instance.name)
        if instance.hvparams.get(constants.HV_KVM_USER_SHUTDOWN):
            os.makedirs(self._state_dir, mode=0o700, exist_ok=True)
            with open(path, "w"):
                pass
        else:
            self._forget_user_shutdown(instance.name)

    def _forget_user_shutdown(self, name):
        try:
            os.unlink(self._user_shutdown_file(name))
        except FileNotFoundError:
            pass

    def _shut_down_by_user(self, info):
        """Ganeti's info for an instance whose guest powered itself off
        under user_shutdown, as its KVM driver reports one."""
        if not info.pid and info.stopped_by_guest and \
            os.path.exists(self._user_shutdown_file(info.name)):
            return (info.name, -1, 0, 0, hv_base.HvInstanceState.SHUTDOWN, 0)
        return None

    def StartInstance(self, instance, block_devices, startup_paused):
        left = {}
        if self._find(instance.name) is None:
            left = self._left_to_hv_kvm(set(), only=instance.name)
        if instance.name in left:
            # A second QEMU on the same disks must never start.
            raise errors.HypervisorError(
                "%s still runs under Ganeti's KVM driver (pid %d), which the agent "
                "didn't take over; see the node daemon's log for why" %
                (instance.name, left[instance.name]))
        spec = instance_spec(instance, block_devices)
        self._note_user_shutdown(instance)
        # Paused as Ganeti's KVM driver does it (-S): not one instruction
        # of the guest runs before someone resumes it.
        self._call("start_instance",
                   pb.StartInstanceRequest(spec=spec, paused=bool(startup_paused)),
                   "starting %s" % instance.name)
        self._give_display_password(instance)

    def _give_display_password(self, instance):
        """Sets the display's password from vnc_password_file or
        spice_password_file, as Ganeti's driver does after each start: the
        agent keeps it in memory only."""
        path = display_password_file(instance)
        if not path:
            return
        try:
            with open(path) as f:
                password = f.readline().rstrip("\n")
        except EnvironmentError as err:
            raise errors.HypervisorError("Failed to open the display password file %s: %s" %
                                         (path, err))
        self._call("set_display_password",
                   pb.SetDisplayPasswordRequest(name=instance.name, password=password),
                   "setting the display password of %s" % instance.name)

    def StopInstance(self, instance, force=False, retry=False, name=None,
                     timeout=None):
        # As Ganeti's KVM driver: a stop by name alone can only kill, and
        # without ACPI there is nothing to ask the guest. The agent itself
        # escalates a powerdown that isn't answered within `timeout` to quit
        # and SIGKILL, so a retry finds the instance gone.
        if name is not None and not force:
            raise errors.HypervisorError("Cannot shutdown cleanly by name only")
        name = name or instance.name
        info = self._find(name)
        if info is None:
            if name in self._left_to_hv_kvm(set(), only=name):
                # One the agent couldn't take over: its own driver stops it.
                self._hv_kvm().StopInstance(instance, force=force, retry=retry, name=name,
                                            timeout=timeout)
                return
            info = self._find(name)
        if info is None or not info.pid:
            return
        acpi = instance is not None and instance.hvparams[constants.HV_ACPI]
        request = pb.StopInstanceRequest(name=name, force=force or not acpi)
        if timeout:
            request.powerdown_timeout_ms = int(timeout * 1000)
        with kac.Client.unix(self._socket) as client:
            try:
                client.stop_instance(request, timeout=(timeout or 60) + 60)
            except kac.FailedPrecondition as e:
                # Stopped meanwhile, by the earlier call Ganeti retries.
                current = self._find(name)
                if current is not None and current.pid:
                    raise agent_error("stopping %s" % name, e)
            except kac.AgentError as e:
                raise agent_error("stopping %s" % name, e)

    def CleanupInstance(self, instance_name):
        # Ganeti calls this after every shutdown, as its KVM driver removes
        # its runtime file here: the agent forgets the stopped instance, so
        # remove, rename and failover leave no record behind.
        self._forget_user_shutdown(instance_name)
        # What Ganeti's KVM driver left of an instance the agent took over
        # (or that driver stopped) goes, as that driver removes it.
        if os.path.exists(os.path.join(self._hv_kvm._ROOT_DIR, "conf",
                                       instance_name + ".runtime")):
            self._hv_kvm().CleanupInstance(instance_name)
        info = self._find(instance_name)
        if info is None:
            return
        if info.pid:
            raise errors.HypervisorError("Cannot cleanup a live instance")
        with kac.Client.unix(self._socket) as client:
            try:
                client.delete_instance(pb.DeleteInstanceRequest(name=instance_name),
                                       timeout=30)
            except kac.NotFound:
                pass
            except kac.AgentError as e:
                raise agent_error("forgetting %s" % instance_name, e)

    def RebootInstance(self, instance):
        # A soft reboot: a fresh QEMU from the saved runtime. Ganeti's KVM
        # driver sends the powerdown and kills at once, without waiting for
        # the guest, and so does this.
        self._call("reboot_instance",
                   pb.RebootInstanceRequest(name=instance.name, mode=pb.REBOOT_MODE_SOFT,
                                            force=True),
                   "rebooting %s" % instance.name)

    # ------------------------------------- instances of Ganeti's KVM driver

    def _hv_kvm_running(self, only=None):
        """The instances (all, or only `only`) whose QEMU Ganeti's own KVM
        driver started and that still run: {name: pid}."""
        conf = os.path.join(self._hv_kvm._ROOT_DIR, "conf")
        try:
            names = [only] if only else [entry[:-len(".runtime")]
                                         for entry in os.listdir(conf)
                                         if entry.endswith(".runtime")]
        except FileNotFoundError:
            return {}
        running = {}
        for name in names:
            if not os.path.exists(os.path.join(conf, name + ".runtime")):
                continue
            _, pid, alive = self._hv_kvm._InstancePidAlive(name)
            if alive:
                running[name] = pid
        return running

    def _take_over(self, names):
        """Has the agent take over these instances of Ganeti's KVM driver.
        One it refuses stays with that driver, which this class then asks
        about it, so Ganeti never takes it for down."""
        for name in sorted(names):
            answer = self._call(
                "adopt_ganeti_instances",
                pb.AdoptGanetiInstancesRequest(ganeti_dir=self._hv_kvm._ROOT_DIR, name=name),
                "taking over %s from Ganeti's KVM driver" % name)
            for adoption in answer.instances:
                if adoption.outcome == pb.GANETI_ADOPTION_OUTCOME_REFUSED:
                    logging.warning("kvm-agent: %s stays with Ganeti's KVM driver: %s",
                                    adoption.name, adoption.reason)
                else:
                    logging.info("kvm-agent: took over %s (pid %d) from Ganeti's KVM driver",
                                 adoption.name, adoption.pid)

    def _left_to_hv_kvm(self, known, only=None):
        """Instances Ganeti's KVM driver still runs once the agent took over
        those it could (all but `known`, the agent's; or only `only`):
        {name: pid}."""
        waiting = {n: p for n, p in self._hv_kvm_running(only).items() if n not in known}
        if not waiting:
            return {}
        self._take_over(waiting)
        return {n: p for n, p in waiting.items() if self._find(n) is None}

    def _agent_instances(self):
        with kac.Client.unix(self._socket) as client:
            try:
                return client.list_instances(pb.ListInstancesRequest(), timeout=30).instances
            except kac.AgentError as e:
                raise agent_error("listing instances", e)

    def _running(self):
        """(the agent's running instances, {name: pid} of those Ganeti's KVM
        driver still runs)."""
        listed = self._agent_instances()
        known = {i.name for i in listed}
        left = {}
        if any(name not in known for name in self._hv_kvm_running()):
            left = self._left_to_hv_kvm(known)
            listed = self._agent_instances()
        return [i for i in listed if i.pid], left

    def ListInstances(self, hvparams=None):
        agents, left = self._running()
        return [i.name for i in agents] + sorted(left)

    @staticmethod
    def _info_tuple(info):
        state = (hv_base.HvInstanceState.RUNNING if info.pid
                 else hv_base.HvInstanceState.SHUTDOWN)
        # What the guest has now, as Ganeti's KVM driver reports it after a
        # balloon change, not the memory it was started with.
        memory = info.balloon_mib or info.memory_mib
        return (info.name, info.pid, memory, info.vcpus, state, info.uptime_seconds)

    def GetInstanceInfo(self, instance_name, hvparams=None):
        info = self._find(instance_name)
        if info is None:
            if instance_name in self._left_to_hv_kvm(set(), only=instance_name):
                return self._hv_kvm().GetInstanceInfo(instance_name)
            info = self._find(instance_name)
        if info is None:
            return None
        if not info.pid:
            return self._shut_down_by_user(info)
        return self._info_tuple(info)

    def GetAllInstancesInfo(self, hvparams=None):
        agents, left = self._running()
        hv_kvm = self._hv_kvm() if left else None
        others = [hv_kvm.GetInstanceInfo(name) for name in sorted(left)]
        down = [self._shut_down_by_user(i) for i in self._agent_instances() if not i.pid]
        return [self._info_tuple(i) for i in agents] + [o for o in others + down if o]

    def GetNodeInfo(self, hvparams=None):
        # The node's memory and CPUs come from /proc: an agent that is down
        # must not hide them, or Ganeti takes the whole node for down.
        # Verify names the agent instead; only the QEMU version is missing.
        result = self.GetLinuxNodeInfo()
        try:
            node = self._call("get_node_info", pb.GetNodeInfoRequest(), "node info",
                              timeout=10)
        except errors.HypervisorError as e:
            logging.warning("no QEMU version for this node: %s", e)
            return result
        result[constants.HV_NODEINFO_KEY_VERSION] = qemu_version(node.qemu_version)
        return result

    @classmethod
    def GetInstanceConsole(cls, instance, primary_node, node_group,
                           hvparams, beparams):
        if hvparams[constants.HV_SERIAL_CONSOLE]:
            ndparams = node_group.FillND(primary_node)
            return objects.InstanceConsole(
                instance=instance.name, kind=constants.CONS_SSH,
                host=primary_node.name, port=ndparams.get(constants.ND_SSH_PORT),
                user=constants.SSH_CONSOLE_USER,
                # --resume: a guest started paused runs once someone is
                # watching, as with Ganeti's own console wrapper.
                command=["kvm-agent", "console", "--resume", instance.name])
        if hvparams[constants.HV_VNC_BIND_ADDRESS] and \
            instance.network_port > constants.VNC_BASE_PORT:
            # The master asks: an address of every interface means the node.
            address = vnc_address(hvparams[constants.HV_VNC_BIND_ADDRESS]) or "127.0.0.1"
            if ipaddress.ip_address(address).is_unspecified:
                address = primary_node.name
            return objects.InstanceConsole(
                instance=instance.name, kind=constants.CONS_VNC,
                host=address, port=instance.network_port,
                display=instance.network_port - constants.VNC_BASE_PORT)
        if hvparams.get(constants.HV_KVM_SPICE_BIND):
            # As Ganeti's driver: the bind address as it is given.
            return objects.InstanceConsole(
                instance=instance.name, kind=constants.CONS_SPICE,
                host=hvparams[constants.HV_KVM_SPICE_BIND], port=instance.network_port)
        return objects.InstanceConsole(instance=instance.name,
                                       kind=constants.CONS_MESSAGE,
                                       message="No serial console, VNC or SPICE for %s" %
                                       instance.name)

    def Verify(self, hvparams=None):
        try:
            node = self._call("get_node_info", pb.GetNodeInfoRequest(), "node info",
                              timeout=10)
        except errors.HypervisorError as e:
            return "kvm-agent is not answering on %s: %s" % (self._socket, e)
        if node.qemu_error:
            return "kvm-agent can't run QEMU: %s" % node.qemu_error
        return None

    def BalloonInstanceMemory(self, instance, mem):
        self._call("set_memory",
                   pb.SetMemoryRequest(name=instance.name, memory_mib=int(mem), wait=False),
                   "ballooning %s" % instance.name)

    # ------------------------------------------------------------- migration

    def _migration_file(self, name):
        return os.path.join(self._state_dir, "%s.migration" % name)

    def _record_migration(self, name, status):
        os.makedirs(self._state_dir, mode=0o700, exist_ok=True)
        path = self._migration_file(name)
        with open(path + ".tmp", "w") as f:
            json.dump(status, f)
        os.replace(path + ".tmp", path)

    def MigrationInfo(self, instance):
        # The target may be a node switched back to Ganeti's own KVM
        # driver: it gets a runtime file that driver can start the same
        # machine from. An agent's class finds its own part at the end.
        answer = self._call("get_runtime", pb.GetRuntimeRequest(name=instance.name),
                            "runtime of %s" % instance.name)
        runtime = json.loads(answer.runtime_json)
        return json.dumps(hv_kvm_runtime(runtime, instance, self._hv_kvm) +
                          [{AGENT_INFO: {"uuid": instance.uuid,
                                         "generation": answer.generation}}])

    def AcceptInstance(self, instance, info, target):
        existing = self._find(instance.name)
        if existing is not None and existing.pid:
            raise errors.HypervisorError(
                "instance %s already runs on this node's agent (pid %d)" %
                (instance.name, existing.pid))
        if from_hv_kvm(info):
            # A source still on Ganeti's own KVM driver sends its runtime
            # file, then the stream to our migration port: a QEMU with the
            # same hardware must wait there.
            request = pb.AcceptGanetiMigrationRequest(
                name=instance.name, ganeti_runtime=info, host=target,
                port=int(instance.hvparams[constants.HV_MIGRATION_PORT]))
            self._call("accept_ganeti_migration", request,
                       "accepting %s from Ganeti's KVM driver" % instance.name)
        # Otherwise the source's agent prepares this node's agent itself
        # when it migrates; there was only the check above to make.

    def MigrateInstance(self, cluster_name, instance, target, live):
        options = migration_options(instance.hvparams, live)
        request = pb.MigrateInstanceRequest(
            name=instance.name, target=self._peer.format(target=target), options=options)
        try:
            self._migrate(request)
        except kac.Unavailable:
            # No agent there: a node switched back to Ganeti's own KVM
            # driver, whose QEMU waits on the instance's migration port
            # (nothing listens there otherwise, and the stream fails).
            logging.info("kvm-agent: no agent on %s; migrating %s to the QEMU on its "
                         "migration port", target, instance.name)
            port = int(instance.hvparams[constants.HV_MIGRATION_PORT])
            request.target = "tcp:%s:%d" % (uri_host(target), port)
            self._migrate(request)

    def _migrate(self, request):
        """Runs a migration to the end, keeping its outcome for
        GetMigrationStatus. An unreachable target agent is raised as such,
        before anything was sent."""
        status = {"status": constants.HV_MIGRATION_ACTIVE}
        self._record_migration(request.name, status)
        try:
            with kac.Client.unix(self._socket) as client:
                for progress in client.migrate_instance(request, timeout=3600):
                    status = {"status": constants.HV_MIGRATION_ACTIVE,
                              "transferred_ram": progress.transferred_bytes,
                              "total_ram": progress.total_bytes}
                    if progress.phase == pb.MIGRATION_PHASE_COMPLETED:
                        status["status"] = constants.HV_MIGRATION_COMPLETED
            if status["status"] != constants.HV_MIGRATION_COMPLETED:
                status["status"] = constants.HV_MIGRATION_FAILED
        except kac.Unavailable:
            raise
        except kac.AgentError as e:
            status = {"status": constants.HV_MIGRATION_FAILED, "error": str(e)}
            self._record_migration(request.name, status)
            raise agent_error("migrating %s to %s" % (request.name, request.target), e)
        self._record_migration(request.name, status)

    @staticmethod
    def VersionsSafeForMigration(src, target):
        # As Ganeti's KVM driver: the versioned machine type carries a
        # migration across QEMU versions, and the target's agent refuses,
        # with the reason, one it can't take. Any difference of versions
        # blocking it would stop rolling upgrades.
        return True

    @classmethod
    def PowercycleNode(cls, hvparams=None):
        # As Ganeti's KVM driver: the node reboots at once (sysrq), and its
        # instances with it.
        cls.LinuxPowercycle()

    def GetMigrationStatus(self, instance):
        try:
            with open(self._migration_file(instance.name)) as f:
                status = json.load(f)
        except (OSError, ValueError):
            return objects.MigrationStatus(status=constants.HV_MIGRATION_FAILED)
        return objects.MigrationStatus(
            status=status["status"],
            transferred_ram=status.get("transferred_ram"),
            total_ram=status.get("total_ram"))

    def FinalizeMigrationDst(self, instance, info, success):
        if success:
            self._note_user_shutdown(instance)
            if from_hv_kvm(info):
                # Nobody but this class tells the agent the stream is in.
                self._call("finalize_migration",
                           pb.FinalizeMigrationRequest(name=instance.name, uuid=instance.uuid,
                                                       resume=True),
                           "finishing the migration of %s" % instance.name)
            info = self._find(instance.name)
            if info is None or not info.pid:
                raise errors.HypervisorError(
                    "migration of %s completed, but it isn't running here" % instance.name)
            # The password doesn't travel with the guest.
            self._give_display_password(instance)
            return
        # Abort: whatever arrived here must go, the source keeps the guest.
        existing = self._find(instance.name)
        if existing is None:
            return
        if existing.state == pb.INSTANCE_STATE_INCOMING:
            self._call("cancel_migration", pb.CancelMigrationRequest(name=instance.name),
                       "dropping the incoming %s" % instance.name)
        elif existing.pid:
            self._call("stop_instance", pb.StopInstanceRequest(name=instance.name, force=True),
                       "stopping the migrated %s" % instance.name)

    def FinalizeMigrationSource(self, instance, success, live):
        try:
            os.unlink(self._migration_file(instance.name))
        except FileNotFoundError:
            pass
        existing = self._find(instance.name)
        if success:
            if existing is not None and existing.pid:
                raise errors.HypervisorError(
                    "migration of %s succeeded, but it still runs on the source" %
                    instance.name)
            return
        if existing is None or not existing.pid:
            raise errors.HypervisorError(
                "migration of %s failed and it no longer runs on the source" % instance.name)
        if existing.state == pb.INSTANCE_STATE_PAUSED:
            self._call("resume_instance", pb.ResumeInstanceRequest(name=instance.name),
                       "resuming %s" % instance.name)

    # --------------------------------------------------------------- hotplug

    def HotplugSupported(self, instance):
        info = self._find(instance.name)
        if info is None or not info.pid:
            raise errors.HotplugError("Instance is probably down")

    def VerifyHotplugSupport(self, instance, action, dev_type):
        if action == constants.HOTPLUG_ACTION_MODIFY and \
            dev_type != constants.HOTPLUG_TARGET_NIC:
            raise errors.HotplugError("Hot-modifying a %s is not supported with kvm-agent" %
                                      dev_type)
        if dev_type not in (constants.HOTPLUG_TARGET_NIC, constants.HOTPLUG_TARGET_DISK):
            raise errors.HotplugError("Hotplug is not supported for %s" % dev_type)
        support = self._call("hotplug_support",
                             pb.HotplugSupportRequest(name=instance.name),
                             "hotplug support of %s" % instance.name)
        capability = {constants.HOTPLUG_TARGET_NIC: support.nic,
                      constants.HOTPLUG_TARGET_DISK: support.disk}[dev_type]
        if action == constants.HOTPLUG_ACTION_REMOVE:
            capability = support.remove
        if not capability.supported:
            raise errors.HotplugError(capability.reason)

    @staticmethod
    def _hvinfo(reply):
        """Ganeti's hvinfo of the device a hotplug call changed: where the
        agent put it, at its SCSI target or in its slot (behind its root
        port on a q35)."""
        device = reply.device
        if device.HasField("scsi_target"):
            return {"id": device.qemu_id, "bus": "scsi.0", "channel": 0,
                    "scsi-id": device.scsi_target, "lun": 0}
        if reply.instance.machine_type.startswith("pc-q35-"):
            bus, addr = "root-port-%d" % device.pci_slot, 0
        else:
            bus, addr = "pci.0", device.pci_slot
        return {"id": device.qemu_id, "bus": bus, "addr": hex(addr)}

    def HotAddDevice(self, instance, dev_type, device, extra, seq):
        if dev_type == constants.HOTPLUG_TARGET_NIC:
            reply = self._call("add_nic", pb.AddNicRequest(
                name=instance.name, nic=nic_spec(device, instance.hvparams)),
                               "hot-adding a NIC to %s" % instance.name)
        elif dev_type == constants.HOTPLUG_TARGET_DISK:
            link_name = extra[0]
            reply = self._call("add_disk", pb.AddDiskRequest(
                name=instance.name, disk=disk_spec(device, link_name, instance.hvparams)),
                               "hot-adding a disk to %s" % instance.name)
        else:
            raise errors.HotplugError("Hotplug is not supported for %s" % dev_type)
        return self._hvinfo(reply)

    def HotDelDevice(self, instance, dev_type, device, extra, seq):
        info = self._find(instance.name)
        if info is None:
            raise errors.HotplugError("Instance %s is not running" % instance.name)
        kind = {constants.HOTPLUG_TARGET_NIC: pb.DEVICE_KIND_NIC,
                constants.HOTPLUG_TARGET_DISK: pb.DEVICE_KIND_DISK}.get(dev_type)
        found = [d for d in info.devices if d.uuid == device.uuid and d.kind == kind]
        if not found:
            raise errors.HotplugError("%s has no %s with uuid %s" %
                                      (instance.name, dev_type, device.uuid))
        reply = self._call("remove_device", pb.RemoveDeviceRequest(
            name=instance.name, device=found[0].name),
                           "removing %s from %s" % (found[0].name, instance.name))
        return self._hvinfo(reply)

    def HotModDevice(self, instance, dev_type, device, extra, seq):
        if dev_type != constants.HOTPLUG_TARGET_NIC:
            raise errors.HotplugError("Hot-modifying a %s is not supported with kvm-agent" %
                                      dev_type)
        info = self._find(instance.name)
        current = [d for d in (info.devices if info is not None and info.pid else [])
                   if d.uuid == device.uuid and d.kind == pb.DEVICE_KIND_NIC]
        if not current:
            raise errors.HotplugError("%s has no running NIC with uuid %s" %
                                      (instance.name, device.uuid))
        wanted = nic_spec(device, instance.hvparams)
        if current[0].detail.lower() != wanted.mac.lower():
            # A new MAC is a new device to the guest, as with Ganeti's KVM
            # driver: the old one goes (the guest must release it), the new
            # one comes.
            self.HotDelDevice(instance, dev_type, device, extra, seq)
            return self.HotAddDevice(instance, dev_type, device, extra, seq)
        # A new link moves the tap to that bridge; the guest sees nothing.
        reply = self._call("set_nic_bridge", pb.SetNicBridgeRequest(
            name=instance.name, device=current[0].name, bridge=wanted.bridge),
                           "moving %s of %s to bridge %r" %
                           (current[0].name, instance.name, wanted.bridge))
        return self._hvinfo(reply)
