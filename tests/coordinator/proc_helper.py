"""A separate process for the cross-process coordinator tests.

    python proc_helper.py TARGET MODEL MODE START_AT HOLD

TARGET is a PostgreSQL DSN or a SQLite file path. MODE ``race``: sleep until the wall-clock
START_AT, try to acquire once, print ``WON <attempt>`` or ``LOST``, and (if won) hold the lease
HOLD seconds. MODE ``hold``: acquire, print ``ACQUIRED <attempt>``, then hold until killed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from staging_cli.coordinator import (
    Coordinator,
    JobSpec,
    PostgresCoordinator,
    SQLiteCoordinator,
    Tuning,
    is_postgres_dsn,
)


async def main(target: str, model: str, mode: str, start_at: float, hold: float) -> int:
    tuning = Tuning(application_name="staging-cli-test-proc")
    coord: Coordinator = (
        PostgresCoordinator(target, tuning)
        if is_postgres_dsn(target)
        else SQLiteCoordinator(target, tuning)
    )
    spec = JobSpec(model=model, worker="http://gpu-1:8081")
    async with coord:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        lease = await coord.acquire(spec, owner=f"proc-{os.getpid()}")
        if mode == "race":
            print("LOST" if lease is None else f"WON {lease.attempt}", flush=True)
            if lease is not None:
                await asyncio.sleep(hold)
                await lease.release()
            return 0
        if lease is None:
            print("LOST", flush=True)
            return 1
        print(f"ACQUIRED {lease.attempt}", flush=True)
        await asyncio.sleep(3600)
    return 0


if __name__ == "__main__":
    target, model, mode, start_at, hold = sys.argv[1:6]
    sys.exit(asyncio.run(main(target, model, mode, float(start_at), float(hold))))
