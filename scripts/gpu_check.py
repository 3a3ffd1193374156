"""The GPU proof in one call: the pipeline's own numbered scripts through Unsloth in 4-bit on a CUDA GPU, and the
Unsloth-against-transformers benchmark, each step timed, with its peak GPU memory and with how its model was really
loaded (`llm.LOADS`: what `llm.load_base` reports for every base model it loads).

    python scripts/gpu_check.py [--out DIR] [--work DIR] [--size auto|tiny|1b] [--optional valid,grpo,evaluate]
    (on the GPU machine: bash scripts/gpu_check.sh, which first unpacks the carried bundle)

Two processes, so that no step pays Unsloth's import (about 40 s on the GPU machine) but once:
  prep  (transformers, REASON4REC_BACKEND=hf, not quantized: the fast path, not what is checked)  builds the random
        model (`--size`: 1b, Llama-3.2-1B's shape, on a GPU; tiny elsewhere), prepares a slice of 40 users of the real
        Musical Instruments reviews and runs stages 1 and 2 up to the Reasoner's training, with tiny settings;
  main  (the backend as configured: Unsloth where installed; 4-bit on a CUDA GPU, as every step's default) imports
        llm once while prep runs, then runs the steps the proof needs (`required`): 2_Reasoner/7 (test and valid),
        3_Predictor/1 (with and without reasons), 3_Predictor/2 (Predictor and Direct_Predictor), 3_Predictor/3 (test,
        with and without reasons), then benchmarks/unsloth_vs_hf.py (one process per backend, its design), then the
        `--optional` groups: valid (3_Predictor/3 on the validation rows), grpo (4_GRPO/1-3), evaluate
        (3_Predictor/4_evaluate.py, only where scikit-surprise and matplotlib are installed: the GPU machine has
        neither, so there it is left to the CPU).
Each script runs in the process as `python script args` would run it (runpy, run_name "__main__", its own sys.argv);
a *_train.sh is run as the Python command it would exec.  NUM_GPUS must stay unset (one process).

Writes to --out (default: $OUT, else ./gpu_check_out): steps.tsv (one row per step: its start and wall time, peak GPU
memory allocated by the process (torch) and used on the whole device (nvidia-smi, sampled every 250 ms; during prep it
also shows main's import), the backend, 4-bit and device of every model it loaded, whether the proof requires it, and
its status), unsloth_vs_hf.json, prep.log, summary.md (printed), which ends with the verdict: "GPU proof: yes" only if
every required step ran, on a CUDA device, with the expected backend (unsloth; hf for the benchmark's HF side) and in
4-bit, as llm.LOADS reports; otherwise "GPU proof: no — why".
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASET = "gpu_check"
COLUMNS = ["step", "command", "process", "start_s", "wall_s", "peak_alloc_MiB", "peak_smi_MiB", "backend", "in_4bit",
           "device", "loads", "required", "expect", "status"]
# Sizes per model: the 1B model on a GPU; the tiny one on a CPU, where only the code path is checked.
SETTINGS = {
    "1b": dict(gen="--max_new_tokens 32 --batch_size 32",
               train="--max_steps 2 --per_device_train_batch_size 4 --save_strategy no",
               prep_train="--max_steps 1 --per_device_train_batch_size 4 --save_strategy no",
               grpo="--max_steps 2 --num_generations 4 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 "
                    "--max_completion_length 32 --mask_truncated_completions false --save_strategy no "
                    "--per_device_eval_batch_size 32 --max_new_tokens 32",
               bench="--steps 12 --batch_size 4 --words 400"),
    "tiny": dict(gen="--max_new_tokens 12 --batch_size 16",
                 train="--max_steps 2 --per_device_train_batch_size 4 --max_len 2048 --save_strategy no",
                 prep_train="--max_steps 1 --per_device_train_batch_size 4 --max_len 2048 --save_strategy no",
                 grpo="--max_steps 2 --num_generations 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 "
                      "--max_completion_length 8 --mask_truncated_completions false --save_strategy no "
                      "--per_device_eval_batch_size 16 --max_new_tokens 12",
                 bench="--steps 4 --batch_size 2 --words 60"),
}


# ---------------------------------------------------------------------------------------------- the step list
def prep_steps(s: dict, raw: str) -> list[dict]:
    """Stages 1-2 up to the Reasoner's training, by the transformers path without 4-bit (their outputs are what the
    required steps read; stages 1-2 through Unsloth in 4-bit were seen on an H200 before, README)."""
    gen, train = f"{s['gen']} --load_in_4bit false", f"{s['prep_train']} --load_in_4bit false"
    return [
        step("prepare a slice of 40 users", "Data/prepare_data.py",
             f"--input {raw} --dataset {DATASET} --max_users 40 --max_his 5"),
        step("Summarizer 1: teacher summaries (local teacher)", "1_Summarizer/1_distilling_aspect_preference_summary.py",
             "--sample 8"),
        step("Summarizer 2: SFT data", "1_Summarizer/2_construct_summarizer_train_data.py"),
        step("Summarizer 3: train", "1_Summarizer/3_summarizer_train.sh", train),
        step("Summarizer 4: summarize all training reviews", "1_Summarizer/4_summarizer_generation.py", gen),
        step("Reasoner 1: sample targets", "2_Reasoner/1_sample_train_data.py"),
        step("Reasoner 2: reward-model SFT data", "2_Reasoner/2_construct_reward_train_data.py"),
        step("Reasoner 3: train the reward model", "2_Reasoner/3_reward_model_train.sh", train),
        step("Reasoner 4: distill and filter reasons", "2_Reasoner/4_distilling_possible_reason.py",
             f"{gen} --max_sample_num 2"),
        step("Reasoner 5: SFT data", "2_Reasoner/5_construct_reasoner_train_data.py"),
        step("Reasoner 6: train", "2_Reasoner/6_reasoner_train.sh", train),
    ]


def main_steps(s: dict, optional: set[str]) -> list[dict]:
    gen, train = s["gen"], s["train"]
    steps = [
        step("Reasoner 7: reasons for the test set", "2_Reasoner/7_generate_reason_for_test.py", gen, required=True),
        step("Reasoner 7: reasons for the validation rows", "2_Reasoner/7_generate_reason_for_test.py",
             f"--split valid {gen}", required=True),
        step("Predictor 1: SFT data", "3_Predictor/1_construct_predictor_train_data.py", gen, required=True),
        step("Predictor 1: SFT data, no reason", "3_Predictor/1_construct_predictor_train_data.py", "--no_reason",
             required=True, expect=None),  # reads and writes data only: it loads no model
        step("Predictor 2: train", "3_Predictor/2_predictor_train.sh", train, required=True),
        step("Predictor 2: train, no reason", "3_Predictor/2_predictor_train.sh", train, env={"NAME": "Direct_Predictor"},
             required=True),
        step("Predictor 3: rate the test rows", "3_Predictor/3_generate_predict_for_test.py", f"--split test {gen}",
             required=True),
        step("Predictor 3: rate the test rows, no reason", "3_Predictor/3_generate_predict_for_test.py",
             f"--no_reason --split test {gen}", required=True),
        step("benchmark: Unsloth vs transformers", "benchmarks/unsloth_vs_hf.py", s["bench"], required=True),
    ]
    if "valid" in optional:
        steps += [step("Predictor 3: rate the valid rows", "3_Predictor/3_generate_predict_for_test.py",
                       f"--split valid {gen}"),
                  step("Predictor 3: rate the valid rows, no reason", "3_Predictor/3_generate_predict_for_test.py",
                       f"--no_reason --split valid {gen}")]
    if "grpo" in optional:
        steps += [step("GRPO 1: refine the Reasoner", "4_GRPO/1_reasoner_grpo_train.sh", s["grpo"]),
                  step("GRPO 2: reasons for the test rows", "4_GRPO/2_generate_reason_for_test.py", f"--split test {gen}"),
                  step("GRPO 3: rate the test rows", "4_GRPO/3_generate_predict_for_test.py", f"--split test {gen}")]
    if "evaluate" in optional:
        steps.append(step("Evaluate: ratings", "3_Predictor/4_evaluate.py", needs=("surprise", "matplotlib")))
    return steps


def step(name, script, args="", *, env=None, required=False, expect="unsloth", needs=()) -> dict:
    return dict(name=name, script=script, args=args.split(), env=env or {}, required=required,
                expect=expect if required else None, needs=needs)


# ---------------------------------------------------------------------------------------------- running a step
def command_of(entry: dict, work: Path) -> list[str]:
    """The Python command line (script first) that the step runs: a *_train.sh's is what it would exec, read by
    running it with $PYTHON set to a program that prints its arguments."""
    script = str(REPO / entry["script"])
    if not script.endswith(".sh"):
        return [script, *entry["args"]]
    shim = work / "print_argv.sh"
    if not shim.exists():
        shim.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
        shim.chmod(0o755)
    done = subprocess.run(["bash", script, *entry["args"]], env={**os.environ, **entry["env"], "PYTHON": str(shim)},
                          capture_output=True, text=True, check=True)
    return done.stdout.split("\0")[:-1]


def run_step(entry: dict, work: Path, process: str) -> dict:
    """Run one step in this process, as `python script args` would; its row."""
    import torch

    import llm

    missing = [m for m in entry["needs"] if not importlib.util.find_spec(m)]
    row = dict(step=entry["name"], command=" ".join([entry["script"], *entry["args"]]), process=process,
               required="yes" if entry["required"] else "no", expect=entry["expect"] or "-", loads=[])
    if missing:
        print(f"\n== {entry['name']}: skipped ({', '.join(missing)} not installed: left to the CPU)", flush=True)
        return {**row, "start": time.time(), "end": time.time(), "status": f"skipped: no {', '.join(missing)}"}
    argv = command_of(entry, work)
    print(f"\n== {entry['name']}: {' '.join(argv)}", flush=True)
    saved_argv, saved_env = sys.argv, dict(os.environ)
    os.environ.update(entry["env"])
    sys.argv = argv
    n_loads = len(llm.LOADS)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start, status = time.time(), "ok"
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (None, 0):
            status = f"failed: {stop.code}"
    except Exception as error:  # noqa: BLE001  (recorded, and the check goes on)
        traceback.print_exc()
        status = f"failed: {type(error).__name__}: {error}"
    end = time.time()
    sys.argv = saved_argv
    os.environ.clear()
    os.environ.update(saved_env)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    status = " ".join(str(status).split())[:300]
    print(f"== {entry['name']}: {status}, {end - start:.1f} s", flush=True)
    return {**row, "start": start, "end": end, "peak_alloc": peak, "loads": llm.LOADS[n_loads:], "status": status}


def benchmark_row(entry: dict, work: Path, out: Path, process: str) -> list[dict]:
    """benchmarks/unsloth_vs_hf.py, as a command (it runs each backend in its own process): a row per backend, from
    what each child reports of its load."""
    command = [sys.executable, str(REPO / entry["script"]), "--model_path", str(work / "model"), *entry["args"],
               "--out", str(work / "bench"), "--json", str(out / "unsloth_vs_hf.json")]
    print(f"\n== {entry['name']}: {' '.join(command)}", flush=True)
    start = time.time()
    with open(out / "unsloth_vs_hf.txt", "w") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.write(done.stdout)
    print(done.stdout, flush=True)
    report = json.loads((out / "unsloth_vs_hf.json").read_text()) if (out / "unsloth_vs_hf.json").exists() else {}
    rows = []
    for backend in ("unsloth", "hf"):
        r = report.get("results", {}).get(backend)
        failed = report.get("failed", {}).get(backend)
        base = dict(step=f"benchmark: {backend} side", command=" ".join([entry["script"], *entry["args"]]),
                    process=f"{process}/child", required="yes", expect=backend)
        if r:
            rows.append({**base, "start": r["start"], "end": r["end"],
                         "peak_alloc": r["peak_memory_gib"] * 1024 if r["memory_kind"].startswith("GPU") else None,
                         "loads": [{"backend": r["loaded_backend"], "in_4bit": r["in_4bit"], "device": r["device"]}],
                         "status": "ok"})
        else:
            why = (failed or {}).get("error") or done.stdout
            last = ([line for line in why.splitlines() if line.strip()] or [f"exit {done.returncode}"])[-1]
            rows.append({**base, "start": (failed or {}).get("start", start), "end": (failed or {}).get("end", time.time()),
                         "loads": [], "status": f"failed: {last.strip()}"})
    return rows


# ---------------------------------------------------------------------------------------------- the two processes
def prep(args, out: Path, work: Path):
    """The prep process: model, data, stages 1-2 (transformers); its rows to prep_steps.jsonl."""
    import torch

    import llm

    rows_file = out / "prep_steps.jsonl"
    size = resolve_size(args.size)

    def record(row):
        with open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    start = time.time()
    from scripts.build_random_llama import build

    build(work / "model", size, device="cuda" if torch.cuda.is_available() else "cpu")
    record(dict(step=f"build the random {size} Llama", command="scripts/build_random_llama.py", process="prep",
                start=start, end=time.time(), peak_alloc=torch.cuda.max_memory_allocated() / 2**20
                if torch.cuda.is_available() else None, loads=[], required="no", expect="-", status="ok"))
    for entry in prep_steps(SETTINGS[size], args.reviews):
        row = run_step(entry, work, "prep")
        record(row)
        if not row["status"].startswith("ok"):
            sys.exit(f"prep: {entry['name']} {row['status']}")
    print(f"prep: done; backend {llm.backend()}", flush=True)


def resolve_size(size: str) -> str:
    import torch

    return size if size != "auto" else "1b" if torch.cuda.is_available() else "tiny"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument("--work", help="working folder (Data/, checkpoints/, the model); default: a new temporary one")
    parser.add_argument("--size", default="auto", choices=["auto", *SETTINGS], help="auto: 1b with CUDA, else tiny")
    parser.add_argument("--optional", default="", help="comma-separated groups beyond the proof: valid, grpo, evaluate")
    parser.add_argument("--reviews", help="the review file (default: $REVIEWS_FILE, else ../shared/data's)")
    parser.add_argument("--since", type=float, help="epoch time the check began (gpu_check.sh: before unpacking)")
    parser.add_argument("--prep_backend", default="hf", help="REASON4REC_BACKEND of the prep process")
    parser.add_argument("--part", default="main", choices=["main", "prep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = args.since or time.time()
    sys.path.insert(0, str(REPO))
    os.chdir(work)
    if args.part == "prep":
        return prep(args, out, work)

    if os.environ.get("NUM_GPUS", "1") not in ("", "1"):
        sys.exit("gpu_check: leave NUM_GPUS unset: every step runs in this one process")
    from scripts.demo_reviews import reviews_file

    args.reviews = str(Path(args.reviews or reviews_file()).resolve())
    if not Path(args.reviews).exists():
        sys.exit(f"gpu_check: the review file {args.reviews} is not here (carry it in .gpu/, see gpu_check.sh)")
    os.environ.update(DATASET=DATASET, MODEL_PATH=str(work / "model"), TEACHER="local",
                      TEACHER_MODEL_PATH=str(work / "model"), TEACHER_MAX_TOKENS="32", TEACHER_BATCH_SIZE="32",
                      HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for stale in ("prep_steps.jsonl", "steps.tsv", "summary.md", "unsloth_vs_hf.json", "unsloth_vs_hf.txt"):
        (out / stale).unlink(missing_ok=True)
    sampler = None
    if shutil.which("nvidia-smi"):
        sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,memory.used", "--format=csv,noheader,nounits",
                                    "-lms", "250"], stdout=open(out / "gpu_memory.csv", "w"), stderr=subprocess.DEVNULL)
    forward = ["--out", str(out), "--work", str(work), "--size", args.size, "--reviews", args.reviews, "--since", str(t0)]
    print(f"gpu_check: working in {work}; prep (stages 1-2, REASON4REC_BACKEND={args.prep_backend}) runs in its own "
          f"process, its output in {out / 'prep.log'}", flush=True)
    prep_process = subprocess.Popen([sys.executable, __file__, "--part", "prep", *forward],
                                    env={**os.environ, "REASON4REC_BACKEND": args.prep_backend},
                                    stdout=open(out / "prep.log", "w"), stderr=subprocess.STDOUT)

    # Meanwhile, this process imports what every step needs, Unsloth first (through llm) where installed.
    start = time.time()
    import llm  # noqa: F401
    import torch
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401

    import qlora_finetune  # noqa: F401
    import training  # noqa: F401

    if torch.cuda.is_available():
        torch.cuda.init()
    rows = [dict(step=f"import llm ({llm.backend()}), trl, datasets, peft", command="-", process="main", start=start,
                 end=time.time(), loads=[], required="no", expect="-", status="ok")]
    print(f"gpu_check: imported llm ({llm.backend()}) in {time.time() - start:.1f} s; waiting for prep", flush=True)
    code = prep_process.wait()
    prep_rows = [json.loads(line) for line in open(out / "prep_steps.jsonl")] if (out / "prep_steps.jsonl").exists() else []
    rows = prep_rows + rows
    if code:
        print(f"gpu_check: prep failed (exit {code}); the end of {out / 'prep.log'}:\n"
              + (out / "prep.log").read_text()[-4000:], flush=True)
    size = resolve_size(args.size)
    planned = main_steps(SETTINGS[size], {g for g in args.optional.split(",") if g})

    def not_run(entry, why):
        return dict(step=entry["name"], command=entry["script"], process="main", start=time.time(), end=time.time(),
                    loads=[], required="yes" if entry["required"] else "no", expect=entry["expect"] or "-",
                    status=f"not run: {why}")

    def report(rows, pending=()):
        """steps.tsv and summary.md as they stand: written after every step, so that a check cut short by the
        call's time limit still brings back what it did, and says what it did not."""
        rows = rows + [not_run(e, "the check stopped before it") for e in pending]
        steps = table(rows, out, t0)  # one reading of the memory samples for both files
        write_steps(steps, out)
        summary = summarize(rows, steps, out, t0, size, since=bool(args.since))
        (out / "summary.md").write_text(summary)
        return summary

    report(rows, planned)
    for i, entry in enumerate(planned):
        if code:
            rows.append(not_run(entry, "prep failed"))
        elif entry["script"].startswith("benchmarks/"):
            rows += benchmark_row(entry, work, out, "main")
        else:
            rows.append(run_step(entry, work, "main"))
        report(rows, planned[i + 1:])
    if sampler:
        sampler.terminate()
    print("\n" + report(rows), flush=True)


# ---------------------------------------------------------------------------------------------- the report
def smi_samples(out: Path) -> list[tuple[float, float]]:
    samples = []
    if (out / "gpu_memory.csv").exists():
        for line in csv.reader(open(out / "gpu_memory.csv")):
            try:
                stamp = datetime.datetime.strptime(line[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                samples.append((stamp, float(line[1])))
            except (ValueError, IndexError):
                continue
    return samples


def table(rows: list[dict], out: Path, t0: float) -> list[dict]:
    samples = smi_samples(out)
    lines = []
    for r in rows:
        loads = r.get("loads") or []
        smi = max((m for t, m in samples if r["start"] - 0.25 <= t <= r["end"] + 0.25), default=None)
        peak = r.get("peak_alloc")
        lines.append(dict(
            step=r["step"], command=r["command"], process=r["process"], start_s=f"{r['start'] - t0:.1f}",
            wall_s=f"{r['end'] - r['start']:.1f}", peak_alloc_MiB="-" if peak is None else f"{peak:.0f}",
            peak_smi_MiB="-" if smi is None else f"{smi:.0f}",
            backend="+".join(sorted({x["backend"] for x in loads})) or "-",
            in_4bit="+".join(sorted({"yes" if x["in_4bit"] else "no" for x in loads})) or "-",
            device="+".join(sorted({x["device"] for x in loads})) or "-", loads=str(len(loads)),
            required=r["required"], expect=r["expect"], status=r["status"]))
    return lines


def write_steps(steps: list[dict], out: Path):
    with open(out / "steps.tsv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(steps)
    os.replace(out / "steps.tsv.tmp", out / "steps.tsv")


def verdict(rows: list[dict]) -> str:
    """"GPU proof: yes" only if every required step ran, each of its model loads with the expected backend, in 4-bit,
    on a CUDA device (as llm.load_base reported it)."""
    import torch

    problems: dict[str, list[str]] = {}
    for r in rows:
        if r["required"] != "yes":
            continue
        why = []
        if r["status"] != "ok":
            why.append(r["status"] if r["status"].startswith("not run") else f"{r['step']} {r['status']}")
        elif r["expect"] != "-":
            loads = r.get("loads") or []
            if not loads:
                why.append("loaded no model")
            why += [f"backend {x['backend']}, not {r['expect']}" for x in loads if x["backend"] != r["expect"]]
            why += ["not in 4-bit" for x in loads if not x["in_4bit"]]
            why += [f"ran on {x['device']}, not a CUDA device" for x in loads if not x["device"].startswith("cuda")]
        for w in dict.fromkeys(why):
            problems.setdefault(w, []).append(r["step"])
    required = [r["step"] for r in rows if r["required"] == "yes"]
    if not problems and torch.cuda.is_available() and required:
        return f"GPU proof: yes — all {len(required)} required steps ran on CUDA through the expected backend in 4-bit"
    loading = [r["step"] for r in rows if r["required"] == "yes" and r.get("loads")]

    def which(reason, steps):
        if len(steps) == 1 and reason.startswith(steps[0]):  # a failure names its step
            return reason
        return f"{reason} (every required step that loaded a model: {len(steps)})" if steps == loading else \
            f"{reason} ({', '.join(steps)})"

    head = [] if torch.cuda.is_available() else ["no CUDA device"]
    return "GPU proof: no — " + "; ".join(head + [which(reason, steps) for reason, steps in problems.items()])


def summarize(rows: list[dict], steps: list[dict], out: Path, t0: float, size: str, since: bool) -> str:
    import torch

    import llm

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    else:
        device = f"no CUDA device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    versions = []
    for package in ("torch", "transformers", "peft", "trl", "unsloth", "bitsandbytes"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"no {package}")
    lines = [f"# GPU check, {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
             f"Device: {device}. Python {platform.python_version()}, {', '.join(versions)}; main backend "
             f"{llm.backend()}; model: random {size} Llama. Whole check {time.time() - t0:.0f} s"
             f"{' (since gpu_check.sh began: the unpacking included)' if since else ''}.", "",
             "| step | process | start (s) | wall (s) | peak GPU allocated (MiB) | peak GPU used, device (MiB) | backend "
             "| 4-bit | device | required | status |",
             "|---|---|---:|---:|---:|---:|---|---|---|---|---|"]
    for r in steps:
        lines.append(f"| {r['step']} | {r['process']} | {r['start_s']} | {r['wall_s']} | {r['peak_alloc_MiB']} | "
                     f"{r['peak_smi_MiB']} | {r['backend']} | {r['in_4bit']} | {r['device']} | {r['required']} | "
                     f"{r['status']} |")
    report = json.loads((out / "unsloth_vs_hf.json").read_text()) if (out / "unsloth_vs_hf.json").exists() else None
    lines.append("")
    if report and report.get("unsloth_over_hf"):
        ratio = report["unsloth_over_hf"]
        u, h = report["results"]["unsloth"], report["results"]["hf"]
        lines += [f"Benchmark ({report['settings']['steps']} LoRA steps of {report['settings']['batch_size']} sequences, "
                  f"about {u['tokens_per_sequence']:.0f} tokens each, the first 2 steps left out of the timing): "
                  f"Unsloth {u['sequences_per_step'] / u['steady_step_s']:.2f} sequences/s, peak "
                  f"{u['peak_memory_gib']:.2f} GiB; transformers + PEFT {h['sequences_per_step'] / h['steady_step_s']:.2f}"
                  f" sequences/s, peak {h['peak_memory_gib']:.2f} GiB ({u['memory_kind']}). Unsloth / HF: "
                  f"{ratio['sequences_per_s']:.2f}x the sequences per second, {ratio['peak_memory']:.2f}x the peak "
                  f"memory."]
        disagree = [what for what, bad in (("not faster", ratio["sequences_per_s"] <= 1.0),
                                           ("not less memory", ratio["peak_memory"] >= 1.0)) if bad]
        if not torch.cuda.is_available():
            lines.append("(On a CPU, without 4-bit: not the setting of Unsloth's claim, faster and less memory on a "
                         "GPU; this ratio says nothing about it.)")
        elif disagree:
            lines.append(f"This disagrees with Unsloth's claim (faster, less memory): here {' and '.join(disagree)}.")
    else:
        lines.append("Benchmark: no ratio (see unsloth_vs_hf.txt).")
    skipped = [r["step"] for r in rows if r["status"].startswith("skipped")]
    if skipped:
        lines.append(f"Skipped here (left to the CPU): {', '.join(skipped)}.")
    lines += ["", verdict(rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
