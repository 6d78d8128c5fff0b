"""
The host's web application: FastAPI, with an asynchronous scheduler started
by its lifespan and an ``httpx.AsyncClient`` adapter for a push vendor's HTTP
API. What a host writes after reading ``docs/howto/asyncio.md``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import ClassVar

import httpx
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import cohortsync as cs
from cohortsync.exceptions import (
    AuthenticationError,
    BadDataError,
    NotFoundError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from cohortsync.storage import SQLiteStorage

BATCH_SIZE = 25


class VendorAudience(cs.AsyncDestination):
    """
    The vendor's audiences, one per sync, over HTTP.

    Under the application's :class:`~cohortsync.AsyncScheduler` it shares the
    client the lifespan made. Without one (a synchronous worker, whose event
    loop is its own), it makes a client per run in :meth:`open` and closes it
    in :meth:`close`: both run on the loop that makes the run's requests.
    """

    capabilities: ClassVar[cs.Capabilities] = cs.Capabilities(
        name="Push vendor", supports_realtime=True, max_batch_size=BATCH_SIZE, max_parallel=2
    )

    def __init__(self, base_url: str, client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url
        self.client = client
        self._per_run: dict[str, httpx.AsyncClient] = {}

    async def open(self, context: cs.RunContext) -> None:
        if self.client is None:
            self._per_run[context.run_id] = httpx.AsyncClient(base_url=self.base_url, timeout=10)

    async def close(self, context: cs.RunContext, *, succeeded: bool) -> None:
        client = self._per_run.pop(context.run_id, None)
        if client is not None:
            await client.aclose()

    async def add(self, batch: cs.Batch) -> cs.DeliveryResult:
        return await self._post("add", batch)

    async def remove(self, batch: cs.Batch) -> cs.DeliveryResult:
        return await self._post("remove", batch)

    async def _post(self, op: str, batch: cs.Batch) -> cs.DeliveryResult:
        client = self.client or self._per_run[batch.context.run_id]
        try:
            response = await client.post(
                f"/audiences/{batch.context.sync_id}/members",
                json={"op": op, "users": batch.identifiers},
                headers={"Idempotency-Key": batch.idempotency_key},
            )
        except httpx.TransportError as error:
            raise TransientError(f"vendor unreachable: {type(error).__name__}") from error
        status = response.status_code
        if status == 429:
            raise RateLimitedError("vendor: HTTP 429")
        if status >= 500:
            raise TransientError(f"vendor: HTTP {status}")
        if status in {401, 403}:
            raise AuthenticationError(f"vendor: HTTP {status}")
        if status in {400, 422}:
            raise BadDataError(f"vendor: HTTP {status}")
        if status != 200:
            raise PermanentError(f"vendor: HTTP {status}")
        return cs.DeliveryResult.ok()


class NewSync(BaseModel):
    cohort_id: str
    destination_id: str
    sync_id: str


def build_scheduler(
    db: Path, vendor_url: str, members: Callable[[], Iterable[str]], client: httpx.AsyncClient
) -> cs.AsyncScheduler:
    """The application's scheduler: the same registrations in every process."""
    scheduler = cs.AsyncScheduler(SQLiteStorage(db), max_concurrent_runs=4)
    scheduler.add_cohort(cs.Cohort(id="power-users", name="Power users", source=members))
    scheduler.add_destination("vendor", VendorAudience(vendor_url, client))
    return scheduler


def create_app(
    db: Path, vendor_url: str, members: Callable[[], Iterable[str]], *, idle: float = 30.0
) -> FastAPI:
    """
    The application. *idle* bounds how long a sync created by an endpoint
    waits for its first run (``run_forever`` polls the store that often).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(base_url=vendor_url, timeout=10) as client:
            scheduler = build_scheduler(db, vendor_url, members, client)
            app.state.cohortsync = scheduler
            worker = asyncio.create_task(scheduler.run_forever(idle=idle))
            try:
                yield
            finally:
                # Every run stops at its next step and gives its lease back;
                # the await returns once they all have.
                worker.cancel()
                with suppress(asyncio.CancelledError):
                    await worker
                await scheduler.aclose()

    app = FastAPI(lifespan=lifespan)

    def scheduler_of(app: FastAPI) -> cs.AsyncScheduler:
        scheduler: cs.AsyncScheduler = app.state.cohortsync
        return scheduler

    @app.post("/syncs", status_code=201)
    async def create_sync(new: NewSync) -> dict[str, object]:
        scheduler = scheduler_of(app)
        sync = await scheduler.create_sync(
            new.cohort_id, new.destination_id, cs.SyncPolicy.daily(), sync_id=new.sync_id
        )
        return {"id": sync.id, "next_run": str(await scheduler.next_run(sync.id))}

    @app.post("/syncs/{sync_id}/run-now", status_code=202)
    async def run_now(sync_id: str) -> dict[str, str]:
        try:
            await scheduler_of(app).sync_now(sync_id)
        except NotFoundError as error:
            raise HTTPException(404, str(error)) from error
        return {"id": sync_id}

    @app.get("/syncs/{sync_id}/runs")
    async def runs(sync_id: str) -> list[dict[str, object]]:
        try:
            history = await scheduler_of(app).history(sync_id)
        except NotFoundError as error:
            raise HTTPException(404, str(error)) from error
        return [
            {"status": run.status.value, "trigger": run.trigger.value, "added": run.added}
            for run in history
        ]

    return app
