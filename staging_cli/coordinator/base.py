"""The coordinator contract, the lease an owner holds, and the machinery both backends share.

:class:`Coordinator` is the protocol the orchestration codes against. :class:`Lease` is what
``acquire`` hands the one owner of a job: it renews itself in the background and fences every
write with the claim's ``attempt``. :class:`CoordinatorBase` implements everything that is not
SQL (acquire/wait/leases/the watch hub) on top of a handful of primitive operations that the
SQLite and PostgreSQL backends provide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from ..errors import CoordinatorError, LostOwnership
from .models import JobSpec, JobState, Progress, Tuning

__all__ = ["Coordinator", "CoordinatorBase", "Lease"]

log = logging.getLogger("staging_cli.coordinator")


@runtime_checkable
class Coordinator(Protocol):
    """One owner per job across processes (SQLite: one machine; PostgreSQL: a cluster).

    ``acquire`` never blocks on another owner: it returns a :class:`Lease` if this caller now
    owns the job, else ``None``; a caller that got ``None`` follows the job with ``get`` and
    ``wait``. See the package docstring for a complete example.
    """

    tuning: Tuning

    async def open(self) -> None:
        """Connect (and create the schema if needed); raises CoordinatorUnavailable."""
        ...

    async def aclose(self) -> None:
        """Release leases still held, stop background tasks, close connections."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def acquire(self, spec: JobSpec, *, owner: str, force: bool = False) -> Lease | None:
        """Claim the job if nobody alive owns it; ``force`` also re-claims a finished job."""
        ...

    async def get(self, key: str) -> JobState | None:
        """The job's current snapshot, or None if the job was never claimed."""
        ...

    async def wait(
        self,
        key: str,
        timeout: float,  # noqa: ASYNC109 - returns the snapshot at the deadline, never raises
        *,
        since: JobState | None = None,
    ) -> JobState | None:
        """Return as soon as the job changes (vs ``since`` or vs now), or at ``timeout``."""
        ...

    async def jobs(self) -> list[JobState]:
        """Every job the database knows, oldest first."""
        ...

    async def invalidate(self, key: str) -> bool:
        """Make a succeeded/failed job claimable again (e.g. the worker lost the model).

        Returns False if the job does not exist or is running (a live owner is never stolen
        from)."""
        ...


class Lease:
    """Ownership of one job by one process, until ``succeed``/``fail``/``release`` or loss.

    A background task renews the lease every ``tuning.heartbeat_interval`` regardless of how
    often :meth:`progress` is called. Every write carries the claim's ``attempt`` (the fencing
    token) and the owner id: once another process has taken over, each of them raises
    :class:`~staging_cli.errors.LostOwnership` and changes nothing.

    Used as an async context manager, a lease still held at the end of the block is released
    (on success or cancellation) or failed with the exception's text (on an error).
    """

    def __init__(self, coordinator: CoordinatorBase, spec: JobSpec, owner: str, attempt: int):
        self._coordinator = coordinator
        self.spec = spec
        self.owner = owner
        self.attempt = attempt
        self._finished: str | None = None
        self._lost: LostOwnership | None = None
        self._loop = asyncio.get_running_loop()
        self._renewed_at = self._loop.time()
        self._task: asyncio.Task[None] | None = asyncio.create_task(
            self._heartbeat(), name=f"staging-cli lease heartbeat {spec.key[:12]}"
        )

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def lost(self) -> bool:
        """True once this process knows another owner took over."""
        return self._lost is not None

    @property
    def active(self) -> bool:
        """True while the lease is held: not finished and not known to be lost."""
        return self._finished is None and self._lost is None

    @property
    def seconds_since_renewal(self) -> float:
        """How long ago the database last confirmed this lease (monotonic clock)."""
        return self._loop.time() - self._renewed_at

    def __repr__(self) -> str:
        state = "lost" if self.lost else (self._finished or "active")
        return (
            f"<Lease {self.spec.model}@{self.spec.worker} key={self.key[:12]} "
            f"owner={self.owner!r} attempt={self.attempt} {state}>"
        )

    def _lost_error(self) -> LostOwnership:
        return LostOwnership(
            f"this process ({self.owner}) no longer owns the job for model {self.spec.model} "
            f"on {self.spec.worker} (attempt {self.attempt}): its lease expired and another "
            "process took over; stop working on it and follow the new owner"
        )

    def _check(self) -> None:
        if self._lost is not None:
            raise self._lost
        if self._finished is not None:
            raise CoordinatorError(
                f"the lease on model {self.spec.model} at {self.spec.worker} is already "
                f"{self._finished}; acquire the job again to do more work on it"
            )

    def _mark_lost(self) -> LostOwnership:
        if self._lost is None:
            self._lost = self._lost_error()
        self._stop_heartbeat()
        return self._lost

    def _stop_heartbeat(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._coordinator._forget(self)

    async def _heartbeat(self) -> None:
        interval = self._coordinator.tuning.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            try:
                ok = await self._coordinator._renew(self.key, self.owner, self.attempt)
            except CoordinatorError as exc:
                # The database is unreachable: keep trying. Nobody can take over before the
                # lease expires, and after that our next renewal tells us whether they did.
                log.warning("lease heartbeat for %s failed: %s", self.key[:12], exc)
                continue
            if ok:
                self._renewed_at = self._loop.time()
            else:
                self._lost = self._lost_error()
                self._task = None
                self._coordinator._forget(self)
                return

    async def progress(self, progress: Progress) -> None:
        """Publish progress (also renews the lease); waiters are woken."""
        self._check()
        ok = await self._coordinator._write_progress(self.key, self.owner, self.attempt, progress)
        if not ok:
            raise self._mark_lost()
        self._renewed_at = self._loop.time()

    async def succeed(self, result: Mapping[str, Any] | None = None) -> None:
        """Mark the job done with a JSON-serializable ``result``; the lease ends."""
        self._check()
        ok = await self._coordinator._finish(
            self.key, self.owner, self.attempt, "succeeded", dict(result or {}), None
        )
        if not ok:
            raise self._mark_lost()
        self._finished = "succeeded"
        self._stop_heartbeat()

    async def fail(self, reason: str) -> None:
        """Mark the job failed; it stays visible as failed for the failure grace period."""
        self._check()
        ok = await self._coordinator._finish(
            self.key, self.owner, self.attempt, "failed", None, reason
        )
        if not ok:
            raise self._mark_lost()
        self._finished = "failed"
        self._stop_heartbeat()

    async def release(self) -> None:
        """Abandon the job (e.g. cancelled): it becomes claimable at once. Idempotent."""
        if self._finished is not None or self._lost is not None:
            return
        self._stop_heartbeat()
        # Marked first: if the database is unreachable the lease simply expires.
        self._finished = "released"
        ok = await self._coordinator._finish(
            self.key, self.owner, self.attempt, "released", None, None
        )
        if not ok:
            self._lost = self._lost_error()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.active:
            return
        if exc is None or not isinstance(exc, Exception):
            await self.release()
        else:
            with contextlib.suppress(CoordinatorError):
                await self.fail(f"{type(exc).__name__}: {exc}")


_MISSING: Any = object()


class _WatchHub:
    """One poller per coordinator that refreshes every watched job in a single query.

    Waiters never touch the database themselves: however many there are, they cost one
    query per ``poll_interval`` (and one per notification on PostgreSQL), on the
    coordinator's existing connection.
    """

    def __init__(self, coordinator: CoordinatorBase) -> None:
        self._coordinator = coordinator
        self._watchers: dict[str, int] = {}
        self._latest: dict[str, tuple[int, JobState | None]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.round = 0

    def register(self, key: str) -> None:
        self._watchers[key] = self._watchers.get(key, 0) + 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="staging-cli watch hub")

    def unregister(self, key: str) -> None:
        left = self._watchers.get(key, 0) - 1
        if left <= 0:
            self._watchers.pop(key, None)
            self._latest.pop(key, None)
            self._events.pop(key, None)
        else:
            self._watchers[key] = left

    def watching(self, key: str) -> bool:
        return key in self._watchers

    def kick(self) -> None:
        self._kick.set()

    def event(self, key: str) -> asyncio.Event:
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = asyncio.Event()
        return ev

    def latest(self, key: str) -> tuple[int, JobState | None] | Any:
        return self._latest.get(key, _MISSING)

    async def _run(self) -> None:
        interval = self._coordinator.tuning.poll_interval
        while self._watchers:
            self.round += 1
            this_round = self.round
            keys = list(self._watchers)
            try:
                states = await self._coordinator._fetch(keys)
            except CoordinatorError as exc:
                log.debug("watch poll failed: %s", exc)
                states = None
            if states is not None:
                for key in keys:
                    if key not in self._watchers:
                        continue
                    new = states.get(key)
                    old = self._latest.get(key, _MISSING)
                    if old is _MISSING or _differs(old[1], new):
                        self._latest[key] = (this_round, new)
                        ev = self._events.pop(key, None)
                        if ev is not None:
                            ev.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), interval)
            self._kick.clear()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _differs(old: JobState | None, new: JobState | None) -> bool:
    if old is None or new is None:
        return (old is None) != (new is None)
    return new.changed_from(old)


class CoordinatorBase(ABC):
    """Everything but SQL: acquire, leases, get/wait/jobs on top of primitive operations."""

    def __init__(self, tuning: Tuning) -> None:
        self.tuning = tuning
        self._leases: set[Lease] = set()
        self._hub: _WatchHub | None = None
        self._closing = False
        self._closed = False

    # -- primitives a backend provides -------------------------------------------------------

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def _close(self) -> None: ...

    @abstractmethod
    async def _claim(self, spec: JobSpec, owner: str, force: bool) -> int | None:
        """Atomically claim ``spec``; the new attempt number, or None if not claimable."""

    @abstractmethod
    async def _renew(self, key: str, owner: str, attempt: int) -> bool:
        """Extend the lease; False if (owner, attempt) no longer holds the running job."""

    @abstractmethod
    async def _write_progress(
        self, key: str, owner: str, attempt: int, progress: Progress
    ) -> bool: ...

    @abstractmethod
    async def _finish(
        self,
        key: str,
        owner: str,
        attempt: int,
        status: str,
        result: dict[str, Any] | None,
        error: str | None,
    ) -> bool:
        """Move the job to succeeded/failed/released, fenced like ``_renew``."""

    @abstractmethod
    async def _fetch(self, keys: Sequence[str]) -> dict[str, JobState]: ...

    @abstractmethod
    async def _list(self) -> list[JobState]: ...

    @abstractmethod
    async def invalidate(self, key: str) -> bool: ...

    def _start_notifications(self) -> None:  # noqa: B027 - optional hook
        """Backends with push notifications start their listener here (idempotent)."""

    # -- shared behaviour -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CoordinatorError("the coordinator is closed; open a new one")

    def _forget(self, lease: Lease) -> None:
        self._leases.discard(lease)

    def _notify_local(self, key: str) -> None:
        # Our own writes wake our own waiters at once, without a round trip through the server.
        if self._hub is not None and self._hub.watching(key):
            self._hub.kick()

    async def acquire(self, spec: JobSpec, *, owner: str, force: bool = False) -> Lease | None:
        self._check_open()
        attempt = await self._claim(spec, owner, force)
        if attempt is None:
            return None
        self._notify_local(spec.key)
        lease = Lease(self, spec, owner, attempt)
        self._leases.add(lease)
        return lease

    async def get(self, key: str) -> JobState | None:
        self._check_open()
        return (await self._fetch([key])).get(key)

    async def jobs(self) -> list[JobState]:
        self._check_open()
        return await self._list()

    async def wait(
        self,
        key: str,
        timeout: float,  # noqa: ASYNC109 - returns the snapshot at the deadline, never raises
        *,
        since: JobState | None = None,
    ) -> JobState | None:
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        baseline = since if since is not None else await self.get(key)
        if self._hub is None:
            self._hub = _WatchHub(self)
        hub = self._hub
        self._start_notifications()
        hub.register(key)
        # Only snapshots from poll rounds that start after this point can be newer than the
        # baseline; an older round finishing late must not count as a change.
        first_round = hub.round + 1
        last: JobState | None = baseline
        try:
            while True:
                ev = hub.event(key)
                seen = hub.latest(key)
                if seen is not _MISSING and seen[0] >= first_round:
                    last = seen[1]
                    if _differs(baseline, last):
                        return last
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return last
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), remaining)
        finally:
            hub.unregister(key)

    async def aclose(self) -> None:
        if self._closed or self._closing:
            return
        self._closing = True
        try:
            if self._hub is not None:
                await self._hub.aclose()
            for lease in list(self._leases):
                try:
                    await lease.release()
                except CoordinatorError as exc:
                    log.warning("could not release %r on close: %s", lease, exc)
                lease._stop_heartbeat()
        finally:
            self._closed = True
            await self._close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
