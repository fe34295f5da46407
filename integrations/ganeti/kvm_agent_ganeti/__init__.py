"""Ganeti integration of kvm-agent: a hypervisor class for Ganeti 3.0 that
runs instances through the node's kvm-agent."""

from .hypervisor import KvmAgentHypervisor, check_supported, instance_spec


def register():
    """Makes Ganeti's "kvm" hypervisor this class, in this process.

    Called at the end of ganeti/hypervisor/__init__.py on every node (see
    README.md): the master checks parameters with it and the node daemon
    runs instances with it.
    """
    from ganeti import constants
    from ganeti import hypervisor

    hypervisor._HYPERVISOR_MAP[constants.HT_KVM] = KvmAgentHypervisor


__all__ = ["KvmAgentHypervisor", "check_supported", "instance_spec", "register"]
