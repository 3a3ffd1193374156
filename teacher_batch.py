"""The teacher's requests through OpenAI's Batch API (TEACHER_BATCH=1): half the price, answers within 24 hours.

A step's uncached requests go out as JSONL files uploaded with purpose "batch", one batch per part (split to fit the
API's limits), on /v1/chat/completions with the 24-hour window.  Each batch carries `metadata` naming its step and a
hash of the requests it holds, and its id is kept in the step's cache file the moment it exists, so that any stop
costs nothing: a rerun polls the batches it knows, and adopts one that a kill kept it from recording (found by
`batches.list`).  Answers come from the output files; what comes back in an error file goes out again in a new batch,
BATCH_MAX_ATTEMPTS times in all, and is then reported by row.

The bookkeeping lives in the cache's SQLite file, beside its answers:
    batches        each batch this cache created or adopted: its id, the keys it holds, whether it was taken in
    batch_errors   how often a request came back in a batch's error file, and the last cause
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter

from tqdm.auto import tqdm

from cache import connect, select_in
from utils import Stop, exit_stopped, fail, stop_signals

# The Batch API's limits per batch (a step's requests are split to fit them), and how many times a request that comes
# back in a batch's error file is sent in all before it is reported.
BATCH_MAX_REQUESTS = 50_000
BATCH_MAX_BYTES = 200_000_000
BATCH_MAX_ATTEMPTS = 3
BATCH_TAG = "reason4rec-teacher"  # metadata["source"] of the batches this module creates
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")


def batch_metadata(desc: str, keys: list[str], part: int, parts: int) -> dict:
    """What a batch carries (strings of at most 512 characters): its step, and a hash of the requests it holds, by
    which a rerun recognises it."""
    return {"source": BATCH_TAG, "step": desc[:512], "part": f"{part}/{parts}", "requests": str(len(keys)),
            "keys_sha256": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()}


class BatchBook:
    """The batches of one cache file and the failures of their requests (tables `batches` and `batch_errors`)."""

    def __init__(self, cache):
        self.cache, self._lock = cache, threading.Lock()
        self._db = connect(cache.path, "batches (id TEXT PRIMARY KEY, keys TEXT, done INTEGER)",
                           "batch_errors (key TEXT PRIMARY KEY, attempts INTEGER, error TEXT)")

    def record(self, batch_id: str, keys: list[str]):
        """A batch now exists at the API that holds these keys: kept at once, so that a rerun polls it."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO batches VALUES (?, ?, 0)", (batch_id, json.dumps(keys)))

    def known(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT id FROM batches")}

    def open(self, keys) -> dict[str, list[str]]:
        """{batch id: its keys} of the batches not yet taken in that hold any of `keys`."""
        keys = set(keys)
        with self._lock:
            rows = self._db.execute("SELECT id, keys FROM batches WHERE done = 0").fetchall()
        return {batch_id: held for batch_id, held in ((i, json.loads(k)) for i, k in rows) if keys.intersection(held)}

    def take_in(self, batch_id: str, answers: dict, errors: dict):
        """Store a finished batch's `answers` ({key: (value, meta)}; an answer already stored is kept), then, in one
        transaction, count its failed requests (`errors`: {key: cause}) and mark the batch taken in.  A kill between
        the two takes the batch in again on the rerun: its answers are kept once, its failures counted once."""
        self.cache.put_each(answers)
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO batch_errors VALUES (?, 1, ?) ON CONFLICT(key) DO UPDATE SET "
                                     "attempts = attempts + 1, error = excluded.error", list(errors.items()))
                self._db.execute("UPDATE batches SET done = 1 WHERE id = ?", (batch_id,))

    def errors(self, keys) -> dict[str, tuple[int, str]]:
        """{key: (times it failed in a batch, the last cause)} for those of `keys` that ever failed."""
        return {k: (n, e) for k, n, e in
                select_in(self._db, self._lock, "SELECT key, attempts, error FROM batch_errors WHERE key IN ({})", keys)}

    def clear_errors(self, keys):
        with self._lock:
            self._db.executemany("DELETE FROM batch_errors WHERE key = ?", [(k,) for k in keys])


class BatchAPI:
    """The Batch API mode of one Teacher (its client, request parameters, cache and bill)."""

    def __init__(self, teacher):
        self.teacher, self.book = teacher, BatchBook(teacher.cache)

    @property
    def client(self):
        return self.teacher.client

    def check(self):
        """Refuse at once an endpoint without the Batch API (listing batches costs nothing)."""
        import openai

        try:
            self.client.batches.list(limit=1)
        except openai.APIStatusError as e:
            fail(self.teacher.safe(f"TEACHER_BATCH=1, but {self.client.base_url} has no Batch API (GET batches "
                                   f"answered {e.status_code}: {e.message}); unset TEACHER_BATCH to send the requests "
                                   f"one by one"))
        except openai.APIConnectionError as e:
            fail(self.teacher.safe(f"TEACHER_BATCH=1, but {self.client.base_url} cannot be reached: {e}"))

    def ask(self, todo: dict, temperature: float, desc: str) -> dict:
        """Send `todo` ({key: (prompt, sample, label)}) through the Batch API and wait for the answers: adopt or
        create the batches, poll them, take in their output files, send again (in a new batch) what came back in an
        error file, at most BATCH_MAX_ATTEMPTS times in all, or what an expired or cancelled batch left unanswered;
        then report by row what still failed.  Ctrl-C or SIGTERM just exits: the batches keep running, and a rerun
        collects them."""
        import openai

        teacher, cache = self.teacher, self.teacher.cache
        lines = {k: (json.dumps({"custom_id": k, "method": "POST", "url": "/v1/chat/completions",
                                 "body": teacher.params(p, temperature, s)}, ensure_ascii=False) + "\n").encode()
                 for k, (p, s, _) in todo.items()}
        wait, retry_at, refusals, failures = min(1.0, teacher.poll), 0.0, 0, 0
        with tqdm(total=len(todo), desc=f"{desc} (Batch API)", unit="req") as bar, stop_signals():
            try:
                while True:
                    answered, live = cache.get_many(todo), self.book.open(todo)
                    bar.update(len(answered) - bar.n)
                    given_up = {k: cause for k, (n, cause) in self.book.errors(todo).items()
                                if n >= BATCH_MAX_ATTEMPTS}
                    held = {k for keys in live.values() for k in keys} | set(given_up) | set(answered)
                    need = sorted(k for k in todo if k not in held)  # neither answered nor in a batch: to send
                    if need and time.monotonic() >= retry_at:
                        failures = 0 if self._submit(need, lines, desc) else failures + 1
                        if failures > teacher.max_retries:
                            fail(f"creating a batch failed {failures} times in a row; rerun the same command later "
                                 f"(a batch created all the same is found and adopted, not paid twice)")
                        retry_at = time.monotonic() + wait * failures
                        live = self.book.open(todo)
                    if not live and not need:
                        break
                    time.sleep(wait)
                    wait = min(2 * wait, teacher.poll)
                    statuses = Counter()
                    for batch_id, keys in live.items():
                        batch = self._poll(batch_id, keys)
                        statuses[batch.status] += 1
                        if batch.status == "failed":  # the enqueued-token limit: send again later
                            refusals += 1
                            delay = min(teacher.poll * 2 ** (refusals - 1), 600)
                            retry_at = time.monotonic() + delay
                            tqdm.write(f"batch {batch_id} was refused: {batch.errors.data[0].message} Sending its "
                                       f"requests again in {delay:g} s.")
                    bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in statuses.items()))
            except (Stop, openai.APIError) as e:
                ids = ", ".join(sorted(self.book.open(todo))) or "none yet"
                running = (f"the batches of this step ({ids}) keep running at the Batch API, and their ids are kept "
                           f"in {cache.path}. Rerun the same command to collect their answers: nothing is paid "
                           f"twice.")
                if isinstance(e, Stop):
                    exit_stopped(e, running)
                fail(teacher.safe(f"the Batch API failed ({type(e).__name__}: {e}); {running}"))
        self._report_failures(todo, given_up, len(answered))  # read after the last poll: nothing has changed since
        return answered

    def _submit(self, need: list[str], lines: dict, desc: str) -> bool:
        """Put the requests `need` into batches, split to fit the API's limits: for each part, adopt a batch of it
        found at the API (one that a killed run created but could not record), or upload the part and create its
        batch; record each batch the moment it exists.  False if creating a batch failed for a passing cause (then
        try again later: the listing adopts a batch that was created all the same, so none is paid twice)."""
        import openai

        parts, part, size = [], [], 0
        for key in need:
            if part and (len(part) >= BATCH_MAX_REQUESTS or size + len(lines[key]) > BATCH_MAX_BYTES):
                parts.append(part)
                part, size = [], 0
            part.append(key)
            size += len(lines[key])
        parts.append(part)
        found = None
        for number, part in enumerate(parts, 1):
            metadata = batch_metadata(desc, part, number, len(parts))
            try:
                found = self._listed() if found is None else found
                batch, action = found.get(metadata["keys_sha256"]), "adopted"
                if batch is None:
                    file = self.client.files.create(file=(f"{metadata['keys_sha256'][:16]}.jsonl",
                                                          b"".join(lines[k] for k in part)), purpose="batch")
                    batch, action = self.client.with_options(max_retries=0).batches.create(  # not retried blindly
                        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h",
                        metadata=metadata), "created"
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
                tqdm.write(self.teacher.safe(f"creating a batch failed ({type(e).__name__}: {e}); trying again soon"))
                return False
            except openai.APIStatusError as e:
                fail(self.teacher.safe(f"the Batch API refused a batch of {len(part):,} requests ({desc}): "
                                       f"{e.status_code}: {e.message}"))
            self.book.record(batch.id, part)
            tqdm.write(f"{action} batch {batch.id}: {len(part):,} requests ({desc}, part {number} of {len(parts)})")
        return True

    def _listed(self) -> dict:
        """{keys_sha256: batch} of the batches at the API that this module created and no cache here knows of (not
        failed; newest first; of the last 30 days, as long as their output files are kept)."""
        known, since, found = self.book.known(), time.time() - 30 * 86400, {}
        for batch in self.client.batches.list(limit=100):  # the client fetches page after page
            if batch.created_at < since:
                break
            metadata = batch.metadata or {}
            if metadata.get("source") == BATCH_TAG and batch.id not in known and batch.status != "failed":
                found.setdefault(metadata.get("keys_sha256"), batch)
        return found

    def _poll(self, batch_id: str, keys: list[str]):
        """Look at a batch (holding `keys`); once it has ended, take in its answers and count its failed requests so
        that what is missing goes out again.  A batch that failed for another cause than the enqueued-token limit
        stops the step."""
        batch = self.client.batches.retrieve(batch_id)
        if batch.status in RUNNING:
            return batch
        if batch.status == "failed":
            errors = batch.errors.data if batch.errors and batch.errors.data else []
            self.book.take_in(batch_id, {}, {})  # nothing of it ran: its requests are free to go again
            if not any(e.code == "token_limit_exceeded" for e in errors):
                causes = "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in errors)
                fail(f"batch {batch_id} failed: {causes or 'no cause given'}. None of its requests ran (nothing was "
                     f"paid); rerun the same command once the cause is fixed.")
            return batch
        answers, errors = {}, {}  # completed, expired or cancelled
        for file_id in (batch.output_file_id, batch.error_file_id):
            for line in self.client.files.content(file_id).text.splitlines() if file_id else []:
                line = json.loads(line)
                response, error = line.get("response") or {}, line.get("error") or {}
                body = response.get("body") or {}
                choices = body.get("choices") or [{}]
                text = (choices[0].get("message") or {}).get("content")
                if response.get("status_code") == 200 and text:
                    usage = body.get("usage") or {}
                    answers[line["custom_id"]] = (text, self.teacher.record(usage.get("prompt_tokens"),
                                                                            usage.get("completion_tokens"), batch_id))
                elif error.get("code") not in ("batch_expired", "batch_cancelled"):  # those are simply sent again
                    cause = (body.get("error") or {}).get("message") or error.get("message") or "the answer was empty"
                    errors[line["custom_id"]] = f"HTTP {response.get('status_code')}: {cause}" if response else cause
        if batch.status == "completed":  # a request that a completed batch left out of both files failed too
            errors.update({k: "missing from the batch's output" for k in keys if k not in answers and k not in errors})
        self.book.take_in(batch_id, answers, errors)
        return batch

    def collect(self, todo: dict) -> dict:
        """One by one, after a TEACHER_BATCH=1 run: take in the answers of its batches that have ended (returned),
        and refuse to ask one by one for requests that are in a batch still running (they would be paid twice)."""
        open_batches = self.book.open(todo)
        running = [b for b, keys in open_batches.items() if self._poll(b, keys).status in RUNNING]
        if running:
            fail(f"{len(running)} batch(es) of this step are still running at the Batch API ({', '.join(running)}): "
                 f"rerun with TEACHER_BATCH=1 to wait for them, or cancel them first; asking one by one now would "
                 f"pay for their requests twice")
        return self.teacher.cache.get_many(todo) if open_batches else {}

    def _report_failures(self, todo: dict, failed: dict, kept: int):
        if not failed:
            return
        self.book.clear_errors(failed)  # a rerun tries them afresh
        rows = "; ".join(f"row {todo[k][2]}: {cause}" for k, cause in list(failed.items())[:5])
        more = f" (and {len(failed) - 5:,} more)" if len(failed) > 5 else ""
        fail(self.teacher.safe(f"{len(failed):,} teacher requests failed in the Batch API {BATCH_MAX_ATTEMPTS} times: "
                               f"{rows}{more}. The {kept:,} answers received are kept in {self.teacher.cache.path}; "
                               f"rerun the same command to try those again."))
