"""The one exception tree of staging-cli.

Every error the toolkit raises on purpose derives from :class:`StagingError` and reads as a
sentence that says what happened and what to do. Library errors (httpx, psycopg, OSError) are
translated at the boundary with ``raise ... from exc`` so callers never need to import them::

    StagingError
    ├── UsageError                  the caller asked for something impossible (exit code 2)
    │   ├── InvalidModelName        a model name with "..", control characters, or absolute
    │   ├── InvalidSize             "32 MiB" style sizes that do not parse
    │   └── ConfigError             unreadable or invalid config file / settings
    ├── TransferError               moving bytes to a worker failed (exit code 1)
    │   ├── WorkerUnreachable       connection/timeout errors after the budget gave up
    │   ├── UploadRefused           the worker refused: 400, 401, 403, 413, 507, ... (no retry)
    │   │   ├── AuthenticationError 401 / 403
    │   │   ├── UploadTooLarge      413: above the worker's --max-size
    │   │   └── InsufficientStorage 507: not enough free disk on the worker
    │   ├── DigestMismatch          the whole file's sha256 is not the one announced (422)
    │   ├── ChecksumRetriesExhausted  a chunk kept arriving corrupted (460 again and again)
    │   ├── FileChanged             the local file changed while it was being staged
    │   └── BudgetExpired           the resume budget ran out
    │       ├── StallTimeout        no server-acknowledged progress for the stall window
    │       └── DeadlineExceeded    the absolute deadline passed
    ├── StagingCancelled            the user cancelled (Ctrl-C); the upload stays resumable
    ├── CoordinatorError            the coordinator (SQLite / PostgreSQL) failed
    │   ├── CoordinatorUnavailable  cannot reach / open the coordinator database
    │   └── LostOwnership           another process took over a job this process owned
    └── LoadError                   the worker could not load the model
        └── LoadTimeout             the backend did not become healthy in time

``StagingError.exit_code`` is the process exit code the CLI uses for it.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BudgetExpired",
    "ChecksumRetriesExhausted",
    "ConfigError",
    "CoordinatorError",
    "CoordinatorUnavailable",
    "DeadlineExceeded",
    "DigestMismatch",
    "FileChanged",
    "InsufficientStorage",
    "InvalidModelName",
    "InvalidSize",
    "LoadError",
    "LoadTimeout",
    "LostOwnership",
    "StagingCancelled",
    "StagingError",
    "StallTimeout",
    "TransferError",
    "UploadRefused",
    "UploadTooLarge",
    "UsageError",
    "WorkerUnreachable",
]


class StagingError(Exception):
    """Base class of every error staging-cli raises on purpose."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(StagingError):
    """The caller asked for something that cannot work as asked."""

    exit_code = 2


class InvalidModelName(UsageError):
    """A model name that could be abused as a path or is otherwise unusable."""


class InvalidSize(UsageError):
    """A size such as ``32MiB`` that does not parse."""


class ConfigError(UsageError):
    """The configuration file or a setting is invalid."""


class TransferError(StagingError):
    """Moving bytes to a worker failed."""


class WorkerUnreachable(TransferError):
    """The worker could not be reached (and the budget no longer allows retrying)."""


class UploadRefused(TransferError):
    """The worker refused the upload with a status that retrying cannot fix."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(UploadRefused):
    """The worker wants a (different) bearer token."""


class UploadTooLarge(UploadRefused):
    """The file is larger than the worker accepts."""


class InsufficientStorage(UploadRefused):
    """The worker does not have the free disk space the file needs."""


class DigestMismatch(TransferError):
    """The received file's sha256 differs from the announced one; the upload was discarded."""


class ChecksumRetriesExhausted(TransferError):
    """A chunk failed its checksum on the worker too many times in a row."""


class FileChanged(TransferError):
    """The local file changed (size or mtime) while it was being staged."""


class BudgetExpired(TransferError):
    """The resume budget (stall window or absolute deadline) ran out."""

    def __init__(self, message: str, *, offset: int = 0) -> None:
        super().__init__(message)
        self.offset = offset


class StallTimeout(BudgetExpired):
    """No server-acknowledged progress for the whole stall window."""


class DeadlineExceeded(BudgetExpired):
    """The absolute deadline passed."""


class StagingCancelled(StagingError):
    """The user cancelled; what the worker acknowledged stays there and resumes next time."""

    exit_code = 130


class CoordinatorError(StagingError):
    """The coordinator failed."""


class CoordinatorUnavailable(CoordinatorError):
    """The coordinator's database cannot be reached or opened."""


class LostOwnership(CoordinatorError):
    """This process no longer owns the job it was working on."""


class LoadError(StagingError):
    """The worker could not load the model."""


class LoadTimeout(LoadError):
    """The model's backend did not become healthy within the load timeout."""
