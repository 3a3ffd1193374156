"""The GPU proof in one command: the pipeline's own numbered scripts through Unsloth in 4-bit on a CUDA GPU, the numbers
they compute compared with transformers', two GRPO steps, and the Unsloth-against-transformers training benchmark,
each step timed, with its peak GPU memory and with how its model was really loaded (`llm.LOADS`: what
`llm.load_base` reports for every base model it loads).

    python scripts/gpu_check.py [--out DIR] [--work DIR] [--size auto|tiny|1b] [--optional direct,valid,grpo,evaluate]
    (bash scripts/gpu_check.sh: the same, after unpacking the packages that a machine without a package registry lacks)

Two processes, one per backend, so that each is imported once (Unsloth's import alone takes about 40 s on an H100):
  prep  (transformers, REASON4REC_BACKEND=hf)  builds the random model (`--size`: 1b, Llama-3.2-1B's shape, on a GPU;
        tiny elsewhere) and a LoRA adapter of the experts' shape with random non-zero weights, prepares a slice of 40
        users of the real Musical Instruments reviews and runs stages 1 and 2 up to the Reasoner's training, with tiny
        settings and without 4-bit (the fast path: its outputs are what the required steps read); then transformers'
        side of what is compared: the values (scripts/backend_values.py on the random adapter, not quantized and in
        4-bit) and the training benchmark (benchmarks/unsloth_vs_hf.py --child), while main waits with the GPU idle;
  main  (the backend as configured: Unsloth where installed; 4-bit on a CUDA GPU, as every step's default) imports
        llm once while prep runs, then runs the steps the proof needs (`required`): Unsloth's side of the values, not
        quantized and in 4-bit, each compared with transformers' against scripts/backend_values.py's tolerances;
        2_Reasoner/7 (test and valid), 3_Predictor/1-3 (the test rows), 4_GRPO/1 (two steps of a few generations:
        the reward must not be zero throughout, the gradient norm must be finite), Unsloth's side of the benchmark;
        then the `--optional` groups: direct (3_Predictor/1-3 --no_reason, the authors' ablation: the same scripts on
        other data), valid (3_Predictor/3 on the validation rows), grpo (4_GRPO/2-3), evaluate
        (3_Predictor/4_evaluate.py, only where scikit-surprise and matplotlib are installed).
Each script runs in its process as `python script args` would run it (runpy, run_name "__main__", its own sys.argv);
a *_train.sh is run as the Python command it would exec.  NUM_GPUS must stay unset (one process).

Writes to --out (default: $GPU_CHECK_OUT, else ./gpu_check_out): steps.tsv (one row per step: its start and wall
time, peak GPU memory allocated by the process (torch) and used on the whole device (nvidia-smi, sampled every
250 ms; during prep it also shows main's import), the backend, 4-bit and device of every model it loaded and the ones the proof expects,
what it measured (the largest value differences, the GRPO rewards and gradient norms), and its status), values_*.json,
unsloth_vs_hf.json, prep.log, summary.md (printed), which ends with the verdict: "GPU proof: yes" only if every
required step ran, on a CUDA device, with the expected backend and precision as llm.LOADS reports them, every value
difference within its tolerance and the GRPO steps rewarded with finite gradients; otherwise "GPU proof: no — why".
"""
from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import importlib.metadata
import importlib.util
import json
import math
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
           "device", "loads", "required", "expect", "expect_4bit", "measured", "status"]
# Sizes per model: the 1B model on a GPU; the tiny one on a CPU, where only the code path is checked.
SETTINGS = {
    "1b": dict(gen="--max_new_tokens 32 --batch_size 32",
               train="--max_steps 2 --per_device_train_batch_size 4 --save_strategy no",
               prep_train="--max_steps 1 --per_device_train_batch_size 4 --save_strategy no",
               grpo="--max_steps 2 --num_generations 4 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 "
                    "--max_completion_length 32 --mask_truncated_completions false --save_strategy no "
                    "--per_device_eval_batch_size 32 --max_new_tokens 32",
               values="--n 8 --batch_size 4",
               bench="--steps 12 --batch_size 4 --words 400"),
    "tiny": dict(gen="--max_new_tokens 12 --batch_size 16",
                 train="--max_steps 2 --per_device_train_batch_size 4 --max_len 2048 --save_strategy no",
                 prep_train="--max_steps 1 --per_device_train_batch_size 4 --max_len 2048 --save_strategy no",
                 grpo="--max_steps 2 --num_generations 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 "
                      "--max_completion_length 8 --mask_truncated_completions false --save_strategy no "
                      "--per_device_eval_batch_size 16 --max_new_tokens 12",
                 values="--n 8 --batch_size 4",
                 bench="--steps 4 --batch_size 2 --words 60"),
}
QUANTIZATIONS = {"not quantized": "false", "4-bit": "true"}  # the values are compared both ways
SIDES = {"prep": "transformers side", "main": "Unsloth side"}


# ---------------------------------------------------------------------------------------------- the step list
def prep_steps(s: dict, raw: str) -> list[dict]:
    """Stages 1-2 up to the Reasoner's training, by the transformers path without 4-bit (their outputs are what the
    required steps read; stages 1-2 through Unsloth in 4-bit were seen on an H200 before, README)."""
    gen, train = f"{s['gen']} --load_in_4bit false", f"{s['prep_train']} --load_in_4bit false"
    return [
        step("prepare a slice of 40 users", "Data/prepare_data.py",
             ["--input", raw, "--dataset", DATASET, "--max_users", "40", "--max_his", "5"]),
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


def side_steps(s: dict, process: str, work: Path, out: Path) -> list[dict]:
    """One backend's side of each comparison: the values of the random adapter (scripts/backend_values.py, not
    quantized and in 4-bit), and the training benchmark (benchmarks/unsloth_vs_hf.py --child)."""
    expect = "hf" if process == "prep" else "unsloth"
    steps = [step(f"values, {q}: {SIDES[process]}", "scripts/backend_values.py",
                  ["--adapter", str(work / "adapter"), "--load_in_4bit", flag, *s["values"].split(),
                   "--json", str(values_file(out, process, q))], required=True, expect=expect, in_4bit=flag == "true",
                  cuda_only=flag == "true")  # bitsandbytes' 4-bit needs a CUDA GPU
             for q, flag in QUANTIZATIONS.items()]
    bench = step(f"benchmark: {SIDES[process]}", "benchmarks/unsloth_vs_hf.py",
                 ["--child", "--model_path", str(work / "model"), *s["bench"].split(), "--out",
                  str(work / f"bench_{process}"), "--json", str(out / f"unsloth_vs_hf_{process}.json")],
                 required=True, expect=expect)
    return steps + [bench]


def main_steps(s: dict, optional: set[str]) -> list[dict]:
    gen, train = s["gen"], s["train"]
    steps = [
        step("Reasoner 7: reasons for the test set", "2_Reasoner/7_generate_reason_for_test.py", gen, required=True),
        step("Reasoner 7: reasons for the validation rows", "2_Reasoner/7_generate_reason_for_test.py",
             f"--split valid {gen}", required=True),
        step("Predictor 1: SFT data", "3_Predictor/1_construct_predictor_train_data.py", gen, required=True),
        step("Predictor 2: train", "3_Predictor/2_predictor_train.sh", train, required=True),
        step("Predictor 3: rate the test rows", "3_Predictor/3_generate_predict_for_test.py", f"--split test {gen}",
             required=True),
        step("GRPO 1: two steps", "4_GRPO/1_reasoner_grpo_train.sh", f"{s['grpo']} --select_on_valid false",
             required=True, measure=grpo_measure),
    ]
    if "direct" in optional:  # the same scripts as the Predictor's, on other data
        steps += [step("Predictor 1: SFT data, no reason", "3_Predictor/1_construct_predictor_train_data.py",
                       "--no_reason"),
                  step("Predictor 2: train, no reason", "3_Predictor/2_predictor_train.sh", train,
                       env={"NAME": "Direct_Predictor"}),
                  step("Predictor 3: rate the test rows, no reason", "3_Predictor/3_generate_predict_for_test.py",
                       f"--no_reason --split test {gen}")]
    if "valid" in optional:
        steps.append(step("Predictor 3: rate the valid rows", "3_Predictor/3_generate_predict_for_test.py",
                          f"--split valid {gen}"))
        if "direct" in optional:
            steps.append(step("Predictor 3: rate the valid rows, no reason",
                              "3_Predictor/3_generate_predict_for_test.py", f"--no_reason --split valid {gen}"))
    if "grpo" in optional:
        steps += [step("GRPO 2: reasons for the test rows", "4_GRPO/2_generate_reason_for_test.sh", f"--split test {gen}"),
                  step("GRPO 3: rate the test rows", "4_GRPO/3_generate_predict_for_test.sh", f"--split test {gen}")]
    if "evaluate" in optional:
        steps.append(step("Evaluate: ratings", "3_Predictor/4_evaluate.py", needs=("surprise", "matplotlib")))
    return steps


def step(name, script, args="", *, env=None, required=False, expect="unsloth", in_4bit=True, needs=(),
         cuda_only=False, measure=None) -> dict:
    """A step: `expect` (the backend) and `in_4bit` are how a required step must load its models (expect None: it
    loads none); `measure(work)`, run after it, returns what it measured and a problem, or None."""
    return dict(name=name, script=script, args=args.split() if isinstance(args, str) else args, env=env or {},
                required=required, expect=expect if required else None, in_4bit=in_4bit, needs=needs,
                cuda_only=cuda_only, measure=measure)


def values_file(out: Path, process: str, quantization: str) -> Path:
    return out / f"values_{process}_{'4bit' if QUANTIZATIONS[quantization] == 'true' else 'unquantized'}.json"


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


def row_of(entry: dict, process: str, **fields) -> dict:
    expected = entry["expect"] is not None
    return {**dict(step=entry["name"], command=" ".join([entry["script"], *entry["args"]]), process=process,
                   required="yes" if entry["required"] else "no", expect=entry["expect"] or "-",
                   expect_4bit=("yes" if entry["in_4bit"] else "no") if expected else "-", loads=[], measured="",
                   start=time.time(), end=time.time()), **fields}


def run_step(entry: dict, work: Path, process: str) -> dict:
    """Run one step in this process, as `python script args` would; its row."""
    import torch

    import llm

    missing = [m for m in entry["needs"] if not importlib.util.find_spec(m)]
    if entry["cuda_only"] and not torch.cuda.is_available():
        missing.append("CUDA device")
    if missing:
        print(f"\n== {entry['name']}: skipped (no {', '.join(missing)})", flush=True)
        return row_of(entry, process, status=f"skipped: no {', '.join(missing)}")
    argv = command_of(entry, work)
    print(f"\n== {entry['name']}: {' '.join(argv)}", flush=True)
    saved_argv, saved_env = sys.argv, dict(os.environ)
    os.environ.update(entry["env"])
    sys.argv = argv
    n_loads = len(llm.LOADS)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start, status, measured = time.time(), "ok", ""
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
    if status == "ok" and entry["measure"]:
        measured, problem = entry["measure"](work)
        status = f"failed: {problem}" if problem else status
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    status = " ".join(str(status).split())[:300]
    print(f"== {entry['name']}: {status}{f' ({measured})' if measured else ''}, {end - start:.1f} s", flush=True)
    return row_of(entry, process, status=status, measured=measured, start=start, end=end, peak_alloc=peak,
                  loads=llm.LOADS[n_loads:])


def grpo_measure(work: Path) -> tuple[str, str | None]:
    """What the GRPO steps logged (the run's log_history.json): each step's mean reward, its spread over the
    generations, and the gradient norm; a problem if the reward was zero in every step or a norm is not finite."""
    log = json.loads((work / "checkpoints" / DATASET / "Reasoner_GRPO" / "final_checkpoint" / "log_history.json")
                     .read_text())
    steps = [e for e in log if "reward" in e and "grad_norm" in e]

    def each(key, form):
        return ", ".join(format(e.get(key, math.nan), form) for e in steps)

    measured = f"{len(steps)} steps: reward {each('reward', '.3f')} (std {each('reward_std', '.3f')}); grad norm " \
               f"{each('grad_norm', '.3g')}"
    if not steps:
        return measured, "GRPO logged no step with a reward and a gradient norm"
    if all(e["reward"] == 0 for e in steps):
        return measured, f"GRPO's reward was 0 in every step ({measured})"
    if not all(math.isfinite(e["grad_norm"]) for e in steps):
        return measured, f"a GRPO gradient norm is not finite ({measured})"
    return measured, None


def comparison_row(out: Path, quantization: str) -> list[dict]:
    """The values of the two sides compared (scripts/backend_values.py's tolerances): the largest difference of
    each, and a failure naming each one out of tolerance."""
    from scripts.backend_values import compare

    files = [values_file(out, process, quantization) for process in SIDES]
    row = dict(step=f"values, {quantization}: Unsloth vs transformers", process="main", required="yes", expect="-",
               expect_4bit="-", loads=[], start=time.time(), end=time.time(), measured="",
               command=f"scripts/backend_values.py --compare {' '.join(f.name for f in files)}")
    if not all(f.exists() for f in files):
        return [{**row, "status": "not run: a side has no values (see its row)"}]
    result = compare(*(json.loads(f.read_text()) for f in files))
    d, t = result["differences"], result["tolerances"]
    measured = result["precision"] + (
        f": score {d['score']:.2g} (at most {t['score']}), log-likelihood {d['loglikelihood']:.2g} (at most "
        f"{t['loglikelihood']}), greedy {d['greedy']:.0%} differ (at most {t['greedy']:.0%})" if d else "")
    print(f"\n== {row['step']}: {measured or result['problems'][0]}", flush=True)
    status = "ok" if not result["problems"] else f"failed: {quantization} values out of tolerance: " + "; ".join(
        result["problems"])
    return [{**row, "measured": measured, "status": status, "comparison": result}]


def benchmark_report(out: Path, s: dict, work: Path) -> list[dict]:
    """unsloth_vs_hf.json from the two sides' results, as benchmarks/unsloth_vs_hf.py writes it, and its table."""
    from benchmarks.unsloth_vs_hf import parse, report, settings_of, table

    results, failed = {}, {}
    for process, backend in (("main", "unsloth"), ("prep", "hf")):
        part = out / f"unsloth_vs_hf_{process}.json"
        if part.exists():
            results[backend] = json.loads(part.read_text())
        else:
            failed[backend] = {"error": f"its side did not run (see the benchmark row of {process})"}
    result = report(settings_of(parse(["--model_path", str(work / "model"), *s["bench"].split()])), results, failed)
    (out / "unsloth_vs_hf.json").write_text(json.dumps(result, indent=1))
    (out / "unsloth_vs_hf.txt").write_text(table(result) + "\n")
    print("\n" + table(result), flush=True)
    return []


# ---------------------------------------------------------------------------------------------- the two processes
def prep(args, out: Path, work: Path):
    """The prep process: model, adapter, data, stages 1-2 (transformers), then transformers' side of the comparisons;
    its rows to prep_steps.jsonl."""
    import torch

    import llm

    rows_file = out / "prep_steps.jsonl"
    size = resolve_size(args.size)

    def record(row):
        with open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    start = time.time()
    from scripts.build_random_llama import build, build_adapter

    build(work / "model", size, device="cuda" if torch.cuda.is_available() else "cpu")
    build_adapter(work / "model", work / "adapter")
    record(dict(step=f"build the random {size} Llama and a random adapter", command="scripts/build_random_llama.py",
                process="prep", start=start, end=time.time(), peak_alloc=torch.cuda.max_memory_allocated() / 2**20
                if torch.cuda.is_available() else None, loads=[], required="no", expect="-", expect_4bit="-",
                measured="", status="ok"))
    for entry in prep_steps(SETTINGS[size], args.reviews):
        row = run_step(entry, work, "prep")
        record(row)
        if not row["status"].startswith("ok"):
            sys.exit(f"prep: {entry['name']} {row['status']}")
    print(f"prep: stages 1-2 done; backend {llm.backend()}", flush=True)
    for entry in side_steps(SETTINGS[size], "prep", work, out):  # a failure here is recorded, and the check goes on
        record(run_step(entry, work, "prep"))


def resolve_size(size: str) -> str:
    import torch

    return size if size != "auto" else "1b" if torch.cuda.is_available() else "tiny"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or "gpu_check_out")
    parser.add_argument("--work", help="working folder (Data/, checkpoints/, the model); default: a new temporary one")
    parser.add_argument("--size", default="auto", choices=["auto", *SETTINGS], help="auto: 1b with CUDA, else tiny")
    parser.add_argument("--optional", default="", help="comma-separated groups beyond the proof: direct, valid, grpo, "
                                                        "evaluate")
    parser.add_argument("--reviews", help="the review file (default: $REVIEWS_FILE, see scripts/demo_reviews.py)")
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
        sys.exit(f"gpu_check: the review file {args.reviews} is not here (pass --reviews or set REVIEWS_FILE)")
    os.environ.update(DATASET=DATASET, MODEL_PATH=str(work / "model"), TEACHER="local",
                      TEACHER_MODEL_PATH=str(work / "model"), TEACHER_MAX_TOKENS="32", TEACHER_BATCH_SIZE="32",
                      HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for pattern in ("prep_steps.jsonl", "steps.tsv", "summary.md", "unsloth_vs_hf*", "values_*.json"):
        for stale in out.glob(pattern):
            stale.unlink()
    sampler = None
    if shutil.which("nvidia-smi"):
        sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,memory.used", "--format=csv,noheader,nounits",
                                    "-lms", "250"], stdout=open(out / "gpu_memory.csv", "w"), stderr=subprocess.DEVNULL)
    forward = ["--out", str(out), "--work", str(work), "--size", args.size, "--reviews", args.reviews, "--since", str(t0)]
    print(f"gpu_check: working in {work}; prep (stages 1-2 and transformers' side, REASON4REC_BACKEND="
          f"{args.prep_backend}) runs in its own process, its output in {out / 'prep.log'}", flush=True)
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
                 end=time.time(), loads=[], required="no", expect="-", expect_4bit="-", measured="", status="ok")]
    print(f"gpu_check: imported llm ({llm.backend()}) in {time.time() - start:.1f} s; waiting for prep", flush=True)
    code = prep_process.wait()
    prep_rows = [json.loads(line) for line in open(out / "prep_steps.jsonl")] if (out / "prep_steps.jsonl").exists() else []
    rows = prep_rows + rows
    if code:
        print(f"gpu_check: prep failed (exit {code}); the end of {out / 'prep.log'}:\n"
              + (out / "prep.log").read_text()[-4000:], flush=True)
    size = resolve_size(args.size)
    s = SETTINGS[size]
    *values, bench = side_steps(s, "main", work, out)
    for entry, quantization in zip(values, QUANTIZATIONS):  # each compared as soon as both sides have run
        entry["after"] = functools.partial(comparison_row, out, quantization)
    bench["after"] = functools.partial(benchmark_report, out, s, work)
    # The values first (the numbers, and quick), then the pipeline's steps, then the benchmark.
    planned = [*values, *main_steps(s, {g for g in args.optional.split(",") if g}), bench]

    def report(rows, pending=()):
        """steps.tsv and summary.md as they stand: written after every step, so that a check cut short by its
        time limit still brings back what it did, and says what it did not."""
        rows = rows + [row_of(e, "main", status="not run: the check stopped before it") for e in pending]
        steps = table(rows, out, t0)  # one reading of the memory samples for both files
        write_steps(steps, out)
        summary = summarize(rows, steps, out, t0, size, since=bool(args.since))
        (out / "summary.md").write_text(summary)
        return summary

    report(rows, planned)
    for i, entry in enumerate(planned):
        rows.append(row_of(entry, "main", status="not run: prep failed") if code else run_step(entry, work, "main"))
        rows += entry.get("after", list)()
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
            required=r["required"], expect=r["expect"], expect_4bit=r["expect_4bit"], measured=r["measured"],
            status=r["status"]))
    return lines


def write_steps(steps: list[dict], out: Path):
    with open(out / "steps.tsv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(steps)
    os.replace(out / "steps.tsv.tmp", out / "steps.tsv")


def verdict(rows: list[dict]) -> str:
    """"GPU proof: yes" only if every required step ran (a comparison: within its tolerances; GRPO: rewarded, with
    finite gradient norms), each of its model loads with the expected backend and precision, on a CUDA device (as
    llm.load_base reported it)."""
    import torch

    problems: dict[str, list[str]] = {}
    for r in rows:
        if r["required"] != "yes":
            continue
        why = []
        if r["status"] != "ok":
            why.append(r["status"] if r["status"].startswith(("not run", "skipped")) else f"{r['step']} {r['status']}")
        elif r["expect"] != "-":
            loads = r.get("loads") or []
            if not loads:
                why.append("loaded no model")
            why += [f"backend {x['backend']}, not {r['expect']}" for x in loads if x["backend"] != r["expect"]]
            why += ["not in 4-bit" if r["expect_4bit"] == "yes" else "in 4-bit, expected not quantized"
                    for x in loads if x["in_4bit"] != (r["expect_4bit"] == "yes")]
            why += [f"ran on {x['device']}, not a CUDA device" for x in loads if not x["device"].startswith("cuda")]
        for w in dict.fromkeys(why):
            problems.setdefault(w, []).append(r["step"])
    required = [r["step"] for r in rows if r["required"] == "yes"]
    if not problems and torch.cuda.is_available() and required:
        return (f"GPU proof: yes — all {len(required)} required steps ran on CUDA through the expected backend and "
                f"precision, the values within their tolerances, GRPO rewarded with finite gradients")

    def which(reason, steps):
        if len(steps) == 1 and reason.startswith(steps[0]):  # a failure names its step
            return reason
        return f"{reason} ({', '.join(steps[:3])}{f' and {len(steps) - 3} more' if len(steps) > 3 else ''})"

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
    lines += ["", "Values, Unsloth against transformers (scripts/backend_values.py: the same random LoRA adapter on the "
              "same model, the same inputs; the tolerances fixed there before the run):", "",
              "| setting | precision | rating: largest difference | log-likelihood (nats/token): largest difference "
              "| greedy: share of prompts whose first tokens differ | within tolerance |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r["step"].endswith("Unsloth vs transformers"):
            c = r.get("comparison") or {}
            d, t = c.get("differences") or {}, c.get("tolerances") or {}
            cells = [f"{d[k]:.2g} (at most {t[k]})" if k in d else "-" for k in ("score", "loglikelihood")]
            cells.append(f"{d['greedy']:.0%} (at most {t['greedy']:.0%})" if d else "-")
            lines.append(f"| {r['step'].split(':')[0].removeprefix('values, ')} | {c.get('precision', '-')} | "
                         f"{' | '.join(cells)} | {'yes' if r['status'] == 'ok' else r['status']} |")
    lines += [""] + [f"{r['step']}: {r['measured'] or '-'}; {r['status']}." for r in rows if r["step"].startswith("GRPO 1")]
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
            lines.append(f"This disagrees with Unsloth's claim (faster, less memory): in this run it is {' and '.join(disagree)}"
                         f" ({ratio['sequences_per_s']:.2f}x the sequences per second of transformers + PEFT, "
                         f"{ratio['peak_memory']:.2f}x its peak memory).")
    else:
        lines.append("Benchmark: no ratio (see unsloth_vs_hf.txt).")
    skipped = [f"{r['step']} ({r['status'].removeprefix('skipped: ')})" for r in rows if r["status"].startswith("skipped")]
    if skipped:
        lines.append(f"Skipped: {', '.join(skipped)}.")
    lines += ["", verdict(rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
