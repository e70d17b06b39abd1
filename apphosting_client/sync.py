"""The blocking client: the async client's methods, run on an event loop in a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from apphosting.v1 import api_keys_pb2
from apphosting.v1 import deployments_pb2 as pb
from apphosting_client.client import AsyncClient
from apphosting_client.config import ClientConfig

P = ParamSpec("P")
T = TypeVar("T")


class _Loop:
    """An event loop running in a daemon thread, for code that has none (or must not block its own)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="apphosting-client", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted (Ctrl-C) while waiting: the call must not go on in the background.
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _Blocking(Generic[P, T]):
    """A method of AsyncClient, blocking: same parameters, the awaited result."""

    def __init__(self, method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]) -> None:
        self._method = method
        self.__doc__ = method.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, client: None, owner: type) -> _Blocking[P, T]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, T]: ...
    def __get__(self, client: Client | None, owner: type) -> _Blocking[P, T] | Callable[P, T]:
        if client is None:
            return self
        method = self._method

        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            return client._loop.run(method(client._async, *args, **kwargs))

        call.__name__ = self._name
        call.__doc__ = self.__doc__
        return call


class _Iterating(Generic[P, T]):
    """An async-generator method of AsyncClient as a blocking iterator."""

    def __init__(self, method: Callable[Concatenate[AsyncClient, P], AsyncIterator[T]]) -> None:
        self._method = method
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, client: None, owner: type) -> _Iterating[P, T]: ...
    @overload
    def __get__(self, client: Client, owner: type) -> Callable[P, Stream[T]]: ...
    def __get__(self, client: Client | None, owner: type) -> _Iterating[P, T] | Callable[P, Stream[T]]:
        if client is None:
            return self
        method = self._method

        def call(*args: P.args, **kwargs: P.kwargs) -> Stream[T]:
            return Stream(client._loop, method(client._async, *args, **kwargs))

        call.__doc__ = self.__doc__
        return call


class Stream(Iterator[T]):
    """The items of an async iterator, each waited for in the client's loop; close() (or leaving a
    `with` block) ends the stream on the server too."""

    def __init__(self, loop: _Loop, source: AsyncIterator[T]) -> None:
        self._loop = loop
        self._source = source
        self._closed = False

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        try:
            return self._loop.run(_next(self._source))
        except StopAsyncIteration:
            self._closed = True
            raise StopIteration from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                self._loop.run(aclose())

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


async def _next(source: AsyncIterator[T]) -> T:
    return await anext(source)


class Client:
    """The blocking client: every method of AsyncClient with the same parameters, returning the
    result instead of a coroutine, and watch / list_all as iterators. Use as `with Client() as client:`.
    Calls from several threads are served one loop; each waits only for its own."""

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        attempts: int = 5,
        backoff: float = 0.2,
        retry_for: float = 60.0,
    ) -> None:
        self._loop = _Loop()

        # The gRPC channel belongs to the loop it is made in: make it there.
        async def make() -> AsyncClient:
            return AsyncClient(config, attempts=attempts, backoff=backoff, retry_for=retry_for)

        try:
            self._async = self._loop.run(make())
        except BaseException:
            self._loop.stop()
            raise
        self.config = self._async.config
        self.stub = self._async.stub

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._async.close())
        finally:
            self._loop.stop()

    create = _Blocking(AsyncClient.create)
    get = _Blocking(AsyncClient.get)
    list = _Blocking(AsyncClient.list)
    delete = _Blocking(AsyncClient.delete)
    retry = _Blocking(AsyncClient.retry)
    update = _Blocking(AsyncClient.update)
    scale = _Blocking(AsyncClient.scale)
    stop = _Blocking(AsyncClient.stop)
    start = _Blocking(AsyncClient.start)
    rollback = _Blocking(AsyncClient.rollback)
    promote = _Blocking(AsyncClient.promote)
    adopt = _Blocking(AsyncClient.adopt)
    releases = _Blocking(AsyncClient.releases)
    preview_image_update = _Blocking(AsyncClient.preview_image_update)
    watch = _Iterating(AsyncClient.watch)
    create_api_key = _Blocking(AsyncClient.create_api_key)
    list_api_keys = _Blocking(AsyncClient.list_api_keys)
    revoke_api_key = _Blocking(AsyncClient.revoke_api_key)

    def list_all(self, **filters: Any) -> Stream[pb.Deployment]:
        """Every deployment matching the filters of list, page after page."""
        return Stream(self._loop, self._async.list_all(**filters))

    def list_all_api_keys(self) -> Stream[api_keys_pb2.ApiKey]:
        """Every API key of the caller, page after page."""
        return Stream(self._loop, self._async.list_all_api_keys())
