from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from staging_cli.config import Paths

from . import pgserver
from .support import RunningWorker, run_worker_in_thread


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    """Client-side dirs inside the test's tmp dir (never the user's real dirs)."""
    return Paths(tmp_path / "config", tmp_path / "state", tmp_path / "cache", tmp_path / "data")


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[RunningWorker]:
    with run_worker_in_thread(tmp_path / "worker") as running:
        yield running


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgserver.PgServer | None]:
    """The suite's own PostgreSQL (None when STAGING_CLI_TEST_DSN points at an external one).
    Missing server binaries fail the run in CI and skip the PostgreSQL tests elsewhere."""
    if os.environ.get("STAGING_CLI_TEST_DSN"):
        yield None
        return
    try:
        server = pgserver.start_pg()
    except pgserver.PgUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def pg_dsn(pg_server: pgserver.PgServer | None) -> str:
    return os.environ.get("STAGING_CLI_TEST_DSN") or (pg_server.dsn if pg_server else "")
