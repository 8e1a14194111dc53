"""The documented Python API: what scripts call. The CLI calls the same functions.

Example::

    import staging_cli

    result = staging_cli.stage(["model.gguf"], model="org/model:q4", worker="http://gpu-1:8081")
    print(result.files[0].sha256, result.bytes_sent)

    done = staging_cli.prestage(["model.gguf"], model="org/model:q4", worker="http://gpu-1:8081")
    print(done.loaded, done.role)          # "owner" did the work, "waiter" reported another's

Every function has an ``*_async`` twin (``stage_async``, ``prestage_async``, ...) for code that
already runs an event loop; the plain names run their own loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import httpx

from .coldload import ColdLoadResult, load_model
from .coldload import prestage as _prestage
from .config import Paths
from .coordinator import open_coordinator
from .loader import Loader, ModelState
from .stager import StageOptions, StageResult, open_stager, stage_files
from .stager.events import EventSink, ignore
from .tus import validate_model_name

T = TypeVar("T")

__all__ = [
    "gc",
    "gc_async",
    "jobs",
    "jobs_async",
    "load",
    "load_async",
    "models",
    "models_async",
    "prestage",
    "prestage_async",
    "stage",
    "stage_async",
    "unload",
    "unload_async",
]

prestage_async = _prestage


async def stage_async(
    files: Sequence[Path | str],
    *,
    model: str,
    worker: str,
    token: str | None = None,
    sha256: Sequence[str] | None = None,
    options: StageOptions | None = None,
    on_event: EventSink = ignore,
    paths: Paths | None = None,
) -> StageResult:
    """Upload ``files`` for ``model`` to ``worker`` (no coordinator, no load).

    ``sha256`` gives each file's known digest (skips hashing); ``on_event`` receives progress
    events (see ``staging_cli.stager.events``). Raises a ``StagingError`` subclass on failure.
    """
    validate_model_name(model)
    stager = open_stager(worker, token=token, options=options, on_event=on_event, paths=paths)
    try:
        return await stage_files(stager, files, model=model, sha256=sha256)
    finally:
        await stager.aclose()
        stager.digests.close()
        stager.records.close()


async def load_async(
    model: str,
    *,
    worker: str,
    digests: Sequence[str],
    token: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    dsn: str | None = None,
    on_event: EventSink = ignore,
    paths: Paths | None = None,
) -> ColdLoadResult:
    """Load ``model`` (blobs ``digests``, already on the worker) once across the cluster."""
    return await load_model(
        model,
        worker=worker,
        digests=digests,
        token=token,
        parameters=parameters,
        dsn=dsn,
        on_event=on_event,
        paths=paths,
    )


async def unload_async(model: str, *, worker: str, token: str | None = None) -> bool:
    """Unload ``model``; False when the worker did not have it."""
    async with httpx.AsyncClient(timeout=60) as client:
        return await Loader(client, worker, token=token).unload(model)


async def models_async(*, worker: str, token: str | None = None) -> list[ModelState]:
    """The worker's repository index."""
    async with httpx.AsyncClient(timeout=30) as client:
        return await Loader(client, worker, token=token).index()


async def jobs_async(*, dsn: str | None = None, paths: Paths | None = None) -> list[dict[str, Any]]:
    """Every job the coordinator knows, as plain dicts (owner, phase, progress, outcome)."""
    where = paths or Paths.from_env()
    async with open_coordinator(dsn, state_dir=where.state_dir) as coord:
        return [asdict(state) for state in await coord.jobs()]


async def gc_async(
    *, worker: str, token: str | None = None, dry_run: bool = True, min_age: float | None = None
) -> dict[str, Any]:
    """Remove (or, with ``dry_run``, list) blobs no recorded model uses on a staging-cli worker."""
    async with httpx.AsyncClient(timeout=120) as client:
        return await Loader(client, worker, token=token).gc(dry_run=dry_run, min_age=min_age)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def stage(files: Sequence[Path | str], **kwargs: Any) -> StageResult:
    """Blocking :func:`stage_async`."""
    return _run(stage_async(files, **kwargs))


def prestage(files: Sequence[Path | str], **kwargs: Any) -> ColdLoadResult:
    """Blocking :func:`staging_cli.coldload.prestage`: claim, stage, load, release."""
    return _run(prestage_async(files, **kwargs))


def load(model: str, **kwargs: Any) -> ColdLoadResult:
    """Blocking :func:`load_async`."""
    return _run(load_async(model, **kwargs))


def unload(model: str, **kwargs: Any) -> bool:
    """Blocking :func:`unload_async`."""
    return _run(unload_async(model, **kwargs))


def models(**kwargs: Any) -> list[ModelState]:
    """Blocking :func:`models_async`."""
    return _run(models_async(**kwargs))


def jobs(**kwargs: Any) -> list[dict[str, Any]]:
    """Blocking :func:`jobs_async`."""
    return _run(jobs_async(**kwargs))


def gc(**kwargs: Any) -> dict[str, Any]:
    """Blocking :func:`gc_async`."""
    return _run(gc_async(**kwargs))
