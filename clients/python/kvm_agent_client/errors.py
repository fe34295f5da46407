"""The agent's refusals as exceptions, one class per gRPC status code."""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

import grpc

REQUEST_ID_KEY = "x-request-id"


class AgentError(grpc.RpcError):
    """A call the agent refused or couldn't complete.

    A :class:`grpc.RpcError`, so code that catches gRPC's errors catches
    it too. ``code()`` and ``details()`` are as on gRPC's errors;
    ``message`` is the agent's message (it ends with what to do next), and
    ``request_id`` the agent's id of the operation, which its log lines
    carry. The original gRPC error is ``__cause__``.
    """

    grpc_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        code: Optional[grpc.StatusCode] = None,
        request_id: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        if code is not None:
            self.grpc_code = code

    def code(self) -> grpc.StatusCode:
        return self.grpc_code

    def details(self) -> str:
        return self.message

    def __str__(self) -> str:
        text = f"{self.grpc_code.name}: {self.message}"
        if self.request_id:
            text += f" [request {self.request_id}]"
        return text


class Cancelled(AgentError):
    grpc_code = grpc.StatusCode.CANCELLED


class InvalidArgument(AgentError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(AgentError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(AgentError):
    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AgentError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(AgentError, PermissionError):
    """Also a :class:`PermissionError`: the agent's socket is not this
    user's to use, for example."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(AgentError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(AgentError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(AgentError):
    grpc_code = grpc.StatusCode.ABORTED


class OutOfRange(AgentError):
    grpc_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(AgentError):
    grpc_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(AgentError):
    grpc_code = grpc.StatusCode.INTERNAL


class Unavailable(AgentError):
    grpc_code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(AgentError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: Dict[grpc.StatusCode, Type[AgentError]] = {
    cls.grpc_code: cls
    for cls in [
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        Unauthenticated,
    ]
}


def _request_id(rpc_error: grpc.RpcError) -> Optional[str]:
    # A refusal comes back trailers-only, so the id is in the trailers;
    # a stream that failed later has it in its headers.
    for getter in ("trailing_metadata", "initial_metadata"):
        try:
            metadata = getattr(rpc_error, getter)() or ()
        except Exception:  # not a call, or one that never started
            continue
        for key, value in metadata:
            if key == REQUEST_ID_KEY:
                return value if isinstance(value, str) else value.decode()
    return None


def _connection_problem(details: str, target: str) -> Optional[Tuple[Type[AgentError], str]]:
    """A failure to reach a unix socket, said as what it is."""
    if not target.startswith("unix:"):
        return None
    path = target[len("unix:"):].lstrip("/")
    path = "/" + path
    if "Permission denied" in details:
        return (
            PermissionDenied,
            f"no permission to connect to the agent's socket {path}: run as root, "
            "or as a user the socket's group lets in",
        )
    if "No such file or directory" in details:
        return (
            Unavailable,
            f"the agent's socket {path} does not exist: is the agent running, "
            "and is this its socket?",
        )
    if "Connection refused" in details:
        return (Unavailable, f"nothing accepts calls on {path}: is the agent running?")
    return None


def error_from(rpc_error: grpc.RpcError, target: str = "") -> AgentError:
    """The typed exception for a failed call to ``target``; raise it
    ``from`` the original."""
    code = rpc_error.code() if hasattr(rpc_error, "code") else grpc.StatusCode.UNKNOWN
    details = (rpc_error.details() if hasattr(rpc_error, "details") else "") or ""
    cls = _BY_CODE.get(code, AgentError)
    if code == grpc.StatusCode.UNAVAILABLE:
        better = _connection_problem(details, target)
        if better:
            cls, details = better
            code = cls.grpc_code
    return cls(details, code, _request_id(rpc_error))
