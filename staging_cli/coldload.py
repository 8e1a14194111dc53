"""claim -> stage -> load -> release: the one orchestration the CLI, the API and the router share.

A cold load is a *job* of the coordinator (model + worker + the files' digests). Exactly one
process in the cluster owns it at a time and does the work; every other process asking for the
same job follows the owner's published progress and reports the owner's result instead of
uploading again::

    acquire ──owner──> stage every file (dedupe, resume) ──> load ──> succeed(result)
       │                 progress published ~every 0.5 s        (failure: fail(reason),
       │                                                          kept for the grace period)
       └──someone else owns it──> wait (LISTEN/NOTIFY or polling) ──> succeeded: verify the
                                  worker still has it (else redo) / failed: report / owner
                                  died: acquire again and resume from the worker's offset

Nothing here is tied to the caller's connection: the owner's work is bounded by its own budgets
(the stager's stall window and deadline, the size-scaled load timeout), and a succeeded job is
trusted only while the worker still shows the model loaded (or, for stage-only jobs, still holds
every blob).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .budget import load_timeout
from .config import Paths
from .coordinator import Coordinator, JobSpec, JobState, Lease, Progress, open_coordinator
from .errors import CoordinatorError, LoadError, LostOwnership, StagingError, UsageError
from .loader import Loader
from .stager import FileResult, StageOptions, Stager, open_stager
from .stager.events import Event, EventSink, Notice, UploadProgress, ignore
from .tus import validate_model_name

PUBLISH_INTERVAL = 0.5
WAIT_SLICE = 5.0


def _worker_in(detail: str) -> str | None:
    """The worker URL an owner's progress detail starts with (``"{worker}: ..."``)."""
    first = detail.split(" ", 1)[0].rstrip(":") if detail else ""
    return first if first.startswith(("http://", "https://")) else None


def owner_id() -> str:
    """Who this process is in the coordinator: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True)
class JobWaiting(Event):
    """Another process owns the job; this one follows its progress."""

    event: ClassVar[str] = "waiting"
    model: str
    owner: str | None
    phase: str
    bytes_done: int
    bytes_total: int | None
    eta_seconds: float | None
    worker: str | None = None


@dataclass(frozen=True)
class Loading(Event):
    event: ClassVar[str] = "loading"
    model: str
    worker: str
    timeout: float


@dataclass(frozen=True)
class Loaded(Event):
    event: ClassVar[str] = "loaded"
    model: str
    worker: str
    state: str


@dataclass(frozen=True)
class ColdLoadResult:
    """What a prestage (or load) achieved, the same for the owner and every waiter."""

    model: str
    worker: str
    files: tuple[FileResult, ...]
    loaded: bool
    role: str  # "owner": this process did the work; "waiter": it reported another's result
    job: Mapping[str, Any] = field(default_factory=dict)

    @property
    def bytes_sent(self) -> int:
        return sum(f.bytes_sent for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": "staged",
            "model": self.model,
            "worker": self.worker,
            "loaded": self.loaded,
            "role": self.role,
            "job": dict(self.job),
            "files": [
                {k: v for k, v in asdict(f).items() if k != "upload_url"} for f in self.files
            ],
        }


# The job's worker when the owner chooses it (the router's cold loads): every replica then agrees
# on one job per model and set of files, whichever worker it ends up on.
PLACED_BY_OWNER = "placed-by-owner"


@dataclass
class ColdLoadRequest:
    """One model's files to stage (and load) on a worker, or on a worker the owner picks."""

    model: str
    worker: str | None  # None: the owner places it with ColdLoader.place
    paths: list[Path]  # empty for load-only
    digests: list[str]
    sizes: list[int]
    load: bool = True
    parameters: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Placed(Event):
    """The owner chose a worker for the model, and why."""

    event: ClassVar[str] = "placed"
    model: str
    worker: str
    reason: str


StagerFactory = Callable[[str], Stager]
Placer = Callable[[ColdLoadRequest], Awaitable[tuple[str, str]]]


class ColdLoader:
    """Runs cold loads through a coordinator; ``stager_for(url)`` gives the stager of a worker
    (its client, token and caches), ``place`` chooses a worker when the request names none."""

    def __init__(
        self,
        coordinator: Coordinator,
        stager_for: StagerFactory,
        *,
        place: Placer | None = None,
        owner: str | None = None,
        on_event: EventSink = ignore,
        load_timeout_cap: float | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.stager_for = stager_for
        self.place = place
        self.owner = owner or owner_id()
        self.emit = on_event
        self.load_timeout_cap = load_timeout_cap

    def _loader(self, worker: str) -> tuple[Stager, Loader]:
        stager = self.stager_for(worker)
        return stager, Loader(stager.client, stager.worker)

    async def run(
        self, request: ColdLoadRequest, on_event: EventSink | None = None
    ) -> ColdLoadResult:
        """Own the job and do it, or follow its owner; returns the job's outcome."""
        emit = on_event or self.emit
        spec = JobSpec.of(request.model, request.worker or PLACED_BY_OWNER, request.digests)
        while True:
            lease = await self.coordinator.acquire(spec, owner=self.owner)
            if lease is not None:
                async with lease:
                    return await self._own(lease, request, emit)
            state = await self.coordinator.get(spec.key)
            while state is not None and state.status == "running" and not state.claimable:
                emit(
                    JobWaiting(
                        request.model,
                        state.owner,
                        state.phase,
                        state.bytes_done,
                        state.bytes_total,
                        state.eta_seconds,
                        request.worker or _worker_in(state.detail),
                    )
                )
                state = await self.coordinator.wait(spec.key, WAIT_SLICE, since=state)
            if state is None or state.claimable:
                continue
            if state.status == "succeeded":
                if await self._still_valid(state, request):
                    return self._reported(state, request)
                await self.coordinator.invalidate(spec.key)
                continue
            if state.status == "failed":
                grace = self.coordinator.tuning.failure_grace
                where = request.worker or (state.result or {}).get("worker") or "a worker"
                raise StagingError(
                    f"another process ({state.owner}) failed to stage {request.model} on "
                    f"{where}: {state.error}. Fix the cause; a new attempt may start "
                    f"{grace:.0f} s after that failure"
                )

    async def _own(self, lease: Lease, request: ColdLoadRequest, emit: EventSink) -> ColdLoadResult:
        total = sum(request.sizes)
        worker, reason = request.worker, ""
        if worker is None:
            if self.place is None:
                raise UsageError(f"no worker given for {request.model} and no placement configured")
            await lease.progress(Progress("placing", 0, total, None, "choosing a worker"))
            worker, reason = await self.place(request)
            emit(Placed(request.model, worker, reason))
        stager, loader = self._loader(worker)
        latest = Progress("staging", 0, total, None, f"{worker}: {reason}" if reason else worker)
        published = latest
        done_before = 0

        def track(event: Event) -> None:
            nonlocal latest
            if isinstance(event, UploadProgress):
                latest = Progress(
                    "staging",
                    done_before + event.bytes_done,
                    total,
                    event.eta_seconds,
                    f"{worker} {Path(event.path).name}: {event.bytes_done}/{event.bytes_total}",
                )
            emit(event)

        async def publish() -> None:
            """Progress for every other process; only a lost lease ends the work early."""
            nonlocal published
            while True:
                await asyncio.sleep(PUBLISH_INTERVAL)
                if latest == published:
                    continue
                try:
                    await lease.progress(latest)
                    published = latest
                except LostOwnership:
                    raise
                except CoordinatorError as exc:
                    # the database may be restarting: the lease's heartbeat keeps retrying and
                    # decides; the bytes keep moving meanwhile (the worker guards the store)
                    emit(Notice(request.model, f"cannot publish progress: {exc}"))

        async def stage_all() -> list[FileResult]:
            nonlocal done_before
            results = []
            staged = request.paths and zip(
                request.paths, request.digests, request.sizes, strict=True
            )
            for path, digest, size in staged or ():
                results.append(
                    await stager.stage_file(
                        path, model=request.model, sha256=digest, on_event=track
                    )
                )
                done_before += size
            return results

        await lease.progress(latest)
        work = asyncio.create_task(stage_all())
        publisher = asyncio.create_task(publish())
        try:
            await asyncio.wait({work, publisher}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()  # the publisher ended: this process lost the job
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                publisher.result()
            files = work.result()
        finally:
            for task in (work, publisher):
                task.cancel()
            await asyncio.gather(work, publisher, return_exceptions=True)
        if not request.paths:
            files = [
                FileResult("", d, s, True, s, 0)
                for d, s in zip(request.digests, request.sizes, strict=True)
            ]
        loaded = False
        if request.load:
            timeout = load_timeout(total)
            if self.load_timeout_cap is not None:
                timeout = min(timeout, self.load_timeout_cap)
            await lease.progress(
                Progress("loading", total, total, None, f"{worker}: timeout {timeout:.0f} s")
            )
            emit(Loading(request.model, worker, timeout))
            state = await loader.load(
                request.model, request.digests, request.parameters, wait=timeout + 60
            )
            if not state.ready:
                raise LoadError(
                    f"worker {worker} answered the load of {request.model} with "
                    f"{state.state}: {state.reason or 'no reason given'}"
                )
            emit(Loaded(request.model, worker, state.state))
            loaded = True
        summary = {
            "loaded": loaded,
            "worker": worker,
            "placement": reason,
            "files": [{"sha256": f.sha256, "size": f.size} for f in files],
        }
        await lease.succeed(summary)
        return ColdLoadResult(
            request.model,
            worker,
            tuple(files),
            loaded,
            "owner",
            {"key": lease.key, "attempt": lease.attempt, "owner": lease.owner},
        )

    async def _still_valid(self, state: JobState, request: ColdLoadRequest) -> bool:
        """A succeeded job counts only while the worker still has what it produced."""
        result = state.result or {}
        worker = request.worker or result.get("worker")
        if not isinstance(worker, str):
            return False
        stager, loader = self._loader(worker)
        if request.load:
            if not result.get("loaded"):
                return False
            current = await loader.state(request.model)
            return (
                current is not None
                and current.ready
                and (not current.files or sorted(current.files) == sorted(request.digests))
            )
        for digest in request.digests:
            response = await stager.client.head(stager.url(f"/blobs/sha256:{digest}"))
            if response.status_code != 200:
                return False
        return True

    def _reported(self, state: JobState, request: ColdLoadRequest) -> ColdLoadResult:
        names = [str(p) for p in request.paths] or [""] * len(request.digests)
        files = tuple(
            FileResult(n, d, s, True, s, 0)
            for n, d, s in zip(names, request.digests, request.sizes, strict=True)
        )
        loaded = bool((state.result or {}).get("loaded"))
        return ColdLoadResult(
            request.model,
            request.worker or str((state.result or {}).get("worker")),
            files,
            loaded,
            "waiter",
            {"key": state.key, "attempt": state.attempt, "owner": state.owner},
        )


async def prestage(
    files: Sequence[Path | str],
    *,
    model: str,
    worker: str,
    token: str | None = None,
    sha256: Sequence[str] | None = None,
    load: bool = True,
    parameters: Mapping[str, Any] | None = None,
    dsn: str | None = None,
    options: StageOptions | None = None,
    on_event: EventSink = ignore,
    paths: Paths | None = None,
    coordinator: Coordinator | None = None,
) -> ColdLoadResult:
    """Stage ``files`` as ``model`` on ``worker`` and load it, once across every process that
    shares the coordinator (``dsn``: PostgreSQL; None: the SQLite file in the state dir)."""
    validate_model_name(model)
    where = paths or Paths.from_env()
    if sha256 is not None and len(sha256) != len(files):
        raise UsageError(f"{len(sha256)} --sha256 values for {len(files)} files: give one per file")
    stager = open_stager(worker, token=token, options=options, on_event=on_event, paths=where)
    try:
        digests, sizes = [], []
        for i, f in enumerate(files):
            version, digest = await stager.digest(Path(f), sha256[i] if sha256 else None)
            digests.append(digest)
            sizes.append(version.size)
        request = ColdLoadRequest(
            model, stager.worker, [Path(f) for f in files], digests, sizes, load, parameters
        )
        return await _with_coordinator(stager, request, dsn, where, coordinator, on_event, token)
    finally:
        await stager.aclose()
        stager.digests.close()
        stager.records.close()


async def load_model(
    model: str,
    *,
    worker: str,
    digests: Sequence[str],
    sizes: Sequence[int] | None = None,
    token: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    dsn: str | None = None,
    on_event: EventSink = ignore,
    paths: Paths | None = None,
    coordinator: Coordinator | None = None,
) -> ColdLoadResult:
    """Load a model whose blobs are already on the worker, once across the cluster."""
    validate_model_name(model)
    where = paths or Paths.from_env()
    stager = open_stager(worker, token=token, on_event=on_event, paths=where)
    try:
        known = list(sizes) if sizes is not None else []
        if not known:
            for digest in digests:
                response = await stager.client.head(stager.url(f"/blobs/sha256:{digest}"))
                length = response.headers.get("content-length", "0")
                known.append(int(length) if response.status_code == 200 and length.isdigit() else 0)
        request = ColdLoadRequest(model, stager.worker, [], list(digests), known, True, parameters)
        return await _with_coordinator(stager, request, dsn, where, coordinator, on_event, token)
    finally:
        await stager.aclose()


async def _with_coordinator(
    stager: Stager,
    request: ColdLoadRequest,
    dsn: str | None,
    where: Paths,
    coordinator: Coordinator | None,
    on_event: EventSink,
    token: str | None,
) -> ColdLoadResult:
    async with contextlib.AsyncExitStack() as stack:
        coord = coordinator
        if coord is None:
            coord = await stack.enter_async_context(
                open_coordinator(dsn, state_dir=where.state_dir)
            )
        runner = ColdLoader(coord, lambda _url: stager, on_event=on_event)
        return await runner.run(request)
    raise AssertionError("unreachable")
