"""The cluster coordinator: PostgreSQL (psycopg 3, async), one durable row per job.

How ownership works:

* A claim is one short transaction: ``pg_try_advisory_xact_lock(k)`` (``k`` hashed client-side
  from ``"staging-cli:job:" + key`` with blake2b, see :func:`~.models.advisory_key`), then an
  ``INSERT ... ON CONFLICT DO UPDATE ... WHERE <claimable>`` of the job row, then
  ``pg_notify``. The lock never waits (a busy lock means someone else is claiming right now: we
  return None) and ends at COMMIT, so no waiter ever blocks on a lock held for a staging run,
  and ``statement_timeout`` can never hit a waiter. Correctness does not rest on the lock: the
  conditional upsert is atomic on its own, the lock only keeps racing claimers off the row.
* The owner renews its lease (``expires_at = clock_timestamp() + lease_ttl``) every
  ``heartbeat_interval``; every owner write has ``owner = ... AND attempt = ...`` (the fencing
  token) in its WHERE clause, so a stale owner changes nothing and gets ``LostOwnership``.
  Lease times use the server's clock only, so client clock skew does not matter.
* A dead owner (crash, SIGKILL, lost network path) is claimable once its lease expires: within
  ``lease_ttl`` (default 10 s) of its last renewal. Connections enable TCP keepalives
  (``keepalives_idle=10, keepalives_interval=5, keepalives_count=3``), so a half-open
  connection is noticed by the owner after about 25 s even without traffic; its heartbeats fail
  in the meantime and, when the server is reachable again, either renew the lease (nobody took
  over) or report ``LostOwnership``.
* Waiters: one ``LISTEN staging_cli_jobs`` connection per coordinator instance fans
  notifications out to every in-process waiter; a poll (``poll_interval``, default 1 s for this
  backend via :func:`~.factory.open_coordinator`) catches what notifications cannot say (a lease
  expiring) and covers a lost listener.

Connections: at most :data:`MAX_CONNECTIONS` (2) per coordinator instance, whatever the number
of leases and waiters: one for short statements (serialized by an asyncio lock) and one for
LISTEN, opened on the first ``wait``. Both use ``application_name`` (default "staging-cli").

Supported deployments: PostgreSQL 12+ reached directly, or through PgBouncer in **session**
mode. We rely on session state only for LISTEN and for ``SET statement_timeout/lock_timeout``;
no session-level advisory lock is ever taken, so a connection handed to another client after a
reset cannot leak one of our locks. PgBouncer in **transaction** mode is not supported (LISTEN
and session settings do not survive there). The table ``staging_jobs`` is created on first use
(``CREATE TABLE IF NOT EXISTS`` under a transaction-scoped advisory lock, so two processes
starting together do not race on the DDL). The role needs CREATE on the schema the first time,
then SELECT/INSERT/UPDATE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from ..errors import CoordinatorError, CoordinatorUnavailable
from .base import CoordinatorBase
from .models import JobSpec, JobState, JobStatus, Progress, Tuning, advisory_key

__all__ = ["MAX_CONNECTIONS", "PostgresCoordinator"]

log = logging.getLogger("staging_cli.coordinator.postgres")

T = TypeVar("T")

#: Upper bound of connections one PostgresCoordinator opens (statements + LISTEN).
MAX_CONNECTIONS = 2

CHANNEL = "staging_cli_jobs"
SCHEMA_LOCK = advisory_key("schema", namespace="staging-cli:ddl:")

SCHEMA = """
CREATE TABLE IF NOT EXISTS staging_jobs (
    key          text PRIMARY KEY,
    model        text NOT NULL,
    worker       text NOT NULL,
    digests      text[] NOT NULL,
    status       text NOT NULL,
    owner        text,
    owner_host   text,
    owner_pid    integer,
    attempt      bigint NOT NULL DEFAULT 0,
    phase        text NOT NULL DEFAULT '',
    bytes_done   bigint NOT NULL DEFAULT 0,
    bytes_total  bigint,
    eta_seconds  double precision,
    detail       text NOT NULL DEFAULT '',
    error        text,
    result       jsonb,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    heartbeat_at timestamptz,
    expires_at   timestamptz,
    version      bigint NOT NULL DEFAULT 0
)
"""

CLAIMABLE = (
    "(j.status = 'released' OR (j.status IN ('running', 'failed') "
    "AND j.expires_at < clock_timestamp()))"
)

SELECT = (
    "SELECT j.key, j.model, j.worker, j.digests, j.status, j.owner, j.owner_host, j.owner_pid, "
    "j.attempt, j.phase, j.bytes_done, j.bytes_total, j.eta_seconds, j.detail, j.error, "
    f"j.result, j.created_at, j.updated_at, j.heartbeat_at, j.expires_at, j.version, {CLAIMABLE} "
    "FROM staging_jobs AS j"
)

CLAIM = f"""
INSERT INTO staging_jobs AS j (key, model, worker, digests, status, owner, owner_host,
    owner_pid, attempt, phase, created_at, updated_at, heartbeat_at, expires_at, version)
VALUES (%(key)s, %(model)s, %(worker)s, %(digests)s, 'running', %(owner)s, %(host)s, %(pid)s,
    1, 'claimed', clock_timestamp(), clock_timestamp(), clock_timestamp(),
    clock_timestamp() + make_interval(secs => %(ttl)s::float8), 1)
ON CONFLICT (key) DO UPDATE SET
    status = 'running', owner = EXCLUDED.owner, owner_host = EXCLUDED.owner_host,
    owner_pid = EXCLUDED.owner_pid, attempt = j.attempt + 1, phase = 'claimed',
    bytes_done = 0, bytes_total = NULL, eta_seconds = NULL, detail = '', error = NULL,
    result = NULL, updated_at = clock_timestamp(), heartbeat_at = clock_timestamp(),
    expires_at = EXCLUDED.expires_at, version = j.version + 1
WHERE {CLAIMABLE} OR (%(force)s AND j.status IN ('succeeded', 'failed'))
RETURNING j.attempt
"""

FENCE = "WHERE key = %(key)s AND owner = %(owner)s AND attempt = %(attempt)s AND status = 'running'"


def describe_dsn(dsn: str) -> str:
    """``host:port`` (or the socket directory) of a DSN for messages; never the password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the given DSN"
    host = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "")
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    if not host:
        return f"the default socket (port {port})"
    if host.startswith("/"):
        return f"socket {host} (port {port})"
    return f"{host}:{port}"


def _reason(exc: BaseException, connect_timeout: float) -> str:
    text = str(exc)
    low = text.lower()
    if "connection refused" in low:
        return "connection refused"
    if "timeout expired" in low or isinstance(exc, TimeoutError):
        return f"no answer within {connect_timeout:g} s"
    if "password authentication failed" in low:
        return "password authentication failed"
    if "no such file or directory" in low:
        return "no server socket there"
    if "could not translate host name" in low or "name or service not known" in low:
        return "unknown host name"
    if "does not exist" in low:
        return text.splitlines()[-1].strip().removeprefix("FATAL:").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class PostgresCoordinator(CoordinatorBase):
    """Coordinator backed by PostgreSQL, for processes on any number of machines."""

    def __init__(self, dsn: str, tuning: Tuning | None = None) -> None:
        super().__init__(tuning or Tuning(poll_interval=1.0))
        self._dsn = dsn
        self.where = describe_dsn(dsn)
        self.hostname = socket.gethostname()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._listen_conn: psycopg.AsyncConnection[Any] | None = None

    def __repr__(self) -> str:
        return f"<PostgresCoordinator {self.where}>"

    # -- connections -------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException, verb: str = "connect to") -> CoordinatorUnavailable:
        return CoordinatorUnavailable(
            f"cannot {verb} PostgreSQL at {self.where} "
            f"({_reason(exc, self.tuning.connect_timeout)}): check --dsn / STAGING_CLI_DSN "
            "and that the server is running"
        )

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        t = self.tuning
        try:
            conn = await asyncio.wait_for(
                psycopg.AsyncConnection.connect(
                    self._dsn,
                    autocommit=True,
                    application_name=t.application_name,
                    connect_timeout=max(1, round(t.connect_timeout)),
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                ),
                t.connect_timeout + 1,
            )
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        try:
            await conn.execute(
                f"SET statement_timeout = {int(t.statement_timeout * 1000)}; "
                f"SET lock_timeout = {int(min(t.statement_timeout, 5.0) * 1000)}; "
                "SET idle_in_transaction_session_timeout = 60000"
            )
        except psycopg.Error as exc:
            await conn.close()
            raise self._unavailable(exc, "set up a session with") from exc
        return conn

    async def _create_schema(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            async with conn.transaction():
                # Blocking, but only ever held for this DDL: two processes starting at once
                # would otherwise race inside CREATE TABLE IF NOT EXISTS (duplicate pg_type).
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                await conn.execute(SCHEMA)
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc, "create the coordinator table on") from exc
        except psycopg.Error as exc:
            raise CoordinatorError(
                f"cannot create the coordinator table staging_jobs on PostgreSQL at "
                f"{self.where} ({_reason(exc, self.tuning.connect_timeout)}): grant the role "
                "CREATE on its schema, or create the table once as an administrator"
            ) from exc

    async def _ensure(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
            self._conn = None
        conn = await self._connect()
        try:
            await self._create_schema(conn)
        except CoordinatorError:
            await conn.close()
            raise
        self._conn = conn
        return conn

    async def open(self) -> None:
        self._check_open()
        async with self._lock:
            await self._ensure()

    async def _run(
        self,
        fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
        *,
        retry: bool,
    ) -> T:
        """Run ``fn`` on the statement connection; reconnect once if ``retry`` (idempotent)."""
        self._check_open()
        async with self._lock:
            for attempt in range(2):
                conn = await self._ensure()
                try:
                    return await fn(conn)
                except psycopg.OperationalError as exc:
                    if conn.closed or conn.broken:
                        self._conn = None
                        with contextlib.suppress(Exception):
                            await conn.close()
                        if retry and attempt == 0:
                            continue
                        raise self._unavailable(exc, "talk to") from exc
                    raise CoordinatorError(
                        f"PostgreSQL at {self.where} failed: "
                        f"{_reason(exc, self.tuning.connect_timeout)}"
                    ) from exc
                except psycopg.Error as exc:
                    raise CoordinatorError(
                        f"PostgreSQL at {self.where} failed: "
                        f"{_reason(exc, self.tuning.connect_timeout)}"
                    ) from exc
        raise AssertionError("unreachable")

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        for conn in (self._listen_conn, self._conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._listen_conn = self._conn = None

    # -- notifications -----------------------------------------------------------------------

    def _start_notifications(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="staging-cli LISTEN")

    async def _listen(self) -> None:
        backoff = 0.5
        while not self._closed:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await self._connect()
                self._listen_conn = conn
                await conn.execute(f"LISTEN {CHANNEL}")
                backoff = 0.5
                if self._hub is not None:
                    self._hub.kick()  # we may have missed notifications while disconnected
                async for note in conn.notifies():
                    hub = self._hub
                    if hub is not None and hub.watching(note.payload):
                        hub.kick()
            except (psycopg.Error, CoordinatorError) as exc:
                log.debug("LISTEN connection lost (%s); polling until it is back", exc)
            finally:
                self._listen_conn = None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    # -- snapshots ---------------------------------------------------------------------------

    @staticmethod
    def _state(row: Sequence[Any]) -> JobState:
        created: datetime = row[16]
        updated: datetime = row[17]
        return JobState(
            key=row[0],
            model=row[1],
            worker=row[2],
            digests=tuple(row[3]),
            status=JobStatus(row[4]),
            owner=row[5],
            owner_host=row[6],
            owner_pid=row[7],
            attempt=int(row[8]),
            phase=row[9],
            bytes_done=int(row[10]),
            bytes_total=None if row[11] is None else int(row[11]),
            eta_seconds=row[12],
            detail=row[13],
            error=row[14],
            result=row[15],
            created_at=created,
            updated_at=updated,
            heartbeat_at=row[18],
            expires_at=row[19],
            version=int(row[20]),
            claimable=bool(row[21]),
        )

    # -- primitives --------------------------------------------------------------------------

    async def _claim(self, spec: JobSpec, owner: str, force: bool) -> int | None:
        params = {
            "key": spec.key,
            "model": spec.model,
            "worker": spec.worker,
            "digests": list(spec.digests),
            "owner": owner,
            "host": self.hostname,
            "pid": os.getpid(),
            "ttl": self.tuning.lease_ttl,
            "force": force,
        }

        async def claim(conn: psycopg.AsyncConnection[Any]) -> int | None:
            async with conn.transaction():
                cur = await conn.execute(
                    "SELECT pg_try_advisory_xact_lock(%s)", (advisory_key(spec.key),)
                )
                got = await cur.fetchone()
                if not got or not got[0]:
                    return None  # another process is claiming this very job right now
                cur = await conn.execute(CLAIM, params)
                row = await cur.fetchone()
                if row is None:
                    return None
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, spec.key))
                return int(row[0])

        # Not retried: after a lost COMMIT we cannot know whether we own the job; if we do,
        # the lease simply expires unrenewed and someone else claims it.
        return await self._run(claim, retry=False)

    async def _renew(self, key: str, owner: str, attempt: int) -> bool:
        params = {"key": key, "owner": owner, "attempt": attempt, "ttl": self.tuning.lease_ttl}

        async def renew(conn: psycopg.AsyncConnection[Any]) -> bool:
            cur = await conn.execute(
                "UPDATE staging_jobs SET heartbeat_at = clock_timestamp(), "
                "expires_at = clock_timestamp() + make_interval(secs => %(ttl)s::float8) " + FENCE,
                params,
            )
            return cur.rowcount == 1

        return await self._run(renew, retry=True)

    async def _update_and_notify(self, key: str, sql: str, params: Any, *, retry: bool) -> bool:
        """One UPDATE of a job row in its own transaction; when it matched, every process is
        told (NOTIFY, committed with the change) and so are this process's waiters."""

        async def update(conn: psycopg.AsyncConnection[Any]) -> bool:
            async with conn.transaction():
                cur = await conn.execute(sql, params)
                ok = cur.rowcount == 1
                if ok:
                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, key))
                return ok

        ok = await self._run(update, retry=retry)
        self._notify_local(key)
        return ok

    async def _write_progress(self, key: str, owner: str, attempt: int, progress: Progress) -> bool:
        params = {
            "key": key,
            "owner": owner,
            "attempt": attempt,
            "ttl": self.tuning.lease_ttl,
            "phase": progress.phase,
            "done": progress.bytes_done,
            "total": progress.bytes_total,
            "eta": progress.eta_seconds,
            "detail": progress.detail,
        }

        return await self._update_and_notify(
            key,
            "UPDATE staging_jobs SET phase = %(phase)s, bytes_done = %(done)s, "
            "bytes_total = %(total)s, eta_seconds = %(eta)s, detail = %(detail)s, "
            "updated_at = clock_timestamp(), heartbeat_at = clock_timestamp(), "
            "expires_at = clock_timestamp() + make_interval(secs => %(ttl)s::float8), "
            "version = version + 1 " + FENCE,
            params,
            retry=True,
        )

    async def _finish(
        self,
        key: str,
        owner: str,
        attempt: int,
        status: str,
        result: dict[str, Any] | None,
        error: str | None,
    ) -> bool:
        params = {
            "key": key,
            "owner": owner,
            "attempt": attempt,
            "status": status,
            "result": None if result is None else Jsonb(result),
            "error": error,
            "grace": self.tuning.failure_grace if status == "failed" else None,
        }

        return await self._update_and_notify(
            key,
            "UPDATE staging_jobs SET status = %(status)s, result = %(result)s, "
            "error = %(error)s, updated_at = clock_timestamp(), "
            "expires_at = clock_timestamp() + make_interval(secs => %(grace)s::float8), "
            "phase = CASE WHEN %(status)s = 'succeeded' THEN 'done' ELSE phase END, "
            "version = version + 1 " + FENCE,
            params,
            retry=False,  # a lost COMMIT of a finish is ambiguous: never replay it
        )

    async def _fetch(self, keys: Sequence[str]) -> dict[str, JobState]:
        wanted = list(keys)

        async def fetch(conn: psycopg.AsyncConnection[Any]) -> dict[str, JobState]:
            cur = await conn.execute(SELECT + " WHERE j.key = ANY(%s)", (wanted,))
            return {row[0]: self._state(row) for row in await cur.fetchall()}

        return await self._run(fetch, retry=True)

    async def _list(self) -> list[JobState]:
        async def list_all(conn: psycopg.AsyncConnection[Any]) -> list[JobState]:
            cur = await conn.execute(SELECT + " ORDER BY j.created_at, j.key")
            return [self._state(row) for row in await cur.fetchall()]

        return await self._run(list_all, retry=True)

    async def invalidate(self, key: str) -> bool:
        return await self._update_and_notify(
            key,
            "UPDATE staging_jobs SET status = 'released', detail = 'invalidated', "
            "expires_at = NULL, updated_at = clock_timestamp(), version = version + 1 "
            "WHERE key = %s AND status IN ('succeeded', 'failed')",
            (key,),
            retry=True,
        )
