"""The reference worker: receives tus uploads into a content-addressed store."""

from __future__ import annotations

from .app import WorkerOptions, create_app
from .server import WorkerConfig, run_worker
from .store import Store, StoreError

__all__ = ["Store", "StoreError", "WorkerConfig", "WorkerOptions", "create_app", "run_worker"]
