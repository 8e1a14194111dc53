"""Local resume records: which upload URL this machine last used for (worker, content).

Only a shortcut. The worker is the source of truth for partial uploads (its ``GET /uploads``
lookup finds them from any machine); a record saves that lookup and lets a resume work against
tus servers that lack it. Stored in SQLite in the user state dir.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path


class ResumeRecords:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self.path is None:
            return None
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS uploads (worker TEXT, sha256 TEXT, size INTEGER,"
                    " url TEXT NOT NULL, updated REAL, PRIMARY KEY (worker, sha256, size))"
                )
            except sqlite3.Error:
                self.path = None
                return None
            self._db = db
        return self._db

    def get(self, worker: str, sha256: str, size: int) -> str | None:
        db = self._conn()
        if db is None:
            return None
        try:
            row = db.execute(
                "SELECT url FROM uploads WHERE worker=? AND sha256=? AND size=?",
                (worker, sha256, size),
            ).fetchone()
        except sqlite3.Error:
            return None
        return str(row[0]) if row else None

    def put(self, worker: str, sha256: str, size: int, url: str) -> None:
        db = self._conn()
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.execute(
                    "INSERT OR REPLACE INTO uploads VALUES (?, ?, ?, ?, ?)",
                    (worker, sha256, size, url, time.time()),
                )

    def forget(self, worker: str, sha256: str, size: int) -> None:
        db = self._conn()
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.execute(
                    "DELETE FROM uploads WHERE worker=? AND sha256=? AND size=?",
                    (worker, sha256, size),
                )

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
