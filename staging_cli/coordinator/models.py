"""The coordinator's values: what a job is, what it reports, how it is tuned.

Plain frozen dataclasses and pure functions (no I/O), shared by every coordinator backend so
that a snapshot read from SQLite and one read from PostgreSQL are the same Python object.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import Any

__all__ = [
    "JobSpec",
    "JobState",
    "JobStatus",
    "Progress",
    "Tuning",
    "advisory_key",
]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

#: Namespace of every advisory-lock name staging-cli hashes, so our keys do not collide with
#: another application's advisory locks in the same database.
LOCK_NAMESPACE = "staging-cli:job:"


@dataclass(frozen=True)
class JobSpec:
    """One model on one worker with a given set of files: the unit that has one owner.

    ``digests`` are the sha256 hex digests of the model's files; they are lower-cased and sorted
    on construction, so the order the caller lists files in does not change the :attr:`key`.
    """

    model: str
    worker: str
    digests: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        digests = tuple(sorted(d.strip().lower() for d in self.digests))
        for d in digests:
            if not _HEX64.match(d):
                raise ValueError(f"{d!r} is not a sha256 hex digest (64 hex characters)")
        if not self.model:
            raise ValueError("a job needs a model name")
        if not self.worker:
            raise ValueError("a job needs a worker")
        object.__setattr__(self, "digests", digests)

    @classmethod
    def of(cls, model: str, worker: str, digests: Iterable[str]) -> JobSpec:
        """Build a spec from any iterable of digests."""
        return cls(model=model, worker=worker, digests=tuple(digests))

    @cached_property
    def key(self) -> str:
        """Stable id of the job: sha256 (hex) of a canonical JSON of model, worker and digests."""
        canonical = json.dumps(
            {"v": 1, "model": self.model, "worker": self.worker, "digests": list(self.digests)},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def advisory_key(job_key: str, namespace: str = LOCK_NAMESPACE) -> int:
    """The signed 64-bit PostgreSQL advisory-lock key of a job, hashed client-side.

    blake2b (8-byte digest) of ``namespace + job_key``, read as a signed big-endian integer.
    We do not use the server's ``hashtext``: it is undocumented and may change between releases.
    """
    digest = hashlib.blake2b((namespace + job_key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True)
class Progress:
    """What the owner of a job reports; waiters see it in :class:`JobState`."""

    phase: str
    bytes_done: int = 0
    bytes_total: int | None = None
    eta_seconds: float | None = None
    detail: str = ""


class JobStatus(StrEnum):
    """Where a job stands.

    ``running``: an owner holds it (it may have died: see :attr:`JobState.claimable`).
    ``succeeded``: done; :attr:`JobState.result` holds what the owner reported.
    ``failed``: the owner gave up; :attr:`JobState.error` says why. Claimable again after the
    failure grace period.
    ``released``: nobody owns it (the owner abandoned it, or it was invalidated); claimable.
    """

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RELEASED = "released"


@dataclass(frozen=True)
class JobState:
    """A snapshot of one job as the database had it when it was read.

    ``attempt`` counts claims (1 for the first owner) and doubles as the fencing token: every
    write of an owner carries it, so a stale owner can never overwrite its successor's row.
    ``expires_at`` is the end of the owner's lease while running and the end of the failure
    grace period when failed. ``claimable`` was computed with the database's clock (PostgreSQL)
    or the local clock (SQLite) when the snapshot was taken. ``version`` increases on every
    change a waiter cares about (heartbeats do not change it).
    """

    key: str
    model: str
    worker: str
    digests: tuple[str, ...]
    status: JobStatus
    owner: str | None
    attempt: int
    phase: str
    bytes_done: int
    bytes_total: int | None
    eta_seconds: float | None
    detail: str
    error: str | None
    result: Mapping[str, Any] | None
    created_at: datetime
    updated_at: datetime
    heartbeat_at: datetime | None
    expires_at: datetime | None
    claimable: bool
    version: int
    owner_host: str | None = None
    owner_pid: int | None = None

    @property
    def done(self) -> bool:
        """True once the job succeeded."""
        return self.status is JobStatus.SUCCEEDED

    def changed_from(self, other: JobState | None) -> bool:
        """True if a waiter holding ``other`` should be told about this snapshot."""
        if other is None:
            return True
        return (self.version, self.claimable, self.attempt) != (
            other.version,
            other.claimable,
            other.attempt,
        )


def epoch_to_datetime(value: float | None) -> datetime | None:
    """Unix seconds (as stored) to an aware UTC datetime."""
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


@dataclass(frozen=True)
class Tuning:
    """Timing knobs shared by every backend (seconds).

    The bound on detecting a dead owner is ``lease_ttl`` (+ one ``poll_interval`` for waiters):
    the owner renews its lease every ``heartbeat_interval``, and a lease not renewed for
    ``lease_ttl`` can be claimed by anyone. Keep ``heartbeat_interval`` well below
    ``lease_ttl`` (at most a third) so a slow database round trip does not cost the lease.
    """

    heartbeat_interval: float = 2.0
    lease_ttl: float = 10.0
    failure_grace: float = 30.0
    poll_interval: float = 0.25
    connect_timeout: float = 5.0
    statement_timeout: float = 15.0
    application_name: str = "staging-cli"

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_interval",
            "lease_ttl",
            "poll_interval",
            "connect_timeout",
            "statement_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"coordinator tuning: {name} must be positive")
        if self.failure_grace < 0:
            raise ValueError("coordinator tuning: failure_grace cannot be negative")

    @classmethod
    def from_kwargs(cls, base: Tuning | None = None, **kwargs: Any) -> Tuning:
        """A copy of ``base`` (or the defaults) with ``kwargs`` replaced; unknown names fail."""
        import dataclasses

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(
                f"unknown coordinator tuning {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(base or cls(), **kwargs)
