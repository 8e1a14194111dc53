"""Fixtures for the coordinator tests: a real PostgreSQL, and coordinators of both kinds."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

# tests/ for the pgserver helper; the repository root so staging_cli imports uninstalled.
_TESTS = Path(__file__).resolve().parent.parent
for _path in (_TESTS, _TESTS.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


from staging_cli.coordinator import (  # noqa: E402
    Coordinator,
    PostgresCoordinator,
    SQLiteCoordinator,
    Tuning,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


MakeCoordinator = Callable[..., Coordinator]


@pytest.fixture
async def make_coordinator(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[MakeCoordinator]:
    """Build coordinator instances sharing one database: each stands for another process."""
    made: list[Coordinator] = []
    dsn = request.getfixturevalue("pg_dsn") if backend == "postgres" else ""
    app = f"staging-cli-test-{uuid.uuid4().hex[:8]}"

    def make(**tuning: Any) -> Coordinator:
        tuning.setdefault("application_name", app)
        tuning.setdefault("poll_interval", 0.25)
        t = Tuning(**tuning)
        coord: Coordinator
        if backend == "sqlite":
            coord = SQLiteCoordinator(tmp_path / "coordinator.sqlite3", t)
        else:
            coord = PostgresCoordinator(dsn, t)
        made.append(coord)
        return coord

    try:
        yield make
    finally:
        for coord in made:
            await coord.aclose()
