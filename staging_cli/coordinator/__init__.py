"""The coordinator: exactly one owner per job across processes and machines.

A *job* is one model on one worker with a given set of files (:class:`JobSpec`); its ``key`` is
the sha256 of a canonical JSON of the three. Whoever ``acquire``\\ s a job gets a
:class:`Lease` and does the work; everybody else follows it through ``get``/``wait`` snapshots
(:class:`JobState`) instead of doing it again::

    from staging_cli.coordinator import JobSpec, Progress, open_coordinator

    spec = JobSpec.of("qwen-14b", "http://gpu-1:8081", digests)
    async with open_coordinator(dsn) as coord:          # dsn None -> local SQLite file
        lease = await coord.acquire(spec, owner="router-1")   # never blocks on a lock
        if lease is not None:                                 # we own it: do the work
            async with lease:       # released on cancellation, failed on an exception
                await lease.progress(Progress("staging", bytes_done=n, bytes_total=total))
                ...
                await lease.succeed({"loaded": True})         # or: await lease.fail("why")
        else:
            state = await coord.get(spec.key)                 # who owns it, phase, bytes
            while state is not None and state.status == "running" and not state.claimable:
                state = await coord.wait(spec.key, timeout=5.0, since=state)
            # succeeded -> use it; failed -> report state.error; claimable -> acquire again

Semantics every backend guarantees (one contract test suite runs on both):

* One owner at a time. ``acquire`` returns None while a live owner holds the job, while a
  failed job is inside its failure grace period (``failure_grace``, default 30 s, so waiters
  report the failure instead of retrying in a storm), and once the job succeeded (until
  ``invalidate(key)`` or ``acquire(..., force=True)``, e.g. when the worker lost the model).
* Liveness: a lease renews itself in the background every ``heartbeat_interval`` (2 s),
  independent of ``progress()`` calls; an owner that stops renewing (killed, hung, cut off)
  loses the job ``lease_ttl`` (10 s) after its last renewal and the next ``acquire`` takes over
  with ``attempt`` + 1.
* Fencing: ``attempt`` is a fencing token. Every owner write (heartbeat, progress, succeed,
  fail) is conditional on (owner, attempt); a process whose job was taken over gets
  :class:`~staging_cli.errors.LostOwnership` and overwrites nothing.
* ``wait`` returns as soon as the job changes (progress, success, failure, release, owner dead
  so it became claimable), else at its timeout, with the latest snapshot.

Backends:

* :class:`SQLiteCoordinator` (``open_coordinator(None)``): a file in the state directory,
  for the processes of one machine on a local filesystem (not NFS). Same-host owners that died
  are also detected by pid at once; pid checks do not cross containers or hosts.
* :class:`PostgresCoordinator` (``open_coordinator("postgresql://...")``): a cluster. Claims
  take a non-blocking, transaction-scoped advisory lock (key hashed client-side) around a short
  upsert of the durable job row; waiters use LISTEN/NOTIFY plus polling; at most
  :data:`MAX_CONNECTIONS` connections per coordinator instance. Direct connections and
  PgBouncer in session mode are supported, transaction mode is not. See its module docstring.

Errors: ``CoordinatorUnavailable`` (cannot reach/open the database, says where and what to
check, never the password), ``LostOwnership``, other ``CoordinatorError``; all from
:mod:`staging_cli.errors`.
"""

from __future__ import annotations

from .base import Coordinator, CoordinatorBase, Lease
from .factory import is_postgres_dsn, open_coordinator
from .models import JobSpec, JobState, JobStatus, Progress, Tuning, advisory_key
from .postgres import MAX_CONNECTIONS, PostgresCoordinator
from .sqlite import SQLiteCoordinator

__all__ = [
    "MAX_CONNECTIONS",
    "Coordinator",
    "CoordinatorBase",
    "JobSpec",
    "JobState",
    "JobStatus",
    "Lease",
    "PostgresCoordinator",
    "Progress",
    "SQLiteCoordinator",
    "Tuning",
    "advisory_key",
    "is_postgres_dsn",
    "open_coordinator",
]
