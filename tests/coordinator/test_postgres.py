"""What only the PostgreSQL coordinator has to prove: connections, restarts, DSN errors."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from typing import Any

import psycopg
import pytest

from staging_cli.coordinator import (
    MAX_CONNECTIONS,
    JobSpec,
    PostgresCoordinator,
    Progress,
    Tuning,
)
from staging_cli.errors import CoordinatorError, CoordinatorUnavailable, LostOwnership

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


def spec(prefix: str = "pg") -> JobSpec:
    return JobSpec(model=f"{prefix}-{uuid.uuid4().hex[:8]}", worker="http://gpu-1:8081")


async def count_connections(dsn: str, app: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_hundred_waiters_use_bounded_connections(pg_dsn: str) -> None:
    app = f"staging-cli-waiters-{uuid.uuid4().hex[:6]}"
    waiters = PostgresCoordinator(pg_dsn, Tuning(application_name=app, poll_interval=1.0))
    owner = PostgresCoordinator(pg_dsn, Tuning(application_name=app + "-owner"))
    async with waiters, owner:
        specs = [spec("wait") for _ in range(20)]
        leases = [await owner.acquire(s, owner="owner") for s in specs]
        # 100 waiters: 5 on each of 20 jobs.
        tasks = [
            asyncio.create_task(waiters.wait(s.key, timeout=30)) for s in specs for _ in range(5)
        ]
        await asyncio.sleep(1.0)  # every waiter is registered, the listener is up
        during = await count_connections(pg_dsn, app)
        t0 = time.monotonic()
        for lease in leases:
            assert lease is not None
            await lease.progress(Progress("staging", bytes_done=1))
        states = await asyncio.gather(*tasks)
        woke = time.monotonic() - t0
        after = await count_connections(pg_dsn, app)
    print(f"\n100 waiters: {during} connections while waiting, woke in {woke:.2f} s")
    assert all(s is not None and s.bytes_done == 1 for s in states)
    assert during <= MAX_CONNECTIONS
    assert after <= MAX_CONNECTIONS
    assert woke < 10


async def test_wrong_dsn_is_unavailable_quickly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave the block
    coord = PostgresCoordinator(
        f"postgresql://alice:hunter2@127.0.0.1:{port}/db", Tuning(connect_timeout=2)
    )
    t0 = time.monotonic()
    with pytest.raises(CoordinatorUnavailable) as info:
        async with coord:
            pass
    took = time.monotonic() - t0
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "connection refused" in message
    assert "STAGING_CLI_DSN" in message
    assert "hunter2" not in message
    assert took < 5
    assert isinstance(info.value.__cause__, psycopg.Error)


async def test_unreachable_host_times_out_quickly() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never routed, so the connect can only time out.
    coord = PostgresCoordinator("host=192.0.2.1 port=5432 dbname=x", Tuning(connect_timeout=1))
    t0 = time.monotonic()
    with pytest.raises(CoordinatorUnavailable) as info:
        await coord.open()
    assert time.monotonic() - t0 < 5
    assert "192.0.2.1:5432" in str(info.value)


async def test_schema_creation_is_safe_concurrently(pg_dsn: str) -> None:
    dbname = f"ddl_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as admin:
        await admin.execute(f"CREATE DATABASE {dbname}")
    try:
        dsn = pg_dsn.rsplit("/", 1)[0] + f"/{dbname}"
        coords = [PostgresCoordinator(dsn) for _ in range(6)]
        await asyncio.gather(*(c.open() for c in coords))
        s = spec("ddl")
        got = await asyncio.gather(*(c.acquire(s, owner=str(i)) for i, c in enumerate(coords)))
        assert sum(lease is not None for lease in got) == 1
        for c in coords:
            await c.aclose()
    finally:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as admin:
            await admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


@pytest.mark.parametrize("ttl", [5.0, 0.5])
async def test_server_restart_never_two_owners(pg_dsn: str, pg_server: Any, ttl: float) -> None:
    if pg_server is None:
        pytest.skip("STAGING_CLI_TEST_DSN points at a server this suite cannot restart")
    t = Tuning(lease_ttl=ttl, heartbeat_interval=min(0.5, ttl / 3), connect_timeout=1)
    owner = PostgresCoordinator(pg_dsn, t)
    contender = PostgresCoordinator(pg_dsn, t)
    job = spec("restart")
    async with owner, contender:
        lease = await owner.acquire(job, owner="owner")
        assert lease is not None
        won: list[int] = []
        errors: list[str] = []
        stop = asyncio.Event()

        async def contend() -> None:
            while not stop.is_set():
                try:
                    got = await contender.acquire(job, owner="contender")
                except CoordinatorError as exc:
                    errors.append(type(exc).__name__)
                else:
                    if got is not None:
                        won.append(got.attempt)
                        return  # keep it: its heartbeat now holds the job
                await asyncio.sleep(0.1)

        task = asyncio.create_task(contend())
        await asyncio.sleep(0.5)
        await asyncio.to_thread(pg_server.stop)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(pg_server.start)
        await asyncio.sleep(max(2.0, 2 * ttl))  # heartbeats and claims resume
        stop.set()
        await task

        outcome: str
        for _ in range(20):
            try:
                await lease.progress(Progress("staging", bytes_done=42))
                outcome = "recovered"
                break
            except LostOwnership:
                outcome = "lost"
                break
            except CoordinatorUnavailable:
                await asyncio.sleep(0.5)
        else:
            pytest.fail("the owner never reconnected after the restart")
        state = await contender.get(job.key)
        assert state is not None
        print(
            f"\nttl={ttl}: owner {outcome}, contender won={won}, "
            f"contender errors during outage={len(errors)}"
        )
        assert errors, "the contender should have seen the outage"
        if outcome == "recovered":
            assert won == []
            assert (state.owner, state.attempt, state.bytes_done) == ("owner", 1, 42)
        else:
            assert won == [2]
            assert (state.owner, state.attempt) == ("contender", 2)
