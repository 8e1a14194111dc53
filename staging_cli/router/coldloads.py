"""Cold loads owned by the router application, never by a request.

A request for a model no worker has loaded calls :meth:`ColdLoads.start`, which returns the one
task loading that model in this process (created on first use, joined afterwards). The task
lives in the application: a client that disconnects, refreshes or times out at a load balancer
cancels only its own wait, never the task. Across router replicas the coordinator decides which
one owns the job; the others' tasks follow it and take over if its owner dies. A background loop
adopts jobs whose owner died even when no request is waiting, so an orphaned cold load always
finishes.

Each task: hash the files (cached) -> claim the job -> place it on a worker (a worker that has
it, else one holding the blobs, else one with room) -> stage -> load -> remember the route.
Its bounds are its own: the stager's stall window and deadline, the size-scaled load timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..coldload import (
    PLACED_BY_OWNER,
    ColdLoader,
    ColdLoadRequest,
    ColdLoadResult,
    JobWaiting,
    Loaded,
    Loading,
    Placed,
)
from ..config import format_size
from ..coordinator import Coordinator
from ..errors import StagingError, UsageError
from ..stager.events import Event, Hashing, UploadProgress
from .catalog import Catalog, CatalogEntry
from .placement import place
from .workers import WorkerPool

log = logging.getLogger("staging_cli.router")

ADOPTABLE_PHASES = ("claimed", "placing", "staging", "loading")


@dataclass
class LoadStatus:
    """What this process knows of a model's cold load (for 503 bodies, /staging/jobs, logs)."""

    model: str
    phase: str = "queued"
    bytes_done: int = 0
    bytes_total: int = 0
    eta_seconds: float | None = None
    worker: str | None = None
    reason: str = ""
    started: float = field(default_factory=time.time)
    error: str | None = None
    failed_at: float | None = None

    def public(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "phase": self.phase,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "worker": self.worker,
        }


class ColdLoads:
    """The application's cold-load tasks, one per model, plus the routes they produced."""

    def __init__(
        self,
        catalog: Catalog,
        pool: WorkerPool,
        coordinator: Coordinator,
        *,
        failure_grace: float = 30.0,
        on_finished: Callable[[str, ColdLoadResult | None, float, BaseException | None], None]
        | None = None,
    ) -> None:
        self.catalog = catalog
        self.pool = pool
        self.coordinator = coordinator
        self.failure_grace = failure_grace
        self.on_finished = on_finished
        self.loader = ColdLoader(coordinator, pool.stager_for, place=self._place)
        self.routes: dict[str, str] = {}  # model -> worker that has it loaded
        self.status: dict[str, LoadStatus] = {}
        self._tasks: dict[str, asyncio.Task[ColdLoadResult]] = {}
        self._closing = False

    # -- requests' view ----------------------------------------------------------------------

    def failure(self, model: str) -> LoadStatus | None:
        """A failed cold load still inside its grace period (requests report it, no retry)."""
        status = self.status.get(model)
        if status is None or status.failed_at is None:
            return None
        if time.time() - status.failed_at > self.failure_grace:
            return None
        return status

    def start(self, entry: CatalogEntry) -> asyncio.Task[ColdLoadResult]:
        """The task cold-loading ``entry`` in this process: created once, joined afterwards."""
        task = self._tasks.get(entry.name)
        if task is not None and not task.done():
            return task
        if self._closing:
            raise UsageError("the router is shutting down")
        self.status[entry.name] = LoadStatus(entry.name, bytes_total=entry.total_size)
        task = asyncio.create_task(self._run(entry), name=f"cold-load {entry.name}")
        self._tasks[entry.name] = task
        task.add_done_callback(lambda t: self._done(entry.name, t))
        return task

    def in_progress(self) -> list[str]:
        return [name for name, task in self._tasks.items() if not task.done()]

    def forget_route(self, model: str) -> None:
        self.routes.pop(model, None)

    # -- the task ------------------------------------------------------------------------------

    async def _place(self, request: ColdLoadRequest) -> tuple[str, str]:
        views = await self.pool.views(fresh=True)
        choice = place(request.model, dict(zip(request.digests, request.sizes, strict=True)), views)
        log.info("placing %s on %s: %s", request.model, choice.worker, choice.reason)
        return choice.worker, choice.reason

    async def _run(self, entry: CatalogEntry) -> ColdLoadResult:
        status = self.status[entry.name]
        logged = 0.0

        def track(event: Event) -> None:
            nonlocal logged
            if isinstance(event, Hashing):
                status.phase = "hashing"
            elif isinstance(event, UploadProgress):
                status.phase = "staging"
                status.bytes_done = event.bytes_done
                status.eta_seconds = event.eta_seconds
                now = time.monotonic()
                if now - logged >= 2.0 or event.bytes_done == event.bytes_total:
                    logged = now
                    eta = f", ETA {event.eta_seconds:.0f}s" if event.eta_seconds is not None else ""
                    log.info(
                        "cold load of %s: staged %s of %s to %s (%s/s%s)",
                        entry.name,
                        format_size(event.bytes_done),
                        format_size(event.bytes_total),
                        status.worker,
                        format_size(event.rate),
                        eta,
                    )
            elif isinstance(event, Placed):
                status.worker, status.reason = event.worker, event.reason
                log.info(
                    "cold load of %s: placed on %s: %s", entry.name, event.worker, event.reason
                )
            elif isinstance(event, Loading):
                status.phase, status.worker = "loading", event.worker
                status.bytes_done = status.bytes_total
                log.info("cold load of %s: loading on %s", entry.name, event.worker)
            elif isinstance(event, Loaded):
                status.phase = "loaded"
            elif isinstance(event, JobWaiting):
                status.phase = event.phase
                status.bytes_done = event.bytes_done
                status.bytes_total = event.bytes_total or status.bytes_total
                status.eta_seconds = event.eta_seconds
                if event.worker:
                    status.worker = event.worker

        stager = self.pool.stager_for(self.pool.urls[0])  # digests do not depend on the worker
        digests = []
        for path in entry.files:
            _, digest = await stager.digest(path, on_event=track)
            digests.append(digest)
        request = ColdLoadRequest(
            entry.name,
            None,
            list(entry.files),
            digests,
            list(entry.sizes),
            True,
            dict(entry.parameters) or None,
        )
        result = await self.loader.run(request, on_event=track)
        self.routes[entry.name] = result.worker
        status.phase, status.worker = "loaded", result.worker
        return result

    def _done(self, model: str, task: asyncio.Task[ColdLoadResult]) -> None:
        status = self.status.get(model)
        seconds = time.time() - status.started if status else 0.0
        if task.cancelled():
            if status:
                status.phase = "interrupted"
            if self.on_finished:
                self.on_finished(model, None, seconds, None)
            return
        exc = task.exception()
        if exc is not None:
            reason = str(exc) if isinstance(exc, StagingError) else f"{type(exc).__name__}: {exc}"
            log.warning("cold load of %s failed: %s", model, reason)
            if status:
                status.phase, status.error, status.failed_at = "failed", reason, time.time()
            if self.on_finished:
                self.on_finished(model, None, seconds, exc)
            return
        log.info("cold load of %s done on %s", model, task.result().worker)
        if self.on_finished:
            self.on_finished(model, task.result(), seconds, None)

    # -- orphans -------------------------------------------------------------------------------

    async def adopt_orphans(self) -> list[str]:
        """Start a task for every router job whose owner died (or shut down) mid-way."""
        adopted = []
        for job in await self.coordinator.jobs():
            if job.worker != PLACED_BY_OWNER or not job.claimable:
                continue
            if job.status == "running" or (
                job.status == "released" and job.phase in ADOPTABLE_PHASES
            ):
                entry = self.catalog.get(job.model)
                task = self._tasks.get(job.model)
                if (
                    entry is not None
                    and (task is None or task.done())
                    and not self.failure(job.model)
                ):
                    log.info(
                        "adopting the orphaned cold load of %s (owner %s)", job.model, job.owner
                    )
                    self.start(entry)
                    adopted.append(job.model)
        return adopted

    async def adopt_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.adopt_orphans()
            except StagingError as exc:
                log.warning("looking for orphaned cold loads failed: %s", exc)

    async def aclose(self) -> None:
        """Stop every task: leases are released, uploads stay resumable on the workers."""
        self._closing = True
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {**asdict(s), "active": s.model in self.in_progress()} for s in self.status.values()
        ]
