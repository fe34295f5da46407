"""Channels to the agent, the client, and the agent's errors as exceptions."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Union

import grpc

from ._stubs.kvmagent.v1 import agent_pb2_grpc

DEFAULT_SOCKET = "/var/lib/kvm-agent/agent.sock"

# grpcio 1.57 and later send the percent-encoded socket path as the HTTP/2
# :authority of a unix: target. That is not a valid authority, and the
# agent's HTTP/2 layer rejects such a call with PROTOCOL_ERROR, so every
# unix channel names an authority of its own.
UNIX_AUTHORITY = "localhost"


def unix_channel(path: Union[str, Path] = DEFAULT_SOCKET) -> grpc.Channel:
    """A channel to the agent's unix socket."""
    return grpc.insecure_channel(
        f"unix://{Path(path).absolute()}",
        options=[("grpc.default_authority", UNIX_AUTHORITY)],
    )


def tls_channel(
    target: str,
    cert: Union[str, Path],
    key: Union[str, Path],
    ca: Union[str, Path],
    server_name: Optional[str] = None,
) -> grpc.Channel:
    """A channel to ``HOST:PORT`` with mutual TLS: this client's certificate
    and key, and the cluster's CA that signed the agent's certificate."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes(),
        certificate_chain=Path(cert).read_bytes(),
    )
    options = []
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, credentials, options=options)


class AgentError(Exception):
    """A call the agent refused or couldn't complete.

    ``code`` is the gRPC status code; ``message`` is the agent's message,
    which ends with what to do next.
    """

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Cancelled(AgentError):
    code = grpc.StatusCode.CANCELLED


class InvalidArgument(AgentError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(AgentError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(AgentError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AgentError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(AgentError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(AgentError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(AgentError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(AgentError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(AgentError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(AgentError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(AgentError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(AgentError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE = {
    cls.code: cls
    for cls in [
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        Unauthenticated,
    ]
}


def error_from(rpc_error: grpc.RpcError) -> AgentError:
    """The typed exception for a failed call."""
    code = rpc_error.code()
    cls = _BY_CODE.get(code, AgentError)
    return cls(rpc_error.details() or "", code)


def _typed(method):
    """Wraps a stub method so failures raise typed errors, for unary
    replies and for each item of a streamed one."""

    @functools.wraps(method)
    def call(*args, **kwargs):
        try:
            reply = method(*args, **kwargs)
        except grpc.RpcError as e:
            raise error_from(e) from None
        if isinstance(reply, grpc.Future) and hasattr(reply, "__iter__"):
            return TypedStream(reply)
        return reply

    return call


class TypedStream:
    """A streamed reply (WatchEvents, MigrateInstance) whose failures raise
    typed errors. ``cancel()`` ends it from the client's side."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> "TypedStream":
        return self

    def __next__(self):
        try:
            return next(self._call)
        except grpc.RpcError as e:
            raise error_from(e) from None

    def cancel(self) -> bool:
        return self._call.cancel()


class Client:
    """The agent's API. Each ``NodeAgent`` method is an attribute named in
    snake case (``start_instance``, ``watch_events``, ...) that takes the
    request message, plus gRPC's ``timeout=`` and ``metadata=``."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.stub = agent_pb2_grpc.NodeAgentStub(channel)

    @classmethod
    def unix(cls, path: Union[str, Path] = DEFAULT_SOCKET) -> "Client":
        return cls(unix_channel(path))

    @classmethod
    def tls(cls, target: str, cert, key, ca, server_name=None) -> "Client":
        return cls(tls_channel(target, cert, key, ca, server_name))

    def __getattr__(self, name: str):
        rpc = "".join(part.capitalize() for part in name.split("_"))
        method = getattr(self.stub, rpc, None)
        if name.startswith("_") or method is None:
            raise AttributeError(f"the agent has no method {name} ({rpc})")
        return _typed(method)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
