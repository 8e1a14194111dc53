"""The contract every coordinator keeps; each test runs on SQLite and on PostgreSQL.

Separate coordinator instances stand for separate processes: each has its own connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from pathlib import Path

import pytest

from staging_cli.coordinator import JobSpec, JobStatus, Lease, Progress, SQLiteCoordinator
from staging_cli.errors import CoordinatorError, CoordinatorUnavailable, LostOwnership

from .conftest import MakeCoordinator

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def new_spec(files: int = 2) -> JobSpec:
    name = f"model-{uuid.uuid4().hex[:8]}"
    digests = [hashlib.sha256(f"{name}/{i}".encode()).hexdigest() for i in range(files)]
    return JobSpec.of(name, "http://gpu-1:8081", digests)


async def test_single_owner(make_coordinator: MakeCoordinator) -> None:
    a, b = make_coordinator(), make_coordinator()
    spec = new_spec()
    lease = await a.acquire(spec, owner="a")
    assert isinstance(lease, Lease)
    assert lease.attempt == 1
    assert await b.acquire(spec, owner="b") is None
    assert await a.acquire(spec, owner="a-again") is None
    state = await b.get(spec.key)
    assert state is not None
    assert state.status is JobStatus.RUNNING
    assert state.owner == "a"
    assert state.attempt == 1
    assert not state.claimable
    assert state.digests == spec.digests
    assert (state.model, state.worker) == (spec.model, spec.worker)


async def test_get_unknown_job_is_none(make_coordinator: MakeCoordinator) -> None:
    assert await make_coordinator().get(new_spec().key) is None


async def test_progress_visible_to_another_instance(make_coordinator: MakeCoordinator) -> None:
    a, b = make_coordinator(), make_coordinator()
    spec = new_spec()
    lease = await a.acquire(spec, owner="a")
    assert lease is not None
    await lease.progress(
        Progress("staging", bytes_done=10, bytes_total=100, eta_seconds=3.5, detail="file 1/2")
    )
    state = await b.get(spec.key)
    assert state is not None
    assert (state.phase, state.bytes_done, state.bytes_total) == ("staging", 10, 100)
    assert state.eta_seconds == 3.5
    assert state.detail == "file 1/2"
    assert state.heartbeat_at is not None


async def test_wait_wakes_on_progress_and_success(make_coordinator: MakeCoordinator) -> None:
    a, b = make_coordinator(), make_coordinator()
    spec = new_spec()
    lease = await a.acquire(spec, owner="a")
    assert lease is not None
    before = await b.get(spec.key)

    async def report() -> None:
        await asyncio.sleep(0.3)
        await lease.progress(Progress("staging", bytes_done=50, bytes_total=100))

    task = asyncio.create_task(report())
    t0 = time.monotonic()
    state = await b.wait(spec.key, timeout=10, since=before)
    waited = time.monotonic() - t0
    await task
    assert state is not None and state.bytes_done == 50
    assert waited < 5, f"wait() took {waited:.2f} s for a progress update"

    async def finish() -> None:
        await asyncio.sleep(0.3)
        await lease.succeed({"loaded": True, "backend": "demo"})

    task = asyncio.create_task(finish())
    t0 = time.monotonic()
    state = await b.wait(spec.key, timeout=10)
    waited = time.monotonic() - t0
    await task
    assert state is not None and state.status is JobStatus.SUCCEEDED
    assert state.result == {"loaded": True, "backend": "demo"}
    assert waited < 5, f"wait() took {waited:.2f} s for success"


async def test_wait_times_out_with_latest_snapshot(make_coordinator: MakeCoordinator) -> None:
    a = make_coordinator()
    spec = new_spec()
    lease = await a.acquire(spec, owner="a")
    assert lease is not None
    t0 = time.monotonic()
    state = await a.wait(spec.key, timeout=0.6)
    assert time.monotonic() - t0 >= 0.5
    assert state is not None and state.owner == "a"


async def test_failure_grace_then_reclaim(make_coordinator: MakeCoordinator) -> None:
    a, b = make_coordinator(failure_grace=1.0), make_coordinator()
    spec = new_spec()
    lease = await a.acquire(spec, owner="a")
    assert lease is not None
    await lease.fail("worker disk full")
    state = await b.get(spec.key)
    assert state is not None
    assert state.status is JobStatus.FAILED
    assert state.error == "worker disk full"
    assert not state.claimable
    assert await b.acquire(spec, owner="b") is None
    # The grace period ends: waiters learn that the job is claimable again.
    state = await b.wait(spec.key, timeout=10, since=state)
    assert state is not None and state.claimable
    again = await b.acquire(spec, owner="b")
    assert again is not None
    assert again.attempt == 2
    state = await a.get(spec.key)
    assert state is not None
    assert (state.status, state.owner, state.error) == (JobStatus.RUNNING, "b", None)


async def test_succeeded_job_not_reclaimed_until_invalidated(
    make_coordinator: MakeCoordinator,
) -> None:
    a, b = make_coordinator(), make_coordinator()
    spec = new_spec()
    lease = await a.acquire(spec, owner="a")
    assert lease is not None
    await lease.succeed({"path": "/models/x"})
    assert await b.acquire(spec, owner="b") is None
    state = await b.get(spec.key)
    assert state is not None and state.status is JobStatus.SUCCEEDED and state.done
    assert state.result == {"path": "/models/x"}
    assert not state.claimable
    assert await b.invalidate(spec.key)
    lease_b = await b.acquire(spec, owner="b")
    assert lease_b is not None and lease_b.attempt == 2
    # A running job cannot be invalidated out from under its owner.
    assert not await a.invalidate(spec.key)
    await lease_b.succeed()
    forced = await a.acquire(spec, owner="a", force=True)
    assert forced is not None and forced.attempt == 3
    # force never steals from a live owner
    assert await b.acquire(spec, owner="b", force=True) is None


async def test_release_makes_job_claimable(make_coordinator: MakeCoordinator) -> None:
    a, b = make_coordinator(), make_coordinator()
    spec = new_spec()
    lease = await a.acquire(spec, owner="a")
    assert lease is not None
    await lease.release()
    await lease.release()  # idempotent
    state = await b.get(spec.key)
    assert state is not None and state.status is JobStatus.RELEASED and state.claimable
    lease_b = await b.acquire(spec, owner="b")
    assert lease_b is not None and lease_b.attempt == 2
    with pytest.raises(CoordinatorError):
        await lease.progress(Progress("staging"))


async def test_lease_context_manager(make_coordinator: MakeCoordinator) -> None:
    a = make_coordinator()
    spec = new_spec()
    lease = await a.acquire(spec, owner="a")
    assert lease is not None
    with pytest.raises(RuntimeError):
        async with lease:
            raise RuntimeError("backend crashed")
    state = await a.get(spec.key)
    assert state is not None and state.status is JobStatus.FAILED
    assert state.error == "RuntimeError: backend crashed"


async def test_heartbeat_keeps_lease_alive(make_coordinator: MakeCoordinator) -> None:
    a = make_coordinator(lease_ttl=1.0, heartbeat_interval=0.2)
    b = make_coordinator()
    spec = new_spec()
    lease = await a.acquire(spec, owner="a")
    assert lease is not None
    await asyncio.sleep(2.0)  # two TTLs without any progress() call
    assert await b.acquire(spec, owner="b") is None
    assert lease.active


async def test_stale_owner_loses_ownership(make_coordinator: MakeCoordinator) -> None:
    # The first owner's heartbeat is effectively paused (interval far above the TTL).
    a = make_coordinator(lease_ttl=0.5, heartbeat_interval=60.0)
    b = make_coordinator()
    spec = new_spec()
    old = await a.acquire(spec, owner="a")
    assert old is not None
    state = await b.get(spec.key)
    state = await b.wait(spec.key, timeout=10, since=state)  # wakes when the lease expires
    assert state is not None and state.claimable
    new = await b.acquire(spec, owner="b")
    assert new is not None and new.attempt == 2
    await new.progress(Progress("staging", bytes_done=7))
    with pytest.raises(LostOwnership):
        await old.progress(Progress("staging", bytes_done=999))
    assert old.lost
    with pytest.raises(LostOwnership):
        await old.succeed({"stale": True})
    state = await b.get(spec.key)
    assert state is not None
    assert (state.owner, state.attempt, state.bytes_done) == ("b", 2, 7)
    assert state.status is JobStatus.RUNNING


async def test_stale_owner_cannot_fail_successor(make_coordinator: MakeCoordinator) -> None:
    a = make_coordinator(lease_ttl=0.3, heartbeat_interval=60.0)
    b = make_coordinator()
    spec = new_spec()
    old = await a.acquire(spec, owner="same-name")
    assert old is not None
    await asyncio.sleep(0.6)
    new = await b.acquire(spec, owner="same-name")  # even with the same owner id
    assert new is not None
    with pytest.raises(LostOwnership):
        await old.fail("stale")
    state = await b.get(spec.key)
    assert state is not None and state.status is JobStatus.RUNNING and state.attempt == 2


async def test_jobs_lists_everything(make_coordinator: MakeCoordinator) -> None:
    a = make_coordinator()
    specs = [new_spec() for _ in range(3)]
    leases = [await a.acquire(s, owner="a") for s in specs]
    assert all(leases)
    assert leases[1] is not None and leases[2] is not None
    await leases[1].succeed({"n": 1})
    await leases[2].fail("nope")
    listed = {j.key: j for j in await make_coordinator().jobs()}
    assert {s.key for s in specs} <= set(listed)
    assert [listed[s.key].status for s in specs] == [
        JobStatus.RUNNING,
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
    ]
    assert listed[specs[0].key].created_at <= listed[specs[0].key].updated_at


async def test_close_releases_held_leases(make_coordinator: MakeCoordinator) -> None:
    a, b = make_coordinator(), make_coordinator()
    spec = new_spec()
    assert await a.acquire(spec, owner="a") is not None
    await a.aclose()
    assert await b.acquire(spec, owner="b") is not None


async def test_sqlite_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    coord = SQLiteCoordinator(blocker / "sub" / "coordinator.sqlite3")
    with pytest.raises(CoordinatorUnavailable, match="cannot open the coordinator database"):
        await coord.open()
