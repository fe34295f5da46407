"""A first script against the agent: list, start with the defaults, watch
the instance's events, reboot it (with a short powerdown timeout: this
guest ignores ACPI), add a NIC, set its memory and stop it.

    python3 newcomer.py NAME [UUID]

It calls the agent the command line is configured for (KVM_AGENT_SOCKET,
KVM_AGENT_ADDRESS, KVM_AGENT_TLS_*). The test suite runs it, and checks it
with mypy --strict.
"""

import sys

from kvm_agent_client import Client, pb


def main(name: str, uuid: str = "") -> None:
    with Client.from_env() as client:
        for info in client.list_instances(timeout=10).instances:
            print(info.name, pb.InstanceState.Name(info.state))

        spec = pb.InstanceSpec(name=name, uuid=uuid, memory_mib=64)
        started = client.start_instance(spec=spec, timeout=60)
        assert started.state == pb.INSTANCE_STATE_RUNNING, started
        assert started.vcpus == 1, started

        # The events so far, replayed; the stream ends when the block does.
        with client.watch_events(name=name, after_sequence=0, timeout=10) as events:
            for event in events:
                print(event.sequence, pb.EventKind.Name(event.kind))
                if event.state == pb.INSTANCE_STATE_RUNNING:
                    break

        client.reboot_instance(name=name, mode=pb.REBOOT_MODE_SOFT, powerdown_timeout_ms=500, timeout=60)
        client.wait_for_state(name, pb.INSTANCE_STATE_RUNNING, timeout=30)

        nic = pb.NicSpec(mac="52:54:00:12:34:56")
        added = client.add_nic(name=name, nic=nic, timeout=30)
        print("added", added.device.name, "in slot", added.device.pci_slot)
        assert added.device.name == "nic0", added.device

        memory = client.set_memory(name=name, memory_mib=48, timeout=30)
        assert memory.target_mib == 48, memory

        stopped = client.stop_instance(name=name, powerdown_timeout_ms=500, timeout=60)
        print("stopped by", pb.StopMethod.Name(stopped.method))
        assert stopped.instance.state == pb.INSTANCE_STATE_STOPPED, stopped


if __name__ == "__main__":
    main(*sys.argv[1:])
