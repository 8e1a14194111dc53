from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from staging_cli.config import Paths

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
