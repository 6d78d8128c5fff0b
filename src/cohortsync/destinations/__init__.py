"""
Ready-made destinations and what they are built from.

* :mod:`cohortsync.destinations.catalog`: capability presets for well-known
  destinations (Facebook Ads, Google Ads, Braze, ...), so eligibility knows
  them by name. No network code.
* :class:`WebhookDestination`: JSON batches shaped like a cohort webhook,
  over a pluggable :class:`HttpTransport` (:class:`UrllibTransport`, the
  standard library's, by default); :class:`AsyncWebhookDestination` is its
  asyncio twin, over an :class:`AsyncHttpTransport`.
* :class:`AsyncioTransport`: :class:`AsyncWebhookDestination`'s default,
  HTTP/1.1 with keep-alive over :mod:`asyncio` streams, no dependencies.
* :class:`HttpxTransport` and :class:`AsyncHttpxTransport` (``cohortsync[httpx]``):
  the webhook over httpx, blocking and asynchronous (proxies, HTTP/2, the
  host's own client).
* :class:`CsvDirectoryDestination`: S3-style entering/exiting/existing files
  in a directory.
* :class:`RateLimits`: the registry of destinations' rate limiters that
  schedulers share; :data:`PROCESS_RATE_LIMITS` is the process-wide default.

The adapters import on first use, so ``import cohortsync`` never loads
``urllib`` or ``csv``, and ``import cohortsync.destinations`` never loads httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cohortsync._delivery import PROCESS_RATE_LIMITS, RateLimits
from cohortsync.destinations import catalog

if TYPE_CHECKING:
    from cohortsync.destinations._asyncio_http import AsyncioTransport
    from cohortsync.destinations._csvdir import CsvDirectoryDestination
    from cohortsync.destinations._httpx import AsyncHttpxTransport, HttpxTransport
    from cohortsync.destinations._urllib import UrllibTransport
    from cohortsync.destinations._webhook import (
        AsyncHttpTransport,
        AsyncWebhookDestination,
        HttpResponse,
        HttpTransport,
        WebhookDestination,
    )

__all__ = [
    "PROCESS_RATE_LIMITS",
    "AsyncHttpTransport",
    "AsyncHttpxTransport",
    "AsyncWebhookDestination",
    "AsyncioTransport",
    "CsvDirectoryDestination",
    "HttpResponse",
    "HttpTransport",
    "HttpxTransport",
    "RateLimits",
    "UrllibTransport",
    "WebhookDestination",
    "catalog",
]

_MODULES = {
    "AsyncHttpTransport": "_webhook",
    "AsyncWebhookDestination": "_webhook",
    "HttpResponse": "_webhook",
    "HttpTransport": "_webhook",
    "WebhookDestination": "_webhook",
    "UrllibTransport": "_urllib",
    "AsyncioTransport": "_asyncio_http",
    "CsvDirectoryDestination": "_csvdir",
    # httpx is an optional dependency (cohortsync[httpx]); its ImportError names the extra.
    "AsyncHttpxTransport": "_httpx",
    "HttpxTransport": "_httpx",
}
"""The private module of each adapter name, imported on first use."""


def __getattr__(name: str) -> Any:
    # The adapters load on first use: they pull in urllib, csv, ssl and threads.
    module = _MODULES.get(name)
    if module is not None:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
