"""The teacher's requests through OpenAI's Batch API (TEACHER_BATCH=1): half the price, answers within 24 hours.

A step's uncached requests go out as JSONL files uploaded with purpose "batch", one batch per part, on
/v1/chat/completions with the 24-hour window.  A part holds at most 50,000 requests, 200 MB and TEACHER_BATCH_TOKENS
estimated prompt tokens (default BATCH_TOKENS), since an organization may only enqueue so many tokens per model at
once.  Each part is written down in the cache file before its batch is created, and the batch carries `metadata`
naming its step and the part's hash; its id is kept the moment it exists.  So any stop costs nothing: a rerun, in
either mode, polls the batches it knows and adopts one that a kill kept it from recording (found by `batches.list`).

What the service answers, and what this module does:
    token_limit_exceeded   the batch is refused at validation.  With another batch of this step queued, its part goes
                           out again (from the file already uploaded) once one of them has ended; with none, the part
                           was too big on its own: the parts are halved at once.  After that one part is in
                           validation at a time.  BATCH_MAX_REFUSALS refusals in a row with nothing else of the step
                           queued stop the step with a message naming the limit and the setting.
    200 with an answer     kept.  An empty or refused answer (billed all the same) is asked again.
    408, 429, 5xx          the line is sent again in a new batch; expired lines too.
    another 4xx            it would fail again: the step stops at once, naming the row and the error.
    cancelled              by hand (the dashboard, the API): its answers are kept and the step stops, saying that a
                           rerun submits the rest again.
A request is sent BATCH_MAX_ATTEMPTS times in all (expiries not counted) before it is reported by row.

The bookkeeping lives in the cache's SQLite file, beside its answers:
    batch_parts    each part written down: its hash, its keys, and the id of its uploaded input file
    batches        each batch this cache created or adopted: its id, the keys it holds, whether it was taken in
    batch_errors   how often a request came back failed, and the last cause
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import Counter

from tqdm.auto import tqdm

from cache import connect, select_in
from utils import Stop, exit_stopped, fail, stop_signals

# The Batch API's limits per batch (a step's requests are split to fit them), and how many times a request that comes
# back failed is sent in all before it is reported.
BATCH_MAX_REQUESTS = 50_000
BATCH_MAX_BYTES = 200_000_000
BATCH_TOKENS = 1_000_000  # estimated prompt tokens per part (TEACHER_BATCH_TOKENS); halved where the service refuses
BATCH_MAX_ATTEMPTS = 3
BATCH_MAX_REFUSALS = 8  # enqueued-token refusals in a row, with nothing else of the step queued, before stopping
BATCH_TAG = "reason4rec-teacher"  # metadata["source"] of the batches this module creates
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
QUEUED = ("in_progress", "finalizing")  # accepted: holding some of the organization's enqueued tokens
ENDED = ("completed", "expired", "cancelled")


def batch_metadata(desc: str, keys: list[str], part: int, parts: int) -> dict:
    """What a batch carries (strings of at most 512 characters): its step, and a hash of the requests it holds, by
    which a rerun recognises it."""
    return {"source": BATCH_TAG, "step": desc[:512], "part": f"{part}/{parts}", "requests": str(len(keys)),
            "keys_sha256": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()}


def empty_cause(refusal: str | None) -> str:
    """Why an answer (HTTP 200) holds no text."""
    return f"the model refused: {refusal}" if refusal else "the answer was empty"


def retried(status: int) -> bool:
    """Is a request that failed with this HTTP status worth sending again? (A timeout, a rate limit, the server.)"""
    return status in (408, 429) or status >= 500


def split(keys: list[str], lines: dict, tokens: dict, budget: float) -> list[list[str]]:
    """`keys` in parts of at most BATCH_MAX_REQUESTS requests, BATCH_MAX_BYTES bytes and `budget` estimated tokens (a
    request over the budget on its own makes a part of its own)."""
    parts, part, size, count = [], [], 0, 0.0
    for key in keys:
        if part and (len(part) >= BATCH_MAX_REQUESTS or size + len(lines[key]) > BATCH_MAX_BYTES
                     or count + tokens[key] > budget):
            parts.append(part)
            part, size, count = [], 0, 0.0
        part.append(key)
        size, count = size + len(lines[key]), count + tokens[key]
    return parts + [part] if part else parts


class BatchBook:
    """The parts, batches and failed requests of one cache file (tables `batch_parts`, `batches`, `batch_errors`)."""

    def __init__(self, cache):
        self.cache, self._lock = cache, threading.Lock()
        self._db = connect(cache.path, "batch_parts (sha TEXT PRIMARY KEY, keys TEXT, file_id TEXT)",
                           "batches (id TEXT PRIMARY KEY, keys TEXT, done INTEGER)",
                           "batch_errors (key TEXT PRIMARY KEY, attempts INTEGER, error TEXT)")

    def write_part(self, sha: str, keys: list[str]) -> str | None:
        """A part about to go out, written down before its batch exists; the id of its input file where uploaded."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO batch_parts VALUES (?, ?, NULL)", (sha, json.dumps(keys)))
            return self._db.execute("SELECT file_id FROM batch_parts WHERE sha = ?", (sha,)).fetchone()[0]

    def set_file(self, sha: str, file_id: str | None):
        with self._lock:
            self._db.execute("UPDATE batch_parts SET file_id = ? WHERE sha = ?", (file_id, sha))

    def any_part(self) -> bool:
        """Has a batch run ever used this cache?"""
        with self._lock:
            return self._db.execute("SELECT 1 FROM batch_parts LIMIT 1").fetchone() is not None

    def part(self, sha: str) -> list[str] | None:
        with self._lock:
            row = self._db.execute("SELECT keys FROM batch_parts WHERE sha = ?", (sha,)).fetchone()
        return json.loads(row[0]) if row else None

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
        """Send `todo` ({key: (prompt, sample, label)}) through the Batch API and wait for the answers (see the
        module's docstring for what each answer of the service leads to).  Ctrl-C or SIGTERM just exits: the batches
        keep running, and a rerun collects them."""
        import openai

        teacher, cache = self.teacher, self.teacher.cache
        lines = {k: (json.dumps({"custom_id": k, "method": "POST", "url": "/v1/chat/completions",
                                 "body": teacher.params(p, temperature, s)}, ensure_ascii=False) + "\n").encode()
                 for k, (p, s, _) in todo.items()}
        tokens = {k: teacher.estimated_tokens(p) for k, (p, _, _) in todo.items()}
        budget, wait, send_at, failures, refusals = teacher.batch_tokens, min(1.0, teacher.poll), 0.0, 0, 0
        careful, statuses = False, {}  # careful: after a refusal, one part in validation at a time
        with tqdm(total=len(todo), desc=f"{desc} (Batch API)", unit="req") as bar, stop_signals():
            try:
                self._adopt(todo)
                while True:
                    answered, live = cache.get_many(todo), self.book.open(todo)
                    bar.update(len(answered) - bar.n)
                    given_up = {k: cause for k, (n, cause) in self.book.errors(todo).items()
                                if n >= BATCH_MAX_ATTEMPTS}
                    held = {k for keys in live.values() for k in keys} | set(given_up) | set(answered)
                    need = sorted(k for k in todo if k not in held)  # neither answered nor in a batch: to send
                    validating = any(statuses.get(b, "validating") == "validating" for b in live)
                    if need and time.monotonic() >= send_at and not (careful and validating):
                        parts = split(need, lines, tokens, budget)
                        failures = 0 if self._submit(parts[:1] if careful else parts, len(parts), lines, desc) \
                            else failures + 1
                        if failures > teacher.max_retries:
                            fail(f"creating a batch failed {failures} times in a row; rerun the same command later "
                                 f"(a batch created all the same is found and adopted, not paid twice)")
                        if failures:
                            send_at = time.monotonic() + wait * failures
                            self._adopt(todo)
                        live = self.book.open(todo)
                    if not live and not need:
                        break
                    time.sleep(wait)
                    wait = min(2 * wait, teacher.poll)
                    before, statuses, rejected, cancelled, refused = statuses, {}, {}, [], []
                    for batch_id, keys in live.items():
                        batch, bad = self._poll(batch_id, keys, todo)
                        statuses[batch_id] = batch.status
                        rejected.update(bad)
                        if batch.status == "cancelled":
                            cancelled.append((batch, keys))
                        if batch.status == "failed":
                            refused.append((batch, keys))
                    if rejected:
                        self._stop(todo, f"{len(rejected):,} teacher requests were rejected by the API (not retried): "
                                         f"{rows(todo, rejected)}. Fix the cause, then rerun the same command")
                    if cancelled:
                        batch, keys = cancelled[0]
                        kept = sum(k in cache.get_many(keys) for k in keys)
                        self._stop(todo, f"batch {batch.id} was cancelled from outside this run (the dashboard or the "
                                         f"API): its {kept:,} answers are kept; the other {len(keys) - kept:,} requests "
                                         f"were not run. Rerun the same command to submit them again")
                    if any(statuses[b] in QUEUED and before.get(b, "validating") == "validating" for b in statuses):
                        refusals = 0  # a part was accepted
                    ended = any(s in ENDED for s in statuses.values())
                    if refused:
                        careful = True
                        message = refused[0][0].errors.data[0].message
                        if ended or any(s in QUEUED for s in statuses.values()):
                            send_at = 0.0 if ended else math.inf  # room comes as a batch of this step ends
                            tqdm.write(f"batch {refused[0][0].id} was refused: {message} It goes out again once "
                                       f"another batch of this step has ended.")
                        else:
                            refusals += 1
                            budget, send_at = self._refused(todo, [keys for _, keys in refused], tokens, refusals,
                                                            message, budget)
                    elif ended and send_at == math.inf:
                        send_at = 0.0
                    bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in Counter(statuses.values()).items()))
            except (Stop, openai.APIError) as e:
                if isinstance(e, Stop):
                    exit_stopped(e, self._running(todo))
                fail(teacher.safe(f"the Batch API failed ({type(e).__name__}: {e}); {self._running(todo)}"))
        self._report_failures(todo, given_up, len(answered))  # read after the last poll: nothing has changed since
        return answered

    def _refused(self, todo: dict, refused: list[list[str]], tokens: dict, refusals: int, message: str,
                 budget: float) -> tuple[float, float]:
        """A part refused for the enqueued-token limit with nothing else of this step queued: too big on its own.
        The new token budget of a part and when to send again: halved at once, or, for a single request, after a
        wait; BATCH_MAX_REFUSALS such refusals in a row stop the step."""
        part = max(refused, key=lambda keys: sum(tokens[k] for k in keys))
        size = sum(tokens[k] for k in part)
        if refusals >= BATCH_MAX_REFUSALS:
            self._stop(todo, f"the Batch API refused {refusals} times in a row to enqueue a batch of this step, with "
                             f"nothing else of it queued: {message} The last one held {len(part):,} requests, about "
                             f"{size:,.0f} prompt tokens (characters / 4). Set TEACHER_BATCH_TOKENS (now "
                             f"{self.teacher.batch_tokens:,.0f}) below that limit, or wait for the organization's other "
                             f"batches of {self.teacher.model} to end, then rerun the same command")
        if len(part) > 1:
            tqdm.write(f"a batch of {len(part):,} requests (about {size:,.0f} prompt tokens) was refused: {message} "
                       f"Nothing else of this step is queued: halving the parts to about {size / 2:,.0f} tokens "
                       f"(TEACHER_BATCH_TOKENS={size / 2:.0f} would start there).")
            return size / 2, 0.0
        delay = min(self.teacher.poll * 2 ** (refusals - 1), 600)
        tqdm.write(f"a batch of one request was refused: {message} Sending it again in {delay:g} s.")
        return budget, time.monotonic() + delay

    def _running(self, todo: dict) -> str:
        ids = ", ".join(sorted(self.book.open(todo))) or "none"
        return (f"the batches of this step still running ({ids}) keep running at the Batch API, and their ids are kept "
                f"in {self.teacher.cache.path}. Rerun the same command to collect their answers: nothing is paid "
                f"twice.")

    def _stop(self, todo: dict, message: str):
        fail(self.teacher.safe(f"{message}. {self._running(todo)}"))

    def _submit(self, parts: list[list[str]], total: int, lines: dict, desc: str) -> bool:
        """Create a batch for each part (of `total` parts), recording it the moment it exists; a part's input file is
        uploaded once, and reused when the part goes out again.  False if creating a batch failed for a passing
        cause: then try again later (the listing adopts a batch that was created all the same, so none is paid
        twice)."""
        import openai

        for number, part in enumerate(parts, 1):
            metadata = batch_metadata(desc, part, number, total)
            sha = metadata["keys_sha256"]
            file_id = reused = self.book.write_part(sha, part)  # written down before its batch can exist
            try:
                if file_id is None:
                    file_id = self.client.files.create(file=(f"{sha[:16]}.jsonl", b"".join(lines[k] for k in part)),
                                                       purpose="batch").id
                    self.book.set_file(sha, file_id)
                batch = self.client.with_options(max_retries=0).batches.create(  # not retried blindly
                    input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                    metadata=metadata)
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
                tqdm.write(self.teacher.safe(f"creating a batch failed ({type(e).__name__}: {e}); trying again soon"))
                return False
            except openai.APIStatusError as e:
                if reused:  # the uploaded file is gone: upload it again
                    self.book.set_file(sha, None)
                    return False
                fail(self.teacher.safe(f"the Batch API refused a batch of {len(part):,} requests ({desc}): "
                                       f"{e.status_code}: {e.message}"))
            self.book.record(batch.id, part)
            tqdm.write(f"created batch {batch.id}: {len(part):,} requests ({desc}, part {number} of {total}"
                       f"{', its input file reused' if reused else ''})")
        return True

    def _adopt(self, todo: dict):
        """Record the batches at the API of parts written down here whose creation was never recorded (a kill between
        the two): tagged by this module, unknown to this cache, not failed, of the last 30 days (as long as their
        output files are kept), newest first."""
        known, since = self.book.known(), time.time() - 30 * 86400
        for batch in self.client.batches.list(limit=100):  # the client fetches page after page
            if batch.created_at < since:
                break
            metadata = batch.metadata or {}
            if metadata.get("source") != BATCH_TAG or batch.id in known or batch.status == "failed":
                continue
            keys = self.book.part(metadata.get("keys_sha256"))
            if keys is not None and set(todo).intersection(keys):
                self.book.record(batch.id, keys)
                known.add(batch.id)
                tqdm.write(f"adopted batch {batch.id}: {len(keys):,} requests ({metadata.get('step')}, part "
                           f"{metadata.get('part')})")

    def _poll(self, batch_id: str, keys: list[str], todo: dict):
        """Look at a batch (holding `keys`); once it has ended, take in its answers and count its failures, so that
        what is missing goes out again.  (The batch, {key: cause} of its requests rejected for good.)  A batch that
        failed for another cause than the enqueued-token limit stops the step."""
        batch = self.client.batches.retrieve(batch_id)
        if batch.status in RUNNING:
            return batch, {}
        if batch.status == "failed":
            errors = batch.errors.data if batch.errors and batch.errors.data else []
            self.book.take_in(batch_id, {}, {})  # nothing of it ran: its requests are free to go again
            if not any(e.code == "token_limit_exceeded" for e in errors):
                causes = "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in errors)
                self._stop(todo, f"batch {batch_id} failed: {causes or 'no cause given'}. None of its requests ran "
                                 f"(nothing was paid); fix the cause, then rerun the same command")
            return batch, {}
        answers, errors, rejected = {}, {}, {}  # completed, expired or cancelled
        for file_id in (batch.output_file_id, batch.error_file_id):
            content = self.client.files.content(file_id).content if file_id else b""
            for line in content.split(b"\n"):  # on "\n" only: JSON leaves U+2028 and the like unescaped in strings
                if not line.strip():
                    continue
                line = json.loads(line)
                key, response, error = line["custom_id"], line.get("response") or {}, line.get("error") or {}
                body, status = response.get("body") or {}, response.get("status_code")
                if status == 200:
                    message = ((body.get("choices") or [{}])[0].get("message") or {})
                    usage = body.get("usage") or {}
                    meta = self.teacher.record(usage.get("prompt_tokens"), usage.get("completion_tokens"), batch_id,
                                               empty=not message.get("content"))
                    if message.get("content"):
                        answers[key] = (message["content"], meta)
                    else:
                        errors[key] = empty_cause(message.get("refusal"))
                elif response:
                    cause = f"HTTP {status}: {(body.get('error') or {}).get('message') or 'no message'}"
                    (errors if retried(status) else rejected)[key] = cause
                elif error.get("code") not in ("batch_expired", "batch_cancelled"):  # those are simply not run
                    errors[key] = error.get("message") or "no answer"
        if batch.status == "completed":  # a request that a completed batch left out of both files failed too
            errors.update({k: "missing from the batch's output" for k in keys if k not in answers and k not in errors
                           and k not in rejected})
        self.book.take_in(batch_id, answers, errors)
        return batch, rejected

    def collect(self, todo: dict) -> dict:
        """One by one, after a TEACHER_BATCH=1 run: adopt its batches that a kill kept it from recording, take in the
        answers of those that have ended (returned), and refuse to ask one by one for requests that are in a batch
        still running (they would be paid twice).  Nothing is asked of the API where no batch run used this cache."""
        if self.book.any_part():
            self._adopt(todo)
        open_batches = self.book.open(todo)
        running = [b for b, keys in open_batches.items() if self._poll(b, keys, todo)[0].status in RUNNING]
        if running:
            fail(f"{len(running)} batch(es) of this step are still running at the Batch API ({', '.join(running)}): "
                 f"rerun with TEACHER_BATCH=1 to wait for them, or cancel them first; asking one by one now would "
                 f"pay for their requests twice")
        return self.teacher.cache.get_many(todo) if open_batches else {}

    def _report_failures(self, todo: dict, failed: dict, kept: int):
        if not failed:
            return
        self.book.clear_errors(failed)  # a rerun tries them afresh
        fail(self.teacher.safe(f"{len(failed):,} teacher requests failed in the Batch API {BATCH_MAX_ATTEMPTS} times: "
                               f"{rows(todo, failed)}. The {kept:,} answers received are kept in "
                               f"{self.teacher.cache.path}; rerun the same command to try those again."))


def rows(todo: dict, causes: dict) -> str:
    """The first five failed requests, by row and cause."""
    first = "; ".join(f"row {todo[k][2]}: {cause}" for k, cause in list(causes.items())[:5])
    return first + (f" (and {len(causes) - 5:,} more)" if len(causes) > 5 else "")
