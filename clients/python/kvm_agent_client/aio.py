"""The asyncio client: the same methods, awaited, with the same typed
errors::

    from kvm_agent_client.aio import AsyncClient

    async with AsyncClient.unix() as client:
        info = await client.get_instance(name="web1")
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Mapping, Optional

import grpc
import grpc.aio

from ._api import AsyncMethods
from ._stubs.kvmagent.v1 import agent_pb2 as pb
from .client import (
    DEFAULT_SOCKET,
    POLL_SECONDS,
    Address,
    PathLike,
    Settings,
    _not_reached,
    _tls_credentials,
    _tls_options,
    _unix_options,
    _wanted,
)


class AsyncClient(AsyncMethods):
    """The agent's API over a ``grpc.aio`` channel: each method as on
    :class:`kvm_agent_client.Client`, awaited; streams are iterated with
    ``async for`` and ended with ``async with`` or ``cancel()``."""

    def __init__(self, channel: grpc.aio.Channel, target: str = "") -> None:
        self.channel = channel
        self.target = target

    @classmethod
    def unix(cls, path: PathLike = DEFAULT_SOCKET) -> "AsyncClient":
        address = Address("unix", os.fspath(path))
        channel = grpc.aio.insecure_channel(address.grpc_target(), options=_unix_options())
        return cls(channel, str(address))

    @classmethod
    def tls(
        cls,
        address: str,
        cert: PathLike,
        key: PathLike,
        ca: PathLike,
        server_name: Optional[str] = None,
    ) -> "AsyncClient":
        parsed = Address.parse(address)
        if parsed.kind != "https":
            raise ValueError(f"{address!r} is not an https://host:port address; mutual TLS needs one")
        channel = grpc.aio.secure_channel(
            parsed.target, _tls_credentials(cert, key, ca), options=_tls_options(server_name)
        )
        return cls(channel, str(parsed))

    @classmethod
    def connect(
        cls,
        address: str,
        cert: Optional[PathLike] = None,
        key: Optional[PathLike] = None,
        ca: Optional[PathLike] = None,
    ) -> "AsyncClient":
        """As :meth:`kvm_agent_client.Client.connect`."""
        parsed = Address.parse(address)
        if parsed.kind == "unix":
            return cls.unix(parsed.target)
        if parsed.kind == "http":
            return cls(grpc.aio.insecure_channel(parsed.target), str(parsed))
        if cert is None or key is None or ca is None:
            raise ValueError(f"{address} needs mutual TLS: give cert, key and ca")
        return cls.tls(address, cert, key, ca)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "AsyncClient":
        """As :meth:`kvm_agent_client.Client.from_env`."""
        s = Settings.from_env(environ)
        return cls.connect(str(s.address), s.cert, s.key, s.ca)

    async def wait_for_state(
        self, name: str, *states: int, timeout: float = 60.0
    ) -> pb.InstanceInfo:
        """As :meth:`kvm_agent_client.Client.wait_for_state`, awaited."""
        wanted = _wanted(states)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            info = await self.get_instance(name=name, timeout=max(left, 1.0))
            if info.state in wanted:
                return info
            if left <= 0:
                raise _not_reached(name, wanted, info, timeout)
            await asyncio.sleep(min(POLL_SECONDS, max(left, 0.0)))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
