#!/usr/bin/env python3
"""The benchmark's libvirt column: the operations the benchmark times through
the agent and on raw QEMU, done through libvirt's Python API, the way a
libvirt user would do them.

    python3 bench/libvirt_peer.py --accel kvm|tcg [--uri qemu:///system]

It keeps one connection to libvirt open, reads one JSON request per line on
stdin and writes one JSON reply per line on stdout, in order, until stdin
ends. A reply is

    {"ok": true, "ms": <wall time of the libvirt call(s) doing the operation>}
    {"ok": false, "error": "<what failed, with libvirt's message>"}

Only the libvirt calls that do the operation are timed; building XML and
looking the domain up are not. Requests:

    {"op": "start", "name": N, "uuid": U, "memory_mib": M,
     "random_ram_file": P}
        defineXML, then create: a persistent domain, started. The machine
        matches the raw column's: pc-i440fx-7.2, KVM or TCG, CPU qemu64, one
        vCPU, M MiB, ACPI, no default devices, a virtio balloon in PCI slot
        3, QEMU's seccomp sandbox as libvirt sets it. The optional
        random_ram_file is copied into guest RAM at 1 MiB when QEMU starts
        (QEMU's generic loader device, given through libvirt's
        <qemu:commandline>), so that a save has real data to write; it must
        fit below the end of RAM and be readable by libvirt's QEMU user.
    {"op": "add_nic", "name": N, "index": I, "slot": S, "mac": MAC}
        Hot-adds a virtio NIC (userspace virtio-net, like the raw column's)
        on a tap that libvirt creates, in PCI slot S: attachDeviceFlags,
        live.
    {"op": "add_disk", "name": N, "index": I, "slot": S, "path": P}
        Hot-adds the raw image P as a virtio-blk disk (vda for index 0, vdb
        for 1, ...) in PCI slot S, cache=writeback: attachDeviceFlags, live.
    {"op": "save", "name": N, "path": P}
        dom.save(P): the guest's state goes to P and QEMU ends.
    {"op": "restore", "path": P}
        Restores P to a running domain. A domain started with a
        random_ram_file is restored without the loader device: the saved
        definition, minus it, goes to restoreFlags, so that QEMU does not
        read the file again only for the stream to overwrite it. Reading
        that definition from the file is not timed.
    {"op": "state", "name": N, "calls": C}
        dom.state() C times in a row; the reply's time is one call's mean.
    {"op": "destroy", "name": N}
        destroy, then undefine. A domain that is not running, or not
        defined, is no error.

The domain's name, uuid and devices are the caller's; this helper keeps no
state between requests but the connection.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable, Dict, List, Optional, Tuple
from xml.sax.saxutils import escape, quoteattr

import libvirt

QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Where the generic loader puts random_ram_file: above the legacy VGA and
# BIOS area, the start of the RAM a PC guest's OS would use.
RANDOM_RAM_ADDRESS = 0x100000
MIB = 1 << 20
DOMAIN_TYPES = {"kvm": "kvm", "tcg": "qemu"}

Request = Dict[str, Any]


class RequestError(Exception):
    """A request this helper cannot carry out, before libvirt is called."""


def pci_address(slot: Any) -> str:
    """The <address> of a device in slot `slot` of the root PCI bus."""
    slot = int(slot)
    if not 0 < slot < 32:
        raise RequestError(f"PCI slot {slot} is not within 1..31")
    return f"<address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' function='0x0'/>"


def qemu_option_value(value: str) -> str:
    """`value` inside a QEMU -device option list, where a comma is doubled."""
    return value.replace(",", ",,")


def loader_xml(path: str, memory_mib: int) -> str:
    """The <qemu:commandline> that loads `path` into guest RAM at boot."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
    except OSError as e:
        raise RequestError(f"random_ram_file {path}: {e.strerror}") from None
    if RANDOM_RAM_ADDRESS + size > memory_mib * MIB:
        raise RequestError(
            f"random_ram_file {path} ({size} bytes) does not fit in {memory_mib} MiB "
            f"of RAM from {RANDOM_RAM_ADDRESS:#x}"
        )
    device = f"loader,file={qemu_option_value(path)},addr={RANDOM_RAM_ADDRESS:#x},force-raw=on"
    return (
        "  <qemu:commandline>\n"
        "    <qemu:arg value='-device'/>\n"
        f"    <qemu:arg value={quoteattr(device)}/>\n"
        "  </qemu:commandline>\n"
    )


def domain_xml(
    accel: str, name: str, uuid: str, memory_mib: Any, random_ram_file: Optional[str] = None
) -> str:
    """A domain like the raw column's QEMU: no default devices, a balloon in
    slot 3. Of what libvirt adds to an i440fx domain by default, only the
    USB controller would become a QEMU device, so model='none' drops it (the
    PS/2 mouse and keyboard it lists are the machine's own). Without <acpi/>
    libvirt would turn ACPI off, which QEMU has on by default."""
    memory_mib = int(memory_mib)
    extra = loader_xml(random_ram_file, memory_mib) if random_ram_file else ""
    return (
        f"<domain type='{DOMAIN_TYPES[accel]}' xmlns:qemu='{QEMU_NS}'>\n"
        f"  <name>{escape(name)}</name>\n"
        f"  <uuid>{escape(uuid)}</uuid>\n"
        f"  <memory unit='MiB'>{memory_mib}</memory>\n"
        f"  <currentMemory unit='MiB'>{memory_mib}</currentMemory>\n"
        "  <vcpu>1</vcpu>\n"
        "  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>\n"
        "  <features><acpi/></features>\n"
        "  <cpu mode='custom' match='exact' check='none'>\n"
        "    <model fallback='forbid'>qemu64</model>\n"
        "  </cpu>\n"
        "  <devices>\n"
        f"    <emulator>{QEMU_BINARY}</emulator>\n"
        "    <controller type='usb' model='none'/>\n"
        "    <memballoon model='virtio'>\n"
        f"      {pci_address(3)}\n"
        "    </memballoon>\n"
        "  </devices>\n"
        f"{extra}"
        "</domain>\n"
    )


def nic_xml(index: Any, slot: Any, mac: str) -> str:
    """A virtio NIC on a tap libvirt creates. driver name='qemu' keeps the
    virtio-net in QEMU, as the raw column's is (no vhost-net)."""
    return (
        "<interface type='ethernet'>\n"
        f"  <mac address={quoteattr(mac)}/>\n"
        "  <model type='virtio'/>\n"
        "  <driver name='qemu'/>\n"
        f"  <alias name='ua-nic{int(index)}'/>\n"
        f"  {pci_address(slot)}\n"
        "</interface>\n"
    )


def disk_target(index: Any) -> str:
    """The guest name of the index-th virtio disk: vda, ..., vdz, vdaa, ..."""
    index = int(index)
    if index < 0:
        raise RequestError(f"disk index {index} is negative")
    letters = ""
    while True:
        letters = chr(ord("a") + index % 26) + letters
        index = index // 26 - 1
        if index < 0:
            return "vd" + letters


def disk_xml(index: Any, slot: Any, path: str) -> str:
    """A raw file as a virtio-blk disk, cache=writeback."""
    return (
        "<disk type='file' device='disk'>\n"
        "  <driver name='qemu' type='raw' cache='writeback'/>\n"
        f"  <source file={quoteattr(path)}/>\n"
        f"  <target dev='{disk_target(index)}' bus='virtio'/>\n"
        f"  <alias name='ua-disk{int(index)}'/>\n"
        f"  {pci_address(slot)}\n"
        "</disk>\n"
    )


def without_loader(xml: str) -> Optional[str]:
    """A domain definition without its <qemu:commandline>, or None when it
    has none."""
    root = ET.fromstring(xml)
    extra = root.findall(f"{{{QEMU_NS}}}commandline")
    if not extra:
        return None
    for element in extra:
        root.remove(element)
    ET.register_namespace("qemu", QEMU_NS)
    return ET.tostring(root, encoding="unicode")


def timed(call: Callable[[], Any]) -> float:
    """Runs `call`; returns its wall time in milliseconds."""
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000.0


def ignoring(codes: Tuple[int, ...], call: Callable[[], Any]) -> None:
    """Runs `call`, treating a libvirt error with one of `codes` as done."""
    try:
        call()
    except libvirt.libvirtError as e:
        if e.get_error_code() not in codes:
            raise


def op_start(conn: libvirt.virConnect, accel: str, req: Request) -> float:
    xml = domain_xml(accel, req["name"], req["uuid"], req["memory_mib"], req.get("random_ram_file"))
    defined: List[libvirt.virDomain] = []

    def define_and_create() -> None:
        defined.append(conn.defineXML(xml))
        defined[0].create()

    try:
        return timed(define_and_create)
    except libvirt.libvirtError:
        # A definition whose start failed would block the next start.
        if defined:
            ignoring((libvirt.VIR_ERR_NO_DOMAIN,), defined[0].undefine)
        raise


def op_add_nic(conn: libvirt.virConnect, _accel: str, req: Request) -> float:
    dom = conn.lookupByName(req["name"])
    xml = nic_xml(req["index"], req["slot"], req["mac"])
    return timed(lambda: dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE))


def op_add_disk(conn: libvirt.virConnect, _accel: str, req: Request) -> float:
    dom = conn.lookupByName(req["name"])
    xml = disk_xml(req["index"], req["slot"], req["path"])
    return timed(lambda: dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE))


def op_save(conn: libvirt.virConnect, _accel: str, req: Request) -> float:
    dom = conn.lookupByName(req["name"])
    return timed(lambda: dom.save(req["path"]))


def op_restore(conn: libvirt.virConnect, _accel: str, req: Request) -> float:
    path = req["path"]
    xml = without_loader(conn.saveImageGetXMLDesc(path, 0))
    if xml is None:
        return timed(lambda: conn.restore(path))
    return timed(lambda: conn.restoreFlags(path, xml, 0))


def op_state(conn: libvirt.virConnect, _accel: str, req: Request) -> float:
    dom = conn.lookupByName(req["name"])
    calls = int(req["calls"])
    if calls < 1:
        raise RequestError(f"calls is {calls}; make it at least 1")

    def read_state() -> None:
        for _ in range(calls):
            dom.state()

    return timed(read_state) / calls


def op_destroy(conn: libvirt.virConnect, _accel: str, req: Request) -> float:
    try:
        dom = conn.lookupByName(req["name"])
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return 0.0
        raise

    def destroy_and_undefine() -> None:
        ignoring((libvirt.VIR_ERR_OPERATION_INVALID,), dom.destroy)
        ignoring((libvirt.VIR_ERR_NO_DOMAIN,), dom.undefine)

    return timed(destroy_and_undefine)


OPERATIONS: Dict[str, Callable[[libvirt.virConnect, str, Request], float]] = {
    "start": op_start,
    "add_nic": op_add_nic,
    "add_disk": op_add_disk,
    "state": op_state,
    "save": op_save,
    "restore": op_restore,
    "destroy": op_destroy,
}


def handle(conn: libvirt.virConnect, accel: str, line: str) -> Dict[str, Any]:
    """The reply to one request line."""
    try:
        req = json.loads(line)
    except ValueError as e:
        return {"ok": False, "error": f"request is not JSON: {e}"}
    if not isinstance(req, dict):
        return {"ok": False, "error": "request is not a JSON object"}
    op = req.get("op")
    operation = OPERATIONS.get(op)
    if operation is None:
        return {"ok": False, "error": f"unknown op {op!r}"}
    what = " ".join(str(req[k]) for k in ("name", "path") if k in req)
    try:
        ms = operation(conn, accel, req)
    except KeyError as e:
        return {"ok": False, "error": f"{op}: missing field {e.args[0]}"}
    except (RequestError, TypeError, ValueError) as e:
        return {"ok": False, "error": f"{op} {what}: {e}"}
    except libvirt.libvirtError as e:
        return {"ok": False, "error": f"{op} {what}: libvirt: {e.get_error_message()}"}
    return {"ok": True, "ms": round(ms, 3)}


def ignore_libvirt_error(_ctx: Any, _err: Any) -> None:
    """libvirt's default handler prints every error on stderr; the replies
    carry them instead."""


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Runs the benchmark's operations through libvirt, one JSON request per line."
    )
    parser.add_argument("--accel", choices=sorted(DOMAIN_TYPES), required=True)
    parser.add_argument("--uri", default="qemu:///system")
    args = parser.parse_args()
    libvirt.registerErrorHandler(ignore_libvirt_error, None)
    try:
        conn = libvirt.open(args.uri)
    except libvirt.libvirtError as e:
        message = e.get_error_message()
        print(f"libvirt_peer: cannot connect to {args.uri}: {message}", file=sys.stderr)
        return 1
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            sys.stdout.write(json.dumps(handle(conn, args.accel, line)) + "\n")
            sys.stdout.flush()
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
