"""Ganeti's hypervisor registry, with its "kvm" run through kvm-agent.

Installed as ganeti/hypervisor/__init__.py after dpkg-divert has moved
Ganeti's own file to __init__.py.distrib (see README.md), so that an
upgrade of Ganeti updates that file and leaves this one: the node can't
silently fall back to Ganeti's KVM driver. It runs Ganeti's module as it
is, then registers the class.

The client and the class live in a directory of their own, put first on
the path of Ganeti's processes only: the grpcio and protobuf they need
(newer than Debian 12's) never shadow the distribution's modules for
anything else on the node.
"""

import os
import sys

_ORIGINAL = __file__ + ".distrib"
with open(_ORIGINAL) as _source:
    exec(compile(_source.read(), _ORIGINAL, "exec"))

_KVM_AGENT_PYTHON = os.environ.get("KVM_AGENT_PYTHONPATH", "/usr/local/lib/kvm-agent/python")
if os.path.isdir(_KVM_AGENT_PYTHON) and _KVM_AGENT_PYTHON not in sys.path:
    sys.path.insert(0, _KVM_AGENT_PYTHON)

import kvm_agent_ganeti  # noqa: E402  (after Ganeti's module, which it extends)

kvm_agent_ganeti.register()
