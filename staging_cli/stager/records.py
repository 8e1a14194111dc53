"""Local resume records: which upload URL this machine last used for (worker, content).

Only a shortcut. The worker is the source of truth for partial uploads (its ``GET /uploads``
lookup finds them from any machine); a record saves that lookup and lets a resume work against
tus servers that lack it. Stored in SQLite in the user state dir.
"""

from __future__ import annotations

import time
from pathlib import Path

from .localdb import LocalDB


class ResumeRecords(LocalDB):
    def __init__(self, path: Path | None) -> None:
        super().__init__(
            path,
            "CREATE TABLE IF NOT EXISTS uploads (worker TEXT, sha256 TEXT, size INTEGER,"
            " url TEXT NOT NULL, updated REAL, PRIMARY KEY (worker, sha256, size))",
        )

    def get(self, worker: str, sha256: str, size: int) -> str | None:
        row = self.query_one(
            "SELECT url FROM uploads WHERE worker=? AND sha256=? AND size=?",
            (worker, sha256, size),
        )
        return str(row[0]) if row else None

    def put(self, worker: str, sha256: str, size: int, url: str) -> None:
        self.execute(
            "INSERT OR REPLACE INTO uploads VALUES (?, ?, ?, ?, ?)",
            (worker, sha256, size, url, time.time()),
        )

    def forget(self, worker: str, sha256: str, size: int) -> None:
        self.execute(
            "DELETE FROM uploads WHERE worker=? AND sha256=? AND size=?", (worker, sha256, size)
        )
