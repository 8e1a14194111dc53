"""Real processes racing for, and dying with, a job (both backends)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from staging_cli.coordinator import JobSpec, PostgresCoordinator, SQLiteCoordinator

HELPER = Path(__file__).with_name("proc_helper.py")


@pytest.fixture
def target(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "postgres":
        return str(request.getfixturevalue("pg_dsn"))
    return str(tmp_path / "coordinator.sqlite3")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def spawn(procs: list[subprocess.Popen[str]], *args: str | float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    return proc


@pytest.mark.timeout(120)
def test_eight_processes_race_exactly_one_wins(
    target: str, procs: list[subprocess.Popen[str]]
) -> None:
    model = f"race-{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 4.0  # every process is connected and waiting by then
    for _ in range(8):
        spawn(procs, target, model, "race", start_at, 3.0)
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    winners = [o for o in outputs if o.startswith("WON")]
    assert len(winners) == 1, outputs
    assert winners == ["WON 1"]
    assert outputs.count("LOST") == 7


@pytest.mark.timeout(120)
def test_sigkilled_owner_is_taken_over(
    target: str, backend: str, procs: list[subprocess.Popen[str]]
) -> None:
    model = f"kill-{uuid.uuid4().hex[:8]}"
    proc = spawn(procs, target, model, "hold", 0, 0)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "ACQUIRED 1", proc.stderr.read() if proc.stderr else line
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    killed_at = time.monotonic()

    async def take_over() -> tuple[float, int]:
        coord = PostgresCoordinator(target) if backend == "postgres" else SQLiteCoordinator(target)
        spec = JobSpec(model=model, worker="http://gpu-1:8081")
        async with coord:
            while True:
                lease = await coord.acquire(spec, owner="survivor")
                if lease is not None:
                    took = time.monotonic() - killed_at
                    await lease.release()
                    return took, lease.attempt
                assert time.monotonic() - killed_at < 30, "dead owner never detected"
                await asyncio.sleep(0.2)

    took, attempt = asyncio.run(take_over())
    print(f"\n[{backend}] SIGKILLed owner taken over after {took:.2f} s (attempt {attempt})")
    assert attempt == 2
