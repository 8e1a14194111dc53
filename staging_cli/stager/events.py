"""Progress events the stager emits; the CLI (or any caller) renders them.

The core never prints. Every event is a frozen dataclass with an ``event`` name that the CLI's
``--json`` mode writes as one NDJSON line. ``bytes_done`` is always bytes the worker has
acknowledged (its ``Upload-Offset``), never bytes merely written to a socket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class FileResult:
    """What staging one file did."""

    path: str
    sha256: str
    size: int
    skipped: bool  # the worker already had the blob: nothing was uploaded
    resumed_from: int  # the worker's offset when this run started uploading
    bytes_sent: int  # payload bytes this run put on the wire (retries included)
    upload_url: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StageResult:
    """What staging a model's files did."""

    model: str
    worker: str
    files: tuple[FileResult, ...] = field(default_factory=tuple)

    @property
    def bytes_sent(self) -> int:
        return sum(f.bytes_sent for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": "staged",
            "model": self.model,
            "worker": self.worker,
            "files": [
                {k: v for k, v in f.to_dict().items() if k != "upload_url"} for f in self.files
            ],
        }


class Event:
    """Base of all progress events."""

    event: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class Hashing(Event):
    event: ClassVar[str] = "hashing"
    path: str
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class FileStarted(Event):
    event: ClassVar[str] = "file_started"
    path: str
    size: int
    sha256: str
    resumed_from: int
    upload_url: str


@dataclass(frozen=True)
class FileSkipped(Event):
    event: ClassVar[str] = "file_skipped"
    path: str
    size: int
    sha256: str
    reason: str


@dataclass(frozen=True)
class UploadProgress(Event):
    event: ClassVar[str] = "progress"
    path: str
    bytes_done: int
    bytes_total: int
    bytes_sent: int
    rate: float  # bytes per second, recent window
    eta_seconds: float | None


@dataclass(frozen=True)
class Retrying(Event):
    event: ClassVar[str] = "retrying"
    path: str
    reason: str
    delay: float
    attempt: int


@dataclass(frozen=True)
class Notice(Event):
    event: ClassVar[str] = "notice"
    path: str
    message: str


@dataclass(frozen=True)
class FileStaged(Event):
    event: ClassVar[str] = "file_staged"
    path: str
    result: FileResult


EventSink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The default sink."""
