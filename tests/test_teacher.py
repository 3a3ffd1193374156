"""The teacher: the real openai client against a local OpenAI-protocol server, retries, the cache, settings."""
import shutil

import pytest
from safetensors.torch import load_file, save_file

from teacher import Teacher
from teacher_server import TeacherServer, teacher_answer

PROMPTS = [f"Task: Summarize the reasons behind review {i}" for i in range(12)]


@pytest.fixture
def env(monkeypatch):
    def apply(server, **extra):
        for key, value in server.env(**{"TEACHER_MAX_RETRIES": "3", "TEACHER_TIMEOUT": "2", **extra}).items():
            monkeypatch.setenv(key, value)
    return apply


def test_answers_in_order_with_429_and_500_on_the_way(tmp_path, env):
    server = TeacherServer(faults=["429", "500", None, "500"])
    env(server)
    teacher = Teacher(tmp_path / "cache.sqlite")
    answers = teacher.ask(PROMPTS, temperature=0.2)
    assert answers == [teacher_answer(p, 0.2, 0) for p in PROMPTS]
    assert server.received == len(PROMPTS) + 3  # three retried requests
    assert sum(server.calls.values()) == server.received  # nothing but chat completions (no Batch API needed)
    assert teacher.usage["requests"] == len(PROMPTS) and teacher.usage["completion_tokens"] > 0
    server.close()


def test_cache_makes_a_rerun_issue_zero_requests(tmp_path, env):
    server = TeacherServer()
    env(server)
    first = Teacher(tmp_path / "cache.sqlite").ask(PROMPTS, temperature=0.2)
    received = server.received
    again = Teacher(tmp_path / "cache.sqlite")
    assert again.ask(PROMPTS, temperature=0.2) == first
    assert server.received == received and again.usage["cached"] == len(PROMPTS)
    # A different temperature or sample number is a different request: asked for, once.
    again.ask(PROMPTS[:2], temperature=1.0, samples=[3, 4])
    assert server.received == received + 2 and server.repeated == 0
    server.close()


def test_distinct_samples_of_one_prompt_are_distinct_requests(tmp_path, env):
    server = TeacherServer()
    env(server)
    prompt = "Analyze whether the user will like the new Musical Instruments item"
    answers = Teacher(tmp_path / "c.sqlite").ask([prompt] * 4, temperature=1.0, samples=[0, 1, 2, 3])
    assert server.received == 4 and len(set(answers)) > 1
    server.close()


def test_missing_key_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("TEACHER", "openai")
    with pytest.raises(SystemExit, match="OPENAI_API_KEY"):
        Teacher(tmp_path / "cache.sqlite")
    assert not (tmp_path / "cache.sqlite").exists()


def test_local_teacher_needs_a_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER", "local")
    monkeypatch.delenv("TEACHER_MODEL_PATH", raising=False)
    with pytest.raises(SystemExit, match="TEACHER_MODEL_PATH"):
        Teacher(tmp_path / "cache.sqlite")


def test_local_teacher_generates_and_caches(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("TEACHER", "local")
    monkeypatch.setenv("TEACHER_MODEL_PATH", tiny_model)
    monkeypatch.setenv("TEACHER_MAX_TOKENS", "8")
    teacher = Teacher(tmp_path / "cache.sqlite")
    answers = teacher.ask(PROMPTS[:3], temperature=1.0, samples=[0, 1, 1])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert teacher.usage["requests"] == 3
    again = Teacher(tmp_path / "cache.sqlite")
    assert again.ask(PROMPTS[:3], temperature=1.0, samples=[0, 1, 1]) == answers
    assert again.usage["requests"] == 0 and again._local is None  # not even loaded


@pytest.mark.parametrize("fault, cause", [("empty", "the answer was empty"), ("malformed", "JSONDecodeError"),
                                          ("no_choices", "the answer was empty")])
def test_bad_answers_are_asked_again_then_fail_naming_the_row(tmp_path, env, fault, cause):
    """An empty or unreadable answer is asked for again twice (three requests in all), then the step fails naming the
    row and the cause."""
    server = TeacherServer(faults=[fault] * 3)
    env(server, TEACHER_CONCURRENCY="1")
    teacher = Teacher(tmp_path / "cache.sqlite")
    with pytest.raises(SystemExit) as failure:
        teacher.ask(PROMPTS[:1], temperature=0.2, labels=["first"])
    assert f"teacher request for row first failed: {cause}" in str(failure.value)
    assert server.received == 3 and len(teacher.cache) == 0
    server.faults = [fault]  # once, then a good answer: recovered without an error
    assert teacher.ask(PROMPTS[1:2], temperature=0.2) == [teacher_answer(PROMPTS[1], 0.2, 0)]
    assert server.received == 5
    server.close()


def test_failure_keeps_what_was_answered_and_hides_the_key(tmp_path, env):
    server = TeacherServer()
    env(server, TEACHER_CONCURRENCY="1", TEACHER_MAX_RETRIES="1")
    teacher = Teacher(tmp_path / "cache.sqlite")
    teacher.ask(PROMPTS[:3], temperature=0.2)
    server.faults = ["500"] * 10
    with pytest.raises(SystemExit) as failure:
        teacher.ask(PROMPTS[:5], temperature=0.2, labels=[f"r{i}" for i in range(5)])
    message = str(failure.value)
    assert "r3" in message and "InternalServerError" in message and "sk-test" not in message
    assert len(teacher.cache) == 3
    server.close()


def test_the_cache_key_holds_the_endpoint_and_a_local_teachers_weights(tmp_path, env, monkeypatch, tiny_model):
    server, other, cache = TeacherServer(), TeacherServer(), tmp_path / "cache.sqlite"
    env(server)
    Teacher(cache).ask(PROMPTS[:3], temperature=0.2)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/")  # the same endpoint, written otherwise
    Teacher(cache).ask(PROMPTS[:3], temperature=0.2)
    monkeypatch.setenv("OPENAI_BASE_URL", other.url)  # another endpoint, maybe another model behind the same name
    Teacher(cache).ask(PROMPTS[:3], temperature=0.2)
    assert server.received == 3 and other.received == 3

    model = tmp_path / "teacher"
    shutil.copytree(tiny_model, model)
    monkeypatch.setenv("TEACHER", "local")
    monkeypatch.setenv("TEACHER_MAX_TOKENS", "8")
    (tmp_path / "link").symlink_to(model)
    for path, new in [(model, 2), (tmp_path / "link", 0), (f"{model}/", 0), ("retrained", 2)]:
        if path == "retrained":  # other weights in the same folder
            weights = load_file(model / "model.safetensors")
            save_file({name: w + 0.01 for name, w in weights.items()}, model / "model.safetensors",
                      metadata={"format": "pt"})
            path = model
        monkeypatch.setenv("TEACHER_MODEL_PATH", str(path))
        teacher = Teacher(cache)
        teacher.ask(PROMPTS[:2], temperature=0.0)
        assert teacher.usage["requests"] == new, path
    server.close(), other.close()
