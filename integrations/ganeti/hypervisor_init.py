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

# The package's directory, or a hand-made one (README.md's step 2).
for _path in [os.environ.get("KVM_AGENT_PYTHONPATH", ""), "/usr/lib/kvm-agent/python",
              "/usr/local/lib/kvm-agent/python"]:
    if _path and os.path.isdir(_path):
        if _path not in sys.path:
            sys.path.insert(0, _path)
        break

import kvm_agent_ganeti  # noqa: E402  (after Ganeti's module, which it extends)

kvm_agent_ganeti.register()
