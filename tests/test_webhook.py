from __future__ import annotations

import json
import logging
import socket
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import pytest

from cohortsync._destination import DeliveryResult, Operation, Rejection
from cohortsync.destinations._urllib import UrllibTransport
from cohortsync.destinations._webhook import (
    AsyncWebhookDestination,
    HttpResponse,
    HttpTransport,
    WebhookDestination,
)
from cohortsync.exceptions import (
    AuthenticationError,
    BadDataError,
    ConfigurationError,
    DeliveryError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from webhook_server import (
    CONTEXT,
    FIXED_DATE,
    QUERY_TOKEN,
    SECRET,
    Server,
    chain,
    make_batch,
    serving,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping


# The blocking and the asyncio adapter share their settings, validation and repr.
AnyWebhook = type[WebhookDestination] | type[AsyncWebhookDestination]
KINDS = [
    pytest.param(WebhookDestination, id="blocking"),
    pytest.param(AsyncWebhookDestination, id="async"),
]


@pytest.fixture
def server() -> Iterator[Server]:
    with serving() as srv:
        yield srv


def destination(server: Server, path: str, **kwargs: Any) -> WebhookDestination:
    return WebhookDestination(
        server.url(path) + f"?token={QUERY_TOKEN}",
        headers={"Authorization": SECRET},
        timeout=kwargs.pop("timeout", 2.0),
        **kwargs,
    )


class TestBody:
    def test_add_posts_the_cohort_webhook_shape(self, server: Server) -> None:
        """An add posts exactly the webhook fields, with in_cohort true."""
        result = destination(server, "/ok").add(make_batch(["u1", "u2"]))

        assert DeliveryResult.ok() == result
        assert [
            {
                "cohort_id": "power-users",
                "cohort_name": "Power users",
                "in_cohort": True,
                "computed_time": "2024-05-01T12:00:00+00:00",
                "message_id": "idem-key-0001",
                "users": ["u1", "u2"],
            }
        ] == [r.body for r in server.requests]

    def test_remove_sends_in_cohort_false(self, server: Server) -> None:
        """Removals are the same message with in_cohort false."""
        destination(server, "/ok").remove(make_batch(["u9"], Operation.REMOVE, key="k-remove"))

        (request,) = server.requests
        assert False is request.body["in_cohort"]
        assert "k-remove" == request.body["message_id"]
        assert ["u9"] == request.body["users"]

    def test_existing_counts_as_in_cohort(self, server: Server) -> None:
        """EXISTING batches (full syncs) say in_cohort true."""
        destination(server, "/ok").add(make_batch(["u1"], Operation.EXISTING))

        assert True is server.requests[0].body["in_cohort"]

    def test_computed_time_is_utc(self, server: Server) -> None:
        """An aware non-UTC computed_at is sent converted to UTC."""
        cet = timezone(timedelta(hours=2))
        context = attrs.evolve(CONTEXT, computed_at=datetime(2024, 5, 1, 14, 30, tzinfo=cet))

        destination(server, "/ok").add(make_batch(["u1"], context=context))

        assert "2024-05-01T12:30:00+00:00" == server.requests[0].body["computed_time"]

    def test_headers(self, server: Server) -> None:
        """The idempotency key and JSON content type are sent with the host's headers."""
        destination(server, "/ok").add(make_batch(["u1"]))

        headers = {k.lower(): v for k, v in server.requests[0].headers.items()}
        assert "idem-key-0001" == headers["idempotency-key"]
        assert "application/json" == headers["content-type"]
        assert SECRET == headers["authorization"]
        assert f"/ok?token={QUERY_TOKEN}" == server.requests[0].path

    def test_same_batch_same_message_id(self, server: Server) -> None:
        """A re-sent batch carries the same message_id, so receivers can de-duplicate."""
        dest = destination(server, "/ok")
        batch = make_batch(["u1", "u2"])

        dest.add(batch)
        dest.add(batch)

        first, second = server.requests
        assert first.body == second.body
        assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]

    def test_non_json_success_body_means_accepted(self, server: Server) -> None:
        """A 2xx without the rejection JSON accepts the whole batch."""
        assert DeliveryResult.ok() == destination(server, "/ok-not-json").add(make_batch(["u1"]))


class TestResponses:
    def test_rejections(self, server: Server) -> None:
        """A 2xx may reject members; unknown users and repeats are ignored."""
        result = destination(server, "/rejected").add(make_batch(["u1", "u2", "u3"]))

        assert (
            Rejection("u2", "unknown user"),
            Rejection("u3", "rejected by webhook"),
        ) == result.rejected

    @pytest.mark.parametrize("path", ["/500", "/408"])
    def test_server_errors_are_transient(self, server: Server, path: str) -> None:
        """5xx and 408 are worth retrying."""
        with pytest.raises(TransientError) as info:
            destination(server, path).add(make_batch(["u1"]))

        assert RateLimitedError is not type(info.value)
        assert info.value.retry_after is None

    def test_transient_honours_retry_after(self, server: Server) -> None:
        """A 503 with Retry-After tells the engine how long to wait."""
        with pytest.raises(TransientError, match="HTTP 503") as info:
            destination(server, "/503").add(make_batch(["u1"]))

        assert 12.0 == info.value.retry_after

    def test_timeout_is_transient(self, server: Server) -> None:
        """A server that does not answer in time gives a TransientError, quickly."""
        with pytest.raises(TransientError, match="timed out"):
            destination(server, "/slow", timeout=0.2).add(make_batch(["u1"]))

    def test_connection_refused_is_transient(self) -> None:
        """Nobody listening is a transient failure, not a crash."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]

        with pytest.raises(TransientError, match="failed"):
            WebhookDestination(f"http://127.0.0.1:{port}/hook").add(make_batch(["u1"]))

    def test_rate_limited_seconds(self, server: Server) -> None:
        """429 with Retry-After in seconds."""
        with pytest.raises(RateLimitedError) as info:
            destination(server, "/429-seconds").add(make_batch(["u1"]))

        assert 7.0 == info.value.retry_after

    def test_rate_limited_http_date(self, server: Server) -> None:
        """429 with an HTTP-date, measured against the server's own Date header."""
        with pytest.raises(RateLimitedError) as info:
            destination(server, "/429-date").add(make_batch(["u1"]))

        assert 30.0 == info.value.retry_after

    def test_rate_limited_without_retry_after(self, server: Server) -> None:
        """429 without a hint leaves the wait to the engine's backoff."""
        with pytest.raises(RateLimitedError) as info:
            destination(server, "/429-bare").add(make_batch(["u1"]))

        assert info.value.retry_after is None

    @pytest.mark.parametrize(
        ("path", "error"),
        [
            ("/401", AuthenticationError),
            ("/403", AuthenticationError),
            ("/400", BadDataError),
            ("/422", BadDataError),
            ("/413", BadDataError),
        ],
    )
    def test_client_errors(self, server: Server, path: str, error: type[Exception]) -> None:
        """Credentials refused pause the sync; bad data is bisected by the engine."""
        with pytest.raises(error, match=f"HTTP {path[1:]}"):
            destination(server, path).add(make_batch(["u1"]))

    @pytest.mark.parametrize("path", ["/404", "/redirect"])
    def test_other_statuses_are_permanent(self, server: Server, path: str) -> None:
        """Other 4xx, and redirects, fail the run without retrying."""
        with pytest.raises(PermanentError) as info:
            destination(server, path).add(make_batch(["u1"]))

        assert BadDataError is not type(info.value)

    def test_redirects_are_not_followed(self, server: Server) -> None:
        """A redirect is not followed: it would replay credentials elsewhere."""
        with pytest.raises(PermanentError, match="HTTP 302"):
            destination(server, "/redirect").add(make_batch(["u1"]))

        assert ["/redirect"] == [urlsplit(r.path).path for r in server.requests]

    def test_error_detail_is_kept(self, server: Server) -> None:
        """The start of an error body is in the message, for diagnosis."""
        with pytest.raises(BadDataError, match="invalid payload"):
            destination(server, "/400").add(make_batch(["u1"]))


def raise_everything(dest: WebhookDestination) -> list[BaseException]:
    raised: list[BaseException] = []
    for path in ["/401", "/400", "/500", "/503", "/429-seconds", "/404", "/redirect", "/slow"]:
        dest_for_path = WebhookDestination(
            dest.url.replace("/ok", path),
            headers={"Authorization": SECRET},
            timeout=0.2,
        )
        with pytest.raises(DeliveryError) as info:
            dest_for_path.add(make_batch(["u1"]))
        raised.append(info.value)
    return raised


class TestSecrets:
    def test_repr_hides_headers_and_query(self, server: Server) -> None:
        """The repr shows where it posts, not the credentials or the query string."""
        dest = destination(server, "/ok")

        assert f"WebhookDestination({server.url('/ok') + '?...'!r})" == repr(dest)

    def test_never_in_errors_or_logs(
        self, server: Server, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Neither the header secret nor the query token leak, even when the server echoes."""
        caplog.set_level(logging.DEBUG)
        dest = destination(server, "/ok")
        dest.add(make_batch(["u1"]))

        raised = raise_everything(dest)

        texts = [repr(dest)]
        for error in raised:
            texts += [f"{e!s} {e!r}" for e in chain(error)]
        texts += [r.getMessage() for r in caplog.records]
        assert 8 == len(raised)
        assert any(r.name.startswith("cohortsync") for r in caplog.records)
        assert any("***" in t for t in texts)  # the echo really happened and was blanked
        assert [] == [t for t in texts if "s3cr3t" in t or QUERY_TOKEN in t]

    @pytest.mark.parametrize(
        "echo",
        [
            "authorization: bearer tok-abcdef-xyz",
            "AUTHORIZATION: BEARER TOK-ABCDEF-XYZ",
            "you sent token=q%2Fsecret%2B1 and q/secret+1 and q%2fsecret%2b1",
        ],
        ids=["lower", "upper", "percent-encoded"],
    )
    def test_echo_in_another_form_is_blanked(self, echo: str) -> None:
        """
        A server that echoes a secret lower-cased, upper-cased or
        percent-encoded does not get it into the error (found by the
        outsider attack: only the exact spelling was blanked).
        """
        transport = RecordingTransport(HttpResponse(500, {}, echo.encode()))
        dest = WebhookDestination(
            "https://hooks.example.com/h?token=q/secret+1",
            headers={"Authorization": "Bearer Tok-ABCdef-XYZ"},
            transport=transport,
        )

        with pytest.raises(TransientError) as info:
            dest.add(make_batch(["u1"]))

        text = str(info.value).lower()
        assert "***" in text
        assert [] == [s for s in ("tok-abcdef-xyz", "q/secret+1", "secret%2b1") if s in text]

    @pytest.mark.parametrize("kind", KINDS)
    def test_bad_header_value_is_not_echoed(self, kind: AnyWebhook) -> None:
        """Refusing a header names it, never its value."""
        with pytest.raises(ConfigurationError, match="Authorization") as info:
            kind("https://example.com", headers={"Authorization": "s3cr3t\r\nX: 1"})

        assert "s3cr3t" not in str(info.value)

    @pytest.mark.parametrize("kind", KINDS)
    def test_url_credentials_are_refused_without_echo(self, kind: AnyWebhook) -> None:
        """Credentials in the URL are refused, and not repeated in the error."""
        with pytest.raises(ConfigurationError, match="credentials") as info:
            kind("https://user:s3cr3t@example.com/hook")

        assert "s3cr3t" not in str(info.value)


@attrs.define
class RecordingTransport:
    """
    A host-supplied transport: records calls and answers from a script.
    """

    response: HttpResponse
    calls: list[tuple[str, bytes, dict[str, str], float]] = attrs.Factory(list)

    def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        self.calls.append((url, body, dict(headers), timeout))
        return self.response


@attrs.frozen
class FixedClock:
    at: datetime

    def now(self) -> datetime:
        return self.at

    def sleep(self, seconds: float) -> None:
        """Never needed here."""


class TestCustomTransport:
    def test_host_transport_is_used(self) -> None:
        """A host's transport gets the URL, JSON body, headers and timeout."""
        transport = RecordingTransport(HttpResponse(200))
        dest = WebhookDestination(
            "https://hooks.example.com/c?sig=1", transport=transport, timeout=3.5
        )

        assert DeliveryResult.ok() == dest.add(make_batch(["u1"]))

        ((url, body, headers, timeout),) = transport.calls
        assert "https://hooks.example.com/c?sig=1" == url
        assert ["u1"] == json.loads(body)["users"]
        assert "idem-key-0001" == headers["Idempotency-Key"]
        assert 3.5 == timeout

    def test_retry_after_lookup_ignores_case(self) -> None:
        """Transports may spell header names any way."""
        transport = RecordingTransport(HttpResponse(429, {"retry-after": " 3 "}))

        with pytest.raises(RateLimitedError) as info:
            WebhookDestination("https://x.example", transport=transport).add(make_batch(["u1"]))

        assert 3.0 == info.value.retry_after

    def test_http_date_without_date_header_uses_the_clock(self) -> None:
        """Without a Date header the injected clock says what "now" is."""
        transport = RecordingTransport(HttpResponse(503, {"Retry-After": FIXED_DATE}))
        clock = FixedClock(datetime(2015, 10, 21, 7, 27, 0, tzinfo=timezone.utc))
        dest = WebhookDestination("https://x.example", transport=transport, clock=clock)

        with pytest.raises(TransientError) as info:
            dest.add(make_batch(["u1"]))

        assert 60.0 == info.value.retry_after

    @pytest.mark.parametrize("value", ["soon", "-5", "nan"])
    def test_unusable_retry_after_is_ignored(self, value: str) -> None:
        """A Retry-After that is not a delay or a date is treated as absent."""
        transport = RecordingTransport(HttpResponse(429, {"Retry-After": value}))

        with pytest.raises(RateLimitedError) as info:
            WebhookDestination("https://x.example", transport=transport).add(make_batch(["u1"]))

        assert info.value.retry_after is None

    def test_os_error_from_host_transport_is_transient(self) -> None:
        """A transport that lets a socket error escape still yields a TransientError."""

        class Broken:
            def post(
                self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
            ) -> HttpResponse:
                raise ConnectionResetError("peer reset")

        with pytest.raises(TransientError, match="peer reset"):
            WebhookDestination("https://x.example", transport=Broken()).add(make_batch(["u1"]))

    def test_default_transport_refuses_other_schemes(self) -> None:
        """The stdlib transport never opens file: URLs, even when called directly."""
        with pytest.raises(ConfigurationError, match="http or https"):
            UrllibTransport().post("file:///etc/passwd", b"{}", {}, 1.0)

    def test_protocol(self) -> None:
        """Both the default and a host transport satisfy HttpTransport."""
        assert isinstance(UrllibTransport(), HttpTransport)
        assert isinstance(RecordingTransport(HttpResponse(200)), HttpTransport)

    def test_response_repr_hides_headers_and_body(self) -> None:
        """Response reprs never show cookies or echoed payloads."""
        response = HttpResponse(200, {"Set-Cookie": "session=s3cr3t"}, b"s3cr3t")

        assert "HttpResponse(status=200, body=<6 bytes>)" == repr(response)


class TestConfiguration:
    """Both webhook destinations: the same settings, checked the same way."""

    @pytest.mark.parametrize("kind", KINDS)
    def test_capabilities(self, kind: AnyWebhook) -> None:
        """Real-time and removals supported; the batch size is per instance."""
        default = kind("https://x.example")
        small = kind("https://x.example", batch_size=50)

        assert ("Webhook", True, True, 1_000) == (
            default.capabilities.name,
            default.capabilities.supports_realtime,
            default.capabilities.supports_removals,
            default.capabilities.max_batch_size,
        )
        assert 50 == small.capabilities.max_batch_size
        assert 1_000 == default.capabilities.max_batch_size

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"url": "ftp://x.example/hook"}, "url"),
            ({"url": "x.example/hook"}, "url"),
            ({"url": "https:///hook"}, "url"),
            ({"url": "https://x.example:port/"}, "url"),
            ({"url": "https://x.example/a b"}, "url"),
            ({"url": 42}, "url"),
            ({"timeout": 0}, "timeout"),
            ({"timeout": -1.0}, "timeout"),
            ({"timeout": float("nan")}, "timeout"),
            ({"batch_size": 0}, "batch_size"),
            ({"batch_size": 1.5}, "batch_size"),
            ({"headers": {"Bad Name": "x"}}, "headers"),
            ({"headers": {"X-Num": 1}}, "headers['X-Num']"),
            ({"transport": object()}, "transport"),
        ],
    )
    @pytest.mark.parametrize("kind", KINDS)
    def test_invalid(self, kind: AnyWebhook, kwargs: dict[str, Any], field: str) -> None:
        """Every bad argument is a ConfigurationError naming it."""
        arguments: dict[str, Any] = {"url": "https://x.example/hook", **kwargs}

        with pytest.raises(ConfigurationError) as info:
            kind(**arguments)

        assert field == info.value.field

    @pytest.mark.parametrize("kind", KINDS)
    def test_frozen(self, kind: AnyWebhook) -> None:
        """Settings cannot drift from the capabilities derived from them."""
        dest = kind("https://x.example")

        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            dest.batch_size = 5  # type: ignore[misc]
