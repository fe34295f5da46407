"""Python client of the kvm-agent node agent.

Connect over the agent's unix socket, over TCP with mutual TLS, or as the
command line is configured (``Client.from_env()``), then call any method
of ``kvmagent.v1.NodeAgent`` by its Python name, with its request's fields
as keyword arguments::

    from kvm_agent_client import Client, pb

    with Client.unix() as client:  # /var/lib/kvm-agent/agent.sock
        info = client.get_instance(name="web1")

``help(client.get_instance)`` documents a method. A refusal from the agent
raises a subclass of :class:`AgentError` (a :class:`grpc.RpcError`) named
after its gRPC code (:class:`NotFound`, :class:`InvalidArgument`, ...).
The asyncio client is :class:`kvm_agent_client.aio.AsyncClient`.
"""

from ._stubs.kvmagent.v1 import agent_pb2 as pb
from .client import (
    DEFAULT_SOCKET,
    Address,
    Client,
    Settings,
    tls_channel,
    unix_channel,
)
from .errors import (
    Aborted,
    AgentError,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    error_from,
)

try:
    from importlib.metadata import version as _version

    __version__ = _version("kvm-agent-client")
except Exception:  # not installed (run from a source tree)
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_SOCKET",
    "Aborted",
    "Address",
    "AgentError",
    "AlreadyExists",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Settings",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_from",
    "pb",
    "tls_channel",
    "unix_channel",
]
