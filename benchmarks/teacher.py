"""Benchmark: the teacher one by one (one at a time, and TEACHER_CONCURRENCY at once) and through the Batch API, side
by side: requests billed, HTTP calls, wall time and cost; then what each kind of stop costs, as requests billed twice.

A local OpenAI-protocol server (tests/teacher_server.py) answers every chat completion after 100 ms, like a remote
API, and speaks the Batch API too; it counts every request it bills, one by one or as a line of a finished batch.  The
same 200 requests go through the project's Teacher (the real openai client) in a fresh process each time.  The local
server moves a batch one status on at every poll (validating, in_progress, finalizing, completed), so the Batch API's
wall time in this benchmark is the client's polling schedule only (TEACHER_BATCH_POLL=0.5): a real batch takes minutes to 24 hours.

Stops: a run is stopped half way, then run again, and the server counts the requests it billed twice.  One by one,
the stop comes while at least half of TEACHER_CONCURRENCY requests are open at the server (and after every answer
delivered so far was cached); through the Batch API, while the step polls its batch.

The enqueued-token limit: the Batch API once more, against a server that enforces, as the real service does, a limit
on the tokens enqueued at once (a third of the step's, so lower than its one part): the run must finish, and the table
gives the parts it ran in, the refusals, the batches created and the files uploaded.

    python benchmarks/teacher.py [--requests 200] [--latency 0.1]
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cache import ResultCache  # noqa: E402
from teacher_server import TeacherServer  # noqa: E402

CHILD = """
import json, sys, time; sys.path.insert(0, {root!r})
from teacher import Teacher
prompts = [f"Task: Summarize the reasons behind review {{i}}" for i in range({n})]
teacher = Teacher({cache!r})
start = time.perf_counter()
teacher.ask(prompts, temperature=0.2)
print(json.dumps({{"seconds": time.perf_counter() - start, "report": teacher.report()}}))
"""


def child(server, n, cache, **settings) -> subprocess.Popen:
    env = {**os.environ, **server.env(TEACHER_BATCH_POLL="0.5", **settings)}
    return subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), n=n, cache=str(cache))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)


def finish(process) -> dict:
    out, _ = process.communicate()
    assert process.returncode == 0, f"the teacher run failed ({process.returncode})"
    return json.loads(out.strip().splitlines()[-1])


cached = ResultCache.count


def wait_until(condition):
    while not condition():
        time.sleep(0.005)


def whole_run(n, latency, tmp, name, **settings):
    server = TeacherServer(latency=latency)
    result = finish(child(server, n, tmp / f"{name}.sqlite", **settings))
    calls = sum(server.calls.values())
    server.close()
    return {**result, "billed": server.answers, "calls": calls}


def stopped_run(n, latency, tmp, name, kill, concurrency, **settings):
    """Stop a run half way with `kill`, run it again; (requests billed twice, requests in flight at the stop,
    batches created)."""
    server, cache = TeacherServer(latency=latency), tmp / f"{name}.sqlite"
    batch = settings.get("TEACHER_BATCH") == "1"
    if batch:
        server.hold_batches()
    process = child(server, n, cache, TEACHER_CONCURRENCY=str(concurrency), **settings)
    moment = []

    def ready():
        if batch:
            return [b["status"] for b in server.batches.values()] == ["in_progress"]
        now, answered = time.monotonic(), server.answers
        moment[:] = [now]
        return answered >= n // 2 and cached(cache) >= answered and server.open_at(now) >= concurrency // 2

    wait_until(ready)
    os.killpg(process.pid, kill)
    process.wait()
    time.sleep(0.2)  # requests the dead client sent that still wait in the server's backlog get picked up
    wait_until(lambda: server.open_at(time.monotonic()) == 0)  # the server bills what was in flight all the same
    in_flight = 0 if batch else server.open_at(moment[0])
    server.release_batches()
    finish(child(server, n, cache, TEACHER_CONCURRENCY=str(concurrency), **settings))
    assert server.answers - server.repeated == n
    server.close()
    return server.repeated, in_flight, server.batches_created


def limited_run(n, latency, tmp) -> dict:
    """The Batch API against an enqueued-token limit of a third of the step's prompt tokens."""
    server = TeacherServer(latency=latency)
    step_tokens = n * len("Task: Summarize the reasons behind review 0".split())  # as the server counts them
    server.token_limit = step_tokens // 3
    result = finish(child(server, n, tmp / "limited.sqlite", TEACHER_BATCH="1"))
    parts = [b for b in server.batches.values() if b["status"] == "completed"]
    server.close()
    assert sum(b["request_counts"]["total"] for b in parts) == n and server.repeated == 0
    return {**result, "limit": server.token_limit, "step_tokens": step_tokens, "parts": len(parts),
            "refused": server.refused, "batches": server.batches_created, "uploads": server.calls["POST /v1/files"],
            "repeated": server.repeated}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    n, concurrency = args.requests, int(os.environ.get("TEACHER_CONCURRENCY", 16))
    tmp = Path(tempfile.mkdtemp())

    modes = [("one by one, one at a time", {"TEACHER_CONCURRENCY": "1"}),
             (f"one by one, concurrency {concurrency}", {"TEACHER_CONCURRENCY": str(concurrency)}),
             ("Batch API (TEACHER_BATCH=1)", {"TEACHER_BATCH": "1"})]
    stops = {}
    for name, settings in modes[1:]:
        key = "batch" if "TEACHER_BATCH" in settings else "one"
        extra = {k: v for k, v in settings.items() if k != "TEACHER_CONCURRENCY"}
        for kill in (signal.SIGTERM, signal.SIGKILL):
            stops[key, kill] = stopped_run(n, args.latency, tmp, f"{key}-{kill.name}", kill, concurrency, **extra)

    print(f"| mode ({n} requests, {args.latency * 1000:.0f} ms each) | requests billed | HTTP calls | wall time (s) "
          f"| cost at gpt-3.5-turbo list prices | requests billed twice after SIGTERM | after SIGKILL |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for name, settings in modes:
        r = whole_run(n, args.latency, tmp, name.replace(" ", "_"), **settings)
        cost = re.search(r"\$[\d,.]+", r["report"]).group()
        key = "batch" if "TEACHER_BATCH" in settings else "one" if settings["TEACHER_CONCURRENCY"] != "1" else None
        if key == "one":
            (term, _, _), (kill, in_flight, _) = stops[key, signal.SIGTERM], stops[key, signal.SIGKILL]
            after = f"{term} | {kill} (of {in_flight} in flight at the kill; bound: {concurrency})"
        elif key == "batch":
            (term, _, made_term), (kill, _, made_kill) = stops[key, signal.SIGTERM], stops[key, signal.SIGKILL]
            after = f"{term} ({made_term} batch in all) | {kill} ({made_kill} batch in all)"
        else:
            after = "– | –"
        print(f"| {name} | {r['billed']} | {r['calls']} | {r['seconds']:.2f} | {cost} | {after} |")

    r = limited_run(n, args.latency, tmp)
    print(f"\n| Batch API, enqueued-token limit {r['limit']:,} tokens (the step: {r['step_tokens']:,}, one part) | parts "
          f"run | refusals | batches created | files uploaded | requests billed twice | wall time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| finished | {r['parts']} | {r['refused']} | {r['batches']} | {r['uploads']} | {r['repeated']} | "
          f"{r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
