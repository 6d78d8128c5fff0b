"""
A destination that really delivers: JSON batches POSTed to a cohort webhook.

The HTTP client is pluggable (:class:`HttpTransport`) so hosts can reuse the
client they already trust (connection pools, proxies, mTLS, tracing); the
default :class:`UrllibTransport` needs nothing beyond the standard library.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from http.client import HTTPException, HTTPMessage
from typing import IO, Any, Protocol, runtime_checkable

import attrs
from typing_extensions import override

from cohortsync import _validators as v
from cohortsync._clock import Clock, SystemClock, require_aware
from cohortsync._destination import (
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

__all__ = ["HttpResponse", "HttpTransport", "UrllibTransport", "WebhookDestination"]

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


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    @override
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> None:
        # urllib would re-send a POST as a bodiless GET, with our Authorization
        # header, to wherever the server points: surface the 3xx instead.
        return


class UrllibTransport:
    """
    The default transport: :mod:`urllib.request`, no dependencies.

    ``timeout`` bounds connecting and each read, as in :mod:`socket`. Proxies
    come from the usual environment variables; redirects are not followed.
    """

    def __init__(self) -> None:
        self._opener = urllib.request.build_opener(_NoRedirects())

    def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        """
        POST with :mod:`urllib.request`; 4xx and 5xx answers are returned,
        not raised, so the destination alone decides what each status means.

        Raises:
            ConfigurationError: The URL is not http or https (urllib would
                also open ``file:`` URLs).
            TransientError: No answer came (refused, reset, timed out).
        """
        if urllib.parse.urlsplit(url).scheme.lower() not in {"http", "https"}:
            # urllib would also open file: and ftp: URLs; a webhook never needs them.
            raise ConfigurationError("url", _safe_url(url), "must use http or https")
        request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")  # noqa: S310 - scheme checked just above
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return HttpResponse(
                    response.status, dict(response.headers.items()), response.read()
                )
        except urllib.error.HTTPError as e:
            try:
                error_body = e.read()
            except (OSError, HTTPException):
                error_body = b""
            finally:
                e.close()
            return HttpResponse(e.code, dict(e.headers.items()) if e.headers else {}, error_body)
        except urllib.error.URLError as e:
            raise TransientError(f"POST to {_safe_url(url)} failed: {_describe(e.reason)}") from e
        except (OSError, HTTPException) as e:
            raise TransientError(f"POST to {_safe_url(url)} failed: {_describe(e)}") from e

    def __repr__(self) -> str:
        return "UrllibTransport()"


def _describe(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, BaseException):
        text = str(reason)
        return f"{type(reason).__name__}: {text}" if text else type(reason).__name__
    return str(reason)


def _safe_url(url: str) -> str:
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


def _check_url(_inst: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise ConfigurationError("url", type(value).__name__, "must be a str")
    shown = _safe_url(value)
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
        return UrllibTransport()
    if not isinstance(value, HttpTransport):
        raise ConfigurationError(
            "transport", type(value).__name__, "must have a post(url, body, headers, timeout)"
        )
    return value


def _check_batch_size(value: int) -> int:
    return v.check_count("batch_size", value, minimum=1)


def _to_clock(value: Clock | None) -> Clock:
    return SystemClock() if value is None else value


def _http_date(value: str) -> datetime | None:
    try:
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


@attrs.frozen(eq=False, repr=False)
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

    Args:
        url: An ``http`` or ``https`` endpoint. Tokens in its query string are
            sent but never shown.
        headers: Extra request headers, typically ``Authorization``. They are
            treated as secrets: never in ``repr``, logs or error messages.
        timeout: Seconds to wait for connecting and for each read.
        batch_size: Most users per message (becomes
            ``capabilities.max_batch_size``).
        transport: The HTTP client; :class:`UrllibTransport` by default.
        clock: Reads "now" for ``Retry-After`` dates when the server sends no
            ``Date`` header.
    """

    url: str = attrs.field(validator=_check_url)
    _headers: dict[str, str] = attrs.field(
        default=None, kw_only=True, converter=_check_headers, alias="headers", repr=False
    )
    timeout: float = attrs.field(
        default=10.0, kw_only=True, validator=v.number(0.0, inclusive=False)
    )
    # A converter, not a validator: validators run after the capabilities default
    # below has already used the value.
    batch_size: int = attrs.field(
        default=WEBHOOK.max_batch_size, kw_only=True, converter=_check_batch_size
    )
    _transport: HttpTransport = attrs.field(
        default=None, kw_only=True, converter=_to_transport, alias="transport"
    )
    _clock: Clock = attrs.field(default=None, kw_only=True, converter=_to_clock, alias="clock")
    # Per instance because the batch size is configurable; shadows the ClassVar.
    capabilities: Capabilities = attrs.field(init=False)  # type: ignore[misc]

    @capabilities.default
    def _capabilities(self) -> Capabilities:
        return WEBHOOK.evolve(max_batch_size=self.batch_size)

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
            **self._headers,
            "Content-Type": "application/json",
            "Idempotency-Key": batch.idempotency_key,
        }
        safe_url = _safe_url(self.url)
        fields = _log_fields(batch) if log.isEnabledFor(logging.DEBUG) else None
        if fields is not None:
            log.debug(
                "sync %s run %s batch %d: webhook POST %s: %s %d users, message_id=%s",
                context.sync_id,
                context.run_id,
                batch.sequence,
                safe_url,
                "in_cohort" if in_cohort else "out_of_cohort",
                len(batch),
                batch.idempotency_key,
                extra=fields,
            )
        try:
            response = self._transport.post(self.url, body, headers, self.timeout)
        except OSError as e:  # a host transport that lets socket errors escape
            raise TransientError(f"POST to {safe_url} failed: {_describe(e)}") from e
        if fields is not None:
            log.debug(
                "sync %s run %s batch %d: webhook %s answered HTTP %d for message_id=%s",
                context.sync_id,
                context.run_id,
                batch.sequence,
                safe_url,
                response.status,
                batch.idempotency_key,
                extra=fields,
            )
        return self._outcome(batch, response)

    def _outcome(self, batch: Batch, response: HttpResponse) -> DeliveryResult:
        status = response.status
        if 200 <= status < 300:
            return _rejections(batch, response.body)
        message = f"webhook {_safe_url(self.url)} answered HTTP {status}{self._detail(response)}"
        if status == 429:
            raise RateLimitedError(message, retry_after=_retry_after(response, self._clock))
        if status == 408 or 500 <= status < 600:
            raise TransientError(message, retry_after=_retry_after(response, self._clock))
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
        for secret in self._secrets():
            text = text.replace(secret, "***")
        if len(text) > _MAX_DETAIL:
            text = text[: _MAX_DETAIL - 3] + "..."
        return f": {text}"

    def _secrets(self) -> list[str]:
        secrets: set[str] = set()
        query = urllib.parse.urlsplit(self.url).query
        values = [*self._headers.values(), *(val for _, val in urllib.parse.parse_qsl(query))]
        for value in values:
            secrets.add(value)
            secrets.update(w for w in value.split() if len(w) >= _MIN_SECRET_WORD)
        # Longest first, so a token is not left half-replaced by a shorter match.
        return sorted((s for s in secrets if s), key=len, reverse=True)

    def __repr__(self) -> str:
        return f"WebhookDestination({_safe_url(self.url)!r})"


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
