"""
:class:`AsyncioTransport`: the asynchronous webhook transport with no
dependency, HTTP/1.1 over :mod:`asyncio` streams.

It is to :class:`AsyncWebhookDestination` what :class:`UrllibTransport` is to
:class:`WebhookDestination`: the default, enough for posting JSON batches to a
webhook, and nothing more. It keeps connections alive between batches (per
event loop, per scheme, host and port), speaks TLS through :mod:`ssl`, reads
``Content-Length``, chunked and read-to-close bodies, decodes gzip and
deflate, and never follows redirects. It reads no proxy settings and speaks no
HTTP/2: a host that needs them passes :class:`AsyncHttpxTransport`.

Why not httpx by default: on a loop that keeps a hundred webhook requests in
flight, httpx, httpcore and anyio took about 1.2 ms of CPU a request here and
this transport about a tenth of that (``docs/performance.md``), and the core
keeps its three dependencies.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
import urllib.parse
import weakref
import zlib
from collections.abc import AsyncGenerator, Awaitable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import attrs
from typing_extensions import Self

from cohortsync import _validators as v
from cohortsync.destinations._webhook import HttpResponse, _describe, require_http, safe_url
from cohortsync.exceptions import ConfigurationError, TransientError

if TYPE_CHECKING:
    import ssl

__all__ = ["AsyncioTransport"]

MAX_BODY = 8 * 1024 * 1024
"""The longest answer body read, in bytes: a webhook's answer is small, and a
server that streams without end must not fill the worker's memory."""

_MAX_HEAD = 64 * 1024
"""The longest status line and headers together, in bytes (as the stream's limit)."""

_NO_BODY = frozenset({204, 304})
# Framing is the transport's: a caller's value for these would corrupt the stream.
_OURS = frozenset({"content-length", "transfer-encoding", "connection"})

_T = TypeVar("_T")

if sys.version_info >= (3, 11):

    async def _within(seconds: float, step: Awaitable[_T]) -> _T:
        async with asyncio.timeout(seconds):
            return await step

else:  # pragma: no cover - Python 3.10

    async def _within(seconds: float, step: Awaitable[_T]) -> _T:
        return await asyncio.wait_for(step, seconds)


class _BadAnswerError(Exception):
    """The server's bytes are not an HTTP/1.x answer."""


@attrs.define
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0
    reused: bool = False

    def usable(self, now: float, expiry: float) -> bool:
        """Still open, silent since it was returned and not idle too long."""
        return (
            now - self.idle_since < expiry
            and not self.reader.at_eof()
            and not self.writer.is_closing()
            # Bytes nobody asked for: the stream is out of step.
            and not self.reader._buffer  # type: ignore[attr-defined] # noqa: SLF001 - no public peek
        )

    def abort(self) -> None:
        self.writer.transport.abort()


@attrs.define
class _Pool:
    """
    One event loop's idle connections, by origin; used on that loop only.
    A timer closes those idle for *expiry* seconds (or closed by the
    server meanwhile) while the pool holds any.
    """

    loop: asyncio.AbstractEventLoop
    max_idle: int
    expiry: float
    idle: dict[tuple[str, str, int], list[_Connection]] = attrs.field(factory=dict)
    closed: bool = False
    timer: asyncio.TimerHandle | None = None
    # Held here so it lives as long as the pool: the loop keeps only a weak reference.
    keeper: AsyncGenerator[None, None] | None = None

    def take(self, origin: tuple[str, str, int], now: float) -> _Connection | None:
        waiting = self.idle.get(origin)
        while waiting:
            connection = waiting.pop()
            if connection.usable(now, self.expiry):
                connection.reused = True
                return connection
            connection.abort()
        return None

    def give(self, origin: tuple[str, str, int], connection: _Connection, now: float) -> None:
        waiting = self.idle.setdefault(origin, [])
        if self.closed or len(waiting) >= self.max_idle:
            connection.abort()
            return
        connection.idle_since = now
        waiting.append(connection)
        if self.timer is None:
            self.timer = self.loop.call_later(self.expiry, self.sweep)

    def sweep(self) -> None:
        """Close connections idle too long or closed by the server; come back for the rest."""
        self.timer = None
        now = self.loop.time()
        oldest = now
        for origin, waiting in list(self.idle.items()):
            kept = []
            for connection in waiting:
                if connection.usable(now, self.expiry):
                    kept.append(connection)
                    oldest = min(oldest, connection.idle_since)
                else:
                    connection.abort()
            if kept:
                self.idle[origin] = kept
            else:
                del self.idle[origin]
        if self.idle and not self.closed:
            self.timer = self.loop.call_later(oldest + self.expiry - now, self.sweep)

    async def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        connections = [c for waiting in self.idle.values() for c in waiting]
        self.idle.clear()
        for connection in connections:
            connection.writer.close()
        for connection in connections:
            await _closing(connection)


async def _closing(connection: _Connection) -> None:
    try:
        await _within(1.0, connection.writer.wait_closed())
    except (OSError, TimeoutError, asyncio.TimeoutError):
        connection.abort()


async def _keep_open(pool: _Pool) -> AsyncGenerator[None, None]:
    """
    Parked at its ``yield`` while *pool* is in use: the loop finalises open
    async generators when it shuts down (``asyncio.run``,
    :meth:`Scheduler.close <cohortsync.Scheduler.close>`), which closes the
    pool's connections on their own loop.
    """
    try:
        yield
    finally:
        await pool.close()


@attrs.frozen
class _Target:
    """Where a URL sends: the origin a connection serves and the request's head."""

    origin: tuple[str, str, int]
    host: str
    target: str

    @classmethod
    @functools.lru_cache(maxsize=256)  # a destination posts to one URL: parse it once
    def of(cls, url: str) -> _Target:
        """
        Raises:
            ConfigurationError: Not an http or https URL, or no host.
        """
        require_http(url)
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        hostname = parts.hostname
        if not hostname:
            raise ConfigurationError("url", safe_url(url), "has no host")
        default_port = 443 if scheme == "https" else 80
        port = parts.port or default_port
        shown = f"[{hostname}]" if ":" in hostname else hostname.encode("idna").decode("ascii")
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        if not target.isascii():
            target = urllib.parse.quote(target, safe="/%:@!$&'()*+,;=?-._~")
        host = shown if port == default_port else f"{shown}:{port}"
        return cls((scheme, hostname, port), host, target)


def _closed_unanswered(error: BaseException) -> bool:
    """Whether *error* says the server closed the connection before any byte of an answer."""
    if isinstance(error, asyncio.IncompleteReadError):
        return not error.partial
    return isinstance(error, ConnectionError)


def _head(target: _Target, body: bytes, headers: Mapping[str, str]) -> bytes:
    lines = [f"POST {target.target} HTTP/1.1"]
    names = {name.lower() for name in headers}
    if "host" not in names:
        lines.append(f"Host: {target.host}")
    if "user-agent" not in names:
        lines.append("User-Agent: cohortsync")
    lines.extend(f"{name}: {value}" for name, value in headers.items() if name.lower() not in _OURS)
    lines.append(f"Content-Length: {len(body)}")
    if "accept-encoding" not in names:
        lines.append("Accept-Encoding: gzip, deflate")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise _BadAnswerError(f"not an HTTP/1.x status line: {lines[0][:40]!r}")
    headers: dict[str, str] = {}
    seen: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not name:
            raise _BadAnswerError(f"malformed header line: {line[:40]!r}")
        value = value.strip()
        first = seen.setdefault(name.lower(), name)
        headers[first] = f"{headers[first]}, {value}" if first in headers else value
    return version, int(code), headers


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    size_read = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BadAnswerError("malformed chunk size") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, ignored
                pass
            return b"".join(parts)
        size_read += size
        if size_read > MAX_BODY:
            raise _BadAnswerError(f"answer body longer than {MAX_BODY} bytes")
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise _BadAnswerError("malformed chunk end")


def _inflate(body: bytes, wbits: int) -> bytes:
    """
    *body* decompressed, refused past :data:`MAX_BODY` as it is inflated: a
    few hundred kilobytes of gzip can hold gigabytes.
    """
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(body, MAX_BODY + 1)
    if len(out) > MAX_BODY or inflater.unconsumed_tail:
        raise _BadAnswerError(f"answer body longer than {MAX_BODY} bytes once decompressed")
    if not inflater.eof:
        raise zlib.error("incomplete or truncated stream")
    return out


def _decoded(body: bytes, encoding: str | None) -> bytes:
    if not encoding or not body:
        return body
    encoding = encoding.strip().lower()
    try:
        if encoding in {"gzip", "x-gzip"}:
            return _inflate(body, 31)
        if encoding == "deflate":
            try:
                return _inflate(body, 15)
            except zlib.error:  # raw deflate, as some servers send it
                return _inflate(body, -15)
    except zlib.error as e:
        raise _BadAnswerError(f"undecodable {encoding} body: {e}") from None
    return body  # identity, or a coding the caller may know


MAX_INTERIM = 16
"""Most informational (1xx) answers read before the final one."""


async def _final_head(reader: asyncio.StreamReader) -> tuple[str, int, dict[str, str]]:
    """The final answer's head, past any informational ones (100 Continue, 102 Processing)."""
    for _ in range(MAX_INTERIM + 1):
        version, status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        if status >= 200:
            return version, status, headers
        if status == 101:
            raise _BadAnswerError("the server switched protocols")
    raise _BadAnswerError(f"more than {MAX_INTERIM} informational answers")


async def _answer(reader: asyncio.StreamReader, timeout: float) -> tuple[HttpResponse, bool]:
    """
    Read one answer: the response and whether the connection may be reused.
    """
    # One deadline for the head, informational answers included: a server
    # that sends 102 Processing forever must not hold the request forever.
    version, status, headers = await _within(timeout, _final_head(reader))
    connection = (_header(headers, "connection") or "").lower()
    keep = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
    coding = _header(headers, "transfer-encoding")
    length = _header(headers, "content-length")
    if status in _NO_BODY:
        body = b""
    elif coding is not None and coding.lower().rstrip().endswith("chunked"):
        body = await _within(timeout, _read_chunked(reader))
    elif length is not None:
        values = {value.strip() for value in length.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise _BadAnswerError("malformed Content-Length")
        size = int(values.pop())
        if size > MAX_BODY:
            raise _BadAnswerError(f"answer body longer than {MAX_BODY} bytes")
        body = await _within(timeout, reader.readexactly(size))
    else:
        body = await _within(timeout, reader.read(MAX_BODY + 1))
        if len(body) > MAX_BODY:
            raise _BadAnswerError(f"answer body longer than {MAX_BODY} bytes")
        keep = False  # the body ended with the connection
    body = _decoded(body, _header(headers, "content-encoding"))
    return HttpResponse(status, headers, body), keep


class AsyncioTransport:
    """
    The default transport of :class:`AsyncWebhookDestination`: HTTP/1.1 over
    :mod:`asyncio` streams, no dependencies.

    Connections are kept alive between batches: each event loop that posts
    gets its own pool (a connection belongs to the loop that opened it). A
    connection idle for *keepalive* seconds, or closed by the server while
    idle, is closed within *keepalive* seconds; the whole pool is closed when
    its loop shuts down (``asyncio.run``, ``asyncio.Runner`` and
    :meth:`Scheduler.close <cohortsync.Scheduler.close>` see to that; a loop
    closed without ``loop.shutdown_asyncgens()`` leaves the sockets to the
    garbage collector) or on :meth:`aclose`. A request on a kept connection
    that the server had closed meanwhile is sent once more on a new one,
    with the same body and so the same idempotency key.

    ``timeout`` bounds connecting, waiting for the answer's head (any
    informational answers before it included) and reading its body, each.
    An answer's head may hold 64 KiB and its body 8 MiB, decompressed.
    Every answer is returned whatever its status; redirects are not
    followed; no proxy settings are read (pass :class:`AsyncHttpxTransport`
    for proxies or HTTP/2).

    Args:
        ssl_context: For https: the :class:`ssl.SSLContext` to verify servers
            with (a private CA, client certificates). By default
            :func:`ssl.create_default_context`, made on first use.
        max_idle: Most connections kept open per host between requests.
        keepalive: Seconds an idle connection is kept.

    Raises:
        ConfigurationError: A bad argument.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_idle: int = 100,
        keepalive: float = 5.0,
    ) -> None:
        if ssl_context is not None:
            import ssl  # noqa: PLC0415 - only when the host brings a context

            if not isinstance(ssl_context, ssl.SSLContext):
                raise ConfigurationError(
                    "ssl_context", type(ssl_context).__name__, "must be an ssl.SSLContext"
                )
        self._ssl = ssl_context
        self._max_idle = v.check_count("max_idle", max_idle)
        self._keepalive = v.check_number("keepalive", keepalive, minimum=0, inclusive=False)
        self._lock = threading.Lock()  # loops in several threads may share the transport
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pool] = (
            weakref.WeakKeyDictionary()
        )

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        """
        POST *body* to *url*; 4xx and 5xx answers are returned, not raised,
        so the destination alone decides what each status means.

        Raises:
            ConfigurationError: The URL is not http or https.
            TransientError: No answer came (refused, reset, timed out), or
                what came is not HTTP/1.x.
        """
        target = _Target.of(url)
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None or pool.closed:
            pool = await self._open_pool(loop)
        head = _head(target, body, headers)
        connection = pool.take(target.origin, loop.time())
        try:
            connection, response, keep = await self._exchange(
                connection, target, head + body, timeout
            )
        except _BadAnswerError as e:
            raise TransientError(f"POST to {safe_url(url)} failed: {e}") from None
        except asyncio.LimitOverrunError:
            raise TransientError(
                f"POST to {safe_url(url)} failed: the answer's head is over {_MAX_HEAD} bytes"
            ) from None
        except (OSError, TimeoutError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            raise TransientError(f"POST to {safe_url(url)} failed: {_describe(e)}") from e
        if keep:
            pool.give(target.origin, connection, loop.time())
        else:
            connection.abort()
        return response

    async def _exchange(
        self, connection: _Connection | None, target: _Target, request: bytes, timeout: float
    ) -> tuple[_Connection, HttpResponse, bool]:
        """
        Send *request* on *connection* (a new one if None) and read the answer;
        once more on a new connection if a kept one turns out closed. On any
        failure, cancellation included, the connection is dropped: its stream
        may be out of step.
        """
        while True:
            if connection is None:
                connection = await self._connect(target, timeout)
            try:
                connection.writer.write(request)
                await _within(timeout, connection.writer.drain())
                response, keep = await _answer(connection.reader, timeout)
            except BaseException as e:
                connection.abort()
                # A kept connection the server closed while it was idle:
                # nothing was answered, so send once more on a new one.
                if connection.reused and _closed_unanswered(e):
                    connection = None
                    continue
                raise
            return connection, response, keep

    async def _connect(self, target: _Target, timeout: float) -> _Connection:
        scheme, hostname, port = target.origin
        context = None
        if scheme == "https":
            context = self._ssl or self._default_context
        reader, writer = await _within(
            timeout,
            asyncio.open_connection(
                hostname,
                port,
                ssl=context,
                server_hostname=hostname if context is not None else None,
                limit=_MAX_HEAD,
            ),
        )
        return _Connection(reader, writer)

    @functools.cached_property
    def _default_context(self) -> ssl.SSLContext:
        """The verifying context for https when the host gave none, made on first use."""
        import ssl  # noqa: PLC0415 - only for https

        return ssl.create_default_context()

    async def _open_pool(self, loop: asyncio.AbstractEventLoop) -> _Pool:
        with self._lock:
            pool = self._pools.get(loop)
            if pool is not None and not pool.closed:
                return pool
            pool = self._pools[loop] = _Pool(loop, self._max_idle, self._keepalive)
            keeper = pool.keeper = _keep_open(pool)
        # Runs to the keeper's yield at once, registering it with this loop.
        await anext(keeper)
        return pool

    async def aclose(self) -> None:
        """
        Close the running loop's connections. Connections of another loop
        are closed when that loop shuts down. A later post opens new ones,
        on whichever loop it runs. Safe to repeat.
        """
        with self._lock:
            pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None and pool.keeper is not None:
            await pool.keeper.aclose()  # its finally closes the pool

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
        return "AsyncioTransport()" if self._ssl is None else "AsyncioTransport(ssl_context=...)"
