"""KvmAgentHypervisor driven the way Ganeti drives a hypervisor class, with
Ganeti 3.0's own objects, constants and parameter checks, against two real
agents. Each step is checked against QEMU through the agent's operator
QMP socket.

Run by the end-to-end suite (tests/tests/ganeti.rs), which starts the
agents and passes, in the environment: KVM_AGENT_TEST_SOCKET and
KVM_AGENT_TEST_STATE_DIR (the source), KVM_AGENT_TEST_TARGET_SOCKET and
KVM_AGENT_TEST_TARGET_STATE_DIR, KVM_AGENT_TEST_KERNEL and
KVM_AGENT_TEST_INITRD (the test guest), KVM_AGENT_TEST_BOOT_ISO (a CD-ROM
that boots it), KVM_AGENT_TEST_SCRATCH (a directory
for disk images), KVM_AGENT_TEST_UUIDS (instance uuids to use, which the
suite cleans up after) and KVM_AGENT_TEST_BINARY (the kvm-agent binary, for
the console command Ganeti runs).
"""

import contextlib
import json
import os
import socket
import subprocess
import time
import unittest
import uuid as uuidlib

from ganeti import constants, errors, objects
from ganeti.hypervisor import hv_base

import kvm_agent_client as kac
from kvm_agent_client import pb
from kvm_agent_ganeti import KvmAgentHypervisor

ENV = os.environ
SOURCE = ENV["KVM_AGENT_TEST_SOCKET"]
TARGET = ENV["KVM_AGENT_TEST_TARGET_SOCKET"]
UUIDS = ENV["KVM_AGENT_TEST_UUIDS"].split(",")
READY_MARKER = b"KVM-AGENT-GUEST-READY"


class Qmp:
    """A minimal QMP client on the agent's operator socket."""

    def __init__(self, state_dir, name):
        path = os.path.join(state_dir, "run", name, "qmp-operator.sock")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        json.loads(self.reader.readline())
        self.execute("qmp_capabilities")

    def execute(self, command, **arguments):
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = json.loads(self.reader.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise AssertionError("%s: %s" % (command, reply["error"]))

    def pci(self):
        """{qdev_id: slot} of bus 0."""
        buses = self.execute("query-pci")
        return {d.get("qdev_id", ""): d["slot"]
                for bus in buses if bus["bus"] == 0 for d in bus["devices"]}

    def block_files(self):
        return {b["inserted"]["file"] for b in self.execute("query-block") if "inserted" in b}

    def has_block_device(self, qdev_id):
        """Whether a device with an image behind it has this id (a path for
        virtio, the id itself for SCSI). Images show as /dev/fdset/N: the
        agent opened them, not QEMU."""
        return any(qdev_id in b.get("qdev", "").split("/") and "inserted" in b
                   for b in self.execute("query-block"))

    def close(self):
        self.reader.close()
        self.sock.close()


def open_files(pid):
    """The paths of the files a process holds open."""
    fd_dir = "/proc/%d/fd" % pid
    files = set()
    for fd in os.listdir(fd_dir):
        try:
            files.add(os.readlink(os.path.join(fd_dir, fd)))
        except OSError:
            pass
    return files


def wait_for_guest(state_dir, name, timeout=120):
    path = os.path.join(state_dir, "run", name, "serial.sock")
    console = socket.socket(socket.AF_UNIX)
    console.settimeout(timeout)
    console.connect(path)
    seen = b""
    deadline = time.monotonic() + timeout
    while READY_MARKER not in seen:
        if time.monotonic() > deadline:
            raise AssertionError("the guest never got ready: %r" % seen[-500:])
        seen += console.recv(4096)
    console.close()


def password_file(name):
    """A display password file in the scratch directory."""
    path = os.path.join(ENV["KVM_AGENT_TEST_SCRATCH"], name)
    with open(path, "w") as f:
        f.write("s3cret\n")
    return path


def free_port():
    """A TCP port nothing listens on now, for an instance's display."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_display(hv, name, hvp):
    """An instance with a display on a free port, started through the
    class and stopped after."""
    hv.CheckParameterSyntax(hvp)
    inst = instance(name, UUIDS[1], hvp, memory=64)
    inst.network_port = free_port()
    hv.StartInstance(inst, [], False)
    try:
        yield inst
    finally:
        hv.StopInstance(inst, force=True)
        hv.CleanupInstance(inst.name)


def query(inst, command):
    """What QEMU answers `command` for the instance, on its operator
    monitor."""
    qmp = Qmp(ENV["KVM_AGENT_TEST_STATE_DIR"], inst.name)
    try:
        return qmp.execute(command)
    finally:
        qmp.close()


def hvparams(**changes):
    hvp = dict(constants.HVC_DEFAULTS[constants.HT_KVM])
    # A node without a Ganeti kernel: boot from disk unless a test says so.
    hvp[constants.HV_KERNEL_PATH] = ""
    hvp[constants.HV_ROOT_PATH] = ""
    hvp.update(changes)
    return hvp


def guest_hvparams():
    """The test guest: direct kernel boot under TCG."""
    return hvparams(**{
        constants.HV_KERNEL_PATH: ENV["KVM_AGENT_TEST_KERNEL"],
        constants.HV_INITRD_PATH: ENV["KVM_AGENT_TEST_INITRD"],
        constants.HV_KERNEL_ARGS: "quiet panic=-1",
        # Ganeti wants a root with a kernel; the initramfs ignores it.
        constants.HV_ROOT_PATH: "/dev/ram0",
        constants.HV_KVM_FLAG: constants.HT_KVM_DISABLED,
    })


def nic(mac):
    return objects.NIC(mac=mac, uuid=str(uuidlib.uuid4()), name=None,
                       nicparams={constants.NIC_MODE: constants.NIC_MODE_BRIDGED,
                                  constants.NIC_LINK: ""})


def disk_image(name, size_mib=8):
    path = os.path.join(ENV["KVM_AGENT_TEST_SCRATCH"], name)
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    disk = objects.Disk(dev_type=constants.DT_PLAIN, size=size_mib, mode=constants.DISK_RDWR,
                        uuid=str(uuidlib.uuid4()), name=None, params={})
    return disk, path


def instance(name, uuid, hvp, memory=256, nics=(), disks=()):
    return objects.Instance(
        name=name, uuid=uuid, hypervisor=constants.HT_KVM, hvparams=hvp,
        beparams={constants.BE_MAXMEM: memory, constants.BE_MINMEM: memory,
                  constants.BE_VCPUS: 1},
        nics=list(nics), disks=list(disks), network_port=0, os="debootstrap")


def agent_has(socket_path, name):
    with kac.Client.unix(socket_path) as client:
        try:
            return client.get_instance(pb.GetInstanceRequest(name=name), timeout=10)
        except kac.NotFound:
            return None


class LifecycleAndHotplug(unittest.TestCase):
    def test_start_hotplug_and_stop_through_the_class(self):
        hv = KvmAgentHypervisor(socket=SOURCE)
        state_dir = ENV["KVM_AGENT_TEST_STATE_DIR"]
        hvp = guest_hvparams()
        hv.CheckParameterSyntax(hvp)
        hv.ValidateParameters(hvp)
        root, root_path = disk_image("root.img")
        inst = instance("web1.example.com", UUIDS[0], hvp, nics=[nic("52:54:00:6a:00:01")],
                        disks=[root])

        hv.StartInstance(inst, [(root, root_path, "")], False)

        name, pid, memory, vcpus, state, _ = hv.GetInstanceInfo(inst.name)
        self.assertEqual((name, memory, vcpus), (inst.name, 256, 1))
        self.assertTrue(hv_running(state))
        self.assertGreater(pid, 0)
        self.assertIn(inst.name, hv.ListInstances())
        self.assertIn(inst.name, [i[0] for i in hv.GetAllInstancesInfo()])
        qmp = Qmp(state_dir, inst.name)
        # The agent opened the image and QEMU got the fd.
        self.assertEqual(len(qmp.block_files()), 1)
        self.assertTrue(all(f.startswith("/dev/fdset/") for f in qmp.block_files()))
        self.assertIn(root_path, open_files(pid))
        devices = agent_has(SOURCE, inst.name).devices
        self.assertEqual(sorted(d.kind for d in devices), [pb.DEVICE_KIND_DISK, pb.DEVICE_KIND_NIC])
        pci = qmp.pci()
        for device in devices:
            self.assertEqual(pci.get(device.qemu_id), device.pci_slot, device)
        # Where Ganeti's own driver puts them, past kvm_pci_reservations
        # (12): the disk first, then the NIC.
        self.assertEqual([(d.kind, d.pci_slot) for d in devices],
                         [(pb.DEVICE_KIND_DISK, 12), (pb.DEVICE_KIND_NIC, 13)])
        wait_for_guest(state_dir, inst.name)

        hv.HotplugSupported(inst)
        for dev_type in (constants.HOTPLUG_TARGET_NIC, constants.HOTPLUG_TARGET_DISK):
            hv.VerifyHotplugSupport(inst, constants.HOTPLUG_ACTION_ADD, dev_type)
            hv.VerifyHotplugSupport(inst, constants.HOTPLUG_ACTION_REMOVE, dev_type)
        hv.VerifyHotplugSupport(inst, constants.HOTPLUG_ACTION_MODIFY,
                                constants.HOTPLUG_TARGET_NIC)
        with self.assertRaises(errors.HotplugError):
            hv.VerifyHotplugSupport(inst, constants.HOTPLUG_ACTION_MODIFY,
                                    constants.HOTPLUG_TARGET_DISK)

        used_before = set(qmp.pci().values())
        hot_nic = nic("52:54:00:6a:00:02")
        nic_info = hv.HotAddDevice(inst, constants.HOTPLUG_TARGET_NIC, hot_nic, None, 1)
        data, data_path = disk_image("data.img")
        disk_info = hv.HotAddDevice(inst, constants.HOTPLUG_TARGET_DISK, data,
                                    (data_path, ""), 1)

        pci = qmp.pci()
        for info in (nic_info, disk_info):
            self.assertIn(info["id"], pci)
            self.assertEqual(hex(pci[info["id"]]), info["addr"])
            self.assertNotIn(pci[info["id"]], used_before, "a free slot")
        self.assertTrue(qmp.has_block_device(disk_info["id"]))

        # A NIC's new link moves its tap to that bridge, in the same slot.
        bridge = "kbg%s" % uuidlib.uuid4().hex[:8]
        subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
        try:
            relinked = objects.NIC(mac=hot_nic.mac, uuid=hot_nic.uuid, name=None,
                                   nicparams={constants.NIC_MODE: constants.NIC_MODE_BRIDGED,
                                              constants.NIC_LINK: bridge})
            self.assertEqual(hv.HotModDevice(inst, constants.HOTPLUG_TARGET_NIC, relinked,
                                             None, 1), nic_info)
            tap = [d.tap for d in agent_has(SOURCE, inst.name).devices
                   if d.uuid == hot_nic.uuid][0]
            master = os.readlink("/sys/class/net/%s/master" % tap)
            self.assertEqual(os.path.basename(master), bridge)
        finally:
            subprocess.run(["ip", "link", "del", bridge], check=False)

        hv.HotDelDevice(inst, constants.HOTPLUG_TARGET_DISK, data, None, 1)
        hv.HotDelDevice(inst, constants.HOTPLUG_TARGET_NIC, hot_nic, None, 1)

        pci = qmp.pci()
        self.assertNotIn(nic_info["id"], pci)
        self.assertNotIn(disk_info["id"], pci)
        self.assertFalse(qmp.has_block_device(disk_info["id"]))
        hv.BalloonInstanceMemory(inst, 200)
        deadline = time.monotonic() + 60
        while qmp.execute("query-balloon")["actual"] >> 20 != 200:
            self.assertLess(time.monotonic(), deadline, "the balloon never reached 200 MiB")
            time.sleep(0.2)
        # Ganeti sees what the guest has now (QEMU reports balloon changes
        # at most once a second).
        while hv.GetInstanceInfo(inst.name)[2] != 200:
            self.assertLess(time.monotonic(), deadline,
                            "the class never reported 200 MiB: %r" % (hv.GetInstanceInfo(inst.name),))
            time.sleep(0.2)
        qmp.close()

        with self.assertRaises(errors.HypervisorError):
            hv.StopInstance(None, name=inst.name)  # only a kill works by name
        hv.StopInstance(inst, timeout=30)
        hv.StopInstance(inst, retry=True, timeout=30)  # Ganeti's retry finds it gone

        self.assertIsNone(hv.GetInstanceInfo(inst.name))
        self.assertNotIn(inst.name, hv.ListInstances())
        hv.CleanupInstance(inst.name)
        self.assertFalse(os.path.exists(os.path.join(state_dir, "run", inst.name, "qmp.sock")))
        # Cleanup follows every shutdown: the agent forgets the instance, so
        # a removed or renamed one leaves nothing behind.
        self.assertIsNone(agent_has(SOURCE, inst.name))
        hv.CleanupInstance(inst.name)  # again: nothing to forget


def hv_running(state):
    from ganeti.hypervisor import hv_base
    return hv_base.HvInstanceState.IsRunning(state)


class NodeConsoleAndReboot(unittest.TestCase):
    def test_node_facts_console_and_a_reboot(self):
        hv = KvmAgentHypervisor(socket=SOURCE)
        self.assertIsNone(hv.Verify())
        absent = os.path.join(ENV["KVM_AGENT_TEST_SCRATCH"], "absent.sock")
        down = KvmAgentHypervisor(socket=absent)
        self.assertIn("kvm-agent is not answering on %s" % absent, down.Verify())
        # A down agent leaves the node's own figures, without a QEMU version.
        figures = down.GetNodeInfo()
        self.assertGreater(figures["memory_total"], 0)
        self.assertGreater(figures["cpu_total"], 0)
        self.assertNotIn(constants.HV_NODEINFO_KEY_VERSION, figures)
        node = hv.GetNodeInfo()
        self.assertGreater(node[constants.HV_NODEINFO_KEY_VERSION], (2, 0, 0))
        self.assertGreater(node["memory_total"], 0)

        inst = instance("rebooted.example.com", UUIDS[4], hvparams(), memory=64)
        hv.StartInstance(inst, [], False)
        pid = hv.GetInstanceInfo(inst.name)[1]
        hv.RebootInstance(inst)
        self.assertNotEqual(hv.GetInstanceInfo(inst.name)[1], pid, "a fresh QEMU")

        console = hv.GetInstanceConsole(
            inst, objects.Node(name="node1.example.com", ndparams={}),
            objects.NodeGroup(name="default", ndparams={}), inst.hvparams, inst.beparams)
        self.assertEqual(console.kind, constants.CONS_SSH)
        self.assertEqual(console.host, "node1.example.com")
        self.assertEqual(console.command, ["kvm-agent", "console", "--resume", inst.name])

        # Started paused, it runs once someone attaches to its console, as
        # with Ganeti's own console wrapper.
        hv.StopInstance(inst, force=True)
        hv.StartInstance(inst, [], True)
        self.assertEqual(agent_has(SOURCE, inst.name).state, pb.INSTANCE_STATE_PAUSED)
        # "prelaunch", not "paused": the guest never ran (-S), as with
        # Ganeti's KVM driver.
        qmp = Qmp(ENV["KVM_AGENT_TEST_STATE_DIR"], inst.name)
        self.assertEqual(qmp.execute("query-status")["status"], "prelaunch")
        qmp.close()
        command = [ENV["KVM_AGENT_TEST_BINARY"]] + console.command[1:]
        attached = subprocess.run(command, input=b"\x1d", capture_output=True, timeout=60,
                                  env=dict(os.environ, KVM_AGENT_SOCKET=SOURCE))
        self.assertEqual(attached.returncode, 0, attached.stderr)
        self.assertEqual(agent_has(SOURCE, inst.name).state, pb.INSTANCE_STATE_RUNNING)
        hv.StopInstance(inst, force=True)
        self.assertIsNone(hv.GetInstanceInfo(inst.name))


class UserShutdown(unittest.TestCase):
    def power_off(self, hv, inst):
        """Starts the test guest and has it power itself off."""
        hv.StartInstance(inst, [], False)
        state_dir = ENV["KVM_AGENT_TEST_STATE_DIR"]
        wait_for_guest(state_dir, inst.name)
        console = socket.socket(socket.AF_UNIX)
        console.connect(os.path.join(state_dir, "run", inst.name, "serial.sock"))
        console.settimeout(2)
        # Enter until the shell answers, so the command isn't typed into a
        # console nobody reads yet.
        seen = b""
        deadline = time.monotonic() + 60
        while b"/ # " not in seen:
            self.assertLess(time.monotonic(), deadline, "no shell: %r" % seen[-300:])
            console.sendall(b"\n")
            try:
                seen += console.recv(4096)
            except socket.timeout:
                pass
        # Connected until the end: QEMU drops what it hasn't read yet
        # when the console goes.
        console.sendall(b"poweroff -f\n")
        deadline = time.monotonic() + 60
        while agent_has(SOURCE, inst.name).pid:
            self.assertLess(time.monotonic(), deadline, "the guest never powered off")
            time.sleep(0.2)
        console.close()

    def test_a_guest_powered_off_under_user_shutdown_is_down_by_its_users_will(self):
        hv = KvmAgentHypervisor(socket=SOURCE,
                                state_dir=os.path.join(ENV["KVM_AGENT_TEST_SCRATCH"], "us"))
        hvp = guest_hvparams()
        hvp[constants.HV_KVM_USER_SHUTDOWN] = True
        KvmAgentHypervisor.CheckParameterSyntax(hvp)
        inst = instance("poweroff.example.com", UUIDS[5], hvp, memory=128)
        self.power_off(hv, inst)
        # As Ganeti's KVM driver reports it: down, by its user.
        info = hv.GetInstanceInfo(inst.name)
        self.assertEqual(info[1:], (-1, 0, 0, hv_base.HvInstanceState.SHUTDOWN, 0))
        self.assertIn(info, hv.GetAllInstancesInfo())
        self.assertNotIn(inst.name, hv.ListInstances())
        hv.CleanupInstance(inst.name)
        self.assertIsNone(hv.GetInstanceInfo(inst.name))

        # Without user_shutdown the same power-off is an instance that is
        # down, which Ganeti's watcher starts again.
        inst.hvparams[constants.HV_KVM_USER_SHUTDOWN] = False
        self.power_off(hv, inst)
        self.assertIsNone(hv.GetInstanceInfo(inst.name))
        self.assertNotIn(inst.name, [i[0] for i in hv.GetAllInstancesInfo()])
        hv.CleanupInstance(inst.name)


class Registration(unittest.TestCase):
    def test_register_makes_ganetis_kvm_this_class(self):
        from ganeti import hypervisor
        import kvm_agent_ganeti

        kvm_agent_ganeti.register()

        self.assertIs(hypervisor.GetHypervisorClass(constants.HT_KVM), KvmAgentHypervisor)
        self.assertIsInstance(hypervisor.GetHypervisor(constants.HT_KVM), KvmAgentHypervisor)


class DivertedRegistry(unittest.TestCase):
    def test_the_diverted_registry_runs_ganetis_own_then_registers_the_class(self):
        """The switch-over as README.md does it, on a copy of Ganeti's
        package: its hypervisor/__init__.py diverted to .distrib, and
        hypervisor_init.py in its place, imported by a fresh Python."""
        import shutil
        import sys
        import tempfile
        import ganeti

        hook = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "hypervisor_init.py")
        with tempfile.TemporaryDirectory() as root:
            shutil.copytree(os.path.dirname(ganeti.__file__), os.path.join(root, "ganeti"))
            init = os.path.join(root, "ganeti", "hypervisor", "__init__.py")
            os.rename(init, init + ".distrib")
            shutil.copy(hook, init)
            probe = ("from ganeti import constants, hypervisor\n"
                     "print(hypervisor.GetHypervisorClass(constants.HT_KVM).__name__)\n"
                     "print(hypervisor.GetHypervisorClass(constants.HT_FAKE).__name__)\n")
            path = os.pathsep.join([root] + os.environ.get("PYTHONPATH", "").split(os.pathsep))
            ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=path), timeout=60)
        self.assertEqual(ran.returncode, 0, ran.stderr)
        # Ganeti's own registry is there, with kvm replaced.
        self.assertEqual(ran.stdout.split(), ["KvmAgentHypervisor", "FakeHypervisor"])


class Settings(unittest.TestCase):
    def test_settings_come_from_the_file_with_the_environment_over_it(self):
        path = os.path.join(ENV["KVM_AGENT_TEST_SCRATCH"], "ganeti.toml")
        with open(path, "w") as f:
            f.write('socket = "%s"\npeer = "https://{target}:7171"\n' % SOURCE)
        saved = {k: os.environ.pop(k, None) for k in ("KVM_AGENT_GANETI_CONFIG",
                                                        "KVM_AGENT_SOCKET", "KVM_AGENT_PEER")}
        try:
            os.environ["KVM_AGENT_GANETI_CONFIG"] = path
            hv = KvmAgentHypervisor()
            self.assertIsNone(hv.Verify(), "reaches the agent the file names")
            self.assertEqual(hv._peer, "https://{target}:7171")
            os.environ["KVM_AGENT_PEER"] = "https://{target}:7272"
            self.assertEqual(KvmAgentHypervisor()._peer, "https://{target}:7272")
            with open(path, "a") as f:
                f.write('sokcet = "/typo"\n')
            with self.assertRaises(errors.HypervisorError) as refused:
                KvmAgentHypervisor()
            self.assertIn("sokcet", str(refused.exception))
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None)
                if value is not None:
                    os.environ[key] = value


class UnsupportedParameters(unittest.TestCase):
    def test_an_unsupported_value_is_named_and_nothing_starts(self):
        hv = KvmAgentHypervisor(socket=SOURCE)
        for param, value in [(constants.HV_SOUNDHW, "all"),
                             (constants.HV_USB_DEVICES, "mouse,braille"),
                             (constants.HV_DISK_TYPE, constants.HT_DISK_SD)]:
            hvp = hvparams(**{param: value})
            with self.assertRaises(errors.HypervisorError) as refused:
                hv.CheckParameterSyntax(hvp)
            self.assertIn(param, str(refused.exception))
            inst = instance("refused.example.com", UUIDS[1], hvp, memory=64)
            with self.assertRaises(errors.HypervisorError) as refused:
                hv.StartInstance(inst, [], False)
            self.assertIn(param, str(refused.exception))
            self.assertIsNone(agent_has(SOURCE, inst.name), "no instance was made")
            self.assertNotIn(inst.name, hv.ListInstances())

    def test_kvm_extra_runs_only_what_the_node_allows(self):
        # The test agent allows no extra option: the agent refuses the
        # start with the setting to change, and nothing runs.
        hv = KvmAgentHypervisor(socket=SOURCE)
        hvp = hvparams(**{constants.HV_KVM_EXTRA: "-device virtio-rng-pci"})
        hv.CheckParameterSyntax(hvp)
        inst = instance("extra.example.com", UUIDS[1], hvp, memory=64)
        with self.assertRaises(errors.HypervisorError) as refused:
            hv.StartInstance(inst, [], False)
        self.assertIn("allowed_extra_options", str(refused.exception))
        self.assertIn("-device virtio-rng-pci", str(refused.exception))
        self.assertIsNone(agent_has(SOURCE, inst.name), "no instance was made")

    def test_a_nic_meant_for_a_vlan_never_lands_on_a_bridge_untagged(self):
        # Ganeti's vlan nicparam on a bridge that doesn't filter VLANs: the
        # tap would carry every VLAN, so nothing starts.
        hv = KvmAgentHypervisor(socket=SOURCE)
        plain = "kbp%s" % uuidlib.uuid4().hex[:8]
        subprocess.run(["ip", "link", "add", plain, "type", "bridge"], check=True)
        try:
            untagged = nic("52:54:00:6a:00:32")
            untagged.nicparams[constants.NIC_LINK] = plain
            untagged.nicparams[constants.NIC_VLAN] = ".100"
            inst = instance("novlan.example.com", UUIDS[2], hvparams(), memory=64,
                            nics=[untagged])
            with self.assertRaises(errors.HypervisorError) as refused:
                hv.StartInstance(inst, [], False)
            self.assertIn("vlan_filtering", str(refused.exception))
            info = agent_has(SOURCE, inst.name)
            self.assertTrue(info is None or info.pid == 0, "no QEMU runs")
            self.assertEqual(os.listdir("/sys/class/net/%s/brif" % plain), [])
            hv.CleanupInstance(inst.name)
        finally:
            subprocess.run(["ip", "link", "del", plain], check=False)

    def test_machine_and_console_parameters_reach_the_spec(self):
        from kvm_agent_ganeti.hypervisor import instance_spec
        hvp = hvparams(**{constants.HV_CPU_CORES: 2, constants.HV_CPU_THREADS: 2,
                          constants.HV_USE_LOCALTIME: True,
                          constants.HV_REBOOT_BEHAVIOR: constants.INSTANCE_REBOOT_EXIT})
        KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(hvp)
        spec = instance_spec(instance("shaped.example.com", UUIDS[1], hvp), [])
        topology = spec.cpu_topology
        self.assertEqual((topology.sockets, topology.cores, topology.threads), (0, 2, 2))
        self.assertTrue(spec.rtc_localtime)
        self.assertTrue(spec.exit_on_reboot)
        plain = instance_spec(instance("plain.example.com", UUIDS[1], hvparams()), [])
        self.assertFalse(plain.HasField("cpu_topology"))
        self.assertFalse(plain.rtc_localtime)
        self.assertFalse(plain.exit_on_reboot)
        # Ganeti's driver gives every guest QEMU's VGA, and VNC a tablet.
        self.assertEqual(plain.display_adapter, pb.DISPLAY_ADAPTER_STD)
        self.assertEqual(plain.usb_pointer, pb.USB_POINTER_UNSPECIFIED)
        console = hvparams(**{constants.HV_VNC_BIND_ADDRESS: "0.0.0.0",
                              constants.HV_KEYMAP: "de", constants.HV_VGA: "cirrus"})
        KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(console)
        vnc = instance("console.example.com", UUIDS[1], console)
        vnc.network_port = 11005
        spec = instance_spec(vnc, [])
        self.assertEqual((spec.vnc.keymap, spec.usb_pointer, spec.display_adapter),
                         ("de", pb.USB_POINTER_TABLET, pb.DISPLAY_ADAPTER_CIRRUS))
        devices = hvparams(**{constants.HV_SOUNDHW: "hda",
                              constants.HV_USB_DEVICES: "keyboard, wacom-tablet",
                              constants.HV_USE_GUEST_AGENT: True})
        KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(devices)
        spec = instance_spec(instance("devices.example.com", UUIDS[1], devices), [])
        self.assertEqual(spec.sound_card, pb.SOUND_CARD_HDA)
        self.assertTrue(spec.guest_agent)
        self.assertFalse(plain.guest_agent)
        self.assertEqual(list(spec.usb_devices),
                         [pb.USB_DEVICE_KEYBOARD, pb.USB_DEVICE_WACOM_TABLET])

        from kvm_agent_ganeti.hypervisor import disk_spec
        disk, path = disk_image("aio.img")
        io = hvparams(**{constants.HV_KVM_DISK_AIO: constants.HT_KVM_AIO_NATIVE,
                         constants.HV_DISK_DISCARD: constants.HT_DISCARD_UNMAP,
                         constants.HV_DISK_CACHE: constants.HT_CACHE_NONE})
        KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(io)
        spec = disk_spec(disk, path, io)
        self.assertEqual((spec.aio, spec.discard, spec.cache, spec.bus),
                         (pb.DISK_AIO_NATIVE, True, pb.DISK_CACHE_NONE, pb.DISK_BUS_VIRTIO))
        ide = hvparams(**{constants.HV_DISK_TYPE: constants.HT_DISK_IDE})
        KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(ide)
        self.assertEqual(disk_spec(disk, path, ide).bus, pb.DISK_BUS_IDE)
        # Ganeti's plain `scsi` was QEMU's emulated SCSI disk.
        for disk_type, bus in [(constants.HT_DISK_SCSI, pb.DISK_BUS_SCSI_HD),
                               (constants.HT_DISK_SCSI_CD, pb.DISK_BUS_SCSI_CD),
                               (constants.HT_DISK_SCSI_BLOCK, pb.DISK_BUS_SCSI_BLOCK),
                               (constants.HT_DISK_SCSI_GENERIC, pb.DISK_BUS_SCSI_GENERIC)]:
            scsi = hvparams(**{constants.HV_DISK_TYPE: disk_type})
            KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(scsi)
            self.assertEqual(disk_spec(disk, path, scsi).bus, bus)
        # Every NIC model of Ganeti's, ne2k_isa on ISA included.
        from kvm_agent_ganeti.hypervisor import nic_spec
        isa = hvparams(**{constants.HV_NIC_TYPE: constants.HT_NIC_NE2K_ISA})
        KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(isa)
        self.assertEqual(nic_spec(nic("52:54:00:6a:00:40"), isa).model, pb.NIC_MODEL_NE2K_ISA)

    def test_scsi_disks_sit_on_ganetis_controller_and_hotplug_there(self):
        from kvm_agent_ganeti.hypervisor import instance_spec
        hv = KvmAgentHypervisor(socket=SOURCE)
        hvp = hvparams(**{constants.HV_DISK_TYPE: constants.HT_DISK_SCSI_HD,
                          constants.HV_KVM_SCSI_CONTROLLER_TYPE:
                          constants.HT_SCSI_CONTROLLER_MEGASAS})
        hv.CheckParameterSyntax(hvp)
        # Only SCSI disks bring a controller, as with Ganeti's driver.
        self.assertEqual(instance_spec(instance("x", UUIDS[1], hvparams()), []).scsi_controller,
                         pb.SCSI_CONTROLLER_UNSPECIFIED)
        root, root_path = disk_image("scsi-root.img")
        inst = instance("scsi.example.com", UUIDS[7], hvp, memory=64, disks=[root])
        hv.StartInstance(inst, [(root, root_path, "")], False)
        try:
            qmp = Qmp(ENV["KVM_AGENT_TEST_STATE_DIR"], inst.name)
            controller = qmp.execute("qom-get", path="/machine/peripheral/scsi",
                                     property="type")
            self.assertEqual(controller, "megasas")
            [device] = agent_has(SOURCE, inst.name).devices
            self.assertEqual((device.pci_slot, device.scsi_target), (0, 0))
            data, data_path = disk_image("scsi-data.img")
            hvinfo = hv.HotAddDevice(inst, constants.HOTPLUG_TARGET_DISK, data,
                                     (data_path, ""), 1)
            self.assertEqual((hvinfo["bus"], hvinfo["scsi-id"], hvinfo["lun"]), ("scsi.0", 1, 0))
            self.assertTrue(qmp.has_block_device(hvinfo["id"]))
            # SCSI needs no guest to let go of a disk.
            hv.HotDelDevice(inst, constants.HOTPLUG_TARGET_DISK, data, None, 1)
            self.assertFalse(qmp.has_block_device(hvinfo["id"]))
            qmp.close()
        finally:
            hv.StopInstance(inst, force=True)
            hv.CleanupInstance(inst.name)

    def test_vnc_tls_with_the_nodes_certificate_and_a_password(self):
        scratch = ENV["KVM_AGENT_TEST_SCRATCH"]
        ca, x509 = os.path.join(scratch, "vnc-ca"), os.path.join(scratch, "vnc-x509")
        for args in (["init-ca"], ["issue", "node1"]):
            subprocess.run([ENV["KVM_AGENT_TEST_BINARY"], "tls"] + args + ["--dir", ca],
                           check=True, capture_output=True)
        os.makedirs(x509, exist_ok=True)
        for source, name in (("ca.pem", "ca-cert.pem"), ("node1.pem", "server-cert.pem"),
                             ("node1-key.pem", "server-key.pem")):
            with open(os.path.join(ca, source), "rb") as f, \
                    open(os.path.join(x509, name), "wb") as g:
                g.write(f.read())
        password = password_file("vnc-password")
        hvp = hvparams(**{constants.HV_VNC_BIND_ADDRESS: "127.0.0.1",
                          constants.HV_VNC_TLS: True, constants.HV_VNC_X509: x509,
                          constants.HV_VNC_X509_VERIFY: True,
                          constants.HV_VNC_PASSWORD_FILE: password})
        hv = KvmAgentHypervisor(socket=SOURCE)
        # The class gives the agent the password after the start; the agent
        # refuses a password for a VNC that asks for none, so this passing
        # shows it asked for one.
        with started_display(hv, "vnc.example.com", hvp) as inst:
            vnc = query(inst, "query-vnc")
            self.assertEqual(vnc["auth"], "vencrypt+x509+vnc")
            self.assertEqual(int(vnc["service"]), inst.network_port)
        verify_only = hvparams(**{constants.HV_VNC_BIND_ADDRESS: "127.0.0.1",
                                  constants.HV_VNC_TLS: True,
                                  constants.HV_VNC_X509_VERIFY: True})
        with self.assertRaises(errors.HypervisorError) as refused:
            hv.CheckParameterSyntax(verify_only)
        self.assertIn(constants.HV_VNC_X509_VERIFY, str(refused.exception))

    def test_spice_on_an_interfaces_address_with_a_password(self):
        password = password_file("spice-password")
        # An interface's name, resolved to its address as Ganeti's driver
        # does.
        hvp = hvparams(**{constants.HV_KVM_SPICE_BIND: "lo",
                          constants.HV_KVM_SPICE_LOSSLESS_IMG_COMPR: "quic",
                          constants.HV_KVM_SPICE_AUDIO_COMPR: False,
                          constants.HV_KVM_SPICE_PASSWORD_FILE: password,
                          constants.HV_SERIAL_CONSOLE: False})
        # The password reaches an agent that refuses one for a display
        # that asks for none: the start passing shows SPICE asks for it.
        with started_display(KvmAgentHypervisor(socket=SOURCE), "spice.example.com",
                             hvp) as inst:
            spice = query(inst, "query-spice")
            self.assertEqual((spice["enabled"], spice["port"], spice["auth"], spice["host"]),
                             (True, inst.network_port, "spice", "127.0.0.1"))
            console = KvmAgentHypervisor.GetInstanceConsole(inst, None, None, hvp, {})
            self.assertEqual((console.kind, console.host, console.port),
                             (constants.CONS_SPICE, "lo", inst.network_port))

    def test_vnc_on_ganetis_port_and_any_address(self):
        # Ganeti hands out ports from 11000: display 5100 and up.
        from kvm_agent_ganeti.hypervisor import instance_spec
        hvp = hvparams(**{constants.HV_VNC_BIND_ADDRESS: "0.0.0.0"})
        KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(hvp)
        inst = instance("seen.example.com", UUIDS[1], hvp)
        inst.network_port = 11000
        spec = instance_spec(inst, [])
        self.assertEqual((spec.vnc.display, spec.vnc.address), (5100, "0.0.0.0"))
        hvp = hvparams(**{constants.HV_VNC_BIND_ADDRESS: "eth-does-not-resolve"})
        with self.assertRaises(errors.HypervisorError) as refused:
            KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(hvp)
        self.assertIn(constants.HV_VNC_BIND_ADDRESS, str(refused.exception))

    def test_migration_caps_reach_the_migration(self):
        from kvm_agent_ganeti.hypervisor import migration_options
        caps = hvparams(**{constants.HV_KVM_MIGRATION_CAPS: "xbzrle:auto-converge"})
        KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(caps)
        options = migration_options(caps, live=True)
        self.assertEqual((options.xbzrle_cache_bytes, options.auto_converge), (64 << 20, True))
        # Given, they are all: no auto-converge unless named.
        only = migration_options(hvparams(**{constants.HV_KVM_MIGRATION_CAPS: "xbzrle"}), True)
        self.assertFalse(only.auto_converge)
        self.assertFalse(migration_options(hvparams(), True).HasField("auto_converge"))
        self.assertEqual(only.multifd_channels, 0)
        multifd = hvparams(**{constants.HV_KVM_MIGRATION_CAPS: "multifd"})
        KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(multifd)
        self.assertEqual(migration_options(multifd, True).multifd_channels, 2)
        self.assertFalse(migration_options(multifd, True).postcopy)
        postcopy = hvparams(**{constants.HV_KVM_MIGRATION_CAPS: "postcopy-ram:auto-converge"})
        KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(postcopy)
        self.assertTrue(migration_options(postcopy, True).postcopy)
        with self.assertRaises(errors.HypervisorError) as refused:
            KvmAgentHypervisor(socket=SOURCE).CheckParameterSyntax(
                hvparams(**{constants.HV_KVM_MIGRATION_CAPS: "x-colo"}))
        self.assertIn("x-colo", str(refused.exception))

    def test_migration_versions_and_powercycle_are_ganetis_kvm_drivers(self):
        self.assertTrue(KvmAgentHypervisor.VersionsSafeForMigration([7, 2, 22], [10, 0, 2]))
        self.assertTrue(KvmAgentHypervisor.VersionsSafeForMigration([7, 2, 22], [7, 2, 19]))
        # The real one reboots the node; what matters is that it is asked.
        from unittest import mock
        with mock.patch.object(KvmAgentHypervisor, "LinuxPowercycle") as powercycle:
            KvmAgentHypervisor.PowercycleNode(hvparams={})
        powercycle.assert_called_once_with()

    def test_ganetis_vlan_syntax_is_read_as_ganeti_writes_it(self):
        from kvm_agent_ganeti.hypervisor import vlan_spec
        for text, untagged, tagged in [(".100", 100, []), ("100", 100, []),
                                       (":100:200", 0, [100, 200]),
                                       (".100:200:300", 100, [200, 300])]:
            spec = vlan_spec(text)
            self.assertEqual((spec.untagged, list(spec.tagged)), (untagged, tagged), text)
        for bad in [":", ".x", ":100:y", ".100::200"]:
            with self.assertRaises(errors.HypervisorError):
                vlan_spec(bad)

    def test_ganetis_security_settings_are_the_agents(self):
        # A cluster asking for a uid pool and a chroot gets the agent's box:
        # QEMU runs unprivileged whatever these say.
        hv = KvmAgentHypervisor(socket=SOURCE)
        hvp = hvparams(**{constants.HV_SECURITY_MODEL: constants.HT_SM_POOL,
                          constants.HV_KVM_USE_CHROOT: True})
        hv.CheckParameterSyntax(hvp)
        inst = instance("boxed.example.com", UUIDS[1], hvp, memory=64)
        hv.StartInstance(inst, [], False)
        try:
            pid = agent_has(SOURCE, inst.name).pid
            with open("/proc/%d/status" % pid) as status:
                uids = [l.split()[1:] for l in status if l.startswith("Uid:")][0]
            self.assertNotIn("0", uids)
            self.assertNotEqual(os.readlink("/proc/%d/root" % pid), "/")
        finally:
            hv.StopInstance(inst, force=True)

    def test_ganetis_own_checks_still_apply(self):
        hvp = hvparams(**{constants.HV_CPU_MASK: "not-a-mask"})
        with self.assertRaises(errors.HypervisorError) as refused:
            KvmAgentHypervisor.CheckParameterSyntax(hvp)
        self.assertIn(constants.HV_CPU_MASK, str(refused.exception))


class InstallFromCdrom(unittest.TestCase):
    def test_boot_order_cdrom_boots_the_image_and_keeps_the_floppy(self):
        hv = KvmAgentHypervisor(socket=SOURCE)
        floppy = os.path.join(ENV["KVM_AGENT_TEST_SCRATCH"], "drivers.img")
        with open(floppy, "wb") as f:
            f.truncate(1440 << 10)
        hvp = hvparams(**{constants.HV_BOOT_ORDER: constants.HT_BO_CDROM,
                          constants.HV_CDROM_IMAGE_PATH: ENV["KVM_AGENT_TEST_BOOT_ISO"],
                          constants.HV_KVM_FLOPPY_IMAGE_PATH: floppy,
                          constants.HV_KVM_CDROM_DISK_TYPE: constants.HT_DISK_PARAVIRTUAL,
                          constants.HV_KVM_FLAG: constants.HT_KVM_DISABLED})
        hv.CheckParameterSyntax(hvp)
        hv.ValidateParameters(hvp)
        inst = instance("installer.example.com", UUIDS[6], hvp, memory=128)
        hv.StartInstance(inst, [], False)
        try:
            # No kernel: the guest's shell comes from the CD-ROM's isolinux.
            wait_for_guest(ENV["KVM_AGENT_TEST_STATE_DIR"], inst.name, timeout=180)
            qmp = Qmp(ENV["KVM_AGENT_TEST_STATE_DIR"], inst.name)
            media = {b["qdev"]: b.get("inserted", {}).get("file")
                     for b in qmp.execute("query-block") if b["qdev"].startswith("media-")}
            qmp.close()
            self.assertEqual(sorted(media), ["media-cdrom", "media-floppy"])
            self.assertTrue(all(media.values()), media)
            devices = {d.name: d.detail for d in agent_has(SOURCE, inst.name).devices}
            self.assertEqual(devices, {"cdrom": ENV["KVM_AGENT_TEST_BOOT_ISO"],
                                       "floppy": floppy})
        finally:
            hv.StopInstance(inst, force=True)

        # The agent opens every image itself: a URL has nothing to open.
        url = hvparams(**{constants.HV_CDROM_IMAGE_PATH: "http://mirror.example/x.iso"})
        with self.assertRaises(errors.HypervisorError) as refused:
            hv.CheckParameterSyntax(url)
        self.assertIn(constants.HV_CDROM_IMAGE_PATH, str(refused.exception))


# A value other than Ganeti's default for every KVM hvparam, with what
# Ganeti's own checks want beside it.
NON_DEFAULT = {
    constants.HV_ACPI: (False, {}),
    constants.HV_BOOT_ORDER: (constants.HT_BO_NETWORK, {}),
    constants.HV_KVM_CDROM2_IMAGE_PATH: ("/srv/iso/second.iso", {}),
    constants.HV_KVM_CDROM_DISK_TYPE: (constants.HT_DISK_IDE, {}),
    constants.HV_CDROM_IMAGE_PATH: ("/srv/iso/install.iso", {}),
    constants.HV_CPU_CORES: (2, {}),
    constants.HV_CPU_MASK: ("0", {}),
    constants.HV_CPU_SOCKETS: (1, {}),
    constants.HV_CPU_THREADS: (1, {}),
    constants.HV_CPU_TYPE: ("qemu64", {}),
    constants.HV_KVM_DISK_AIO: (constants.HT_KVM_AIO_NATIVE,
                                {constants.HV_DISK_CACHE: constants.HT_CACHE_NONE}),
    constants.HV_DISK_CACHE: (constants.HT_CACHE_WBACK, {}),
    constants.HV_DISK_DISCARD: (constants.HT_DISCARD_UNMAP, {}),
    constants.HV_DISK_TYPE: (constants.HT_DISK_SCSI_HD, {}),
    constants.HV_KVM_FLOPPY_IMAGE_PATH: ("/srv/img/drivers.img", {}),
    constants.HV_INITRD_PATH: ("/boot/initrd.img", {}),
    constants.HV_KERNEL_ARGS: ("quiet", {}),
    constants.HV_KERNEL_PATH: ("/boot/vmlinuz", {constants.HV_ROOT_PATH: "/dev/vda1"}),
    constants.HV_KEYMAP: ("de", {constants.HV_VNC_BIND_ADDRESS: "0.0.0.0"}),
    constants.HV_KVM_EXTRA: ("-device virtio-rng-pci", {}),
    constants.HV_KVM_FLAG: (constants.HT_KVM_DISABLED, {}),
    constants.HV_KVM_PATH: ("/usr/bin/qemu-system-x86_64", {}),
    constants.HV_KVM_PCI_RESERVATIONS: (16, {}),
    constants.HV_KVM_MACHINE_VERSION: ("pc-i440fx-7.2", {}),
    constants.HV_MEM_PATH: ("/dev/hugepages", {}),
    constants.HV_MIGRATION_BANDWIDTH: (64, {}),
    constants.HV_KVM_MIGRATION_CAPS: ("xbzrle:auto-converge", {}),
    constants.HV_MIGRATION_DOWNTIME: (100, {}),
    constants.HV_MIGRATION_MODE: (constants.HT_MIGRATION_NONLIVE, {}),
    constants.HV_MIGRATION_PORT: (8200, {}),
    constants.HV_NIC_TYPE: (constants.HT_NIC_E1000, {}),
    constants.HV_REBOOT_BEHAVIOR: (constants.INSTANCE_REBOOT_EXIT, {}),
    constants.HV_ROOT_PATH: ("/dev/vda2", {}),
    constants.HV_KVM_SCSI_CONTROLLER_TYPE: ("megasas", {}),
    constants.HV_SECURITY_DOMAIN: ("nobody", {constants.HV_SECURITY_MODEL: constants.HT_SM_USER}),
    constants.HV_SECURITY_MODEL: (constants.HT_SM_POOL, {}),
    constants.HV_SERIAL_CONSOLE: (False, {}),
    constants.HV_SERIAL_SPEED: (115200, {}),
    constants.HV_SOUNDHW: ("hda", {}),
    constants.HV_KVM_SPICE_BIND: ("0.0.0.0", {}),
    constants.HV_KVM_SPICE_LOSSLESS_IMG_COMPR: ("glz", {constants.HV_KVM_SPICE_BIND: "0.0.0.0"}),
    constants.HV_KVM_SPICE_IP_VERSION: (4, {constants.HV_KVM_SPICE_BIND: "0.0.0.0"}),
    constants.HV_KVM_SPICE_JPEG_IMG_COMPR: ("never", {constants.HV_KVM_SPICE_BIND: "0.0.0.0"}),
    constants.HV_KVM_SPICE_PASSWORD_FILE: ("/etc/ganeti/spice", {
        constants.HV_KVM_SPICE_BIND: "0.0.0.0"}),
    constants.HV_KVM_SPICE_AUDIO_COMPR: (False, {constants.HV_KVM_SPICE_BIND: "0.0.0.0"}),
    constants.HV_KVM_SPICE_STREAMING_VIDEO_DETECTION: ("all", {
        constants.HV_KVM_SPICE_BIND: "0.0.0.0"}),
    constants.HV_KVM_SPICE_TLS_CIPHERS: ("HIGH", {constants.HV_KVM_SPICE_BIND: "0.0.0.0"}),
    constants.HV_KVM_SPICE_USE_TLS: (True, {constants.HV_KVM_SPICE_BIND: "0.0.0.0"}),
    constants.HV_KVM_SPICE_USE_VDAGENT: (False, {constants.HV_KVM_SPICE_BIND: "0.0.0.0"}),
    constants.HV_KVM_SPICE_ZLIB_GLZ_IMG_COMPR: ("never", {
        constants.HV_KVM_SPICE_BIND: "0.0.0.0"}),
    constants.HV_USB_DEVICES: ("keyboard", {}),
    constants.HV_USB_MOUSE: (constants.HT_MOUSE_TABLET, {}),
    constants.HV_KVM_USE_CHROOT: (True, {}),
    constants.HV_USE_GUEST_AGENT: (True, {}),
    constants.HV_USE_LOCALTIME: (True, {}),
    constants.HV_KVM_USER_SHUTDOWN: (True, {}),
    constants.HV_VGA: ("cirrus", {}),
    constants.HV_VHOST_NET: (True, {}),
    constants.HV_VIRTIO_NET_QUEUES: (2, {}),
    constants.HV_VNC_BIND_ADDRESS: ("0.0.0.0", {}),
    constants.HV_VNC_PASSWORD_FILE: ("/etc/ganeti/vnc", {constants.HV_VNC_BIND_ADDRESS: "0.0.0.0"}),
    constants.HV_VNC_TLS: (True, {constants.HV_VNC_BIND_ADDRESS: "0.0.0.0"}),
    constants.HV_VNC_X509: ("/etc/ganeti/x509", {constants.HV_VNC_BIND_ADDRESS: "0.0.0.0"}),
    constants.HV_VNC_X509_VERIFY: (True, {constants.HV_VNC_BIND_ADDRESS: "0.0.0.0",
                                          constants.HV_VNC_X509: "/etc/ganeti/x509"}),
    constants.HV_VNET_HDR: (False, {}),
}

class EveryParameter(unittest.TestCase):
    def test_every_kvm_hvparam_is_honoured_and_none_refused(self):
        from kvm_agent_ganeti.hypervisor import instance_spec
        defaults = constants.HVC_DEFAULTS[constants.HT_KVM]
        self.assertEqual(set(NON_DEFAULT), set(defaults), "a value for each of Ganeti's")
        refused = set()
        for param, (value, beside) in sorted(NON_DEFAULT.items()):
            self.assertNotEqual(value, defaults[param], param)
            hvp = hvparams(**dict(beside, **{param: value}))
            try:
                KvmAgentHypervisor.CheckParameterSyntax(hvp)
            except errors.HypervisorError as e:
                # Ganeti's own checks must pass: only the class may refuse,
                # naming the parameter or the one it goes with.
                self.assertIn("not supported with kvm-agent", str(e), param)
                self.assertTrue(any(p in str(e) for p in [param, *beside]), str(e))
                refused.add(param)
                continue
            inst = instance("every.example.com", UUIDS[1], hvp)
            inst.network_port = 11001
            instance_spec(inst, [])
        self.assertEqual(sorted(refused), [], "refused by the class")


class Migration(unittest.TestCase):
    """MigrationInfo on the source, AcceptInstance on the target,
    MigrateInstance, GetMigrationStatus until done, FinalizeMigrationDst,
    then FinalizeMigrationSource: the order of Ganeti's backend."""

    def setUp(self):
        # Ganeti names the target by address; here the address is the
        # target agent's socket.
        self.source = KvmAgentHypervisor(socket=SOURCE, peer="unix:{target}",
                                         state_dir=ENV["KVM_AGENT_TEST_SCRATCH"])
        self.target = KvmAgentHypervisor(socket=TARGET, peer="unix:{target}",
                                         state_dir=ENV["KVM_AGENT_TEST_SCRATCH"] + "/target")

    def migrate(self, source, inst, target_address):
        info = source.MigrationInfo(inst)
        self.target.AcceptInstance(inst, info, target_address)
        try:
            source.MigrateInstance("cluster.example.com", inst, target_address, True)
        except errors.HypervisorError:
            pass  # Ganeti's backend reads the outcome from the status.
        while True:
            status = source.GetMigrationStatus(inst)
            if status.status != constants.HV_MIGRATION_ACTIVE:
                break
            time.sleep(0.2)
        success = status.status == constants.HV_MIGRATION_COMPLETED
        self.target.FinalizeMigrationDst(inst, info, success)
        source.FinalizeMigrationSource(inst, success, True)
        return status

    def test_a_migration_in_ganetis_order_moves_the_instance(self):
        hvp = hvparams(**{constants.HV_MIGRATION_BANDWIDTH: 1024})
        inst = instance("mover.example.com", UUIDS[2], hvp, memory=128,
                        nics=[nic("52:54:00:6a:00:03")])
        self.source.StartInstance(inst, [], False)
        before = agent_has(SOURCE, inst.name)

        status = self.migrate(self.source, inst, TARGET)

        self.assertEqual(status.status, constants.HV_MIGRATION_COMPLETED)
        self.assertIsNone(self.source.GetInstanceInfo(inst.name))
        self.assertIsNone(agent_has(SOURCE, inst.name), "the source let go")
        self.assertIsNotNone(self.target.GetInstanceInfo(inst.name))
        after = agent_has(TARGET, inst.name)
        self.assertEqual([(d.name, d.pci_slot) for d in after.devices],
                         [(d.name, d.pci_slot) for d in before.devices])
        qmp = Qmp(ENV["KVM_AGENT_TEST_TARGET_STATE_DIR"], inst.name)
        self.assertEqual(qmp.execute("query-status")["status"], "running")
        qmp.close()
        self.target.StopInstance(inst, force=True)

    def test_an_aborted_migration_leaves_the_instance_on_the_source_only(self):
        inst = instance("stayer.example.com", UUIDS[3], hvparams(), memory=128)
        self.source.StartInstance(inst, [], False)
        pid = self.source.GetInstanceInfo(inst.name)[1]
        unreachable = os.path.join(ENV["KVM_AGENT_TEST_SCRATCH"], "no-agent-here.sock")

        status = self.migrate(self.source, inst, unreachable)

        self.assertEqual(status.status, constants.HV_MIGRATION_FAILED)
        info = self.source.GetInstanceInfo(inst.name)
        self.assertIsNotNone(info, "the instance still runs on the source")
        self.assertEqual(info[1], pid, "in the same QEMU")
        self.assertIsNone(agent_has(TARGET, inst.name), "nothing on the target")
        qmp = Qmp(ENV["KVM_AGENT_TEST_STATE_DIR"], inst.name)
        self.assertEqual(qmp.execute("query-status")["status"], "running")
        qmp.close()
        self.source.StopInstance(inst, force=True)


if __name__ == "__main__":
    unittest.main()
