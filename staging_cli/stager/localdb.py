"""A small SQLite file that only ever saves work (the digest cache, the resume records).

Opened lazily, in WAL mode, shared safely by several processes of one machine. Any SQLite error
turns the file off for this process instead of failing the stage: losing it costs a re-hash or
an upload lookup, never correctness.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


class LocalDB:
    def __init__(self, path: Path | None, schema: str) -> None:
        self.path = path
        self._schema = schema
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self.path is None:
            return None
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(self._schema)
            except (sqlite3.Error, OSError):
                self.path = None
                return None
            self._db = db
        return self._db

    def query_one(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        db = self._conn()
        if db is None:
            return None
        try:
            row: tuple[Any, ...] | None = db.execute(sql, params).fetchone()
        except sqlite3.Error:
            return None
        return row

    def execute(self, sql: str, params: tuple[Any, ...]) -> None:
        db = self._conn()
        if db is None:
            return
        try:
            db.execute(sql, params)
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
