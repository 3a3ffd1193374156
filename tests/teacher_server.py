"""A small OpenAI-protocol server on 127.0.0.1, standing in for the paid teacher in tests and benchmarks: the real
`openai` client talks to it over HTTP.  It speaks chat completions, files and batches:

    POST /v1/chat/completions          one answer
    POST /v1/files                     multipart upload (purpose=batch)
    GET  /v1/files/{id}, .../content   a file's object, its bytes (a batch's input, output or error file)
    POST /v1/batches                   create a batch from an uploaded JSONL file
    GET  /v1/batches/{id}              retrieve it; every retrieve moves it one status on:
                                       validating -> in_progress -> finalizing -> completed
    GET  /v1/batches                   list, newest first, paginated (`data`, `has_more`, `first_id`, `last_id`)
    POST /v1/batches/{id}/cancel       cancelling -> cancelled

Its answers are deterministic functions of the request (prompt, temperature, seed), shaped like the teacher's
(summaries, reasons, a judge's scores), the same through both routes.  It counts what a real API would bill: `answered` holds, for
every request (its JSON body), how often it was answered, one by one or as a line of a finished batch; `repeated`
is how many of those were paid twice.

Misbehaviour on purpose, for chat completions: `faults` is a list of what to do to the next requests in turn ("429",
"500", "timeout", "malformed", "empty", "no_choices", "401": the key refused with the key itself in the message, as
OpenAI's "Incorrect API key provided: sk-..." quotes it, or None for a normal answer); `latency` delays every answer;
`hold(n)` makes it answer n requests in all and then leave every further one hanging unanswered until `release()`
drops those (and, after it, any request whose client is already gone: one sent before the release that the server
had not yet picked up).  `open_at(t)` counts the requests that were not yet answered at time t (time.monotonic()): those a
client killed at t may lose.  For batches: `batch_faults` is a list of what happens to the next batches created
("expire": half of its requests done, the rest expired; "cancel": cancelled half way, as from the dashboard;
"token_limit": failed with the API's enqueued-token-limit error, as the real API reports it: a created batch that
fails at validation with errors.data[0].code "token_limit_exceeded"; "lose_line": completed, its last request in
neither file; None: normal); `line_faults[prompt] = n` puts
that prompt's next n batch lines into the error file (HTTP 500); `hold_batches()` keeps every batch in progress
until `release_batches()`; `batch_api=False` answers 404 to files and batches (an endpoint without the Batch API).

As the real service: `token_limit` (None: none) is the organization's enqueued-token limit per model: a batch whose
prompt tokens, with those of the model's batches in progress or finalizing, exceed it fails at validation with
"token_limit_exceeded" (and `refused` counts those refusals).  Reasoning models (o1, o3, o4, gpt-5, ...; not the
gpt-5-chat ones) answer 400 "unsupported_parameter" to `max_tokens` and 400 "unsupported_value" to a temperature other
than 1, one by one and in a batch line.  `line_errors[prompt]` lists what the next batch lines of that prompt get, in
turn: an HTTP status (400, 408, 429, 500, 503: the line goes to the error file with the service's error body),
"empty" (status 200, an empty answer) or "refusal" (status 200, no content but the model's refusal); for one by one,
`faults` also takes "refusal".  Output and error files are written in UTF-8, with characters such as U+2028 as they
are (JSON does not escape them), and input files are read line by line on "\n" only.
"""
import email.parser
import email.policy
import hashlib
import itertools
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

WORDS = ("warm tone durable build bright sound sturdy stand easy setup good value clear output solid feel "
         "cheap price weak clamp noisy hum heavy weight fragile cable").split()
TOKEN_LIMIT = ("Enqueued token limit reached for {model} in organization org-test. Limit: {limit:,} enqueued tokens. "
               "Please try again once some in_progress batches have been completed.")
REASONING = re.compile(r"(o\d|gpt-5)([-.].*)?")  # models that reason before answering (gpt-5-chat-* excepted)
STATUS_ERRORS = {  # HTTP status -> the error body's type and code, as the service sends them
    400: ("invalid_request_error", None), 408: ("timeout", None), 429: ("rate_limit_exceeded", "rate_limit_exceeded"),
    500: ("server_error", None), 503: ("server_error", None)}


def error_body(status: int, message: str, param=None, code=None) -> dict:
    kind, default_code = STATUS_ERRORS.get(status, ("invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def rejected(body: dict) -> dict | None:
    """The 400 body with which a reasoning model rejects a parameter it does not take, or None."""
    model = body.get("model", "")
    if not REASONING.fullmatch(model) or "-chat" in model:
        return None
    if "max_tokens" in body:
        return error_body(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                               "'max_completion_tokens' instead.", "max_tokens", "unsupported_parameter")
    if body.get("temperature", 1) != 1:
        return error_body(400, f"Unsupported value: 'temperature' does not support {body['temperature']} with this "
                               f"model. Only the default (1) value is supported.", "temperature", "unsupported_value")
    return None


def teacher_answer(prompt: str, temperature: float = 0.0, seed=None) -> str:
    """A plausible, deterministic answer of the teacher to one of the pipeline's prompts."""
    rng = random.Random(hashlib.sha256(f"{prompt}|{temperature}|{seed}".encode()).digest())
    pick = lambda n: ", ".join(rng.sample(WORDS, n)).title()  # noqa: E731
    if prompt.startswith("You are grading an analysis"):  # the judge of 3_Predictor/5_evaluate_reasons.py
        return f"Score: {rng.randint(1, 10)}\nThe analysis anticipates {pick(2).lower()}."
    if prompt.startswith("Task: Summarize"):
        return f"Positive Aspects: {pick(3)}\nNegative Aspects: {pick(2)}\nUser Preference Elements: {pick(3)}"
    if "Analyze whether the user will like" in prompt:
        hint = re.search(r"rated the item (\S+) stars", prompt)
        mood = "will likely enjoy" if not hint or float(hint.group(1)) >= 4 else "may be disappointed by"
        return (f"Given the user's focus on {pick(2).lower()}, the user {mood} this item; other buyers mention "
                f"{pick(2).lower()}, which fits these preferences.")
    return "Predicted Rating: 4.0"


class TeacherServer:
    def __init__(self, respond=teacher_answer, latency: float = 0.0, faults=None, batch_api: bool = True):
        self.respond, self.latency, self.faults, self.batch_api = respond, latency, list(faults or []), batch_api
        self.answered = Counter()  # request fingerprint -> times answered (billed)
        self.bodies = []  # every chat-completion request body received, one by one or in a batch, as JSON
        self.calls = Counter()  # "POST /v1/files", "GET /v1/batches/{id}", ... -> times called
        self.times = []  # [received, answered or None] of every chat-completion request (time.monotonic())
        self.hold_after = None
        self.reserved = 0  # requests admitted to be answered
        self.released = False  # a hold was released: requests of clients already gone are dropped
        self._released = threading.Event()
        self.files, self.batches = {}, {}
        self.batch_faults, self.line_faults = [], Counter()
        self.line_errors = {}  # prompt -> what its next batch lines get, in turn
        self.token_limit, self.refused = None, 0
        self.batches_held = False
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self._route("POST")

            def do_GET(self):
                self._route("GET")

            def _route(self, method):
                url = urlparse(self.path)
                parts = url.path.rstrip("/").split("/")[2:]  # after /v1
                route = "/".join("{id}" if i == 1 and parts[0] in ("files", "batches") else p
                                 for i, p in enumerate(parts))
                with server._lock:
                    server.calls[f"{method} /v1/{route}"] += 1
                if method == "POST" and route == "chat/completions":
                    return self._chat()
                if parts and parts[0] in ("files", "batches") and server.batch_api:
                    with server._lock:
                        answer = server._files_and_batches(method, parts, self._body(), parse_qs(url.query),
                                                           self.headers.get("Content-Type", ""))
                    if answer is not None:
                        return self._send(*answer)
                self._send(404, {"error": {"message": f"no route {method} {url.path}", "type": "invalid_request_error",
                                           "code": "not_found"}})

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else b""

            def _client_gone(self) -> bool:
                """Has the client closed the connection (it was killed) before being answered?"""
                self.connection.setblocking(False)
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except BlockingIOError:
                    return False
                except OSError:
                    return True
                finally:
                    self.connection.setblocking(True)

            def _chat(self):
                body = json.loads(self._body())
                if server.released and self._client_gone():
                    return  # sent before the release by a client since killed: dropped as the hold would have
                with server._lock:  # decided on arrival: answered (at most hold_after in all), or held
                    server.bodies.append(body)
                    times = [time.monotonic(), None]
                    server.times.append(times)
                    fault = server.faults.pop(0) if server.faults else None
                    held = fault is None and server.hold_after is not None and server.reserved >= server.hold_after
                    server.reserved += fault is None and not held
                if held:
                    server._released.wait()
                    return  # dropped: never answered
                if server.latency:
                    time.sleep(server.latency)
                if fault == "401":
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    return self._send(401, {"error": {
                        "message": f"Incorrect API key provided: {key}. You can find your API key at "
                                   f"https://platform.openai.com/account/api-keys.",
                        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
                if fault in ("429", "500"):
                    return self._send(int(fault), {"error": {"message": f"injected {fault}", "type": "test"}})
                if fault == "timeout":
                    time.sleep(30)
                    return
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [{"message": ')
                if (error := rejected(body)) is not None:
                    return self._send(400, error)
                completion = server._complete(body, empty=fault == "empty", no_choices=fault == "no_choices",
                                              refusal=fault == "refusal")
                times[1] = time.monotonic()
                self._send(200, completion)

            def _send(self, status, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                binary = urlparse(self.path).path.endswith("/content")  # a file's bytes
                self.send_header("Content-Type", "application/octet-stream" if binary else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # a client's connections wait in the backlog rather than being retried

            def handle_error(self, request, client_address):
                pass  # a client killed on purpose leaves a broken pipe behind: expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    # ------------------------------------------------------------------------------------------ chat completions
    @property
    def received(self) -> int:
        """Chat-completion requests received."""
        return len(self.times)

    def _complete(self, body: dict, empty=False, no_choices=False, refusal=False) -> dict:
        """The chat completion for a request body; a non-empty answer is counted as billed."""
        prompt = body["messages"][-1]["content"]
        text = "" if empty or refusal else self.respond(prompt, body.get("temperature", 1.0), body.get("seed"))
        message = {"role": "assistant", "content": None, "refusal": "I'm sorry, I can't help with that."} if refusal \
            else {"role": "assistant", "content": text, "refusal": None}
        choices = [] if no_choices else [{"index": 0, "finish_reason": "stop", "message": message}]
        if text and choices:
            with self._lock:
                self.answered[json.dumps(body, sort_keys=True)] += 1
        return {"id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "test"), "choices": choices,
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                          "total_tokens": len(prompt.split()) + len(text.split())}}

    # ------------------------------------------------------------------------------------------ files and batches
    def _files_and_batches(self, method, parts, body: bytes, query, content_type: str):
        """(status, payload) for a files or batches call, or None for an unknown route (404)."""
        kind, rest = parts[0], parts[1:]
        if kind == "files" and method == "POST" and not rest:
            fields = self._multipart(body, content_type)
            return 200, self._new_file(fields["file"][1], fields["file"][0], fields["purpose"][1].decode())
        if kind == "files" and method == "GET" and rest and rest[0] in self.files:
            file = self.files[rest[0]]
            return (200, file["data"]) if rest[1:] == ["content"] else (200, file["object"])
        if kind == "batches" and method == "POST" and not rest:
            return 200, self._create_batch(json.loads(body))
        if kind == "batches" and method == "GET" and not rest:
            return 200, self._list(query)
        if kind == "batches" and rest and rest[0] in self.batches:
            batch = self.batches[rest[0]]
            if method == "POST" and rest[1:] == ["cancel"]:
                if batch["status"] in ("validating", "in_progress", "finalizing"):
                    batch.update(status="cancelling", cancelling_at=int(time.time()))
                return 200, self._public(batch)
            if method == "GET" and not rest[1:]:
                self._advance(batch)
                return 200, self._public(batch)
        return None

    @staticmethod
    def _multipart(body: bytes, content_type: str) -> dict:
        """{field: (filename, bytes)} of a multipart/form-data body."""
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        return {part.get_param("name", header="content-disposition"): (part.get_filename(),
                                                                          part.get_payload(decode=True))
                for part in message.iter_parts()}

    def _new_file(self, data: bytes, filename: str, purpose: str) -> dict:
        file_id = f"file-{next(self._ids)}"
        obj = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename or "upload", "purpose": purpose, "status": "processed"}
        self.files[file_id] = {"data": data, "object": obj}
        return obj

    def _create_batch(self, params: dict) -> dict:
        lines = [json.loads(line) for line in self.files[params["input_file_id"]]["data"].split(b"\n")
                 if line.strip()]
        batch_id = f"batch_{next(self._ids)}"
        now = int(time.time())
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": params["endpoint"], "errors": None,
            "input_file_id": params["input_file_id"], "completion_window": params["completion_window"],
            "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
            "expires_at": now + 86400, "metadata": params.get("metadata"), "model": lines[0]["body"]["model"],
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "_lines": lines, "_fault": self.batch_faults.pop(0) if self.batch_faults else None,
            "_order": len(self.batches)}
        return self._public(self.batches[batch_id])

    def add_batch(self, jsonl: bytes, metadata: dict) -> str:
        """A batch created at the API by someone else (or by a client that died before it could note its id)."""
        with self._lock:
            file = self._new_file(jsonl, "input.jsonl", "batch")
            return self._create_batch({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                                       "completion_window": "24h", "metadata": metadata})["id"]

    def _advance(self, batch: dict):
        """One status further, as a real batch moves on over time (here: at every retrieve)."""
        status, fault, now = batch["status"], batch["_fault"], int(time.time())
        if status == "validating" and (fault == "token_limit" or self._over_limit(batch)):
            self.refused += 1
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [{
                "code": "token_limit_exceeded", "param": None, "line": None,
                "message": TOKEN_LIMIT.format(model=batch["model"], limit=self.token_limit or 90_000)}]})
        elif status == "validating":
            batch.update(status="in_progress", in_progress_at=now)
        elif status == "in_progress" and not self.batches_held:
            if fault in ("expire", "cancel"):
                self._finish(batch, "expired" if fault == "expire" else "cancelled", partial=True)
            else:
                batch.update(status="finalizing", finalizing_at=now)
        elif status == "finalizing":
            self._finish(batch, "completed")
        elif status == "cancelling":
            self._finish(batch, "cancelled", partial=True)

    @staticmethod
    def _tokens(batch: dict) -> int:
        """A batch's prompt tokens, counted as its answers' usage counts them."""
        return sum(len(line["body"]["messages"][-1]["content"].split()) for line in batch["_lines"])

    def _over_limit(self, batch: dict) -> bool:
        """Would enqueueing this batch exceed the model's enqueued-token limit?"""
        if self.token_limit is None:
            return False
        queued = sum(self._tokens(b) for b in self.batches.values()
                     if b["model"] == batch["model"] and b["status"] in ("in_progress", "finalizing"))
        return queued + self._tokens(batch) > self.token_limit

    def _line_result(self, line: dict) -> tuple[int, dict]:
        """(HTTP status, body) of one batch line that runs."""
        prompt = line["body"]["messages"][-1]["content"]
        if self.line_faults[prompt] > 0:
            self.line_faults[prompt] -= 1
            return 500, {"error": {"message": "injected server error", "type": "server_error"}}
        fate = self.line_errors[prompt].pop(0) if self.line_errors.get(prompt) else None
        if (error := rejected(line["body"])) is not None:
            return 400, error
        if isinstance(fate, int):
            return fate, error_body(fate, f"injected HTTP {fate}")
        return 200, self._complete(line["body"], empty=fate == "empty", refusal=fate == "refusal")

    def _finish(self, batch: dict, status: str, partial: bool = False):
        """Answer the batch's requests (the first half only, if `partial`) into its output and error files."""
        lines = batch["_lines"]
        done = len(lines) // 2 if partial else len(lines)
        output, errors = [], []
        for k, line in enumerate(lines):
            self.bodies.append(line["body"])
            result = {"id": f"batch_req_{next(self._ids)}", "custom_id": line["custom_id"], "response": None,
                      "error": None}
            if k >= done:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                result["error"] = {"code": code, "message": "This request could not be executed before the "
                                   "completion window expired." if code == "batch_expired" else "cancelled"}
                errors.append(result)
            elif not (batch["_fault"] == "lose_line" and k == len(lines) - 1):
                code, body = self._line_result(line)
                result["response"] = {"status_code": code, "request_id": f"req_{next(self._ids)}", "body": body}
                (output if code == 200 else errors).append(result)
        jsonl = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()  # noqa: E731
        now = int(time.time())
        batch.update(status=status, **{f"{status}_at": now},
                     output_file_id=self._new_file(jsonl(output), "output.jsonl", "batch_output")["id"],
                     error_file_id=self._new_file(jsonl(errors), "errors.jsonl", "batch_output")["id"] if errors
                     else None,
                     request_counts={"total": len(lines), "completed": len(output), "failed": len(errors)})

    def _list(self, query) -> dict:
        ordered = sorted(self.batches.values(), key=lambda b: -b["_order"])  # newest first
        after = query.get("after", [None])[0]
        if after:
            ordered = ordered[[b["id"] for b in ordered].index(after) + 1:]
        limit = int(query.get("limit", [20])[0])
        page = [self._public(b) for b in ordered[:limit]]
        return {"object": "list", "data": page, "has_more": len(ordered) > limit,
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def hold_batches(self):
        self.batches_held = True

    def release_batches(self):
        self.batches_held = False

    def finish_batches(self):
        """Let time pass at the API: every batch runs to its end."""
        with self._lock:
            self.batches_held = False
            for batch in self.batches.values():
                while batch["status"] in ("validating", "in_progress", "finalizing", "cancelling"):
                    self._advance(batch)

    @property
    def batches_created(self) -> int:
        return len(self.batches)

    # ------------------------------------------------------------------------------------------ holding, counting
    def hold(self, after: int):
        self._released.clear()
        self.hold_after, self.released = after, False

    def release(self):
        self.released = self.hold_after is not None
        self.hold_after = None
        self._released.set()

    def open_at(self, t: float) -> int:
        """Chat-completion requests not answered at time t: received before t and answered after (or never), or
        received after t."""
        with self._lock:
            return sum(answered is None or answered > t for received, answered in self.times)

    @property
    def repeated(self) -> int:
        """Requests answered (billed) more than once: what a cache should make zero."""
        return sum(n - 1 for n in self.answered.values())

    @property
    def answers(self) -> int:
        return sum(self.answered.values())

    def env(self, **extra) -> dict:
        """Environment settings that point the pipeline's teacher at this server."""
        return {"TEACHER": "openai", "OPENAI_BASE_URL": self.url, "OPENAI_API_KEY": "sk-test-0123456789abcdefghijkl",
                "TEACHER_MODEL": "gpt-3.5-turbo", **extra}

    def close(self):
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()
