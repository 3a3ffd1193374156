"""Results already paid for (teacher calls) or computed (generations, scores): one SQLite file, key -> JSON.

Each answer is committed as soon as it arrives, so a rerun after a crash, a kill or a Ctrl-C asks again for nothing
it already has.  Keys are hashes of everything that determines the answer (see `ResultCache.key`).  Several
processes (a data-parallel run) may share one file: SQLite serialises their writes.  (The teacher's Batch API mode
keeps its own tables in the same file: see teacher_batch.py.)
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from utils import fail


def connect(path: Path, *tables: str) -> sqlite3.Connection:
    """A connection to the SQLite file `path` (created where absent), shareable by threads, with these tables
    ("name (columns)") created where absent; a corrupted file stops the step with a message.  The processes of a
    data-parallel run may open a new file at once: switching it to WAL does not wait for another's lock, so a
    "locked" file is tried again, once a second for a minute."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(61):
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=60)
            db.execute("PRAGMA journal_mode=WAL")
            for table in tables:
                db.execute(f"CREATE TABLE IF NOT EXISTS {table}")
            return db
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 60:
                fail(f"the cache {path} cannot be opened ({e}); is another step using it?")
            time.sleep(1)
        except sqlite3.DatabaseError as e:
            fail(f"the cache {path} is corrupted ({e}); move it away to start it afresh "
                 f"(its answers would then be asked for again).")


def select_in(db: sqlite3.Connection, lock: threading.Lock, query: str, keys) -> list[tuple]:
    """The rows of `query` (whose "IN ({})" takes the keys) for the distinct `keys`, asked 500 at a time (SQLite's
    limit on parameters)."""
    keys, rows = list(dict.fromkeys(keys)), []
    with lock:
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            rows += db.execute(query.format(",".join("?" * len(chunk))), chunk).fetchall()
    return rows


class ResultCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = connect(self.path, "results (key TEXT PRIMARY KEY, value TEXT, meta TEXT)")

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get_many(self, keys) -> dict:
        return {k: json.loads(v) for k, v in
                select_in(self._db, self._lock, "SELECT key, value FROM results WHERE key IN ({})", keys)}

    def put_many(self, items: dict, meta: dict | None = None):
        """Store {key: value} in one transaction: all of a batch is kept, or none of it.  `meta` (e.g. the token
        usage of a teacher answer) is kept beside each value."""
        meta = json.dumps(meta or {})
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
                                     [(k, json.dumps(v, ensure_ascii=False), meta) for k, v in items.items()])

    def average(self, field: str) -> tuple[float, int]:
        """The mean of a positive numeric `field` of the stored metas (e.g. completion_tokens), and over how many."""
        with self._lock:
            mean, n = self._db.execute(f"SELECT AVG(json_extract(meta, '$.{field}')), COUNT(*) FROM results "
                                       f"WHERE json_extract(meta, '$.{field}') > 0").fetchone()
        return mean or 0.0, n

    def put_each(self, items: dict):
        """Store {key: (value, meta)} in one transaction; a value already stored is kept."""
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR IGNORE INTO results VALUES (?, ?, ?)",
                                     [(k, json.dumps(v, ensure_ascii=False), json.dumps(m))
                                      for k, (v, m) in items.items()])

    @staticmethod
    def count(path: str | Path) -> int:
        """How many results a cache file holds, 0 where there is none yet: for watching a running step's progress from
        another process, without creating the file."""
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
                return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        except sqlite3.Error:
            return 0

    def __len__(self):
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
