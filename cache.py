"""Results already paid for (teacher calls) or computed (generations, scores): one SQLite file, key -> JSON.

Each answer is committed as soon as it arrives, so a rerun after a crash, a kill or a Ctrl-C asks again for nothing
it already has.  Keys are hashes of everything that determines the answer (see `ResultCache.key`).  Several
processes (a data-parallel run) may share one file: SQLite serialises their writes.

The teacher's Batch API mode keeps its bookkeeping in the same file: `batches` (each batch a step created or adopted,
the keys it holds, and whether its results were taken in) and `batch_errors` (how often a request came back in a
batch's error file).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from utils import fail


class ResultCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for attempt in range(61):
            try:
                self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=60)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT, meta TEXT)")
                self._db.execute("CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, keys TEXT, done INTEGER)")
                self._db.execute("CREATE TABLE IF NOT EXISTS batch_errors (key TEXT PRIMARY KEY, attempts INTEGER, "
                                 "error TEXT)")
                break
            except sqlite3.OperationalError as e:  # the processes of a data-parallel run opening a new file at once:
                if "locked" not in str(e) or attempt == 60:  # switching it to WAL does not wait for a lock
                    fail(f"the cache {self.path} cannot be opened ({e}); is another step using it?")
                time.sleep(1)
            except sqlite3.DatabaseError as e:
                fail(f"the cache {self.path} is corrupted ({e}); move it away to start it afresh "
                     f"(its answers would then be asked for again).")

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _select_in(self, query: str, keys) -> list[tuple]:
        """The rows of `query` (whose "IN ({})" takes the keys) for the distinct `keys`, asked 500 at a time (SQLite's
        limit on parameters)."""
        keys, rows = list(dict.fromkeys(keys)), []
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                rows += self._db.execute(query.format(",".join("?" * len(chunk))), chunk).fetchall()
        return rows

    def get_many(self, keys) -> dict:
        return {k: json.loads(v) for k, v in self._select_in("SELECT key, value FROM results WHERE key IN ({})", keys)}

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

    # ------------------------------------------------------------------------------ Batch API bookkeeping
    def record_batch(self, batch_id: str, keys: list[str]):
        """A batch now exists at the API that holds these keys: kept at once, so that a rerun polls it."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO batches VALUES (?, ?, 0)", (batch_id, json.dumps(keys)))

    def known_batches(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT id FROM batches")}

    def open_batches(self, keys) -> dict[str, list[str]]:
        """{batch id: its keys} of the batches not yet taken in that hold any of `keys`."""
        keys = set(keys)
        with self._lock:
            rows = self._db.execute("SELECT id, keys FROM batches WHERE done = 0").fetchall()
        return {batch_id: held for batch_id, held in ((i, json.loads(k)) for i, k in rows) if keys.intersection(held)}

    def take_in_batch(self, batch_id: str, answers: dict, errors: dict):
        """In one transaction: store a finished batch's `answers` ({key: (value, meta)}; an answer already stored is
        kept), count its failed requests (`errors`: {key: cause}), and mark the batch taken in."""
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR IGNORE INTO results VALUES (?, ?, ?)",
                                     [(k, json.dumps(v, ensure_ascii=False), json.dumps(m))
                                      for k, (v, m) in answers.items()])
                self._db.executemany("INSERT INTO batch_errors VALUES (?, 1, ?) ON CONFLICT(key) DO UPDATE SET "
                                     "attempts = attempts + 1, error = excluded.error", list(errors.items()))
                self._db.execute("UPDATE batches SET done = 1 WHERE id = ?", (batch_id,))

    def batch_errors(self, keys) -> dict[str, tuple[int, str]]:
        """{key: (times it failed in a batch, the last cause)} for those of `keys` that ever failed."""
        return {k: (n, e) for k, n, e in
                self._select_in("SELECT key, attempts, error FROM batch_errors WHERE key IN ({})", keys)}

    def clear_batch_errors(self, keys):
        with self._lock:
            self._db.executemany("DELETE FROM batch_errors WHERE key = ?", [(k,) for k in keys])

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
