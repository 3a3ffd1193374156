"""Benchmark: teacher calls, concurrent against one at a time, and a run killed half way then resumed.

A local OpenAI-protocol server (tests/teacher_server.py) answers every request after 100 ms, like a remote API.
The same 200 requests go through the project's Teacher (the real openai client) with the configured concurrency
(TEACHER_CONCURRENCY, default 16) and with concurrency 1.  Then a run in a subprocess is killed with SIGKILL after
half the answers arrived, and run again: the server counts how many requests it answered twice.

    python benchmarks/teacher.py [--requests 200] [--latency 0.1]
"""
import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from teacher_server import TeacherServer  # noqa: E402

CHILD = """
import sys, time; sys.path.insert(0, {root!r})
from teacher import Teacher
prompts = [f"Task: Summarize the reasons behind review {{i}}" for i in range({n})]
teacher = Teacher({cache!r})
start = time.perf_counter()
teacher.ask(prompts, temperature=0.2)
print(time.perf_counter() - start)
"""


def timed_run(server, n, concurrency, cache) -> float:
    """Seconds that Teacher.ask took for n prompts, in a fresh process."""
    env = {**os.environ, **server.env(TEACHER_CONCURRENCY=str(concurrency))}
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), n=n, cache=str(cache))], env=env,
                         check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def cached(cache) -> int:
    try:
        with sqlite3.connect(cache) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.Error:
        return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    concurrency = int(os.environ.get("TEACHER_CONCURRENCY", 16))
    tmp = Path(tempfile.mkdtemp())

    server = TeacherServer(latency=args.latency)
    sequential = timed_run(server, args.requests, 1, tmp / "sequential.sqlite")
    concurrent = timed_run(server, args.requests, concurrency, tmp / "concurrent.sqlite")
    server.close()

    server = TeacherServer(latency=args.latency)
    cache = tmp / "killed.sqlite"
    server.hold(args.requests // 2)
    env = {**os.environ, **server.env(TEACHER_CONCURRENCY=str(concurrency))}
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), n=args.requests, cache=str(cache))],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while server.answers < args.requests // 2 or cached(cache) < server.answers:  # every delivered answer is kept
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    before = cached(cache)
    server.release()
    resumed = timed_run(server, args.requests, concurrency, cache)
    repeated, total = server.repeated, server.answers
    server.close()

    print(f"| run ({args.requests} requests, {args.latency * 1000:.0f} ms each) | wall time (s) | requests/s |")
    print("|---|---:|---:|")
    print(f"| one at a time | {sequential:.2f} | {args.requests / sequential:.1f} |")
    print(f"| concurrency {concurrency} | {concurrent:.2f} | {args.requests / concurrent:.1f} |")
    print(f"\nkilled (SIGKILL) with {before} answers kept, then resumed in {resumed:.2f} s: the server answered "
          f"{total} requests for {args.requests} prompts, {repeated} of them twice")
    print(f"speed-up (one at a time / concurrent): {sequential / concurrent:.1f}x; repeated requests after the "
          f"kill: {repeated}")


if __name__ == "__main__":
    main()
