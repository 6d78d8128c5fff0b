"""
The webhook destinations and their transports as a host uses them, checked
by mypy (``nox -s typing``) and never executed: a host-written transport of
each kind, the httpx ones, and both schedulers registering the adapters.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import httpx
from typing_extensions import assert_type

import cohortsync
from cohortsync.destinations import (
    AsyncHttpTransport,
    AsyncHttpxTransport,
    AsyncioTransport,
    AsyncWebhookDestination,
    HttpResponse,
    HttpTransport,
    HttpxTransport,
    WebhookDestination,
)
from cohortsync.storage import MemoryStorage


class HostTransport:
    """A host's blocking client: structurally an HttpTransport."""

    def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        return HttpResponse(204)


class AsyncHostTransport:
    """A host's asynchronous client: structurally an AsyncHttpTransport."""

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> HttpResponse:
        return HttpResponse(204, {"Retry-After": "3"}, b"")


blocking_transport: HttpTransport = HostTransport()
async_transport: AsyncHttpTransport = AsyncHostTransport()
httpx_transport: HttpTransport = HttpxTransport(httpx.Client(timeout=5.0))
async_httpx_transport: AsyncHttpTransport = AsyncHttpxTransport(httpx.AsyncClient())
stdlib_transport: AsyncHttpTransport = AsyncioTransport(
    ssl_context=ssl.create_default_context(cafile="ca.pem"), max_idle=10, keepalive=2.5
)

hook = WebhookDestination(
    "https://hooks.example.com/c",
    headers={"Authorization": "Bearer token"},
    timeout=5.0,
    batch_size=500,
    transport=httpx_transport,
)
assert_type(hook.url, str)
assert_type(hook.timeout, float)
assert_type(hook.batch_size, int)
assert_type(hook.capabilities, cohortsync.Capabilities)

async_hook = AsyncWebhookDestination("https://hooks.example.com/c", transport=async_transport)
assert_type(async_hook.batch_size, int)
assert_type(async_hook.capabilities, cohortsync.Capabilities)

with HttpxTransport() as own:
    assert_type(own, HttpxTransport)
    own.close()

scheduler = cohortsync.Scheduler(MemoryStorage())
assert_type(scheduler.add_destination("hook", hook), WebhookDestination)
assert_type(scheduler.add_destination("async-hook", async_hook), AsyncWebhookDestination)


async def async_host(batch: cohortsync.Batch) -> None:
    async with AsyncWebhookDestination("https://hooks.example.com/c") as dest:
        assert_type(dest, AsyncWebhookDestination)
        aio = cohortsync.AsyncScheduler(MemoryStorage())
        assert_type(aio.add_destination("hook", dest), AsyncWebhookDestination)
        assert_type(await dest.add(batch), cohortsync.DeliveryResult)
    async with AsyncHttpxTransport() as transport:
        assert_type(transport, AsyncHttpxTransport)
        response = await transport.post("https://hooks.example.com/c", b"{}", {}, 5.0)
        assert_type(response, HttpResponse)
        await transport.aclose()
    async with AsyncioTransport() as stdlib:
        assert_type(stdlib, AsyncioTransport)
        assert_type(await stdlib.post("https://h.example/c", b"{}", {}, 5.0), HttpResponse)
