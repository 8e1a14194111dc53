"""Pick and build the coordinator a DSN asks for (none: the embedded SQLite one)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..config import Paths
from .base import Coordinator
from .models import Tuning
from .postgres import PostgresCoordinator
from .sqlite import SQLiteCoordinator

__all__ = ["SQLITE_FILENAME", "is_postgres_dsn", "open_coordinator"]

SQLITE_FILENAME = "coordinator.sqlite3"

# A libpq keyword/value string: "host=db port=5432 dbname=x" (at least one key=value pair).
_KEYWORD_DSN = re.compile(r"^\s*[A-Za-z_]+\s*=")


def is_postgres_dsn(dsn: str) -> bool:
    """True for ``postgresql://``/``postgres://`` URLs and libpq ``key=value`` strings."""
    return dsn.startswith(("postgresql://", "postgres://")) or bool(_KEYWORD_DSN.match(dsn))


def open_coordinator(
    dsn: str | None,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    tuning: Tuning | None = None,
    **overrides: Any,
) -> Coordinator:
    """The coordinator for ``dsn``: PostgreSQL for a DSN, SQLite in ``state_dir`` for None.

    Nothing is opened yet: use ``async with open_coordinator(...) as coord`` (or ``await
    coord.open()``) to connect and create the schema, which raises CoordinatorUnavailable if the
    database cannot be reached. ``overrides`` are :class:`Tuning` fields (``lease_ttl=...``).
    A ``dsn`` that is neither a PostgreSQL URL nor a libpq string is a ``ValueError``.
    """
    if dsn is None or dsn == "":
        base = tuning or Tuning()
        directory = Path(state_dir) if state_dir is not None else Paths.from_env().state_dir
        return SQLiteCoordinator(directory / SQLITE_FILENAME, Tuning.from_kwargs(base, **overrides))
    if not is_postgres_dsn(dsn):
        raise ValueError(
            "the coordinator DSN must be a postgresql:// (or postgres://) URL or a libpq "
            "'host=... dbname=...' string; leave it unset to use the local SQLite coordinator"
        )
    # PostgreSQL pushes changes through LISTEN/NOTIFY, so its poll only has to catch lease
    # expiries: once a second is plenty.
    base = tuning or Tuning(poll_interval=1.0)
    return PostgresCoordinator(dsn, Tuning.from_kwargs(base, **overrides))
