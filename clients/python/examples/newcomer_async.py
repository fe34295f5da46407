"""newcomer.py's twin on the asyncio client.

    python3 newcomer_async.py NAME [UUID]
"""

import asyncio
import sys

from kvm_agent_client import pb
from kvm_agent_client.aio import AsyncClient


async def main(name: str, uuid: str = "") -> None:
    async with AsyncClient.from_env() as client:
        for info in (await client.list_instances(timeout=10)).instances:
            print(info.name, pb.InstanceState.Name(info.state))

        spec = pb.InstanceSpec(name=name, uuid=uuid, memory_mib=64)
        started = await client.start_instance(spec=spec, timeout=60)
        assert started.state == pb.INSTANCE_STATE_RUNNING, started
        assert started.vcpus == 1, started

        async with client.watch_events(name=name, after_sequence=0, timeout=10) as events:
            async for event in events:
                print(event.sequence, pb.EventKind.Name(event.kind))
                if event.state == pb.INSTANCE_STATE_RUNNING:
                    break

        await client.reboot_instance(name=name, mode=pb.REBOOT_MODE_SOFT, powerdown_timeout_ms=500, timeout=60)
        await client.wait_for_state(name, pb.INSTANCE_STATE_RUNNING, timeout=30)

        nic = pb.NicSpec(mac="52:54:00:12:34:57")
        added = await client.add_nic(name=name, nic=nic, timeout=30)
        print("added", added.device.name, "in slot", added.device.pci_slot)
        assert added.device.name == "nic0", added.device

        memory = await client.set_memory(name=name, memory_mib=48, timeout=30)
        assert memory.target_mib == 48, memory

        stopped = await client.stop_instance(name=name, powerdown_timeout_ms=500, timeout=60)
        print("stopped by", pb.StopMethod.Name(stopped.method))
        assert stopped.instance.state == pb.INSTANCE_STATE_STOPPED, stopped


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
