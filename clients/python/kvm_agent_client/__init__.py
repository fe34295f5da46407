"""Python client of the kvm-agent node agent.

Connect over the agent's unix socket or over TCP with mutual TLS, then call
any method of ``kvmagent.v1.NodeAgent`` by its Python name::

    from kvm_agent_client import Client, pb

    client = Client.unix()  # /var/lib/kvm-agent/agent.sock
    info = client.get_instance(pb.GetInstanceRequest(name="web1"))

A refusal from the agent raises a subclass of :class:`AgentError` named
after its gRPC code (:class:`NotFound`, :class:`InvalidArgument`, ...).
"""

from .client import (
    DEFAULT_SOCKET,
    AgentError,
    AlreadyExists,
    Cancelled,
    Client,
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
    tls_channel,
    unix_channel,
)
from ._stubs.kvmagent.v1 import agent_pb2 as pb

__all__ = [
    "DEFAULT_SOCKET",
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
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "pb",
    "tls_channel",
    "unix_channel",
]
