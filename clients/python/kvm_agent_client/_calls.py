"""How a method of the agent is called: the request checked and built, the
call made, its failure turned into a typed error. The methods themselves
(``_api``) are generated from the proto and name only their types here.
"""

from __future__ import annotations

import asyncio
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Generic,
    Iterator,
    Optional,
    Tuple,
    Type,
    TypeVar,
)

import grpc
import grpc.aio
from google.protobuf.message import Message

from .errors import AgentError, error_from

Response = TypeVar("Response")


def build_request(method: str, request_type: Type[Message], request: Any, fields: Dict[str, Any]) -> Message:
    """The request to send: ``request`` if it is one of ``request_type``,
    else one made of ``fields``. Anything else is refused here, before a
    byte is sent, with what to pass instead."""
    wanted = request_type.__name__
    if request is not None:
        if fields:
            raise TypeError(
                f"{method}() takes a {wanted} or keyword arguments, not both "
                f"(got a request and {', '.join(sorted(fields))})"
            )
        if isinstance(request, request_type):
            return request
        if isinstance(request, dict):
            raise TypeError(
                f"{method}() takes a {wanted}, not a dict: pass its fields as keyword "
                f"arguments, {method}(**fields), or as pb.{wanted}(**fields)"
            )
        raise TypeError(f"{method}() takes a {wanted}, not a {type(request).__name__}")
    known = [f.name for f in request_type.DESCRIPTOR.fields]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise TypeError(
            f"{method}() got unknown keyword arguments {', '.join(unknown)}; "
            f"the fields of {wanted} are: {', '.join(known) or 'none'}"
        )
    try:
        return request_type(**fields)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{method}(): {e}") from None


class MethodTable:
    """The base of a client: where the generated methods find the channel
    and the address they call."""

    channel: Any
    target: str

    def _method(self, cls: Type[Any]) -> Any:
        cache = self.__dict__.setdefault("_methods", {})
        if cls not in cache:
            cache[cls] = cls(self)
        return cache[cls]


class _Method:
    request_type: Type[Message]
    response_type: Type[Message]
    path: str
    python_name: str

    def __init__(self, client: MethodTable) -> None:
        self._target = client.target
        self._callable = self._multicallable(client.channel)

    def _multicallable(self, channel: Any) -> Any:
        raise NotImplementedError

    def _prepare(self, request: Any, fields: Dict[str, Any]) -> Message:
        return build_request(self.python_name, self.request_type, request, fields)

    def __repr__(self) -> str:
        return f"<kvm-agent method {self.python_name} ({self.path})>"


def _call_options(fields: Dict[str, Any]) -> Dict[str, Any]:
    return {k: fields.pop(k) for k in ("timeout", "metadata", "wait_for_ready") if k in fields}


class UnaryFuture(Generic[Response]):
    """A call under way (``method.future(...)``): ``result()`` returns its
    answer or raises its typed error."""

    def __init__(self, future: Any, target: str) -> None:
        self._future = future
        self._target = target

    def result(self, timeout: Optional[float] = None) -> Response:
        try:
            result: Response = self._future.result(timeout=timeout)
            return result
        except grpc.RpcError as e:
            raise error_from(e, self._target) from e

    def exception(self, timeout: Optional[float] = None) -> Optional[AgentError]:
        error = self._future.exception(timeout=timeout)
        return None if error is None else error_from(error, self._target)

    def done(self) -> bool:
        return bool(self._future.done())

    def cancel(self) -> bool:
        return bool(self._future.cancel())

    def add_done_callback(self, callback: Callable[["UnaryFuture[Response]"], None]) -> None:
        self._future.add_done_callback(lambda _: callback(self))


class Unary(_Method):
    """A method with one answer. Call it, or use ``with_call`` (the answer
    and gRPC's call, for its metadata) or ``future``."""

    def _multicallable(self, channel: Any) -> Any:
        return channel.unary_unary(
            self.path,
            request_serializer=self.request_type.SerializeToString,
            response_deserializer=self.response_type.FromString,
        )

    def __call__(self, request: Any = None, /, **fields: Any) -> Any:
        options = _call_options(fields)
        message = self._prepare(request, fields)
        try:
            return self._callable(message, **options)
        except grpc.RpcError as e:
            raise error_from(e, self._target) from e

    def with_call(self, request: Any = None, /, **fields: Any) -> Tuple[Any, grpc.Call]:
        options = _call_options(fields)
        message = self._prepare(request, fields)
        try:
            return tuple(self._callable.with_call(message, **options))  # type: ignore[return-value]
        except grpc.RpcError as e:
            raise error_from(e, self._target) from e

    def future(self, request: Any = None, /, **fields: Any) -> UnaryFuture[Any]:
        options = _call_options(fields)
        message = self._prepare(request, fields)
        return UnaryFuture(self._callable.future(message, **options), self._target)


class ResponseStream(Generic[Response]):
    """A streamed answer (WatchEvents, MigrateInstance). Iterate it; its
    failures raise typed errors. ``cancel()``, or leaving its ``with``
    block, ends it from this side, and iteration then just stops.
    ``code()`` and ``details()`` say how it ended (they wait for the end).
    """

    def __init__(self, call: Any, target: str) -> None:
        self._call = call
        self._target = target
        self._cancelled = False

    def __iter__(self) -> Iterator[Response]:
        return self

    def __next__(self) -> Response:
        try:
            item: Response = next(self._call)
            return item
        except grpc.RpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise error_from(e, self._target) from e

    def cancel(self) -> bool:
        self._cancelled = True
        return bool(self._call.cancel())

    def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self._call.code()
        return code

    def details(self) -> str:
        return str(self._call.details() or "")

    def __enter__(self) -> "ResponseStream[Response]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Stream(_Method):
    """A method with a streamed answer; calling it returns a
    :class:`ResponseStream`."""

    def _multicallable(self, channel: Any) -> Any:
        return channel.unary_stream(
            self.path,
            request_serializer=self.request_type.SerializeToString,
            response_deserializer=self.response_type.FromString,
        )

    def __call__(self, request: Any = None, /, **fields: Any) -> ResponseStream[Any]:
        options = _call_options(fields)
        message = self._prepare(request, fields)
        return ResponseStream(self._callable(message, **options), self._target)


class AsyncUnary(Unary):
    """A method with one answer, awaited."""

    async def __call__(self, request: Any = None, /, **fields: Any) -> Any:  # type: ignore[override]
        options = _call_options(fields)
        message = self._prepare(request, fields)
        try:
            return await self._callable(message, **options)
        except grpc.RpcError as e:  # grpc.aio.AioRpcError is one
            raise error_from(e, self._target) from e


class AsyncResponseStream(Generic[Response]):
    """A streamed answer for ``async for``, and ``async with`` to end it.
    As :class:`ResponseStream`, a local ``cancel()`` ends iteration
    quietly; ``await code()`` and ``await details()`` say how it ended."""

    def __init__(self, call: Any, target: str) -> None:
        self._call = call
        self._target = target
        self._cancelled = False
        self._items: Optional[AsyncIterator[Response]] = None

    def __aiter__(self) -> AsyncIterator[Response]:
        return self

    async def __anext__(self) -> Response:
        if self._items is None:
            self._items = self._call.__aiter__()
        try:
            return await self._items.__anext__()
        except asyncio.CancelledError:
            if self._cancelled:
                raise StopAsyncIteration from None
            raise
        except grpc.RpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                raise StopAsyncIteration from None
            raise error_from(e, self._target) from e

    def cancel(self) -> bool:
        self._cancelled = True
        return bool(self._call.cancel())

    async def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = await self._call.code()
        return code

    async def details(self) -> str:
        return str(await self._call.details() or "")

    async def __aenter__(self) -> "AsyncResponseStream[Response]":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncStream(Stream):
    """A method with a streamed answer, for asyncio."""

    def __call__(self, request: Any = None, /, **fields: Any) -> AsyncResponseStream[Any]:  # type: ignore[override]
        options = _call_options(fields)
        message = self._prepare(request, fields)
        return AsyncResponseStream(self._callable(message, **options), self._target)
