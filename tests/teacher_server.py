"""A small OpenAI-protocol chat-completions server on 127.0.0.1, standing in for the paid teacher in tests and
benchmarks: the real `openai` client talks to it over HTTP.

Its answers are deterministic functions of the request (prompt, temperature, seed), shaped like the teacher's
(summaries, reasons, a judge's scores).  It counts every request it answers, can add latency, and can misbehave on
purpose: `faults` is a list of what to do to the next requests in turn ("429", "500", "timeout", "malformed",
"empty", "no_choices", or None for a normal answer).  `hold(n)` makes it answer n requests in all and then leave every
further one hanging unanswered, until `release()` drops those and goes back to normal: a client can then be killed at
a known point: once n answers are out (`answers >= n`), nothing is in flight that the server would answer.
"""
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("warm tone durable build bright sound sturdy stand easy setup good value clear output solid feel "
         "cheap price weak clamp noisy hum heavy weight fragile cable").split()


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
    def __init__(self, respond=teacher_answer, latency: float = 0.0, faults=None):
        self.respond, self.latency, self.faults = respond, latency, list(faults or [])
        self.answered = Counter()  # request fingerprint -> times answered successfully
        self.received = 0
        self.bodies = []  # every request body received, as JSON
        self.hold_after = None
        self.reserved = 0  # requests admitted to be answered
        self._released = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:  # decided on arrival: answered (at most hold_after in all), or held
                    server.received += 1
                    server.bodies.append(body)
                    fault = server.faults.pop(0) if server.faults else None
                    held = fault is None and server.hold_after is not None and server.reserved >= server.hold_after
                    server.reserved += fault is None and not held
                if held:
                    server._released.wait()
                    return  # dropped: never answered
                if server.latency:
                    time.sleep(server.latency)
                if fault in ("429", "500"):
                    return self._send(int(fault), {"error": {"message": f"injected {fault}", "type": "test"}})
                if fault == "timeout":
                    time.sleep(30)
                    return
                if fault == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [{"message": ')
                prompt = body["messages"][-1]["content"]
                text = "" if fault == "empty" else server.respond(prompt, body.get("temperature", 1.0), body.get("seed"))
                choices = [] if fault == "no_choices" else [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]
                if text and choices:
                    with server._lock:
                        server.answered[json.dumps(body, sort_keys=True)] += 1
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "test"), "choices": choices,
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                              "total_tokens": len(prompt.split()) + len(text.split())}})

            def _send(self, status, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client killed on purpose leaves a broken pipe behind: expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def hold(self, after: int):
        self._released.clear()
        self.hold_after = after

    def release(self):
        self.hold_after = None
        self._released.set()

    @property
    def repeated(self) -> int:
        """Requests answered more than once: what a cache should make zero."""
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
