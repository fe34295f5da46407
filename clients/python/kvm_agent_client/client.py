"""Channels to the agent, and the synchronous client."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

import grpc

from ._api import Methods
from ._stubs.kvmagent.v1 import agent_pb2 as pb
from ._stubs.kvmagent.v1 import agent_pb2_grpc
from .errors import DeadlineExceeded

DEFAULT_SOCKET = "/var/lib/kvm-agent/agent.sock"

# grpcio 1.57 and later send the percent-encoded socket path as the HTTP/2
# :authority of a unix: target. That is not a valid authority, and the
# agent's HTTP/2 layer rejects such a call with PROTOCOL_ERROR, so every
# unix channel names an authority of its own.
UNIX_AUTHORITY = "localhost"

PathLike = Union[str, "os.PathLike[str]"]


class Address(NamedTuple):
    """An agent address as the command line takes it: ``kind`` is "unix"
    (``target`` is the socket path), "http" or "https" (``target`` is
    HOST:PORT)."""

    kind: str
    target: str

    @classmethod
    def parse(cls, text: str) -> "Address":
        """Reads ``unix:/path``, ``/path``, ``http://host:port``,
        ``https://host:port`` or a bare ``host:port`` (mutual TLS)."""
        if text.startswith("unix:"):
            path = "/" + text[len("unix:"):].lstrip("/")
            if path != "/":
                return cls("unix", path)
        elif text.startswith("/"):
            return cls("unix", text)
        else:
            for scheme in ("http", "https"):
                prefix = f"{scheme}://"
                if text.startswith(prefix) and len(text) > len(prefix):
                    return cls(scheme, text[len(prefix):].rstrip("/"))
            if ":" in text and "/" not in text:
                return cls("https", text)
        raise ValueError(
            f"agent address {text!r} is neither unix:/path/to/agent.sock nor https://host:port"
        )

    def grpc_target(self) -> str:
        return f"unix://{Path(self.target).absolute()}" if self.kind == "unix" else self.target

    def __str__(self) -> str:
        return f"unix:{self.target}" if self.kind == "unix" else f"{self.kind}://{self.target}"


def unix_channel(path: PathLike = DEFAULT_SOCKET) -> grpc.Channel:
    """A channel to the agent's unix socket."""
    return grpc.insecure_channel(Address("unix", os.fspath(path)).grpc_target(), options=_unix_options())


def _unix_options() -> List[Tuple[str, Any]]:
    return [("grpc.default_authority", UNIX_AUTHORITY)]


def _tls_credentials(cert: PathLike, key: PathLike, ca: PathLike) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes(),
        certificate_chain=Path(cert).read_bytes(),
    )


def _tls_options(server_name: Optional[str]) -> List[Tuple[str, Any]]:
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


def tls_channel(
    address: str,
    cert: PathLike,
    key: PathLike,
    ca: PathLike,
    server_name: Optional[str] = None,
) -> grpc.Channel:
    """A channel to ``https://HOST:PORT`` (or ``HOST:PORT``) with mutual
    TLS: this client's certificate and key, and the cluster's CA that
    signed the agent's certificate."""
    parsed = Address.parse(address)
    if parsed.kind != "https":
        raise ValueError(f"{address!r} is not an https://host:port address; mutual TLS needs one")
    return grpc.secure_channel(
        parsed.target, _tls_credentials(cert, key, ca), options=_tls_options(server_name)
    )


class Settings(NamedTuple):
    """Where to call the agent, read from the command line's variables."""

    address: Address
    cert: Optional[str]
    key: Optional[str]
    ca: Optional[str]

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        """KVM_AGENT_ADDRESS, else KVM_AGENT_SOCKET, else the default
        socket; KVM_AGENT_TLS_CERT, _KEY and _CA for an https address."""
        env = os.environ if environ is None else environ
        if env.get("KVM_AGENT_ADDRESS"):
            address = Address.parse(env["KVM_AGENT_ADDRESS"])
        else:
            address = Address("unix", env.get("KVM_AGENT_SOCKET") or DEFAULT_SOCKET)
        tls = [env.get(f"KVM_AGENT_TLS_{part}") or None for part in ("CERT", "KEY", "CA")]
        if any(tls) and not all(tls):
            raise ValueError(
                "mutual TLS needs all of KVM_AGENT_TLS_CERT, KVM_AGENT_TLS_KEY and KVM_AGENT_TLS_CA"
            )
        if address.kind == "https" and not all(tls):
            raise ValueError(
                f"{address} needs mutual TLS: set KVM_AGENT_TLS_CERT, KVM_AGENT_TLS_KEY and KVM_AGENT_TLS_CA"
            )
        return cls(address, *tls)


def _wanted(states: Iterable[int]) -> Tuple[int, ...]:
    wanted = tuple(states)
    if not wanted:
        raise TypeError("wait_for_state() needs at least one state, e.g. pb.INSTANCE_STATE_RUNNING")
    return wanted


def _not_reached(name: str, wanted: Tuple[int, ...], info: pb.InstanceInfo, timeout: float) -> DeadlineExceeded:
    names = " or ".join(pb.InstanceState.Name(s) for s in wanted)  # type: ignore[arg-type]
    now = pb.InstanceState.Name(info.state)
    return DeadlineExceeded(
        f"instance {name!r} is {now}, not {names}, after {timeout:g} s ({info.state_detail or 'no detail'})"
    )


# How often wait_for_state asks: quick enough for a start, light on the agent.
POLL_SECONDS = 0.2


class Client(Methods):
    """The agent's API: one method per RPC of ``kvmagent.v1.NodeAgent``,
    named in snake case (``start_instance``, ``watch_events``, ...). Each
    takes its request message or the request's fields as keyword
    arguments, plus gRPC's ``timeout=``, ``metadata=`` and
    ``wait_for_ready=``; unary ones also have ``.future()`` and
    ``.with_call()``. ``help(client.start_instance)`` documents one.

    A refusal raises a subclass of :class:`AgentError` named after its gRPC
    code. ``stub`` is the plain generated gRPC stub.
    """

    def __init__(self, channel: grpc.Channel, target: str = "") -> None:
        self.channel = channel
        self.target = target
        self.stub = agent_pb2_grpc.NodeAgentStub(channel)

    @classmethod
    def unix(cls, path: PathLike = DEFAULT_SOCKET) -> "Client":
        """A client of the agent on this node, over its unix socket."""
        return cls(unix_channel(path), str(Address("unix", os.fspath(path))))

    @classmethod
    def tls(
        cls,
        address: str,
        cert: PathLike,
        key: PathLike,
        ca: PathLike,
        server_name: Optional[str] = None,
    ) -> "Client":
        """A client over TCP with mutual TLS; ``address`` is
        ``https://HOST:PORT`` or ``HOST:PORT``."""
        return cls(tls_channel(address, cert, key, ca, server_name), str(Address.parse(address)))

    @classmethod
    def connect(
        cls,
        address: str,
        cert: Optional[PathLike] = None,
        key: Optional[PathLike] = None,
        ca: Optional[PathLike] = None,
    ) -> "Client":
        """A client of the agent at an address as the command line's
        ``--agent`` takes it: ``unix:/path``, ``/path``,
        ``http://127.0.0.1:PORT`` or ``https://HOST:PORT`` (then with
        ``cert``, ``key`` and ``ca``)."""
        parsed = Address.parse(address)
        if parsed.kind == "unix":
            return cls.unix(parsed.target)
        if parsed.kind == "http":
            return cls(grpc.insecure_channel(parsed.target), str(parsed))
        if cert is None or key is None or ca is None:
            raise ValueError(f"{address} needs mutual TLS: give cert, key and ca")
        return cls.tls(address, cert, key, ca)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Client":
        """A client configured as the command line is: KVM_AGENT_ADDRESS
        or KVM_AGENT_SOCKET, and KVM_AGENT_TLS_CERT, _KEY and _CA."""
        s = Settings.from_env(environ)
        return cls.connect(str(s.address), s.cert, s.key, s.ca)

    def wait_for_state(
        self, name: str, *states: int, timeout: float = 60.0
    ) -> pb.InstanceInfo:
        """Waits until instance ``name`` is in one of ``states``
        (``pb.INSTANCE_STATE_RUNNING``, ...) and returns it; raises
        :class:`DeadlineExceeded` after ``timeout`` seconds."""
        wanted = _wanted(states)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            info = self.get_instance(name=name, timeout=max(left, 1.0))
            if info.state in wanted:
                return info
            if left <= 0:
                raise _not_reached(name, wanted, info, timeout)
            time.sleep(min(POLL_SECONDS, max(left, 0.0)))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
