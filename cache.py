"""Results already paid for (teacher calls) or computed (generations, scores): one SQLite file, key -> JSON.

Each answer is committed as soon as it arrives, so a rerun after a crash, a kill or a Ctrl-C asks again for nothing
it already has.  Keys are hashes of everything that determines the answer (see `ResultCache.key`).  Several
processes (a data-parallel run) may share one file: SQLite serialises their writes.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from utils import fail


class ResultCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT, meta TEXT)")
        except sqlite3.DatabaseError as e:
            fail(f"the cache {self.path} is corrupted ({e}); move it away to start it afresh "
                 f"(its answers would then be asked for again).")

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get_many(self, keys) -> dict:
        found, keys = {}, list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                rows = self._db.execute(
                    f"SELECT key, value FROM results WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                found.update((k, json.loads(v)) for k, v in rows)
        return found

    def put_many(self, items: dict, meta: dict | None = None):
        """Store {key: value} in one transaction: all of a batch is kept, or none of it.  `meta` (e.g. the token
        usage of a teacher answer) is kept beside each value."""
        meta = json.dumps(meta or {})
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
                                     [(k, json.dumps(v, ensure_ascii=False), meta) for k, v in items.items()])

    def __len__(self):
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
