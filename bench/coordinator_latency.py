"""Coordinator latency and connection benchmark (a script, not a test).

    .venv/bin/python bench/coordinator_latency.py [--claims 200] [--dsn postgresql://...]

For the SQLite and the PostgreSQL coordinator: claim and release latency (p50/p99 over
``--claims`` distinct jobs), then 1, 10 and 100 concurrent waiters on a job in one process: the
database connections held meanwhile (PostgreSQL: pg_stat_activity rows with our
application_name; SQLite: open file descriptors on the database files) and how long after a
progress report every waiter had returned. Without ``--dsn`` it starts its own PostgreSQL with
tests/pgserver.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psycopg  # noqa: E402

from staging_cli.coordinator import (  # noqa: E402
    Coordinator,
    JobSpec,
    PostgresCoordinator,
    Progress,
    SQLiteCoordinator,
    Tuning,
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sqlite_fds(path: Path) -> int:
    names = {str(path), f"{path}-wal", f"{path}-shm"}
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in names:
                count += 1
        except OSError:
            pass
    return count


async def pg_connections(dsn: str, app: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        )
        row = await cur.fetchone()
        return int(row[0]) if row else -1


async def bench(name: str, make: object, count_conns: object, claims: int) -> list[str]:
    assert callable(make) and callable(count_conns)
    rows: list[str] = []
    coord: Coordinator = make("bench")
    owner: Coordinator = make("bench-owner")
    async with coord, owner:
        acquire_ms: list[float] = []
        release_ms: list[float] = []
        run = uuid.uuid4().hex[:6]
        for i in range(claims):
            spec = JobSpec(model=f"bench-{run}-{i}", worker="http://gpu-1:8081")
            t0 = time.perf_counter()
            lease = await coord.acquire(spec, owner="bench")
            t1 = time.perf_counter()
            assert lease is not None
            await lease.release()
            t2 = time.perf_counter()
            acquire_ms.append((t1 - t0) * 1000)
            release_ms.append((t2 - t1) * 1000)
        rows.append(
            f"{name:<10} claim   p50 {statistics.median(acquire_ms):7.2f} ms   "
            f"p99 {pct(acquire_ms, 0.99):7.2f} ms   ({claims} distinct jobs)"
        )
        rows.append(
            f"{name:<10} release p50 {statistics.median(release_ms):7.2f} ms   "
            f"p99 {pct(release_ms, 0.99):7.2f} ms"
        )
        for waiters in (1, 10, 100):
            spec = JobSpec(model=f"wait-{run}-{waiters}", worker="http://gpu-1:8081")
            lease = await owner.acquire(spec, owner="owner")
            assert lease is not None
            base = await coord.get(spec.key)
            tasks = [
                asyncio.create_task(coord.wait(spec.key, timeout=30, since=base))
                for _ in range(waiters)
            ]
            # Not a multiple of poll_interval, so polls are not phase-locked with progress().
            await asyncio.sleep(1.37)
            conns = await count_conns()
            t0 = time.perf_counter()
            await lease.progress(Progress("staging", bytes_done=1))
            states = await asyncio.gather(*tasks)
            woke = (time.perf_counter() - t0) * 1000
            assert all(s is not None and s.bytes_done == 1 for s in states)
            await lease.release()
            rows.append(
                f"{name:<10} {waiters:>3} waiters: {conns}; "
                f"all woken {woke:6.1f} ms after progress()"
            )
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--claims", type=int, default=200)
    parser.add_argument("--dsn", default=os.environ.get("STAGING_CLI_TEST_DSN"))
    args = parser.parse_args()

    server = None
    if not args.dsn:
        import pgserver

        server = pgserver.start_pg()
        args.dsn = server.dsn
    rows: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "coordinator.sqlite3"

            def make_sqlite(app: str) -> Coordinator:
                return SQLiteCoordinator(db, Tuning(application_name=app))

            async def sqlite_conns() -> str:
                # Both coordinators (waiting + owner) live in this process: 1 connection each.
                return f"{sqlite_fds(db)} fds on the db files for 2 sqlite3 connections"

            rows += await bench("sqlite", make_sqlite, sqlite_conns, args.claims)

        def make_pg(app: str) -> Coordinator:
            return PostgresCoordinator(args.dsn, Tuning(application_name=app, poll_interval=1.0))

        async def pg_conns() -> str:
            n = await pg_connections(args.dsn, "bench")
            return f"{n} PostgreSQL connections held by the waiting coordinator"

        rows += await bench("postgresql", make_pg, pg_conns, args.claims)
    finally:
        if server is not None:
            server.destroy()
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
