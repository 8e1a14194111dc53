"""staging-cli: resumable, verified staging of model files onto inference workers.

The public Python API is what ``__all__`` lists; everything else is reachable but not promised.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import (
    gc,
    gc_async,
    jobs,
    jobs_async,
    load,
    load_async,
    models,
    models_async,
    prestage,
    prestage_async,
    stage,
    stage_async,
    unload,
    unload_async,
)
from .coldload import ColdLoadResult
from .config import Paths, parse_size
from .coordinator import Coordinator, JobSpec, JobState, Lease, Progress, open_coordinator
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .loader import Loader, ModelState
from .stager import (
    Event,
    FileResult,
    StageOptions,
    Stager,
    StageResult,
)
from .worker import Store, WorkerConfig, create_app, run_worker

__all__ = [
    "ColdLoadResult",
    "Coordinator",
    "Event",
    "JobSpec",
    "JobState",
    "Lease",
    "Loader",
    "ModelState",
    "Progress",
    "FileResult",
    "Paths",
    "StageOptions",
    "StageResult",
    "Stager",
    "Store",
    "WorkerConfig",
    "__version__",
    "create_app",
    "gc",
    "gc_async",
    "jobs",
    "jobs_async",
    "load",
    "load_async",
    "models",
    "models_async",
    "open_coordinator",
    "parse_size",
    "prestage",
    "prestage_async",
    "run_worker",
    "stage",
    "stage_async",
    "unload",
    "unload_async",
    *_errors_all,
]
