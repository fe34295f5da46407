"""Instances started by Ganeti 3.0's own KVM driver (hv_kvm), taken over by
the agent while they run.

Ganeti's driver runs unchanged, with only its directories moved under a
scratch directory and its network script replaced by the bridge join that
script does. Run by tests/tests/ganeti_adoption.rs, with the environment of
test_hypervisor.py plus KVM_AGENT_TEST_BRIDGE (a bridge for the NICs).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import unittest
import urllib.request
import uuid as uuidlib

from ganeti import constants, errors, objects, pathutils
from ganeti.hypervisor import hv_kvm

import kvm_agent_client as kac
from kvm_agent_client import pb
from kvm_agent_ganeti import KvmAgentHypervisor

ENV = os.environ
SOURCE = ENV["KVM_AGENT_TEST_SOCKET"]
TARGET = ENV["KVM_AGENT_TEST_TARGET_SOCKET"]
SCRATCH = ENV["KVM_AGENT_TEST_SCRATCH"]
BRIDGE = ENV["KVM_AGENT_TEST_BRIDGE"]
UUIDS = ENV["KVM_AGENT_TEST_UUIDS"].split(",")
GANETI_DIR = os.path.join(SCRATCH, "kvm-hypervisor")
# QEMU's log (-D) goes there too.
pathutils.LOG_KVM_DIR = os.path.join(SCRATCH, "kvm-log")
os.makedirs(pathutils.LOG_KVM_DIR, exist_ok=True)
PROMPT = b"/ # "
Outcome = pb.GanetiAdoptionOutcome


class ScratchKvm(hv_kvm.KVMHypervisor):
    """Ganeti's KVM driver with its files under the scratch directory."""
    _ROOT_DIR = GANETI_DIR
    _PIDS_DIR = _ROOT_DIR + "/pid"
    _UIDS_DIR = _ROOT_DIR + "/uid"
    _CTRL_DIR = _ROOT_DIR + "/ctrl"
    _CONF_DIR = _ROOT_DIR + "/conf"
    _NICS_DIR = _ROOT_DIR + "/nic"
    _KEYMAP_DIR = _ROOT_DIR + "/keymap"
    _CHROOT_DIR = _ROOT_DIR + "/chroot"
    _CHROOT_QUARANTINE_DIR = _ROOT_DIR + "/chroot-quarantine"
    _DIRS = [_ROOT_DIR, _PIDS_DIR, _UIDS_DIR, _CTRL_DIR, _CONF_DIR, _NICS_DIR,
             _CHROOT_DIR, _CHROOT_QUARANTINE_DIR, _KEYMAP_DIR]

    @staticmethod
    def _ConfigureNIC(instance, seq, nic, tap):
        # What Ganeti's kvm-ifup does for a bridged NIC.
        link = nic.nicparams[constants.NIC_LINK]
        subprocess.check_call(["ip", "link", "set", tap, "master", link, "up"])


def hv_kvm_params():
    """Ganeti's defaults, with the test guest booted directly under TCG."""
    hvp = dict(constants.HVC_DEFAULTS[constants.HT_KVM])
    hvp.update({
        constants.HV_KVM_PATH: shutil.which("qemu-system-x86_64"),
        constants.HV_KERNEL_PATH: ENV["KVM_AGENT_TEST_KERNEL"],
        constants.HV_INITRD_PATH: ENV["KVM_AGENT_TEST_INITRD"],
        constants.HV_KERNEL_ARGS: "quiet panic=-1",
        constants.HV_ROOT_PATH: "/dev/ram0",
        constants.HV_KVM_FLAG: constants.HT_KVM_DISABLED,
    })
    return hvp


def ganeti_instance(name, uuid, mac, **hvparams):
    nic = objects.NIC(mac=mac, uuid=str(uuidlib.uuid4()), name=None,
                      nicparams={constants.NIC_MODE: constants.NIC_MODE_BRIDGED,
                                 constants.NIC_LINK: BRIDGE, constants.NIC_VLAN: ""})
    path = os.path.join(SCRATCH, name + ".disk0")
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    disk = objects.Disk(dev_type=constants.DT_PLAIN, size=8, mode=constants.DISK_RDWR,
                        uuid=str(uuidlib.uuid4()), name=None, params={})
    inst = objects.Instance(
        name=name, uuid=uuid, hypervisor=constants.HT_KVM,
        hvparams=dict(hv_kvm_params(), **hvparams),
        beparams={constants.BE_MAXMEM: 128, constants.BE_MINMEM: 128,
                  constants.BE_VCPUS: 1},
        nics=[nic], disks=[disk], network_port=0, os="debootstrap")
    return inst, [(disk, path, None)]


class Console:
    """The test guest's shell on a serial socket."""

    def __init__(self, path, timeout=180):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.seen = b""

    def wait_for_prompt(self, timeout=180):
        """Sends Enter until the shell answers: the guest may still boot,
        or have printed its banner before anyone listened."""
        deadline = time.monotonic() + timeout
        while PROMPT not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError("no shell prompt from the guest: %r" % self.seen[-500:])
            self.sock.sendall(b"\n")
            self.sock.settimeout(2)
            try:
                self.seen += self.sock.recv(4096)
            except socket.timeout:
                pass
        self.sock.settimeout(60)
        self.seen = b""

    def wait_for(self, marker, timeout=180):
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError("no %r from the guest: %r" % (marker, self.seen[-500:]))
            self.seen += self.sock.recv(4096)

    def run(self, command):
        """The output of a shell command, up to a marker it prints after
        it (written so that an echo of the line wouldn't contain it)."""
        self.seen = b""
        self.sock.sendall(command.encode() + b'; echo "==""done=="\n')
        self.wait_for(b"==done==", timeout=60)
        output = self.seen[:self.seen.rindex(b"==done==")]
        # The shell doesn't echo; prompts for earlier Enters may lead.
        return output.replace(PROMPT, b"")

    def close(self):
        self.sock.close()


def guest_run(console_path, command):
    console = Console(console_path)
    console.wait_for_prompt()
    output = console.run(command).decode(errors="replace")
    console.close()
    return output


def pci_functions(console_path):
    """The guest's PCI devices, as it lists them."""
    listing = guest_run(console_path, "ls /sys/bus/pci/devices")
    return sorted(word for word in listing.split() if word.startswith("0000:"))


def adopt(name=None, dry_run=False, ganeti_dir=GANETI_DIR, socket_path=SOURCE):
    with kac.Client.unix(socket_path) as client:
        answer = client.adopt_ganeti_instances(pb.AdoptGanetiInstancesRequest(
            ganeti_dir=ganeti_dir, name=name or "", dry_run=dry_run), timeout=60)
    return {a.name: a for a in answer.instances}


def agent(socket_path, call, request, timeout=120):
    with kac.Client.unix(socket_path) as client:
        return getattr(client, call)(request, timeout=timeout)


class Adoption(unittest.TestCase):
    started = []

    @classmethod
    def tearDownClass(cls):
        # Whatever the agents didn't take over and stop.
        for name in cls.started:
            try:
                with open(os.path.join(GANETI_DIR, "pid", name)) as f:
                    os.kill(int(f.read()), signal.SIGKILL)
            except (OSError, ValueError):
                pass

    def start_under_ganeti(self, name, uuid, mac, **hvparams):
        inst, block_devices = ganeti_instance(name, uuid, mac, **hvparams)
        ScratchKvm().StartInstance(inst, block_devices, False)
        self.started.append(name)
        with open(os.path.join(GANETI_DIR, "pid", name)) as f:
            return inst, int(f.read())

    def test_a_running_instance_is_taken_over_and_keeps_its_hardware(self):
        name = "adopted.example.com"
        inst, pid = self.start_under_ganeti(name, UUIDS[0], "52:54:00:6b:00:01")
        ganeti_console = os.path.join(GANETI_DIR, "ctrl", name + ".serial")
        guest_run(ganeti_console, "echo adopted-marker > /marker")
        before = pci_functions(ganeti_console)
        with open(os.path.join(GANETI_DIR, "conf", name + ".runtime")) as f:
            runtime = json.load(f)
        hv_slots = {d["hvinfo"]["id"]: int(d["hvinfo"]["addr"], 16)
                    for d in runtime[1] + [entry[0] for entry in runtime[3]]}

        dry = adopt(name, dry_run=True)[name]
        self.assertEqual(dry.outcome, Outcome.GANETI_ADOPTION_OUTCOME_WOULD_ADOPT, dry.reason)
        self.assertIsNone(agent_has(SOURCE, name), "a dry run takes nothing over")

        taken = adopt()[name]
        self.assertEqual(taken.outcome, Outcome.GANETI_ADOPTION_OUTCOME_ADOPTED, taken.reason)
        self.assertEqual(taken.pid, pid)
        info = agent_has(SOURCE, name)
        self.assertEqual(info.pid, pid, "the same QEMU")
        self.assertEqual(info.state, pb.INSTANCE_STATE_RUNNING)
        self.assertIn("soft reboot", info.unconfined)
        self.assertEqual(unconfined_count(), 1)
        self.assertEqual({d.qemu_id: d.pci_slot for d in info.devices}, hv_slots)
        with open(os.path.join(GANETI_DIR, "nic", name, "0")) as f:
            self.assertEqual([d.tap for d in info.devices if d.kind == pb.DEVICE_KIND_NIC],
                             [f.read()], "its tap is found")
        # Taking over again changes nothing.
        again = adopt(name)[name]
        self.assertEqual(again.outcome, Outcome.GANETI_ADOPTION_OUTCOME_ALREADY_ADOPTED)

        console = os.path.join(ENV["KVM_AGENT_TEST_STATE_DIR"], "run", name, "serial.sock")
        self.assertIn("adopted-marker", guest_run(console, "cat /marker"),
                      "the guest ran on through the take-over")

        # Devices the agent adds go where nothing of Ganeti's is.
        agent(SOURCE, "add_nic", pb.AddNicRequest(name=name, nic=pb.NicSpec(
            name="eth-new", mac="52:54:00:6b:00:02", model=pb.NIC_MODEL_VIRTIO, bridge=BRIDGE)))
        extra = os.path.join(SCRATCH, name + ".extra")
        with open(extra, "wb") as f:
            f.truncate(4 << 20)
        agent(SOURCE, "add_disk", pb.AddDiskRequest(name=name, disk=pb.DiskSpec(
            name="extra", path=extra, format=pb.DISK_FORMAT_RAW)))
        info = agent_has(SOURCE, name)
        new_slots = {d.name: d.pci_slot for d in info.devices if d.name in ("eth-new", "extra")}
        self.assertEqual(len(new_slots), 2)
        reserved = runtime[2].get("kvm_pci_reservations", 12)
        for slot in new_slots.values():
            self.assertGreaterEqual(slot, reserved, "Ganeti's reserved slots stay free")
            self.assertNotIn(slot, hv_slots.values())
        with_new = sorted(before + ["0000:00:%02x.0" % s for s in new_slots.values()])

        # Ganeti's own disk leaves as the agent's do, its drive with it.
        image = os.path.join(SCRATCH, name + ".disk0")
        self.assertIn(image, open_files(pid))
        ganeti_disk = next(d for d in info.devices
                           if d.kind == pb.DEVICE_KIND_DISK and d.qemu_id in hv_slots)
        agent(SOURCE, "remove_device", pb.RemoveDeviceRequest(name=name, device=ganeti_disk.name))
        gone = "0000:00:%02x.0" % ganeti_disk.pci_slot
        with_new.remove(gone)
        self.assertNotIn(gone, pci_functions(console))
        self.assertNotIn(image, open_files(pid), "QEMU closed the image")

        # A migration from the QEMU Ganeti started to one the second agent
        # starts, confined: the guest sees the same hardware there.
        with kac.Client.unix(SOURCE) as client:
            for _ in client.migrate_instance(pb.MigrateInstanceRequest(
                    name=name, target="unix:" + TARGET), timeout=300):
                pass
        self.assertTrue(exits(pid), "the QEMU Ganeti started ended")
        self.assertEqual(unconfined_count(), 0)
        moved = agent_has(TARGET, name)
        self.assertEqual(moved.state, pb.INSTANCE_STATE_RUNNING)
        self.assertEqual(moved.unconfined, "")
        self.assertEqual({d.qemu_id: d.pci_slot for d in moved.devices},
                         {d.qemu_id: d.pci_slot for d in info.devices
                          if d.name != ganeti_disk.name})
        target_console = os.path.join(ENV["KVM_AGENT_TEST_TARGET_STATE_DIR"], "run", name,
                                      "serial.sock")
        self.assertIn("adopted-marker", guest_run(target_console, "cat /marker"))
        self.assertEqual(pci_functions(target_console), with_new)

        # A soft reboot replays it: a new QEMU, the same hardware.
        rebooted = agent(TARGET, "reboot_instance", pb.RebootInstanceRequest(
            name=name, mode=pb.REBOOT_MODE_SOFT, force=True))
        self.assertNotEqual(rebooted.pid, moved.pid)
        self.assertEqual(pci_functions(target_console), with_new)

        # A save and a restore too.
        saved = os.path.join(SCRATCH, name + ".save")
        agent(TARGET, "save_instance", pb.SaveInstanceRequest(name=name, path=saved))
        agent(TARGET, "restore_instance", pb.RestoreInstanceRequest(path=saved))
        self.assertEqual(pci_functions(target_console), with_new)
        agent(TARGET, "stop_instance", pb.StopInstanceRequest(name=name, force=True))

    def test_the_class_sees_every_instance_through_the_switch(self):
        switched, kept = "switched.example.com", "kept.example.com"
        switched_inst, switched_pid = self.start_under_ganeti(
            switched, UUIDS[2], "52:54:00:6b:00:04")
        # A device the agent doesn't model yet (through kvm_extra): this one
        # stays with Ganeti's driver.
        kept_inst, kept_pid = self.start_under_ganeti(
            kept, UUIDS[3], "52:54:00:6b:00:05",
            **{constants.HV_KVM_EXTRA: "-device virtio-rng-pci"})
        self.assertEqual(sorted(ScratchKvm().ListInstances()), [kept, switched])

        # The node's kvm class is now the agent's: its first listing takes
        # over what it can and still lists every instance, once.
        hv = KvmAgentHypervisor(socket=SOURCE, state_dir=os.path.join(SCRATCH, "class"),
                                hv_kvm=ScratchKvm)
        self.assertEqual(sorted(hv.ListInstances()), [kept, switched])
        self.assertEqual(agent_has(SOURCE, switched).pid, switched_pid)
        self.assertIsNone(agent_has(SOURCE, kept))
        self.assertEqual(sorted(hv.ListInstances()), [kept, switched])
        infos = {info[0]: info[1] for info in hv.GetAllInstancesInfo()}
        self.assertEqual(infos, {switched: switched_pid, kept: kept_pid})
        self.assertEqual(hv.GetInstanceInfo(kept)[1], kept_pid)

        # Never a second QEMU on the same disks.
        with self.assertRaises(errors.HypervisorError) as refusal:
            hv.StartInstance(kept_inst, [], False)
        self.assertIn("Ganeti's KVM driver", str(refusal.exception))

        # Each stops through whoever runs it, and Ganeti's files go.
        hv.StopInstance(kept_inst, force=True)
        self.assertTrue(exits(kept_pid))
        hv.StopInstance(switched_inst, force=True)
        self.assertTrue(exits(switched_pid))
        for name in (kept, switched):
            hv.CleanupInstance(name)
            self.assertFalse(os.path.exists(os.path.join(GANETI_DIR, "conf", name + ".runtime")))
        self.assertIsNone(agent_has(SOURCE, switched))
        self.assertEqual(hv.ListInstances(), [])

    def test_a_node_still_on_ganetis_driver_migrates_to_the_agent(self):
        name = "rolling.example.com"
        port = free_port()
        inst, pid = self.start_under_ganeti(name, UUIDS[4], "52:54:00:6b:00:06",
                                            **{constants.HV_MIGRATION_PORT: port})
        ganeti_console = os.path.join(GANETI_DIR, "ctrl", name + ".serial")
        guest_run(ganeti_console, "echo rolled-marker > /marker")
        before = pci_functions(ganeti_console)
        source = ScratchKvm()
        target = KvmAgentHypervisor(socket=TARGET, state_dir=os.path.join(SCRATCH, "class-t"),
                                    hv_kvm=ScratchKvm)

        # Ganeti's order: the target accepts, the source's own driver sends,
        # Ganeti polls the source, then finalizes both sides.
        info = source.MigrationInfo(inst)
        target.AcceptInstance(inst, info, "127.0.0.1")
        self.assertEqual(agent_has(TARGET, name).state, pb.INSTANCE_STATE_INCOMING)
        source.MigrateInstance("cluster.example.com", inst, "127.0.0.1", True)
        deadline = time.monotonic() + 120
        while source.GetMigrationStatus(inst).status == constants.HV_MIGRATION_ACTIVE:
            self.assertLess(time.monotonic(), deadline, "the migration never ended")
            time.sleep(0.2)
        status = source.GetMigrationStatus(inst)
        self.assertEqual(status.status, constants.HV_MIGRATION_COMPLETED)
        target.FinalizeMigrationDst(inst, info, True)
        source.FinalizeMigrationSource(inst, True, True)

        self.assertTrue(exits(pid), "the source's QEMU ended")
        moved = agent_has(TARGET, name)
        self.assertEqual(moved.state, pb.INSTANCE_STATE_RUNNING)
        self.assertEqual(target.ListInstances(), [name])
        console = os.path.join(ENV["KVM_AGENT_TEST_TARGET_STATE_DIR"], "run", name, "serial.sock")
        self.assertIn("rolled-marker", guest_run(console, "cat /marker"))
        self.assertEqual(pci_functions(console), before)
        target.StopInstance(inst, force=True)

    def test_an_instance_goes_back_to_a_node_on_ganetis_driver(self):
        name = "handback.example.com"
        port = free_port()
        inst, block_devices = ganeti_instance(name, UUIDS[5], "52:54:00:6b:00:07",
                                              **{constants.HV_MIGRATION_PORT: port})
        # The target node has no agent (it was switched back).
        source = KvmAgentHypervisor(
            socket=SOURCE, peer="unix:" + os.path.join(SCRATCH, "no-agent-{target}.sock"),
            state_dir=os.path.join(SCRATCH, "class-s"), hv_kvm=ScratchKvm)
        source.StartInstance(inst, block_devices, False)
        self.started.append(name)
        console = os.path.join(ENV["KVM_AGENT_TEST_STATE_DIR"], "run", name, "serial.sock")
        guest_run(console, "echo handed-back > /marker")
        before = pci_functions(console)
        target = ScratchKvm()

        info = source.MigrationInfo(inst)
        target.AcceptInstance(inst, info, "127.0.0.1")
        source.MigrateInstance("cluster.example.com", inst, "127.0.0.1", True)
        self.assertEqual(source.GetMigrationStatus(inst).status,
                         constants.HV_MIGRATION_COMPLETED)
        target.FinalizeMigrationDst(inst, info, True)
        source.FinalizeMigrationSource(inst, True, True)

        self.assertIsNone(agent_has(SOURCE, name), "the agent let go")
        self.assertIn(name, target.ListInstances())
        ganeti_console = os.path.join(GANETI_DIR, "ctrl", name + ".serial")
        self.assertIn("handed-back", guest_run(ganeti_console, "cat /marker"))
        self.assertEqual(pci_functions(ganeti_console), before)
        with open(os.path.join(GANETI_DIR, "pid", name)) as f:
            pid = int(f.read())
        target.StopInstance(inst, force=True)
        self.assertTrue(exits(pid))

    def test_what_cant_be_taken_over_is_left_alone(self):
        name = "refused.example.com"
        inst, pid = self.start_under_ganeti(name, UUIDS[1], "52:54:00:6b:00:03")
        before = pci_functions(os.path.join(GANETI_DIR, "ctrl", name + ".serial"))
        conf = os.path.join(GANETI_DIR, "conf", name + ".runtime")
        pidfile = os.path.join(GANETI_DIR, "pid", name)
        with open(conf) as f:
            good = f.read()

        def refused(reason_part):
            answer = adopt(name)[name]
            self.assertEqual(answer.outcome, Outcome.GANETI_ADOPTION_OUTCOME_REFUSED)
            self.assertIn(reason_part, answer.reason)
            self.assertIsNone(agent_has(SOURCE, name), "nothing is recorded")
            os.kill(pid, 0)  # and the QEMU runs on
            return answer

        # A file Ganeti is still writing.
        with open(conf, "w") as f:
            f.write(good[:len(good) // 2])
        refused("not complete JSON")

        # A file from before Ganeti 2.16, whose ids aren't this QEMU's.
        old = json.loads(good)
        for entry in old[1]:
            entry["pci"] = int(entry.pop("hvinfo")["addr"], 16)
        with open(conf, "w") as f:
            json.dump(old, f)
        refused("hotnic-")

        with open(conf, "w") as f:
            f.write(good)
        # A pid that is another process, and one that is gone.
        sleeper = subprocess.Popen(["sleep", "60"])
        with open(pidfile, "w") as f:
            f.write(str(sleeper.pid))
        refused("is not the QEMU of")
        sleeper.kill()
        sleeper.wait()
        refused("is not running")
        with open(pidfile, "w") as f:
            f.write(str(pid))

        # With its files right again, it is taken over.
        taken = adopt(name)[name]
        self.assertEqual(taken.outcome, Outcome.GANETI_ADOPTION_OUTCOME_ADOPTED, taken.reason)
        self.assertNotEqual(taken.instance.unconfined, "")
        # Its next soft reboot confines it.
        rebooted = agent(SOURCE, "reboot_instance", pb.RebootInstanceRequest(
            name=name, mode=pb.REBOOT_MODE_SOFT, force=True))
        self.assertTrue(exits(pid), "the agent ends a QEMU it took over")
        self.assertNotEqual(rebooted.pid, pid)
        self.assertEqual(rebooted.unconfined, "")
        self.assertEqual(unconfined_count(), 0)
        console = os.path.join(ENV["KVM_AGENT_TEST_STATE_DIR"], "run", name, "serial.sock")
        self.assertEqual(pci_functions(console), before, "the same hardware, confined")
        agent(SOURCE, "stop_instance", pb.StopInstanceRequest(name=name, force=True))


def open_files(pid):
    files = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            files.add(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            pass
    return files


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unconfined_count():
    """The source agent's kvm_agent_unconfined_instances gauge."""
    url = "http://%s/metrics" % ENV["KVM_AGENT_TEST_METRICS"]
    with urllib.request.urlopen(url, timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("kvm_agent_unconfined_instances "):
                return float(line.split()[1])
    return None


def exits(pid, timeout=15):
    """Whether `pid` is gone (or a zombie, which init reaps late) in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def agent_has(socket_path, name):
    try:
        return agent(socket_path, "get_instance", pb.GetInstanceRequest(name=name), timeout=10)
    except kac.NotFound:
        return None


def start_for_the_suite(name, uuid, mac):
    """Starts an instance under Ganeti's driver and prints its QEMU's pid,
    for the part of the suite that restarts an agent."""
    inst, block_devices = ganeti_instance(name, uuid, mac)
    ScratchKvm().StartInstance(inst, block_devices, False)
    with open(os.path.join(GANETI_DIR, "pid", name)) as f:
        print(int(f.read()))


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["start"]:
        start_for_the_suite(*sys.argv[2:5])
    else:
        unittest.main()
