"""The stager: the client side of staging (digest cache, resume records, the upload loop)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..config import Paths
from .digest import DigestCache, FileVersion, hash_file
from .events import (
    Event,
    EventSink,
    FileResult,
    FileSkipped,
    FileStaged,
    FileStarted,
    Hashing,
    Notice,
    Retrying,
    StageResult,
    UploadProgress,
    ignore,
)
from .records import ResumeRecords
from .upload import StageOptions, Stager

__all__ = [
    "DigestCache",
    "Event",
    "EventSink",
    "FileResult",
    "FileSkipped",
    "FileStaged",
    "FileStarted",
    "FileVersion",
    "Hashing",
    "Notice",
    "ResumeRecords",
    "Retrying",
    "StageOptions",
    "StageResult",
    "Stager",
    "UploadProgress",
    "hash_file",
    "open_stager",
    "stage_files",
]


def open_stager(
    worker: str,
    *,
    token: str | None = None,
    options: StageOptions | None = None,
    on_event: EventSink = ignore,
    paths: Paths | None = None,
) -> Stager:
    """A Stager with the digest cache and resume records in the user's cache and state dirs."""
    where = paths or Paths.from_env()
    return Stager(
        worker,
        token=token,
        options=options,
        on_event=on_event,
        digest_cache=DigestCache(where.cache_dir / "digests.sqlite3"),
        records=ResumeRecords(where.state_dir / "uploads.sqlite3"),
    )


async def stage_files(
    stager: Stager,
    files: Sequence[Path | str],
    *,
    model: str | None = None,
    sha256: Sequence[str | None] | None = None,
) -> StageResult:
    """Stage every file, one after the other, with one stager."""
    digests = list(sha256) if sha256 is not None else [None] * len(files)
    if len(digests) != len(files):
        from ..errors import UsageError

        raise UsageError(
            f"{len(digests)} --sha256 values for {len(files)} files: give one per file"
        )
    results = []
    for path, digest in zip(files, digests, strict=True):
        results.append(await stager.stage_file(Path(path), model=model, sha256=digest))
    return StageResult(model=model or "", worker=stager.worker, files=tuple(results))
