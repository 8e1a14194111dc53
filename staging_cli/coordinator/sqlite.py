"""The embedded coordinator: one SQLite file shared by the processes of ONE machine.

Every claim runs in a ``BEGIN IMMEDIATE`` transaction (SQLite's single writer lock, waited
for at most ``busy_timeout``), reads the job row, decides, and writes it with the previous
``attempt`` in the WHERE clause; owner writes are fenced by (owner, attempt) the same way. The
database runs in WAL mode so readers (waiters) never block the writer.

Scope and limits:

* One machine, local filesystem. SQLite's locking is not reliable over NFS/SMB and WAL needs
  shared memory between the processes: do not put the file on a network share, and do not share
  it between hosts. Use :class:`~staging_cli.coordinator.postgres.PostgresCoordinator` for a
  cluster.
* Dead owners are detected two ways: the lease (``lease_ttl``, renewed every
  ``heartbeat_interval``) always; and, as a shortcut, a pid check (``os.kill(pid, 0)`` plus a
  zombie check in ``/proc``) when the owner recorded the same host name as ours. The pid check
  does not cross containers (pid namespaces) or hosts; a recycled pid only delays detection to
  the lease expiry, it never makes two owners.
* Waiters poll (``poll_interval``, default 0.25 s) through one shared poller per coordinator.
* One sqlite3 connection per coordinator instance; calls run in worker threads (sqlite3 is
  synchronous) serialized by a lock.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import CoordinatorError, CoordinatorUnavailable
from .base import CoordinatorBase
from .models import JobSpec, JobState, JobStatus, Progress, Tuning, epoch_to_datetime

__all__ = ["SQLiteCoordinator"]

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS staging_jobs (
    key          TEXT PRIMARY KEY,
    model        TEXT NOT NULL,
    worker       TEXT NOT NULL,
    digests      TEXT NOT NULL,
    status       TEXT NOT NULL,
    owner        TEXT,
    owner_host   TEXT,
    owner_pid    INTEGER,
    attempt      INTEGER NOT NULL DEFAULT 0,
    phase        TEXT NOT NULL DEFAULT '',
    bytes_done   INTEGER NOT NULL DEFAULT 0,
    bytes_total  INTEGER,
    eta_seconds  REAL,
    detail       TEXT NOT NULL DEFAULT '',
    error        TEXT,
    result       TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    heartbeat_at REAL,
    expires_at   REAL,
    version      INTEGER NOT NULL DEFAULT 0
)
"""

COLUMNS = (
    "key, model, worker, digests, status, owner, owner_host, owner_pid, attempt, phase, "
    "bytes_done, bytes_total, eta_seconds, detail, error, result, created_at, updated_at, "
    "heartbeat_at, expires_at, version"
)

BUSY_TIMEOUT_MS = 10_000


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) process on this host, as far as we can see."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # "pid (comm) S ...": the state follows the last ')' (comm may contain spaces).
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


class SQLiteCoordinator(CoordinatorBase):
    """Coordinator backed by a SQLite file (WAL, busy_timeout) for processes of one machine."""

    def __init__(self, path: str | os.PathLike[str], tuning: Tuning | None = None) -> None:
        super().__init__(tuning or Tuning())
        self.path = Path(path)
        self.hostname = socket.gethostname()
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._open_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<SQLiteCoordinator {self.path}>"

    # -- connection --------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise CoordinatorUnavailable(
                f"cannot open the coordinator database {self.path} ({exc}): check that the "
                "directory exists and is writable (STAGING_CLI_STATE_DIR moves it)"
            ) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise CoordinatorUnavailable(
                    f"the coordinator database {self.path} cannot use WAL mode (got {mode}); "
                    "put it on a local filesystem"
                )
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(SCHEMA)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise CoordinatorUnavailable(
                f"cannot initialise the coordinator database {self.path} ({exc}): check that "
                "it is a staging-cli database on a local, writable filesystem"
            ) from exc
        return conn

    async def open(self) -> None:
        self._check_open()
        async with self._open_lock:
            if self._conn is None:
                self._conn = await asyncio.to_thread(self._connect)

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(self._close_sync, conn)

    def _close_sync(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            conn.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()
        if self._conn is None:
            await self.open()
        conn = self._conn
        assert conn is not None

        def call() -> T:
            with self._lock:
                try:
                    return fn(conn)
                except sqlite3.Error as exc:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise CoordinatorError(
                        f"the coordinator database {self.path} failed: {exc}"
                    ) from exc

        return await asyncio.to_thread(call)

    # -- snapshots ---------------------------------------------------------------------------

    def _claimable(self, row: sqlite3.Row | tuple[Any, ...], now: float, force: bool) -> bool:
        status, owner_host, owner_pid, expires_at = row[4], row[6], row[7], row[19]
        if status == JobStatus.RELEASED:
            return True
        if status == JobStatus.RUNNING:
            if expires_at is not None and expires_at < now:
                return True
            return (
                owner_host == self.hostname
                and owner_pid is not None
                and owner_pid != os.getpid()
                and not pid_alive(int(owner_pid))
            )
        if status == JobStatus.FAILED:
            return force or (expires_at is not None and expires_at < now)
        return force  # succeeded

    def _state(self, row: tuple[Any, ...], now: float) -> JobState:
        created = epoch_to_datetime(row[16])
        updated = epoch_to_datetime(row[17])
        assert created is not None and updated is not None
        return JobState(
            key=row[0],
            model=row[1],
            worker=row[2],
            digests=tuple(json.loads(row[3])),
            status=JobStatus(row[4]),
            owner=row[5],
            owner_host=row[6],
            owner_pid=row[7],
            attempt=row[8],
            phase=row[9],
            bytes_done=row[10],
            bytes_total=row[11],
            eta_seconds=row[12],
            detail=row[13],
            error=row[14],
            result=None if row[15] is None else json.loads(row[15]),
            created_at=created,
            updated_at=updated,
            heartbeat_at=epoch_to_datetime(row[18]),
            expires_at=epoch_to_datetime(row[19]),
            claimable=self._claimable(row, now, False),
            version=row[20],
        )

    # -- primitives --------------------------------------------------------------------------

    async def _claim(self, spec: JobSpec, owner: str, force: bool) -> int | None:
        ttl = self.tuning.lease_ttl
        pid = os.getpid()

        def claim(conn: sqlite3.Connection) -> int | None:
            conn.execute("BEGIN IMMEDIATE")
            now = time.time()
            row = conn.execute(
                f"SELECT {COLUMNS} FROM staging_jobs WHERE key = ?", (spec.key,)
            ).fetchone()
            if row is None:
                conn.execute(
                    f"INSERT INTO staging_jobs ({COLUMNS}) VALUES "
                    "(?, ?, ?, ?, 'running', ?, ?, ?, 1, 'claimed', 0, NULL, NULL, '', NULL, "
                    "NULL, ?, ?, ?, ?, 1)",
                    (
                        spec.key,
                        spec.model,
                        spec.worker,
                        json.dumps(list(spec.digests)),
                        owner,
                        self.hostname,
                        pid,
                        now,
                        now,
                        now,
                        now + ttl,
                    ),
                )
                conn.execute("COMMIT")
                return 1
            if not self._claimable(row, now, force):
                conn.execute("ROLLBACK")
                return None
            attempt = int(row[8]) + 1
            cur = conn.execute(
                "UPDATE staging_jobs SET status = 'running', owner = ?, owner_host = ?, "
                "owner_pid = ?, attempt = ?, phase = 'claimed', bytes_done = 0, "
                "bytes_total = NULL, eta_seconds = NULL, detail = '', error = NULL, "
                "result = NULL, updated_at = ?, heartbeat_at = ?, expires_at = ?, "
                "version = version + 1 WHERE key = ? AND attempt = ?",
                (owner, self.hostname, pid, attempt, now, now, now + ttl, spec.key, row[8]),
            )
            if cur.rowcount != 1:  # cannot happen under the write lock; be safe anyway
                conn.execute("ROLLBACK")
                return None
            conn.execute("COMMIT")
            return attempt

        return await self._run(claim)

    async def _renew(self, key: str, owner: str, attempt: int) -> bool:
        ttl = self.tuning.lease_ttl

        def renew(conn: sqlite3.Connection) -> bool:
            now = time.time()
            cur = conn.execute(
                "UPDATE staging_jobs SET heartbeat_at = ?, expires_at = ? "
                "WHERE key = ? AND owner = ? AND attempt = ? AND status = 'running'",
                (now, now + ttl, key, owner, attempt),
            )
            return cur.rowcount == 1

        return await self._run(renew)

    async def _write_progress(self, key: str, owner: str, attempt: int, progress: Progress) -> bool:
        ttl = self.tuning.lease_ttl

        def write(conn: sqlite3.Connection) -> bool:
            now = time.time()
            cur = conn.execute(
                "UPDATE staging_jobs SET phase = ?, bytes_done = ?, bytes_total = ?, "
                "eta_seconds = ?, detail = ?, updated_at = ?, heartbeat_at = ?, "
                "expires_at = ?, version = version + 1 "
                "WHERE key = ? AND owner = ? AND attempt = ? AND status = 'running'",
                (
                    progress.phase,
                    progress.bytes_done,
                    progress.bytes_total,
                    progress.eta_seconds,
                    progress.detail,
                    now,
                    now,
                    now + ttl,
                    key,
                    owner,
                    attempt,
                ),
            )
            return cur.rowcount == 1

        ok = await self._run(write)
        self._notify_local(key)
        return ok

    async def _finish(
        self,
        key: str,
        owner: str,
        attempt: int,
        status: str,
        result: dict[str, Any] | None,
        error: str | None,
    ) -> bool:
        grace = self.tuning.failure_grace
        result_json = None if result is None else json.dumps(result)

        def finish(conn: sqlite3.Connection) -> bool:
            now = time.time()
            expires = now + grace if status == "failed" else None
            cur = conn.execute(
                "UPDATE staging_jobs SET status = ?, result = ?, error = ?, updated_at = ?, "
                "expires_at = ?, phase = CASE WHEN ? = 'succeeded' THEN 'done' ELSE phase END, "
                "version = version + 1 "
                "WHERE key = ? AND owner = ? AND attempt = ? AND status = 'running'",
                (status, result_json, error, now, expires, status, key, owner, attempt),
            )
            return cur.rowcount == 1

        ok = await self._run(finish)
        self._notify_local(key)
        return ok

    async def _fetch(self, keys: Sequence[str]) -> dict[str, JobState]:
        wanted = list(keys)

        def fetch(conn: sqlite3.Connection) -> dict[str, JobState]:
            now = time.time()
            out: dict[str, JobState] = {}
            # Chunks stay far below SQLite's bound-parameter limit.
            for i in range(0, len(wanted), 500):
                chunk = wanted[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                for row in conn.execute(
                    f"SELECT {COLUMNS} FROM staging_jobs WHERE key IN ({marks})", chunk
                ):
                    out[row[0]] = self._state(row, now)
            return out

        return await self._run(fetch)

    async def _list(self) -> list[JobState]:
        def list_all(conn: sqlite3.Connection) -> list[JobState]:
            now = time.time()
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM staging_jobs ORDER BY created_at, key"
            ).fetchall()
            return [self._state(row, now) for row in rows]

        return await self._run(list_all)

    async def invalidate(self, key: str) -> bool:
        def invalidate(conn: sqlite3.Connection) -> bool:
            now = time.time()
            cur = conn.execute(
                "UPDATE staging_jobs SET status = 'released', detail = 'invalidated', "
                "expires_at = NULL, updated_at = ?, version = version + 1 "
                "WHERE key = ? AND status IN ('succeeded', 'failed')",
                (now, key),
            )
            return cur.rowcount == 1

        ok = await self._run(invalidate)
        self._notify_local(key)
        return ok
