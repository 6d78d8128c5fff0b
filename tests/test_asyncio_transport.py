"""
``AsyncioTransport``, the async webhook's default HTTP client, against a raw
server whose bytes each test scripts: keep-alive, framing (length, chunked,
read to close), encodings, a server that drops a kept connection, timeouts,
cancellation, malformed answers, TLS and shutdown.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import socket
import ssl
import subprocess
import threading
import zlib
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest

from cohortsync.destinations import AsyncHttpTransport, AsyncioTransport, AsyncWebhookDestination
from cohortsync.exceptions import ConfigurationError, TransientError
from webhook_server import make_batch

T = TypeVar("T")

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BOMB = gzip.compress(b"0" * (9 * 1024 * 1024))
"""A small gzip body that inflates past the 8 MiB cap (found by the outsider attack)."""


@attrs.define
class Request:
    connection: int
    head: str
    body: bytes


Script = Callable[[Request, int], "bytes | list[tuple[float, bytes]] | None"]
"""What the server answers to a request (and its index on its connection):
the bytes to write, pieces to write each after a pause, or None to close
the connection without answering."""


@attrs.define
class RawServer:
    """
    An asyncio server on a thread of its own that writes whatever the test's
    script says, and records every request and every closed connection.
    """

    script: Script
    tls: ssl.SSLContext | None = None
    requests: list[Request] = attrs.Factory(list)
    opened: int = 0
    closed: int = 0
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None
    _tasks: set[asyncio.Task[None]] = attrs.Factory(set)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.opened += 1
        number = self.opened
        try:
            index = 0
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                text = head.decode("latin-1")
                length = 0
                for line in text.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                request = Request(number, text, await reader.readexactly(length))
                self.requests.append(request)
                answer = self.script(request, index)
                index += 1
                if answer is None:
                    break
                if isinstance(answer, list):
                    for pause, piece in answer:
                        await asyncio.sleep(pause)
                        writer.write(piece)
                        await writer.drain()
                    break
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.closed += 1
            writer.close()
            self._tasks.discard(task)

    def start(self) -> None:
        started: Future[None] = Future()

        async def main() -> None:
            self._stop = asyncio.Event()
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
            self.port = server.sockets[0].getsockname()[1]
            started.set_result(None)
            async with server:
                await self._stop.wait()
                for task in list(self._tasks):  # handlers still writing or waiting
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(main())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.result(timeout=10)

    def stop(self) -> None:
        assert self._loop is not None
        assert self._stop is not None
        assert self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def url(self, path: str = "/hook") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def wait_closed(self, count: int) -> None:
        """Wait (a little) until *count* connections have been closed."""
        for _ in range(200):
            if self.closed >= count:
                return
            threading.Event().wait(0.01)
        raise AssertionError(f"{self.closed} connections closed, expected {count}")


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def make(script: Script, tls: ssl.SSLContext | None = None) -> RawServer:
        server = RawServer(script, tls)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def ok(_request: Request, _index: int) -> bytes:
    return OK


def first_waits(event: threading.Event, seconds: float) -> Script:
    """A script whose first answer on a connection waits for *event* (at most *seconds*)."""

    def script(_request: Request, index: int) -> bytes:
        if index == 0:
            event.wait(seconds)
        return OK

    return script


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def post_all(transport: AsyncioTransport, url: str, count: int) -> list[int]:
    statuses = []
    for k in range(count):
        response = await transport.post(url, f'{{"k":{k}}}'.encode(), {"X-K": str(k)}, 2.0)
        statuses.append(response.status)
    return statuses


class TestRequests:
    def test_request_head_and_body(self, serve: Callable[..., RawServer]) -> None:
        """One POST: target with its query, Host, the caller's headers, our framing, the body."""
        server = serve(ok)

        async def go() -> None:
            async with AsyncioTransport() as transport:
                await transport.post(
                    server.url("/a/b?token=t1&x=2"),
                    b'{"users":["u1"]}',
                    {
                        "Authorization": "Bearer s",
                        "Content-Length": "999",
                        "Connection": "close",
                        "Accept-Encoding": "identity",
                    },
                    2.0,
                )

        run(go())

        (request,) = server.requests
        lines = request.head.split("\r\n")
        assert "POST /a/b?token=t1&x=2 HTTP/1.1" == lines[0]
        assert f"Host: 127.0.0.1:{server.port}" in lines
        assert "Authorization: Bearer s" in lines
        assert "Content-Length: 16" in lines  # ours, not the caller's
        assert not any(line.startswith("Connection") for line in lines)
        # The caller's Accept-Encoding replaces ours (the attack found both sent).
        assert ["Accept-Encoding: identity"] == [
            line for line in lines if line.lower().startswith("accept-encoding")
        ]
        assert b'{"users":["u1"]}' == request.body

    def test_connections_are_kept_alive(self, serve: Callable[..., RawServer]) -> None:
        """Five posts one after another go over one connection."""
        server = serve(ok)

        async def go() -> list[int]:
            async with AsyncioTransport() as transport:
                return await post_all(transport, server.url(), 5)

        assert [200] * 5 == run(go())
        assert {1} == {r.connection for r in server.requests}

    def test_concurrent_posts_open_connections_and_keep_them(
        self, serve: Callable[..., RawServer]
    ) -> None:
        """Ten at once open ten connections; the next ten reuse them."""
        server = serve(ok)

        async def go() -> None:
            async with AsyncioTransport() as transport:
                for _ in range(2):
                    await asyncio.gather(
                        *(transport.post(server.url(), b"{}", {}, 2.0) for _ in range(10))
                    )

        run(go())

        assert 20 == len(server.requests)
        assert 10 == server.opened

    def test_max_idle_bounds_the_kept_connections(self, serve: Callable[..., RawServer]) -> None:
        """With max_idle=2, only two of ten connections stay open after a wave."""
        server = serve(ok)

        async def go() -> None:
            async with AsyncioTransport(max_idle=2) as transport:
                await asyncio.gather(
                    *(transport.post(server.url(), b"{}", {}, 2.0) for _ in range(10))
                )
                await asyncio.sleep(0.05)
                assert 8 == server.closed

        run(go())


class TestAnswers:
    @pytest.mark.parametrize(
        ("answer", "body"),
        [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
            (
                (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: 1\r\n\r\n"
                ),
                b"hello",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
                % (len(gzip.compress(b"hello")), gzip.compress(b"hello")),
                b"hello",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n%s"
                % (len(zlib.compress(b"hello")), zlib.compress(b"hello")),
                b"hello",
            ),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", b"hi"),
            (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", b""),
        ],
        ids=["length", "chunked", "gzip", "deflate", "continue", "no-content"],
    )
    def test_bodies(self, serve: Callable[..., RawServer], answer: bytes, body: bytes) -> None:
        """Each framing and encoding gives the body, and the connection is reused after."""
        server = serve(lambda _r, _i: answer)

        async def go() -> list[bytes]:
            async with AsyncioTransport() as transport:
                return [(await transport.post(server.url(), b"{}", {}, 2.0)).body for _ in range(2)]

        assert [body, body] == run(go())
        assert 1 == server.opened

    def test_body_to_close_is_read_and_not_reused(self, serve: Callable[..., RawServer]) -> None:
        """An answer without a length ends with its connection: read whole, then a new one."""
        server = serve(lambda _r, _i: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")

        async def go() -> list[bytes]:
            async with AsyncioTransport() as transport:
                return [(await transport.post(server.url(), b"{}", {}, 2.0)).body for _ in range(2)]

        assert [b"all of it"] * 2 == run(go())
        assert 2 == server.opened

    def test_errors_and_headers_are_returned(self, serve: Callable[..., RawServer]) -> None:
        """A 429 comes back as an answer, its headers looked up in any case, repeats joined."""
        answer = (
            b"HTTP/1.1 429 Too Many\r\nretry-after: 7\r\nX-A: 1\r\nx-a: 2\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        server = serve(lambda _r, _i: answer)

        async def go() -> Any:
            async with AsyncioTransport() as transport:
                return await transport.post(server.url(), b"{}", {}, 2.0)

        response = run(go())
        assert 429 == response.status
        assert "7" == response.headers["Retry-After"]
        assert "1, 2" == response.headers["x-a"]

    @pytest.mark.parametrize(
        ("answer", "match"),
        [
            (b"SPDY/3 200 OK\r\n\r\n", "status line"),
            (b"HTTP/1.1 2x0 OK\r\n\r\n", "status line"),
            (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "Content-Length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", "longer than"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk"),
            (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", "head is over"),
            (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 9\r\n\r\nshort",
                "Incomplete",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nbad",
                "gzip",
            ),
            (b"HTTP/1.1 101 Switching\r\n\r\n", "switched"),
            (b"HTTP/1.1 102 Processing\r\n\r\n" * 17 + OK, "informational"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
                % (len(BOMB), BOMB),
                "once decompressed",
            ),
        ],
        ids=[
            "not-http",
            "bad-code",
            "bad-header",
            "negative-length",
            "two-lengths",
            "huge-length",
            "bad-chunk",
            "huge-head",
            "short-body",
            "bad-gzip",
            "upgrade",
            "endless-interim",
            "gzip-bomb",
        ],
    )
    def test_malformed_answers_are_transient(
        self, serve: Callable[..., RawServer], answer: bytes, match: str
    ) -> None:
        """Bytes that are not a whole HTTP/1.x answer: a TransientError, the connection dropped."""
        server = serve(lambda _r, _i: answer)

        async def go() -> None:
            async with AsyncioTransport() as transport:
                await transport.post(server.url("/h?token=sekrit"), b"{}", {}, 2.0)

        with pytest.raises(TransientError, match=match) as info:
            run(go())
        assert "sekrit" not in str(info.value)
        server.wait_closed(1)


class TestFailures:
    def test_kept_connection_closed_by_the_server_is_retried_once(
        self, serve: Callable[..., RawServer]
    ) -> None:
        """
        The server drops a kept connection on its second request without an
        answer: the request goes again on a new connection, same body.
        """
        server = serve(lambda _r, index: None if index == 1 else OK)

        async def go() -> list[int]:
            async with AsyncioTransport() as transport:
                return await post_all(transport, server.url(), 2)

        assert [200, 200] == run(go())
        assert [1, 1, 2] == [r.connection for r in server.requests]
        assert server.requests[1].body == server.requests[2].body

    def test_a_new_connection_closed_without_answer_is_not_retried(
        self, serve: Callable[..., RawServer]
    ) -> None:
        """On a fresh connection an empty close is the server's doing: transient, sent once."""
        server = serve(lambda _r, _i: None)

        async def go() -> None:
            async with AsyncioTransport() as transport:
                await transport.post(server.url(), b"{}", {}, 2.0)

        with pytest.raises(TransientError, match="failed"):
            run(go())
        assert 1 == len(server.requests)

    def test_timeout_is_transient_and_drops_the_connection(
        self, serve: Callable[..., RawServer]
    ) -> None:
        """No answer within the timeout: TransientError; the late answer is never read."""
        late = threading.Event()
        server = serve(first_waits(late, 1.0))

        async def go() -> int:
            async with AsyncioTransport() as transport:
                with pytest.raises(TransientError, match="timed out"):
                    await transport.post(server.url(), b"{}", {}, 0.2)
                late.set()
                return (await transport.post(server.url(), b"{}", {}, 2.0)).status

        assert 200 == run(go())
        assert [1, 2] == [r.connection for r in server.requests]

    def test_interim_answers_do_not_extend_the_timeout(
        self, serve: Callable[..., RawServer]
    ) -> None:
        """
        A server that sends 102 Processing every 0.1 s and never the final
        answer times out after the timeout, not never (found by the
        outsider attack: each interim answer restarted the wait).
        """
        server = serve(lambda _r, _i: [(0.1, b"HTTP/1.1 102 Processing\r\n\r\n")] * 12)

        async def go() -> float:
            loop = asyncio.get_running_loop()
            async with AsyncioTransport() as transport:
                started = loop.time()
                with pytest.raises(TransientError, match="timed out"):
                    await transport.post(server.url(), b"{}", {}, 0.5)
                return loop.time() - started

        assert run(go()) < 0.9

    def test_connection_refused_is_transient(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        async def go() -> None:
            async with AsyncioTransport() as transport:
                await transport.post(f"http://127.0.0.1:{port}/h", b"{}", {}, 2.0)

        with pytest.raises(TransientError, match="failed"):
            run(go())

    def test_cancellation_drops_the_connection(self, serve: Callable[..., RawServer]) -> None:
        """A post cancelled while it waits is cancelled, and its connection is not reused."""
        release = threading.Event()
        server = serve(first_waits(release, 2.0))

        async def go() -> int:
            async with AsyncioTransport() as transport:
                task = asyncio.ensure_future(transport.post(server.url(), b"{}", {}, 5.0))
                await asyncio.sleep(0.1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                release.set()
                return (await transport.post(server.url(), b"{}", {}, 2.0)).status

        assert 200 == run(go())
        assert [1, 2] == [r.connection for r in server.requests]


class TestLifecycle:
    def test_loop_shutdown_closes_the_pool(self, serve: Callable[..., RawServer]) -> None:
        """Without aclose, asyncio.run's shutdown closes the kept connection on its loop."""
        server = serve(ok)
        transport = AsyncioTransport()

        run(post_all(transport, server.url(), 1))

        server.wait_closed(1)

    def test_one_pool_per_loop(self, serve: Callable[..., RawServer]) -> None:
        """Two loops, one transport: each loop opens and closes its own connection."""
        server = serve(ok)
        transport = AsyncioTransport()

        run(post_all(transport, server.url(), 2))
        run(post_all(transport, server.url(), 2))

        assert [1, 1, 2, 2] == [r.connection for r in server.requests]
        server.wait_closed(2)

    def test_aclose_closes_and_a_later_post_reopens(self, serve: Callable[..., RawServer]) -> None:
        """
        aclose() closes the loop's connections; the transport stays usable,
        on this loop and on another (found by the outsider attack: it
        refused every later post, on every loop).
        """
        server = serve(ok)
        transport = AsyncioTransport()

        async def go() -> None:
            await post_all(transport, server.url(), 1)
            await transport.aclose()
            await transport.aclose()  # safe to repeat
            server.wait_closed(1)
            await post_all(transport, server.url(), 1)

        run(go())
        run(post_all(transport, server.url(), 1))

        assert [1, 2, 3] == [r.connection for r in server.requests]

    def test_destination_reused_after_async_with(self, serve: Callable[..., RawServer]) -> None:
        """Leaving ``async with destination`` does not retire the destination."""
        server = serve(ok)
        hook = AsyncWebhookDestination(server.url())

        async def go() -> None:
            async with hook:
                await hook.add(make_batch(["u1"], key="k1"))
            await hook.add(make_batch(["u2"], key="k2"))

        run(go())

        assert 2 == len(server.requests)

    def test_idle_connections_are_closed_after_keepalive(
        self, serve: Callable[..., RawServer]
    ) -> None:
        """
        With nothing more to send, idle connections are closed once
        *keepalive* has passed (found by the outsider attack: they stayed
        open until the next post).
        """
        server = serve(ok)

        async def go() -> None:
            transport = AsyncioTransport(keepalive=0.2)
            await asyncio.gather(*(transport.post(server.url(), b"{}", {}, 2.0) for _ in range(5)))
            await asyncio.sleep(0.6)
            assert 5 == server.closed
            await transport.aclose()

        run(go())

    def test_arguments_are_checked(self) -> None:
        with pytest.raises(ConfigurationError, match="max_idle"):
            AsyncioTransport(max_idle=-1)
        with pytest.raises(ConfigurationError, match="keepalive"):
            AsyncioTransport(keepalive=0)
        with pytest.raises(ConfigurationError, match="ssl_context"):
            AsyncioTransport(ssl_context=object())  # type: ignore[arg-type]

    def test_refuses_other_schemes(self) -> None:
        async def go() -> None:
            await AsyncioTransport().post("file:///etc/passwd", b"{}", {}, 1.0)

        with pytest.raises(ConfigurationError, match="http or https"):
            run(go())

    def test_repr_and_protocol(self) -> None:
        assert "AsyncioTransport()" == repr(AsyncioTransport())
        assert isinstance(AsyncioTransport(), AsyncHttpTransport)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(  # noqa: S603 - a fixed command line
        [  # noqa: S607 - openssl from PATH, as a developer has it
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def https_server(serve: Callable[..., RawServer], certificate: tuple[Path, Path]) -> RawServer:
    """A server answering 200 over TLS with the self-signed certificate."""
    cert, key = certificate
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    return serve(ok, server_side)


class TestTls:
    def test_https_with_the_hosts_context(
        self, https_server: RawServer, certificate: tuple[Path, Path]
    ) -> None:
        """With a context trusting the server's certificate, https works and is kept alive."""
        trusting = ssl.create_default_context(cafile=str(certificate[0]))
        transport = AsyncioTransport(ssl_context=trusting)

        async def go() -> list[int]:
            async with transport:
                return await post_all(transport, https_server.url(), 2)

        assert [200, 200] == run(go())
        assert 1 == https_server.opened
        assert "AsyncioTransport(ssl_context=...)" == repr(transport)

    def test_untrusted_certificate_is_refused(self, https_server: RawServer) -> None:
        """The default context verifies: a self-signed server is not posted to."""
        transport = AsyncioTransport()

        async def go() -> None:
            async with transport:
                await transport.post(https_server.url(), b"{}", {}, 2.0)

        with pytest.raises(TransientError, match="CERTIFICATE_VERIFY_FAILED"):
            run(go())
        assert [] == https_server.requests
        # The default context it made is not the host's: the repr still says so.
        assert "AsyncioTransport()" == repr(transport)


class TestUnderTheWebhook:
    def test_webhook_messages_arrive_once_each(self, serve: Callable[..., RawServer]) -> None:
        """AsyncWebhookDestination's default: three batches, three messages, one connection."""
        server = serve(ok)

        async def go() -> None:
            async with AsyncWebhookDestination(
                server.url(), headers={"Authorization": "k"}
            ) as dest:
                for k in range(3):
                    await dest.add(make_batch([f"u{k}"], key=f"key-{k}"))

        run(go())

        messages = [json.loads(r.body) for r in server.requests]
        assert [["u0"], ["u1"], ["u2"]] == [m["users"] for m in messages]
        assert 3 == len({m["message_id"] for m in messages})
        assert {1} == {r.connection for r in server.requests}
