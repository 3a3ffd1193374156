"""The teacher's Batch API mode, its stops and its bill: the real openai client against the local OpenAI-protocol
server (tests/teacher_server.py), which counts every request it bills.

What each kind of stop costs, proved here:
    SIGTERM / Ctrl-C, one by one       0 requests repeated          test_sigterm_one_by_one_...
    SIGKILL, one by one                at most the requests in flight (<= TEACHER_CONCURRENCY)
                                                                    test_sigkill_one_by_one_...
    SIGTERM or SIGKILL, Batch API      0 requests repeated, no second batch
                                                                    test_a_kill_while_polling_...,
                                                                    test_a_kill_between_creating_..._adopts_that_batch
"""
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from openai import OpenAI

import teacher_batch
from cache import ResultCache
from conftest import DATASET, FAST, REPO, environment, pipeline_env, run
from teacher import Teacher
from teacher_server import TeacherServer, teacher_answer

PROMPTS = [f"Task: Summarize the reasons behind review {i}" for i in range(12)]
SUMMARIES = "1_Summarizer/1_distilling_aspect_preference_summary.py"
REASONS = "2_Reasoner/4_distilling_possible_reason.py"


@pytest.fixture
def env(monkeypatch):
    def apply(server, **extra):
        settings = {"TEACHER_MAX_RETRIES": "2", "TEACHER_TIMEOUT": "5", "TEACHER_BATCH_POLL": "0.02", **extra}
        for key, value in server.env(**settings).items():
            monkeypatch.setenv(key, value)
    return apply


def results(cache) -> dict:
    with sqlite3.connect(cache) as db:
        return dict(db.execute("SELECT key, value FROM results"))


rows = ResultCache.count


def sizes(server) -> list[int]:
    return [b["request_counts"]["total"] for b in server.batches.values()]


def statuses(server) -> list[str]:
    return [b["status"] for b in server.batches.values()]


def start(script, *args, cwd, env, log):
    """A pipeline step in its own process group, its output going to `log`."""
    return subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd, env=environment(env),
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_until(condition, child=None, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert child is None or child.poll() is None, "the step ended before it could be stopped"
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


# ------------------------------------------------------------------------------------------ the same answers
def test_batch_mode_caches_the_same_answers_under_the_same_keys_as_one_by_one(tmp_path, env):
    samples, server = [0, 1, 2] * 4, TeacherServer()  # one endpoint: it is part of the cache key
    env(server)
    first = Teacher(tmp_path / "one.sqlite").ask(PROMPTS, temperature=0.2, samples=samples)
    one_by_one = list(server.bodies)
    env(server, TEACHER_BATCH="1")
    teacher = Teacher(tmp_path / "batch.sqlite")
    assert teacher.ask(PROMPTS, temperature=0.2, samples=samples) == first
    assert results(tmp_path / "one.sqlite") == results(tmp_path / "batch.sqlite")
    assert sorted(json.dumps(b, sort_keys=True) for b in one_by_one) == \
        sorted(json.dumps(b, sort_keys=True) for b in server.bodies[12:])  # the same requests, seeds and temperatures
    assert server.received == 12 and sizes(server) == [12]
    assert teacher.usage["batch_requests"] == 12 and "50% discount applied to 12" in teacher.report()
    server.close()


def test_a_step_can_switch_modes_midway_and_keeps_every_answer(tmp_path, env, monkeypatch):
    server, cache = TeacherServer(), tmp_path / "cache.sqlite"
    env(server)
    Teacher(cache).ask(PROMPTS[:5], temperature=0.7)  # one by one, then stopped
    env(server, TEACHER_BATCH="1")
    assert Teacher(cache).ask(PROMPTS, temperature=0.7) == [teacher_answer(p, 0.7, 0) for p in PROMPTS]
    assert sizes(server) == [7]  # only what had no answer
    env(server, TEACHER_BATCH="0")
    again = Teacher(cache)
    again.ask(PROMPTS, temperature=0.7)
    assert again.usage["requests"] == 0 and server.answers == 12 and server.repeated == 0

    # Batch mode stopped while its batch runs, then one by one: refused rather than paid twice.  The batch is then
    # cancelled (through the client, as from the dashboard): the batch run stops, and one by one asks for the rest.
    server.hold_batches()
    env(server, TEACHER_BATCH="1")
    batch_run, outcome = asked_in_background(Teacher(cache), PROMPTS, temperature=0.9)
    wait_until(lambda: statuses(server)[1:] == ["in_progress"])  # created, recorded, polled
    monkeypatch.setenv("TEACHER_BATCH", "0")
    with pytest.raises(SystemExit, match=r"1 batch\(es\) of this step are still running at the Batch API \(batch_"):
        Teacher(cache).ask(PROMPTS, temperature=0.9)
    OpenAI(base_url=server.url, api_key="sk-test").batches.cancel(list(server.batches)[-1])
    server.release_batches()
    batch_run.join(60)
    assert "was cancelled from outside this run" in outcome["error"]
    assert statuses(server)[1:] == ["cancelled"] and sizes(server)[1:] == [12] and server.received == 5
    assert Teacher(cache).ask(PROMPTS, temperature=0.9) == [teacher_answer(p, 0.9, 0) for p in PROMPTS]
    assert server.received == 11 and server.repeated == 0
    server.close()


# ------------------------------------------------------------------------------------------ what the API does
def test_error_lines_go_out_again_in_a_new_batch_a_bounded_number_of_times_then_are_reported_by_row(tmp_path, env):
    server, cache = TeacherServer(), tmp_path / "cache.sqlite"
    env(server, TEACHER_BATCH="1")
    server.line_faults[PROMPTS[3]] = 1  # fails once, then is answered
    server.line_faults[PROMPTS[7]] = 99  # fails every time
    with pytest.raises(SystemExit) as failure:
        Teacher(cache).ask(PROMPTS, temperature=0.2, labels=[f"r{i}" for i in range(12)])
    message = str(failure.value)
    assert message.startswith("error: 1 teacher requests failed in the Batch API 3 times: row r7: HTTP 500: "
                              "injected server error. The 11 answers received are kept")
    assert "\n" not in message and "r3" not in message
    assert sizes(server) == [12, 2, 1] and teacher_batch.BATCH_MAX_ATTEMPTS == 3
    assert rows(cache) == 11 and server.repeated == 0
    server.line_faults.clear()  # a rerun tries the reported row afresh
    assert Teacher(cache).ask(PROMPTS, temperature=0.2)[7] == teacher_answer(PROMPTS[7], 0.2, 0)
    assert sizes(server) == [12, 2, 1, 1] and server.repeated == 0
    server.close()


def test_an_expired_batch_sends_again_only_what_has_no_answer(tmp_path, env):
    server = TeacherServer()
    env(server, TEACHER_BATCH="1")
    server.batch_faults = ["expire"]
    answers = Teacher(tmp_path / "cache.sqlite").ask(PROMPTS, temperature=0.2)
    assert answers == [teacher_answer(p, 0.2, 0) for p in PROMPTS]
    assert statuses(server) == ["expired", "completed"] and sizes(server) == [12, 6]
    assert server.answers == 12 and server.repeated == 0
    server.close()


def test_a_request_missing_from_a_completed_batch_counts_as_failed_and_goes_out_again(tmp_path, env):
    server = TeacherServer()
    env(server, TEACHER_BATCH="1")
    server.batch_faults = ["lose_line"]
    assert Teacher(tmp_path / "cache.sqlite").ask(PROMPTS, temperature=0.2) == \
        [teacher_answer(p, 0.2, 0) for p in PROMPTS]
    assert sizes(server) == [12, 1] and server.repeated == 0
    server.close()


def test_the_enqueued_token_limit_halves_a_part_refused_with_nothing_else_queued(tmp_path, env, capsys):
    server = TeacherServer()
    env(server, TEACHER_BATCH="1")
    server.batch_faults = ["token_limit"]
    assert Teacher(tmp_path / "cache.sqlite").ask(PROMPTS, temperature=0.2) == \
        [teacher_answer(p, 0.2, 0) for p in PROMPTS]
    first = server.batches[next(iter(server.batches))]
    assert first["errors"]["data"][0]["code"] == "token_limit_exceeded"
    assert statuses(server)[0] == "failed" and set(statuses(server)[1:]) == {"completed"}
    assert sizes(server)[0] == 12 and sum(sizes(server)[1:]) == 12 and max(sizes(server)[1:]) <= 6  # halved
    assert server.repeated == 0
    assert "Enqueued token limit reached" in capsys.readouterr().out
    server.close()


def test_a_big_step_is_split_into_batches_within_the_limits(tmp_path, env, monkeypatch):
    server = TeacherServer()
    env(server, TEACHER_BATCH="1")
    monkeypatch.setattr(teacher_batch, "BATCH_MAX_REQUESTS", 5)
    Teacher(tmp_path / "a.sqlite").ask(PROMPTS, temperature=0.2)
    assert sizes(server) == [5, 5, 2]
    monkeypatch.setattr(teacher_batch, "BATCH_MAX_REQUESTS", 50_000)
    monkeypatch.setattr(teacher_batch, "BATCH_MAX_BYTES", 1000)
    Teacher(tmp_path / "b.sqlite").ask(PROMPTS, temperature=0.5)
    inputs = [len(server.files[b["input_file_id"]]["data"]) for b in list(server.batches.values())[3:]]
    assert sum(sizes(server)[3:]) == 12 and len(inputs) > 2 and max(inputs) <= 1000
    assert server.repeated == 0
    metadata = [b["metadata"] for b in server.batches.values()]
    assert [m["part"] for m in metadata[:3]] == ["1/3", "2/3", "3/3"]
    assert len({m["keys_sha256"] for m in metadata}) == len(metadata)
    server.close()


def test_an_endpoint_without_the_batch_api_is_refused_up_front(tmp_path, env, monkeypatch):
    server = TeacherServer(batch_api=False)
    env(server, TEACHER_BATCH="1")
    with pytest.raises(SystemExit, match=r"^error: TEACHER_BATCH=1, but .* has no Batch API \(GET batches answered "
                                         r"404.*unset TEACHER_BATCH to send the requests one by one$"):
        Teacher(tmp_path / "cache.sqlite")
    assert server.received == 0 and sum(server.calls.values()) == 1
    monkeypatch.setenv("TEACHER_BATCH", "yes")
    with pytest.raises(SystemExit, match="TEACHER_BATCH must be 1"):
        Teacher(tmp_path / "cache.sqlite")
    server.close()


def test_the_local_teacher_refuses_batch_mode(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setenv("TEACHER", "local")
    monkeypatch.setenv("TEACHER_MODEL_PATH", str(tmp_path / "model"))
    monkeypatch.setenv("TEACHER_BATCH", "1")
    with pytest.raises(SystemExit, match="local teacher .* does not have: unset TEACHER_BATCH"):
        Teacher(tmp_path / "cache.sqlite")


# ------------------------------------------------------------------------------------------ the real service's limits
def asked_in_background(teacher, prompts, temperature=0.2, **kwargs):
    """Run teacher.ask in a thread: (thread, outcome), outcome["answers"] or outcome["error"] once it ends."""
    outcome = {}

    def ask():
        try:
            outcome["answers"] = teacher.ask(prompts, temperature=temperature, **kwargs)
        except SystemExit as e:
            outcome["error"] = str(e)
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    return thread, outcome


def test_parts_are_split_by_an_estimated_token_budget(tmp_path, env):
    server = TeacherServer()
    env(server, TEACHER_BATCH="1", TEACHER_BATCH_TOKENS="50")  # a prompt here is about 11 tokens (44 characters / 4)
    Teacher(tmp_path / "cache.sqlite").ask(PROMPTS, temperature=0.2)
    assert sizes(server) == [4, 4, 4] and server.repeated == 0
    server.close()


def test_a_part_over_the_enqueued_token_limit_is_halved_at_once(tmp_path, env, capsys):
    """The organization may enqueue 30 tokens (the server counts a prompt's words: 7 here), far less than the step's
    one part (84): refused with nothing else queued, the part is halved at once, until the parts fit."""
    server = TeacherServer()
    server.token_limit = 30
    env(server, TEACHER_BATCH="1")
    thread, outcome = asked_in_background(Teacher(tmp_path / "cache.sqlite"), PROMPTS)
    thread.join(60)
    assert outcome.get("answers") == [teacher_answer(p, 0.2, 0) for p in PROMPTS], outcome
    accepted = [b for b in server.batches.values() if b["status"] == "completed"]
    assert sum(b["request_counts"]["total"] for b in accepted) == 12 and server.repeated == 0
    assert all(server._tokens(b) <= 30 for b in accepted)
    assert sizes(server)[0] == 12 and server.refused >= 2 and "halving the parts" in capsys.readouterr().out
    server.close()


def test_a_part_refused_while_the_steps_own_batch_holds_the_queue_waits_and_reuses_its_upload(tmp_path, env,
                                                                                                capsys):
    """Parts of 3 prompts (21 tokens at the server) under a limit of 30: one fits at a time.  The others are refused
    while the first is queued, wait for it to end, and go out again from the files already uploaded."""
    server = TeacherServer()
    server.token_limit = 30
    env(server, TEACHER_BATCH="1", TEACHER_BATCH_TOKENS="34")  # 3 prompts of about 11 tokens (44 characters / 4)
    thread, outcome = asked_in_background(Teacher(tmp_path / "cache.sqlite"), PROMPTS)
    thread.join(60)
    assert outcome.get("answers") == [teacher_answer(p, 0.2, 0) for p in PROMPTS], outcome
    accepted = [b for b in server.batches.values() if b["status"] == "completed"]
    assert [b["request_counts"]["total"] for b in accepted] == [3, 3, 3, 3] and server.repeated == 0
    assert server.refused >= 3 and "halving" not in capsys.readouterr().out
    inputs = [b["input_file_id"] for b in server.batches.values()]
    assert server.calls["POST /v1/files"] == len(set(inputs)) == 4 < len(inputs)  # sent again from its upload
    server.close()


def test_refusals_for_the_enqueued_token_limit_are_capped_with_a_message_naming_it(tmp_path, env):
    server = TeacherServer()
    server.token_limit = 5  # not even one request fits
    env(server, TEACHER_BATCH="1")
    thread, outcome = asked_in_background(Teacher(tmp_path / "cache.sqlite"), PROMPTS)
    thread.join(60)
    assert not thread.is_alive(), "still sending the same refused part"
    message = outcome.get("error", "")
    assert message.startswith("error: the Batch API refused") and "Limit: 5 enqueued tokens" in message
    assert "TEACHER_BATCH_TOKENS" in message and "\n" not in message
    assert server.refused == teacher_batch.BATCH_MAX_REFUSALS and server.answers == 0
    server.close()


@pytest.mark.parametrize("batch", ["0", "1"])
def test_a_reasoning_model_gets_max_completion_tokens(tmp_path, env, batch):
    server = TeacherServer()
    env(server, TEACHER_MODEL="gpt-5-mini", TEACHER_BATCH=batch)
    assert Teacher(tmp_path / "cache.sqlite").ask(PROMPTS[:3], temperature=1.0) == \
        [teacher_answer(p, 1.0, 0) for p in PROMPTS[:3]]
    assert all("max_completion_tokens" in b and "max_tokens" not in b for b in server.bodies)
    server.close()


@pytest.mark.parametrize("batch", ["0", "1"])
def test_a_temperature_the_model_cannot_take_is_refused_before_anything_is_paid(tmp_path, env, monkeypatch, batch):
    server = TeacherServer()
    env(server, TEACHER_MODEL="gpt-5-mini", TEACHER_BATCH=batch)
    with pytest.raises(SystemExit, match=r"^error: the teacher gpt-5-mini .*only its default temperature, 1; this "
                                         r"step asks at temperature 0\.2"):
        Teacher(tmp_path / "cache.sqlite").ask(PROMPTS, temperature=0.2)
    with pytest.raises(SystemExit, match="temperature 0.2"):  # a step names its temperatures before its first request
        Teacher(tmp_path / "cache.sqlite", temperatures=[1.0, 0.2])
    assert server.received == 0 and server.batches_created == 0
    monkeypatch.setenv("TEACHER_MODEL", "gpt-5-chat-latest")  # not a reasoning model
    Teacher(tmp_path / "cache.sqlite", temperatures=[0.2])
    server.close()


def test_408_429_and_5xx_lines_are_retried_and_any_other_4xx_is_reported_at_once(tmp_path, env):
    server = TeacherServer()
    env(server, TEACHER_BATCH="1")
    server.line_errors = {PROMPTS[2]: [408], PROMPTS[3]: [429], PROMPTS[4]: [503]}
    assert Teacher(tmp_path / "a.sqlite").ask(PROMPTS, temperature=0.2) == [teacher_answer(p, 0.2, 0) for p in PROMPTS]
    assert sizes(server) == [12, 3]
    server.line_errors = {PROMPTS[1]: [400]}
    with pytest.raises(SystemExit) as failure:
        Teacher(tmp_path / "b.sqlite").ask(PROMPTS, temperature=0.5, labels=[f"r{i}" for i in range(12)])
    assert sizes(server)[2:] == [12]  # not sent again
    assert str(failure.value).startswith("error: 1 teacher requests were rejected by the API (not retried): row r1: "
                                         "HTTP 400: injected HTTP 400.")
    assert rows(tmp_path / "b.sqlite") == 11
    assert Teacher(tmp_path / "b.sqlite").ask(PROMPTS, temperature=0.5)[1] == teacher_answer(PROMPTS[1], 0.5, 0)
    assert sizes(server)[2:] == [12, 1] and server.repeated == 0
    server.close()


@pytest.mark.parametrize("batch", ["0", "1"])
def test_empty_and_refused_answers_are_asked_again_a_bounded_number_of_times_and_billed(tmp_path, env, batch):
    server = TeacherServer(faults=["empty", "refusal"])
    env(server, TEACHER_BATCH=batch)
    server.line_errors = {PROMPTS[5]: ["empty"], PROMPTS[6]: ["refusal"]}
    teacher = Teacher(tmp_path / "cache.sqlite")
    assert teacher.ask(PROMPTS, temperature=0.2) == [teacher_answer(p, 0.2, 0) for p in PROMPTS]
    assert teacher.usage["empty"] == 2 and teacher.usage["requests"] == 14
    assert "2 of them empty or refused, asked again" in teacher.report()
    server.faults = ["refusal"] * 3
    server.line_errors = {PROMPTS[0]: ["refusal"] * 3}
    with pytest.raises(SystemExit, match=r"row #0(:| failed:) the model refused: I.m sorry"):
        Teacher(tmp_path / "cache.sqlite").ask(PROMPTS[:1], temperature=0.9)
    server.close()


def test_output_files_are_split_on_newlines_only(tmp_path, env):
    """JSON leaves U+2028, U+2029 and U+0085 unescaped inside a string; str.splitlines() breaks lines on them."""
    def respond(prompt, temperature=0.0, seed=None):
        return teacher_answer(prompt, temperature, seed) + "\u2028Also\u2029this\x85too"
    server = TeacherServer(respond=respond)
    env(server, TEACHER_BATCH="1")
    assert Teacher(tmp_path / "cache.sqlite").ask(PROMPTS, temperature=0.2) == [respond(p, 0.2, 0) for p in PROMPTS]
    assert "\u2028".encode() in server.files[server.batches[next(iter(server.batches))]["output_file_id"]]["data"]
    server.close()


def test_a_batch_cancelled_by_hand_stops_the_step_and_a_rerun_submits_the_rest_again(tmp_path, env):
    server, cache = TeacherServer(), tmp_path / "cache.sqlite"
    env(server, TEACHER_BATCH="1")
    server.hold_batches()
    thread, outcome = asked_in_background(Teacher(cache), PROMPTS)
    wait_until(lambda: statuses(server) == ["in_progress"])
    batch_id = next(iter(server.batches))
    OpenAI(base_url=server.url, api_key="sk-test").batches.cancel(batch_id)  # as from the dashboard
    server.release_batches()
    thread.join(60)
    assert outcome.get("error", "").startswith(f"error: batch {batch_id} was cancelled from outside this run (the "
                                               f"dashboard or the API): its 6 answers are kept; the other 6 requests "
                                               f"were not run. Rerun the same command to submit them again")
    assert sizes(server) == [12] and rows(cache) == 6
    assert Teacher(cache).ask(PROMPTS, temperature=0.2) == [teacher_answer(p, 0.2, 0) for p in PROMPTS]
    assert sizes(server) == [12, 6] and server.repeated == 0
    server.close()


def test_one_by_one_after_a_kill_between_creating_a_batch_and_recording_it_adopts_that_batch(tmp_path, env,
                                                                                               monkeypatch):
    server, cache = TeacherServer(), tmp_path / "cache.sqlite"
    env(server, TEACHER_BATCH="1")
    child = subprocess.run([sys.executable, "-c", CREATE_THEN_DIE.format(root=str(REPO), cache=str(cache),
                                                                         prompts=PROMPTS)], capture_output=True)
    assert child.returncode == -signal.SIGKILL and server.batches_created == 1
    monkeypatch.setenv("TEACHER_BATCH", "0")
    with pytest.raises(SystemExit, match="still running at the Batch API"):  # it would pay for them twice
        Teacher(cache).ask(PROMPTS, temperature=0.2, desc="teacher summaries")
    server.finish_batches()
    assert Teacher(cache).ask(PROMPTS, temperature=0.2, desc="teacher summaries") == \
        [teacher_answer(p, 0.2, 0) for p in PROMPTS]
    assert server.received == 0 and server.batches_created == 1 and server.repeated == 0
    server.close()


# ------------------------------------------------------------------------------------------ kills and stops
def test_a_kill_while_polling_resumes_the_same_batch_and_pays_nothing_twice(workspace, tiny_model, tmp_path):
    """SIGTERM, then SIGKILL, while the step polls its batch; the third run collects it.  One batch in all."""
    server, data = TeacherServer(), workspace / "Data" / DATASET
    env = pipeline_env(tiny_model, server, TEACHER_BATCH="1", TEACHER_BATCH_POLL="0.05")
    server.hold_batches()
    for kill, polls in [(signal.SIGTERM, 3), (signal.SIGKILL, 6)]:
        with open(tmp_path / f"{kill.name}.log", "w") as log:
            child = start(SUMMARIES, "--limit", "40", cwd=workspace, env=env, log=log)
            wait_until(lambda: server.calls["GET /v1/batches/{id}"] >= polls, child)
            os.killpg(child.pid, kill)
            child.wait(60)
        out = (tmp_path / f"{kill.name}.log").read_text()
        assert child.returncode == (143 if kill == signal.SIGTERM else -signal.SIGKILL)
        assert server.batches_created == 1 and server.answers == 0
    assert "stopped by SIGTERM: the batches of this step still running (batch_" in (tmp_path / "SIGTERM.log").read_text()
    assert "keep running at the Batch API" in (tmp_path / "SIGTERM.log").read_text()
    server.release_batches()
    out = run(SUMMARIES, "--limit", "40", cwd=workspace, env=env)
    assert "created batch" not in out.stdout + out.stderr
    assert server.batches_created == 1 and server.answers == 40 and server.repeated == 0 and server.received == 0
    summaries = pd.read_pickle(data / "train_aspect_preference_summary.pkl")["review_summary"]
    assert len(summaries) == 40 and summaries.str.startswith("Positive Aspects").all()
    server.close()


ASK = """
import sys
sys.path.insert(0, {root!r})
from teacher import Teacher
Teacher({cache!r}).ask({prompts!r}, temperature=0.2)
"""

# SIGTERM at the one moment its exception is lost: while openai builds a polled Batch object, inside the
# `try: validate_type(...) except Exception: pass` by which construct_type (openai/_models.py) tries a union's types
STOP_INSIDE_OPENAI = """
import signal, sys
sys.path.insert(0, {root!r})
import openai._models
validate_type, counts = openai._models.validate_type, []

def validate_type_then_sigterm(*, type_, value):
    if isinstance(value, dict) and "completed" in value:  # a batch's request_counts, once per batch object
        counts.append(value)
        if len(counts) == 3:
            signal.raise_signal(signal.SIGTERM)  # its handler runs here, inside openai's try
    return validate_type(type_=type_, value=value)

openai._models.validate_type = validate_type_then_sigterm
from teacher import Teacher
Teacher({cache!r}).ask({prompts!r}, temperature=0.2)
"""


def test_a_sigterm_whose_exception_openai_swallows_still_stops_the_batch_step(tmp_path, env):
    """The SIGTERM handler raises Stop in the main thread, wherever it is; in Batch API mode that is often inside the
    openai client, which catches every Exception while it builds a response object.  A SIGTERM that lands there
    stops the step all the same (while Stop was an Exception, the step polled on for as long as the batch ran, up to
    24 hours), and a rerun collects the same batch."""
    server, cache = TeacherServer(), tmp_path / "cache.sqlite"
    env(server, TEACHER_BATCH="1")
    server.hold_batches()
    stopped = subprocess.run([sys.executable, "-c", STOP_INSIDE_OPENAI.format(root=str(REPO), cache=str(cache),
                                                                              prompts=PROMPTS)],
                             capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 143 and "stopped by SIGTERM" in stopped.stderr, stopped.stderr[-2000:]
    assert server.batches_created == 1 and server.answers == 0
    server.release_batches()
    subprocess.run([sys.executable, "-c", ASK.format(root=str(REPO), cache=str(cache), prompts=PROMPTS)], check=True,
                   capture_output=True, timeout=60)
    assert server.batches_created == 1 and server.repeated == 0 and rows(cache) == len(PROMPTS)
    server.close()


def test_one_by_one_after_a_killed_batch_run_takes_in_its_batch_once_it_has_ended(tmp_path, env, monkeypatch):
    server, cache = TeacherServer(), tmp_path / "cache.sqlite"
    env(server, TEACHER_BATCH="1")
    server.hold_batches()
    child = subprocess.Popen([sys.executable, "-c", ASK.format(root=str(REPO), cache=str(cache), prompts=PROMPTS)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: statuses(server) == ["in_progress"], child)
    child.kill()
    child.wait()
    monkeypatch.setenv("TEACHER_BATCH", "0")
    with pytest.raises(SystemExit, match="still running at the Batch API"):  # it would pay for them twice
        Teacher(cache).ask(PROMPTS, temperature=0.2)
    server.finish_batches()
    teacher = Teacher(cache)
    assert teacher.ask(PROMPTS, temperature=0.2) == [teacher_answer(p, 0.2, 0) for p in PROMPTS]
    assert teacher.usage["batch_requests"] == 12 and server.received == 0
    assert server.batches_created == 1 and server.answers == 12 and server.repeated == 0
    server.close()


CREATE_THEN_DIE = """
import os, signal, sys
sys.path.insert(0, {root!r})
import teacher_batch
teacher_batch.BatchBook.record = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # dies right after creating
from teacher import Teacher
Teacher({cache!r}).ask({prompts!r}, temperature=0.2, desc="teacher summaries")
"""


def test_a_kill_between_creating_a_batch_and_recording_it_adopts_that_batch(tmp_path, env, capsys):
    server, cache = TeacherServer(), tmp_path / "cache.sqlite"
    env(server, TEACHER_BATCH="1")
    child = subprocess.run([sys.executable, "-c", CREATE_THEN_DIE.format(root=str(REPO), cache=str(cache),
                                                                         prompts=PROMPTS)], capture_output=True)
    assert child.returncode == -signal.SIGKILL and server.batches_created == 1 and rows(cache) == 0
    teacher = Teacher(cache)
    assert teacher.ask(PROMPTS, temperature=0.2, desc="teacher summaries") == \
        [teacher_answer(p, 0.2, 0) for p in PROMPTS]
    assert f"adopted batch {next(iter(server.batches))}: 12 requests" in capsys.readouterr().out
    assert server.batches_created == 1 and server.answers == 12 and server.repeated == 0
    server.close()


def test_sigterm_one_by_one_waits_for_the_requests_in_flight_and_repeats_nothing(workspace, tiny_model, tmp_path):
    server, data = TeacherServer(latency=0.5), workspace / "Data" / DATASET
    env = pipeline_env(tiny_model, server, TEACHER_CONCURRENCY="8", TEACHER_TIMEOUT="10")
    with open(tmp_path / "log", "w") as log:
        child = start(SUMMARIES, "--limit", "48", cwd=workspace, env=env, log=log)
        wait_until(lambda: server.answers >= 8 and server.open_at(time.monotonic()) >= 4, child)
        child.send_signal(signal.SIGTERM)
        child.wait(60)
    out = (tmp_path / "log").read_text()
    assert child.returncode == 143 and "Traceback" not in out
    assert "waiting up to 10 s (TEACHER_TIMEOUT) for the " in out
    assert "Rerun the same command to continue: nothing is paid twice." in out
    assert server.open_at(time.monotonic()) == 0 and rows(data / "teacher_cache.sqlite") == server.answers
    run(SUMMARIES, "--limit", "48", cwd=workspace, env=env)
    assert server.answers == 48 and server.repeated == 0
    server.close()


def test_sigkill_one_by_one_repeats_at_most_the_requests_in_flight(workspace, tiny_model):
    """The honest bound: the answers of the requests in flight die with the process.  The kill comes when every
    answer delivered so far is cached and at least half of TEACHER_CONCURRENCY requests are open at the server."""
    concurrency, server, data = 8, TeacherServer(latency=0.5), workspace / "Data" / DATASET
    env = pipeline_env(tiny_model, server, TEACHER_CONCURRENCY=str(concurrency))
    child = start(SUMMARIES, "--limit", "48", cwd=workspace, env=env, log=subprocess.DEVNULL)
    moment = []

    def ready():
        now = time.monotonic()
        answered = server.answers
        moment[:] = [now]
        return answered >= 8 and rows(data / "teacher_cache.sqlite") >= answered and \
            server.open_at(now) >= concurrency // 2

    wait_until(ready, child)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(60)
    time.sleep(0.2)  # requests the dead client sent that still wait in the server's backlog get picked up
    wait_until(lambda: server.open_at(time.monotonic()) == 0)  # the server finishes (and bills) them all the same
    in_flight = server.open_at(moment[0])  # requests not answered when every answer so far was cached
    run(SUMMARIES, "--limit", "48", cwd=workspace, env=env)
    assert concurrency // 2 <= in_flight <= concurrency
    assert 0 < server.repeated <= in_flight
    server.close()


# ------------------------------------------------------------------------------------------ the bill
def test_dry_run_prints_requests_tokens_and_cost_and_sends_nothing(workspace, tiny_model):
    server, data, costs = TeacherServer(), workspace / "Data" / DATASET, []
    for batch in ("0", "1"):
        env = pipeline_env(tiny_model, server, TEACHER_BATCH=batch)
        out = run(SUMMARIES, "--limit", "40", "--dry_run", cwd=workspace, env=env).stdout
        assert "dry run, nothing sent: the teacher gpt-3.5-turbo" in out
        assert re.search(r"teacher summaries: 40 requests \(0 more answered by the cache\), ~[\d,]+ prompt tokens, "
                         r"~960 completion tokens \(at most 960\): ~\$[\d.]+ \(at most \$[\d.]+\)", out)
        assert ("through the Batch API (half price)" in out) == (batch == "1")
        costs.append(float(re.search(r": ~\$([\d.]+)", out).group(1)))
    assert costs[0] > 0 and abs(costs[1] - costs[0] / 2) <= 0.0001
    assert sum(server.calls.values()) == 0 and not (data / "train_aspect_preference_summary.pkl").exists()
    env = pipeline_env(tiny_model, None, TEACHER_MODEL="gpt-4o-mini")  # no key needed to price a step
    out = run(SUMMARIES, "--limit", "40", "--dry_run", cwd=workspace, env={**env, "OPENAI_API_KEY": ""}).stdout
    assert "gpt-4o-mini" in out and "40 requests" in out
    server.close()


def test_the_estimate_skips_cached_answers_and_the_report_prices_the_tokens(tmp_path, env, capsys, monkeypatch):
    server, cache = TeacherServer(), tmp_path / "cache.sqlite"
    env(server)
    teacher = Teacher(cache)
    teacher.ask(PROMPTS[:5], temperature=0.2)
    u = teacher.usage
    price = (u["prompt_tokens"] * 0.5 + u["completion_tokens"] * 1.5) / 1e6
    assert f"${price:,.4f} at list prices" in teacher.report()
    with pytest.raises(SystemExit) as done:
        Teacher(cache, dry_run=True).ask(PROMPTS, temperature=0.2, desc="summaries")
    out = capsys.readouterr().out
    assert done.value.code == 0 and "summaries: 7 requests (5 more answered by the cache)" in out
    assert "the mean of the 5 answers in the cache" in out and server.received == 5
    monkeypatch.setenv("TEACHER_MODEL", "my-model")
    assert "cost unknown (no price for my-model: give one in TEACHER_PRICES)" in Teacher(cache).report()
    monkeypatch.setenv("TEACHER_PRICES", '{"my-model": [1.0, 2.0]}')
    assert Teacher(cache).price() == (1.0, 2.0)
    (tmp_path / "prices.json").write_text('{"gpt-4o-mini": [10, 20]}')
    monkeypatch.setenv("TEACHER_PRICES", str(tmp_path / "prices.json"))
    monkeypatch.setenv("TEACHER_MODEL", "gpt-4o-mini-2024-07-18")
    assert Teacher(cache).price() == (10.0, 20.0)
    monkeypatch.setenv("TEACHER_PRICES", "{not json")
    with pytest.raises(SystemExit, match="^error: TEACHER_PRICES must be a JSON file or inline JSON"):
        Teacher(cache)
    server.close()


# ------------------------------------------------------------------------------------------ the reason filter
def test_the_reason_filter_sends_one_batch_per_round_with_the_same_result(finished, tmp_path, tiny_model):
    root = finished[0]
    output = "distilling_high_quality_reasons.pkl"
    work = tmp_path / "w"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("*.sqlite*", output, "distilling_report.json"))
    server = TeacherServer()
    env = pipeline_env(tiny_model, server, TEACHER_BATCH="1", TEACHER_BATCH_POLL="0.02")

    # --dry_run prices every round before any model is loaded: it runs even without the reward model.
    reward_model = work / "checkpoints" / DATASET / "reason_reward_model"
    reward_model.rename(tmp_path / "reward_model")
    out = run(REASONS, *FAST["GEN_ARGS"].split(), "--dry_run", cwd=work, env=env).stdout
    assert "teacher reasons, attempt 0: " in out and "teacher reasons, attempt 10 (at most): " in out
    assert "all of the above: " in out and sum(server.calls.values()) == 0
    (tmp_path / "reward_model").rename(reward_model)

    run(REASONS, *FAST["GEN_ARGS"].split(), cwd=work, env=env)
    report = json.loads((work / "Data" / DATASET / "distilling_report.json").read_text())
    rounds = len(report["accepted_per_attempt"])
    assert [b["metadata"]["step"] for b in server.batches.values()] == \
        [f"teacher reasons, attempt {a}" for a in range(rounds)]
    assert server.received == 0 and server.repeated == 0
    assert (work / "Data" / DATASET / output).read_bytes() == (root / "Data" / DATASET / output).read_bytes()
    server.close()
