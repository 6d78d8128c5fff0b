"""
The ``cohortsync[httpx]`` transports: the webhook destinations over httpx.

:class:`HttpxTransport` (blocking, for :class:`WebhookDestination`) and
:class:`AsyncHttpxTransport` (for :class:`AsyncWebhookDestination`) keep the
contract of :class:`UrllibTransport`: every HTTP answer is returned, whatever
its status; no answer (refused, reset, timed out) is a
:class:`~cohortsync.exceptions.TransientError`; redirects are never followed
(they would replay credentials elsewhere); only http and https URLs are
opened.

httpx logs each request's URL at INFO on the ``httpx`` logger, query string
included: while one of these transports posts, a filter on that logger shows
the URL without its query string and credentials, as the destinations do.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING

import attrs
from typing_extensions import Self

try:
    import httpx
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "cohortsync.destinations.HttpxTransport and AsyncHttpxTransport need httpx, "
        'which is not installed: pip install "cohortsync[httpx]"'
    ) from exc

from cohortsync.destinations._webhook import (
    HttpResponse,
    _describe,
    require_http,
    safe_url,
)
from cohortsync.exceptions import ConfigurationError, PermanentError, TransientError

if TYPE_CHECKING:
    import asyncio

__all__ = ["AsyncHttpxTransport", "HttpxTransport"]

TIMEOUT = httpx.Timeout(10.0)
"""A client's timeout for requests that give none; every post gives its own."""

LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
"""
The pool of a client the transport makes: at most 100 connections open (a
webhook's runs keep ``max_parallel`` requests each in flight, and an
asynchronous scheduler runs up to ``max_concurrent_runs`` at once), 20 kept
alive between batches, for 5 s.
"""

_POSTING: ContextVar[bool] = ContextVar("cohortsync_httpx_posting", default=False)


class _HideUrlSecrets(logging.Filter):
    """
    On the ``httpx`` logger: while one of our transports posts (in this
    thread or task), log each URL without its query string or userinfo.
    Other requests of the process are left alone.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if _POSTING.get() and isinstance(record.args, tuple):
            record.args = tuple(
                safe_url(str(arg)) if isinstance(arg, httpx.URL) else arg for arg in record.args
            )
        return True


logging.getLogger("httpx").addFilter(_HideUrlSecrets())


@contextmanager
def _posting(url: str) -> Iterator[None]:
    """
    Map httpx's failures to what the webhook destinations expect, and keep
    the URL's secrets out of httpx's log lines.

    Raises:
        ConfigurationError: The URL is not one httpx can send to.
        TransientError: No answer came (refused, reset, timed out).
    """
    token = _POSTING.set(True)
    try:
        yield
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
        raise ConfigurationError("url", safe_url(url), f"cannot be sent to: {e}") from None
    except httpx.TimeoutException as e:
        raise TransientError(f"POST to {safe_url(url)} failed: timed out") from e
    except httpx.RequestError as e:  # connect, read, write, protocol and decoding errors
        raise TransientError(f"POST to {safe_url(url)} failed: {_describe(e)}") from e
    finally:
        _POSTING.reset(token)


def _response(response: httpx.Response) -> HttpResponse:
    return HttpResponse(response.status_code, dict(response.headers.items()), response.content)


def _closed(url: str) -> PermanentError:
    return PermanentError(f"POST to {safe_url(url)} not sent: the transport's client is closed")


class HttpxTransport:
    """
    A blocking transport over :class:`httpx.Client`, for
    :class:`WebhookDestination`: a connection pool (HTTP keep-alive across
    batches and runs), and the host's own client if it has one (proxies,
    mTLS, event hooks).

    Each post carries the destination's ``timeout`` (connect, read, write and
    waiting for a pooled connection alike) and never follows redirects,
    whatever the client's own settings.

    Args:
        client: The host's client, used as it is; the host closes it.
            Without one the transport makes its own (timeouts of 10 s, at
            most 100 connections, 20 kept alive, proxies from the
            environment) and closes it in :meth:`close` (also ``with``).

    Raises:
        ConfigurationError: *client* is not an :class:`httpx.Client`.
    """

    def __init__(self, client: httpx.Client | None = None) -> None:
        if client is not None and not isinstance(client, httpx.Client):
            raise ConfigurationError(
                "client",
                type(client).__name__,
                "must be an httpx.Client (an httpx.AsyncClient goes with AsyncHttpxTransport)",
            )
        self._owned = client is None
        self._client = (
            httpx.Client(timeout=TIMEOUT, limits=LIMITS, follow_redirects=False)
            if client is None
            else client
        )

    def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        """
        POST with httpx; 4xx and 5xx answers are returned, not raised, so the
        destination alone decides what each status means.

        Raises:
            ConfigurationError: The URL is not http or https.
            TransientError: No answer came (refused, reset, timed out).
            PermanentError: The client is closed.
        """
        require_http(url)
        if self._client.is_closed:
            raise _closed(url)
        with _posting(url):
            response = self._client.post(
                url, content=body, headers=dict(headers), timeout=timeout, follow_redirects=False
            )
        return _response(response)

    def close(self) -> None:
        """
        Close the client the transport made (a host's client is the host's
        to close). Safe to repeat.
        """
        if self._owned:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return "HttpxTransport()" if self._owned else "HttpxTransport(client=<host's>)"


async def _keep_open(client: httpx.AsyncClient) -> AsyncGenerator[None, None]:
    """
    Parked at its ``yield`` for as long as *client* is in use: the event
    loop finalises open async generators when it shuts down
    (``loop.shutdown_asyncgens()``, which ``asyncio.run`` and
    :meth:`Scheduler.close <cohortsync.Scheduler.close>` call), and that
    closes the client on its own loop, before the loop is gone.
    """
    try:
        yield
    finally:
        await client.aclose()


@attrs.frozen
class _LoopClient:
    client: httpx.AsyncClient
    keeper: AsyncGenerator[None, None]


class AsyncHttpxTransport:
    """
    An asynchronous transport over :class:`httpx.AsyncClient`, for
    :class:`AsyncWebhookDestination` (pass it as ``transport=``; the default is
    :class:`AsyncioTransport`), for proxies, HTTP/2 or a client of the host's:
    connections are pooled and requests awaited, so one event loop keeps
    many webhook requests in flight.

    Each post carries the destination's ``timeout`` and never follows
    redirects, whatever the client's own settings.

    An :class:`httpx.AsyncClient`'s connections belong to the event loop
    that opened them, and a destination may be used from more than one loop
    (an :class:`~cohortsync.AsyncScheduler` on the host's, a
    :class:`~cohortsync.Scheduler` on its own). So without a client of the
    host's, the transport makes one per loop, on first use there, and
    closes it when that loop shuts down (``asyncio.run`` and
    :meth:`Scheduler.close <cohortsync.Scheduler.close>` see to that) or on
    :meth:`aclose`.

    Args:
        client: The host's client, used as it is, on the loop it belongs
            to; the host closes it. Without one, clients are made as above
            (timeouts of 10 s, at most 100 connections, 20 kept alive,
            proxies from the environment).

    Raises:
        ConfigurationError: *client* is not an :class:`httpx.AsyncClient`.
    """

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        if client is not None and not isinstance(client, httpx.AsyncClient):
            raise ConfigurationError(
                "client",
                type(client).__name__,
                "must be an httpx.AsyncClient (an httpx.Client goes with HttpxTransport)",
            )
        self._client = client
        self._lock = threading.Lock()  # loops in several threads may share the transport
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        """
        POST with httpx; 4xx and 5xx answers are returned, not raised, so the
        destination alone decides what each status means.

        Raises:
            ConfigurationError: The URL is not http or https.
            TransientError: No answer came (refused, reset, timed out).
            PermanentError: The transport or the host's client is closed.
        """
        require_http(url)
        client = self._client if self._client is not None else await self._loop_client(url)
        if client.is_closed:
            raise _closed(url)
        with _posting(url):
            response = await client.post(
                url, content=body, headers=dict(headers), timeout=timeout, follow_redirects=False
            )
        return _response(response)

    async def _loop_client(self, url: str) -> httpx.AsyncClient:
        """The client this transport made for the running loop, made on first use."""
        import asyncio  # noqa: PLC0415 - already loaded: this runs on its event loop

        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise _closed(url)
            made = self._clients.get(loop)
            if made is not None and not made.client.is_closed:
                return made.client
            client = httpx.AsyncClient(timeout=TIMEOUT, limits=LIMITS, follow_redirects=False)
            made = self._clients[loop] = _LoopClient(client, _keep_open(client))
        # Runs to the keeper's yield at once, registering it with this loop.
        await anext(made.keeper)
        return client

    async def aclose(self) -> None:
        """
        Close the client the transport made for the running loop, and make
        no more (a host's client is the host's to close). A client made on
        another loop is closed when that loop shuts down. Safe to repeat.
        """
        import asyncio  # noqa: PLC0415 - see _loop_client

        with self._lock:
            self._closed = True
            made = self._clients.pop(asyncio.get_running_loop(), None)
        if made is not None:
            await made.keeper.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            "AsyncHttpxTransport()"
            if self._client is None
            else "AsyncHttpxTransport(client=<host's>)"
        )
