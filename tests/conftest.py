"""Shared test fixtures: a tiny random Llama, a local OpenAI-protocol teacher, a slice of the real data, and a way
to run the pipeline's scripts exactly as a user does (as subprocesses, from a working folder)."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from teacher_server import TeacherServer  # noqa: E402

REAL_DATA = REPO / "tests" / "fixtures" / "reviews_Musical_Instruments_5.60users.json.gz"  # see make_review_slice.py
DATASET = "mi"


def environment(extra=None) -> dict:
    """The environment of a step run by a test: this one, with this Python for the bash scripts too."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(extra or {})}


def run(*command, cwd=REPO, env=None, check=True, timeout=900) -> subprocess.CompletedProcess:
    """Run a pipeline step (a repository path: .py with this Python, .sh with bash) and return what it printed."""
    script, *rest = (str(c) for c in command)
    program = [sys.executable] if script.endswith(".py") else ["bash"] if script.endswith(".sh") else []
    path = str(REPO / script) if program else script
    result = subprocess.run(program + [path, *rest], cwd=cwd, env=environment(env), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(rest)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from scripts.build_random_llama import build

    return build(tmp_path_factory.mktemp("models") / "tiny-llama", "tiny")


@pytest.fixture
def teacher_server():
    server = TeacherServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def real_slice(tmp_path_factory) -> Path:
    """Data/<DATASET>/ prepared from the committed slice of the real Musical Instruments reviews (60 users)."""
    root = tmp_path_factory.mktemp("prepared")
    run("Data/prepare_data.py", "--input", REAL_DATA, "--dataset", DATASET, cwd=root)
    return root / "Data" / DATASET


@pytest.fixture
def workspace(tmp_path, real_slice, tiny_model) -> Path:
    """A working folder holding Data/<DATASET>/ (a fresh copy of the real slice), to run the scripts from."""
    shutil.copytree(real_slice, tmp_path / "Data" / DATASET)
    return tmp_path


FAST = {"TRAIN_ARGS": "--max_steps 2 --per_device_train_batch_size 4 --max_len 2048",
        "GEN_ARGS": "--max_new_tokens 12 --batch_size 16",
        "GRPO_ARGS": "--max_steps 2 --num_generations 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 "
                     "--max_completion_length 8 --mask_truncated_completions false --save_strategy steps "
                     "--save_steps 1 --per_device_eval_batch_size 16 --max_new_tokens 12"}


def full_run(root: Path, real_slice: Path, model: str, **env) -> tuple[Path, str, TeacherServer]:
    """run_all.sh on the tiny model, with the HTTP teacher, in `root`: (root, what it printed, the server)."""
    shutil.copytree(real_slice, root / "Data" / DATASET)
    server = TeacherServer()
    result = run("run_all.sh", cwd=root, env=pipeline_env(model, server, **FAST, **env), timeout=1800)
    return root, result.stdout + result.stderr, server


@pytest.fixture(scope="session")
def finished(tmp_path_factory, real_slice, tiny_model):
    """One full pipeline run, shared by the tests that inspect its outputs."""
    root, out, server = full_run(tmp_path_factory.mktemp("pipeline"), real_slice, tiny_model)
    yield root, out, server
    server.close()


def pipeline_env(model: str, server: TeacherServer | None = None, **extra) -> dict:
    """The environment a pipeline step runs in: dataset, base model, teacher, small sizes for the tiny model."""
    env = {"DATASET": DATASET, "MODEL_PATH": model, "REASON4REC_BACKEND": "hf", "TEACHER_MAX_TOKENS": "24"}
    if server is not None:
        env.update(server.env())
    return {**env, **extra}


# ------------------------------------------------------------------------------------------------ interrupted training
def kill_training_after(script: str, args, work: Path, model: str, output: Path, checkpoint: int):
    """Start a *_train.sh in `work` and SIGKILL it once `output`/checkpoint-`checkpoint` is complete; leave the folder
    as a kill at that very moment leaves it (a later checkpoint the kill may have reached is removed)."""
    child = subprocess.Popen(["bash", str(REPO / script), *map(str, args)], cwd=work,
                             env=environment(pipeline_env(model)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    while not (output / f"checkpoint-{checkpoint}" / "trainer_state.json").exists():
        assert child.poll() is None, "training finished before it could be killed"
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    for later in output.glob("checkpoint-*"):
        if int(later.name.split("-")[1]) > checkpoint:
            shutil.rmtree(later)


def plant_in_log(checkpoint: Path):
    """Mark the last entry of a checkpoint's log history: a run resumed from that checkpoint carries the mark on."""
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][-1]["planted"] = checkpoint.name
    state_file.write_text(json.dumps(state, indent=2))


def cut_short(complete: Path, dest: Path):
    """A checkpoint as a kill while it is being saved leaves it: its weights, but not trainer_state.json (written
    last)."""
    shutil.copytree(complete, dest, ignore=shutil.ignore_patterns("trainer_state.json"))


def logged_steps(history: list) -> list:
    """The steps at which a run logged its training loss, in order, with "planted" where the planted mark is."""
    steps = []
    for entry in history:
        steps += [entry["step"]] * ("loss" in entry) + ["planted"] * ("planted" in entry)
    return steps


def file_hashes(*folders: Path) -> dict:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for folder in folders for f in sorted(folder.rglob("*"))
            if f.is_file()}
