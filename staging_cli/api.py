"""The documented Python API: what scripts call. The CLI calls the same functions.

Example::

    import staging_cli

    result = staging_cli.stage(["model.gguf"], model="org/model:q4", worker="http://gpu-1:8081")
    print(result.files[0].sha256, result.bytes_sent)

``stage_async`` is the same coroutine for code that already runs an event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from .config import Paths
from .stager import StageOptions, StageResult, open_stager, stage_files
from .stager.events import EventSink, ignore
from .tus import validate_model_name


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
    """Stage ``files`` for ``model`` onto ``worker``; returns what was sent per file.

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


def stage(
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
    """Blocking form of :func:`stage_async` for scripts."""
    return asyncio.run(
        stage_async(
            files,
            model=model,
            worker=worker,
            token=token,
            sha256=sha256,
            options=options,
            on_event=on_event,
            paths=paths,
        )
    )
