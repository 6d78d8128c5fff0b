"""
A destination that really delivers: JSON batches POSTed to a cohort webhook.

:class:`WebhookDestination` blocks, :class:`AsyncWebhookDestination` awaits;
both are thin shells over one private core (``_Webhook``: settings,
message, log lines, what each answer means), so they cannot drift apart.

The HTTP client is pluggable (:class:`HttpTransport`, :class:`AsyncHttpTransport`)
so hosts can reuse the client they already trust (connection pools, proxies,
mTLS, tracing); the default :class:`UrllibTransport` needs nothing beyond the
standard library, and ``cohortsync[httpx]`` adds the httpx transports.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import datetime, timezone
from types import TracebackType
from typing import Protocol, runtime_checkable

import attrs
from typing_extensions import Self

from cohortsync import _validators as v
from cohortsync._clock import Clock, SystemClock, require_aware
from cohortsync._destination import (
    AsyncDestination,
    Batch,
    Capabilities,
    DeliveryResult,
    Destination,
    Rejection,
)
from cohortsync.destinations.catalog import WEBHOOK
from cohortsync.exceptions import (
    AuthenticationError,
    BadDataError,
    ConfigurationError,
    PermanentError,
    RateLimitedError,
    TransientError,
)

__all__ = [
    "AsyncHttpTransport",
    "AsyncWebhookDestination",
    "HttpResponse",
    "HttpTransport",
    "WebhookDestination",
]

log = logging.getLogger("cohortsync.destinations")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 header field name
_MAX_DETAIL = 200
_MIN_SECRET_WORD = 6


class _Headers(Mapping[str, str]):
    """
    Read-only headers with case-insensitive lookup, as HTTP requires: servers
    spell ``Retry-After`` however they like.
    """

    __slots__ = ("_items",)

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._items = {str(k).lower(): (str(k), str(val)) for k, val in headers.items()}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (original for original, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        # Response headers may carry cookies or tokens: names only.
        return f"<headers {sorted(self._items)}>"


def _to_headers(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return _Headers({} if value is None else value)


@attrs.frozen
class HttpResponse:
    """
    What an :class:`HttpTransport` returns for any HTTP status, error or not.

    Args:
        status: The HTTP status code.
        headers: Response headers; lookups ignore case.
        body: The raw response body.
    """

    status: int = attrs.field(validator=v.count(100))
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_to_headers, repr=False)
    body: bytes = attrs.field(
        default=b"",
        validator=attrs.validators.instance_of(bytes),
        repr=lambda body: f"<{len(body)} bytes>",
    )


@runtime_checkable
class HttpTransport(Protocol):
    """
    The HTTP client a :class:`WebhookDestination` posts through.

    Return an :class:`HttpResponse` for every HTTP answer, including 4xx and
    5xx: the destination maps statuses to errors. Raise
    :class:`~cohortsync.exceptions.TransientError` when no answer came
    (connection refused, timeout, reset); an ``OSError`` is treated the same.
    Never follow redirects: they would replay credentials to another URL.
    """

    def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        """
        POST *body* to *url* and return the answer, whatever its status.

        Args:
            url: The webhook's URL.
            body: The JSON batch, already encoded.
            headers: Content type, ``Idempotency-Key`` and the host's headers
                (credentials: keep them out of logs and errors).
            timeout: Seconds to wait for a connection and for each read.

        Raises:
            TransientError: No answer came; the engine retries with backoff.
        """
        ...


@runtime_checkable
class AsyncHttpTransport(Protocol):
    """
    The HTTP client an :class:`AsyncWebhookDestination` posts through: the
    awaitable twin of :class:`HttpTransport`, with the same contract.

    Return an :class:`HttpResponse` for every HTTP answer, including 4xx and
    5xx. Raise :class:`~cohortsync.exceptions.TransientError` when no answer
    came; an ``OSError`` or an :class:`asyncio.TimeoutError` is treated the
    same. Never follow redirects. Let :class:`asyncio.CancelledError` through:
    it is how the scheduler stops a run.
    """

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        """
        POST *body* to *url* and return the answer, whatever its status.

        Args:
            url: The webhook's URL.
            body: The JSON batch, already encoded.
            headers: Content type, ``Idempotency-Key`` and the host's headers
                (credentials: keep them out of logs and errors).
            timeout: Seconds to wait for a connection and for each read.

        Raises:
            TransientError: No answer came; the engine retries with backoff.
        """
        ...


def require_http(url: str) -> None:
    """
    Refuse a URL that is not http or https before any client sees it:
    urllib would also open ``file:`` and ``ftp:`` URLs, and a webhook never
    needs them.

    Raises:
        ConfigurationError: Another scheme (the URL shown without its secrets).
    """
    if urllib.parse.urlsplit(url).scheme.lower() not in {"http", "https"}:
        raise ConfigurationError("url", safe_url(url), "must use http or https")


def _describe(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, BaseException):
        text = str(reason)
        return f"{type(reason).__name__}: {text}" if text else type(reason).__name__
    return str(reason)


def safe_url(url: str) -> str:
    """
    *url* without userinfo, query string or fragment: the parts that carry tokens.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid url>"
    host = parts.netloc.rpartition("@")[2]
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{parts.path}{query}"


def _check_url(value: object) -> str:
    # A converter, not a validator: the shown_url default reads the value next.
    if not isinstance(value, str):
        raise ConfigurationError("url", type(value).__name__, "must be a str")
    shown = safe_url(value)
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port  # raises on a malformed port
    except ValueError as e:
        raise ConfigurationError("url", shown, f"is not a valid URL ({e})") from None
    if parts.scheme.lower() not in {"http", "https"}:
        raise ConfigurationError("url", shown, "must use http or https")
    if not parts.hostname:
        raise ConfigurationError("url", shown, "has no host")
    if "@" in parts.netloc:
        raise ConfigurationError(
            "url", shown, "must not embed credentials; pass headers={'Authorization': ...}"
        )
    if any(c.isspace() or ord(c) < 32 for c in value):
        raise ConfigurationError("url", shown, "must not contain whitespace or control characters")
    return value


def _check_headers(value: Mapping[str, str] | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError("headers", type(value).__name__, "must be a mapping")
    checked: dict[str, str] = {}
    for name, val in value.items():
        if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
            raise ConfigurationError("headers", name, "is not a valid header name")
        # Values are secrets (Authorization): name the header, never the value.
        if not isinstance(val, str):
            raise ConfigurationError(f"headers[{name!r}]", "<redacted>", "must be a str")
        if any(c in val for c in "\r\n\0"):
            raise ConfigurationError(f"headers[{name!r}]", "<redacted>", "must be a single line")
        if not _latin1(val):
            raise ConfigurationError(f"headers[{name!r}]", "<redacted>", "must be Latin-1 text")
        checked[name] = val
    return checked


def _latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _to_transport(value: HttpTransport | None) -> HttpTransport:
    if value is None:
        # urllib.request and http.client load only for the blocking default.
        from cohortsync.destinations._urllib import UrllibTransport  # noqa: PLC0415

        return UrllibTransport()
    if not isinstance(value, HttpTransport):
        raise ConfigurationError(
            "transport", type(value).__name__, "must have a post(url, body, headers, timeout)"
        )
    if inspect.iscoroutinefunction(value.post):
        # Its post() would hand back a coroutine, never awaited, instead of an answer.
        raise ConfigurationError(
            "transport",
            type(value).__name__,
            "is asynchronous (async def post): use it with AsyncWebhookDestination",
        )
    return value


def _to_async_transport(
    value: AsyncHttpTransport | None,
) -> tuple[AsyncHttpTransport, Callable[[], Awaitable[None]] | None]:
    """
    The transport, and how to close it when the destination made it itself.
    """
    if value is None:
        from cohortsync.destinations._asyncio_http import (  # noqa: PLC0415 - loads asyncio
            AsyncioTransport,
        )

        made = AsyncioTransport()
        return made, made.aclose
    if not isinstance(value, AsyncHttpTransport) or not inspect.iscoroutinefunction(value.post):
        # A blocking post() would stall the event loop for every request.
        raise ConfigurationError(
            "transport",
            type(value).__name__,
            "must have an async def post(url, body, headers, timeout); "
            "a blocking transport goes with WebhookDestination",
        )
    return value, None


def _check_batch_size(value: int) -> int:
    return v.check_count("batch_size", value, minimum=1)


def _to_clock(value: Clock | None) -> Clock:
    return SystemClock() if value is None else value


def _http_date(value: str) -> datetime | None:
    try:
        import email.utils  # noqa: PLC0415 - only for a Retry-After given as a date

        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC in RFC 5322
        when = when.replace(tzinfo=timezone.utc)
    return when


def _retry_after(response: HttpResponse, clock: Clock) -> float | None:
    """
    Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date.

    An HTTP-date is measured against the response's own ``Date`` header when
    there is one, so clock skew between us and the server does not matter.
    """
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    when = _http_date(raw)
    if when is None:
        return None
    server_now = response.headers.get("Date")
    now = (_http_date(server_now) if server_now else None) or clock.now()
    return max(0.0, (when - now).total_seconds())


@attrs.frozen
class _Request:
    """One batch as the webhook receives it: what either transport posts."""

    body: bytes
    headers: dict[str, str]
    # The log lines' extra= fields, when DEBUG is on (None: do not log).
    fields: dict[str, object] | None


@attrs.frozen(repr=False)
class _Webhook:
    """
    Everything the two webhook destinations share, so they cannot drift apart:
    the settings (validated here, once), the message a batch becomes, the log
    lines, and what each answer means. They differ only in how they call
    their transport: :class:`WebhookDestination` blocks, and
    :class:`AsyncWebhookDestination` awaits.
    """

    url: str = attrs.field(converter=_check_url)
    headers: dict[str, str] = attrs.field(converter=_check_headers)
    timeout: float = attrs.field(validator=v.number(0.0, inclusive=False))
    # A converter, not a validator: validators run after the capabilities
    # default below has already used the value.
    batch_size: int = attrs.field(converter=_check_batch_size)
    clock: Clock = attrs.field(converter=_to_clock)
    capabilities: Capabilities = attrs.field(init=False)
    shown_url: str = attrs.field(init=False)

    @capabilities.default
    def _capabilities(self) -> Capabilities:
        return WEBHOOK.evolve(max_batch_size=self.batch_size)

    @shown_url.default
    def _shown_url(self) -> str:
        return safe_url(self.url)

    def request(self, batch: Batch, *, in_cohort: bool) -> _Request:
        """The JSON message and headers for *batch*; logs the POST at DEBUG."""
        context = batch.context
        payload = {
            "cohort_id": context.cohort_id,
            "cohort_name": context.cohort_name,
            "in_cohort": in_cohort,
            "computed_time": require_aware(context.computed_at, "computed_at").isoformat(),
            "message_id": batch.idempotency_key,
            "users": batch.identifiers,
        }
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        headers = {
            "User-Agent": "cohortsync",
            **self.headers,
            "Content-Type": "application/json",
            "Idempotency-Key": batch.idempotency_key,
        }
        fields = _log_fields(batch) if log.isEnabledFor(logging.DEBUG) else None
        if fields is not None:
            log.debug(
                "sync %s run %s batch %d: webhook POST %s: %s %d users, message_id=%s",
                context.sync_id,
                context.run_id,
                batch.sequence,
                self.shown_url,
                "in_cohort" if in_cohort else "out_of_cohort",
                len(batch),
                batch.idempotency_key,
                extra=fields,
            )
        return _Request(body, headers, fields)

    def no_answer(self, error: BaseException) -> TransientError:
        """
        The error for a transport that let a socket error or a timeout escape
        instead of raising :class:`~cohortsync.exceptions.TransientError`.
        """
        return TransientError(f"POST to {self.shown_url} failed: {_describe(error)}")

    def outcome(self, batch: Batch, request: _Request, response: HttpResponse) -> DeliveryResult:
        """
        What *response* means for *batch*: its rejections, or the error the
        engine acts on; logs the answer at DEBUG.

        Raises:
            RateLimitedError: HTTP 429.
            TransientError: HTTP 408 or 5xx.
            AuthenticationError: HTTP 401 or 403.
            BadDataError: HTTP 400, 413 or 422.
            PermanentError: Any other status that is not 2xx, redirects included.
        """
        status = response.status
        if request.fields is not None:
            log.debug(
                "sync %s run %s batch %d: webhook %s answered HTTP %d for message_id=%s",
                batch.context.sync_id,
                batch.context.run_id,
                batch.sequence,
                self.shown_url,
                status,
                batch.idempotency_key,
                extra=request.fields,
            )
        if 200 <= status < 300:
            return _rejections(batch, response.body)
        message = f"webhook {self.shown_url} answered HTTP {status}{self._detail(response)}"
        if status == 429:
            raise RateLimitedError(message, retry_after=_retry_after(response, self.clock))
        if status == 408 or 500 <= status < 600:
            raise TransientError(message, retry_after=_retry_after(response, self.clock))
        if status in {401, 403}:
            raise AuthenticationError(message)
        if status in {400, 413, 422}:
            raise BadDataError(message)
        raise PermanentError(message)

    def _detail(self, response: HttpResponse) -> str:
        """
        The start of an error body, for diagnosis, with our secrets blanked out in
        case the server echoes the request back.
        """
        text = " ".join(response.body.decode("utf-8", "replace").split())
        if not text:
            return ""
        text = self._secret_pattern().sub("***", text)
        if len(text) > _MAX_DETAIL:
            text = text[: _MAX_DETAIL - 3] + "..."
        return f": {text}"

    def _secrets(self) -> list[str]:
        secrets: set[str] = set()
        query = urllib.parse.urlsplit(self.url).query
        values = [*self.headers.values(), *(val for _, val in urllib.parse.parse_qsl(query))]
        for value in values:
            secrets.add(value)
            secrets.update(w for w in value.split() if len(w) >= _MIN_SECRET_WORD)
        # Longest first, so a token is not left half-replaced by a shorter match.
        return sorted((s for s in secrets if s), key=len, reverse=True)

    def _secret_pattern(self) -> re.Pattern[str]:
        """
        Our secrets as the server may echo them: in any case (a server that
        lower-cases headers) and percent-encoded, as they went in the query.
        """
        forms: set[str] = set()
        for secret in self._secrets():
            forms.update(
                (secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret))
            )
        ordered = sorted(forms, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, ordered)) or "(?!)", re.IGNORECASE)

    def describe(self, kind: type[object]) -> str:
        """The ``repr`` of a destination of class *kind*: where it posts, no secrets."""
        return f"{kind.__name__}({self.shown_url!r})"


@attrs.frozen(eq=False, repr=False, init=False)
class WebhookDestination(Destination):
    """
    POSTs each batch as a cohort-webhook JSON message.

    The body is ``{"cohort_id", "cohort_name", "in_cohort", "computed_time",
    "message_id", "users"}``: ``in_cohort`` is ``false`` for removals,
    ``computed_time`` is the ISO-8601 UTC time the membership was computed and
    ``message_id`` (also sent as the ``Idempotency-Key`` header) is the batch's
    idempotency key, identical when a batch is re-sent after a crash, so the
    receiver can de-duplicate.

    A 2xx answer may reject members individually with a JSON body
    ``{"rejected": [{"user": "...", "reason": "..."}]}``. Other statuses map to
    the library's errors: 429 to ``RateLimitedError``; 408 and 5xx to
    ``TransientError`` (both honour ``Retry-After``); 401/403 to
    ``AuthenticationError``; 400, 413 and 422 to ``BadDataError``, so the engine
    bisects the batch (which also cures a payload that is too large); anything
    else, redirects included, to ``PermanentError``.

    :class:`AsyncWebhookDestination` is the same adapter for asyncio hosts.

    Args:
        url: An ``http`` or ``https`` endpoint. Tokens in its query string are
            sent but never shown.
        headers: Extra request headers, typically ``Authorization``. They are
            treated as secrets: never in ``repr``, logs or error messages.
        timeout: Seconds to wait for connecting and for each read.
        batch_size: Most users per message (becomes
            ``capabilities.max_batch_size``).
        transport: The HTTP client; :class:`UrllibTransport` by default
            (:class:`HttpxTransport` with ``cohortsync[httpx]``). The host
            that passes one closes it.
        clock: Reads "now" for ``Retry-After`` dates when the server sends no
            ``Date`` header.

    Raises:
        ConfigurationError: A bad argument, named (never a header's value).
    """

    _webhook: _Webhook
    _transport: HttpTransport
    # Per instance because the batch size is configurable; shadows the ClassVar.
    capabilities: Capabilities  # type: ignore[misc]

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        batch_size: int = WEBHOOK.max_batch_size,
        transport: HttpTransport | None = None,
        clock: Clock | None = None,
    ) -> None:
        webhook = _Webhook(url, headers, timeout, batch_size, clock)
        self.__attrs_init__(webhook, _to_transport(transport), webhook.capabilities)

    @property
    def url(self) -> str:
        """The endpoint, as given (its query string may hold a token: do not log it)."""
        return self._webhook.url

    @property
    def timeout(self) -> float:
        """Seconds to wait for connecting and for each read."""
        return self._webhook.timeout

    @property
    def batch_size(self) -> int:
        """Most users per message."""
        return self._webhook.batch_size

    def add(self, batch: Batch) -> DeliveryResult:
        """
        Send the batch with ``in_cohort: true`` (``ADD`` and ``EXISTING`` alike).
        """
        return self._send(batch, in_cohort=True)

    def remove(self, batch: Batch) -> DeliveryResult:
        """
        Send the batch with ``in_cohort: false``.
        """
        return self._send(batch, in_cohort=False)

    def _send(self, batch: Batch, *, in_cohort: bool) -> DeliveryResult:
        webhook = self._webhook
        request = webhook.request(batch, in_cohort=in_cohort)
        try:
            response = self._transport.post(
                webhook.url, request.body, request.headers, webhook.timeout
            )
        except OSError as e:  # a host transport that lets socket errors escape
            raise webhook.no_answer(e) from e
        return webhook.outcome(batch, request, response)

    def __repr__(self) -> str:
        return self._webhook.describe(type(self))


@attrs.frozen(eq=False, repr=False, init=False)
class AsyncWebhookDestination(AsyncDestination):
    """
    :class:`WebhookDestination` for asyncio hosts: the same messages, the same
    answers mapped to the same errors, the same validation and the same care
    with secrets; requests are awaited on the event loop instead of blocking
    a thread.

    Under an :class:`~cohortsync.AsyncScheduler` its requests run on the
    host's loop; a plain :class:`~cohortsync.Scheduler` runs them on a loop of
    its own (see :class:`~cohortsync.AsyncDestination`).

    The default transport, :class:`AsyncioTransport`, needs no dependency
    (HTTP/1.1 over :mod:`asyncio` streams, no proxies); with
    ``cohortsync[httpx]``, :class:`AsyncHttpxTransport` adds proxies and
    HTTP/2. The default keeps one connection pool per event loop, closed
    when that loop shuts down (``asyncio.run`` and
    :meth:`Scheduler.close <cohortsync.Scheduler.close>` do this) or by
    :meth:`aclose` (also ``async with``).

    Args:
        url: As for :class:`WebhookDestination`.
        headers: As for :class:`WebhookDestination`: secrets, never shown.
        timeout: As for :class:`WebhookDestination`.
        batch_size: As for :class:`WebhookDestination`.
        transport: The HTTP client, any :class:`AsyncHttpTransport`;
            :class:`AsyncioTransport` by default. The host that passes one
            closes it.
        clock: As for :class:`WebhookDestination`.

    Raises:
        ConfigurationError: A bad argument, named (never a header's value).
    """

    _webhook: _Webhook
    _transport: AsyncHttpTransport
    # The default transport's aclose; None for the host's transport, which the host closes.
    _close_transport: Callable[[], Awaitable[None]] | None
    # Per instance because the batch size is configurable; shadows the ClassVar.
    capabilities: Capabilities  # type: ignore[misc]

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        batch_size: int = WEBHOOK.max_batch_size,
        transport: AsyncHttpTransport | None = None,
        clock: Clock | None = None,
    ) -> None:
        webhook = _Webhook(url, headers, timeout, batch_size, clock)
        made, close = _to_async_transport(transport)
        self.__attrs_init__(webhook, made, close, webhook.capabilities)

    @property
    def url(self) -> str:
        """The endpoint, as given (its query string may hold a token: do not log it)."""
        return self._webhook.url

    @property
    def timeout(self) -> float:
        """Seconds to wait for connecting and for each read."""
        return self._webhook.timeout

    @property
    def batch_size(self) -> int:
        """Most users per message."""
        return self._webhook.batch_size

    async def add(self, batch: Batch) -> DeliveryResult:
        """
        Send the batch with ``in_cohort: true`` (``ADD`` and ``EXISTING`` alike).
        """
        return await self._send(batch, in_cohort=True)

    async def remove(self, batch: Batch) -> DeliveryResult:
        """
        Send the batch with ``in_cohort: false``.
        """
        return await self._send(batch, in_cohort=False)

    async def _send(self, batch: Batch, *, in_cohort: bool) -> DeliveryResult:
        import asyncio  # noqa: PLC0415 - already loaded: this runs on its event loop

        webhook = self._webhook
        request = webhook.request(batch, in_cohort=in_cohort)
        try:
            response = await self._transport.post(
                webhook.url, request.body, request.headers, webhook.timeout
            )
        # asyncio.TimeoutError is not an OSError before Python 3.11 (asyncio.wait_for).
        except (OSError, asyncio.TimeoutError) as e:
            raise webhook.no_answer(e) from e
        return webhook.outcome(batch, request, response)

    async def aclose(self) -> None:
        """
        Close the default transport's connections on the running loop; a
        transport the host passed is the host's to close. Safe to repeat.
        """
        if self._close_transport is not None:
            await self._close_transport()

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
        return self._webhook.describe(type(self))


def _log_fields(batch: Batch) -> dict[str, object]:
    """The ``extra=`` fields of a log line about *batch*: its run and sequence."""
    context = batch.context
    return {
        "sync_id": context.sync_id,
        "run_id": context.run_id,
        "slot": None if context.slot is None else context.slot.isoformat(),
        "batch": batch.sequence,
    }


def _rejections(batch: Batch, body: bytes) -> DeliveryResult:
    """
    Read ``{"rejected": [...]}`` from a 2xx body; anything else means all accepted.

    Only users that were in the batch count: a rejection of something never
    sent would corrupt the rejected-members ledger.
    """
    if not body.strip():
        return DeliveryResult.ok()
    try:
        data = json.loads(body)
    except ValueError:
        return DeliveryResult.ok()
    entries = data.get("rejected") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return DeliveryResult.ok()
    sent = set(batch.identifiers)
    rejected: dict[str, Rejection] = {}
    for entry in entries:
        user, reason = (
            (entry.get("user"), entry.get("reason")) if isinstance(entry, dict) else (entry, None)
        )
        if not isinstance(user, str) or user not in sent or user in rejected:
            continue
        if not isinstance(reason, str) or not reason.strip():
            reason = "rejected by webhook"
        rejected[user] = Rejection(user, reason)
    if len(rejected) < len(entries):
        log.debug(
            "webhook: ignored %d rejection entries (malformed, repeated or not in the batch)",
            len(entries) - len(rejected),
        )
    return DeliveryResult.partial(rejected.values()) if rejected else DeliveryResult.ok()
