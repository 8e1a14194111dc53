"""staging-cli: resumable, verified staging of model files onto inference workers.

The public Python API is what ``__all__`` lists; everything else is reachable but not promised.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import stage, stage_async
from .config import Paths, parse_size
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .stager import (
    Event,
    FileResult,
    StageOptions,
    Stager,
    StageResult,
)
from .worker import Store, WorkerConfig, create_app, run_worker

__all__ = [
    "Event",
    "FileResult",
    "Paths",
    "StageOptions",
    "StageResult",
    "Stager",
    "Store",
    "WorkerConfig",
    "__version__",
    "create_app",
    "parse_size",
    "run_worker",
    "stage",
    "stage_async",
    *_errors_all,
]
