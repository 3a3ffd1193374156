"""scripts/gpu_check.py, the GPU proof: on a CPU it runs every step the proof requires, in its two processes, each
row says how its models were loaded (llm.LOADS) and what it measured (the value comparison, GRPO), and the verdict
says no, naming why; the rules of the verdict and of GRPO's row on made-up rows and logs (the tests run
without a CUDA device)."""
import csv
import json
import math
import subprocess
import sys

from conftest import REAL_DATA, REPO, environment
from scripts import gpu_check

SIDES = ["values, not quantized: transformers side", "values, 4-bit: transformers side",
         "benchmark: transformers side"]  # the prep process's, after stages 1-2
REQUIRED = ["values, not quantized: Unsloth side", "values, not quantized: Unsloth vs transformers",
            "values, 4-bit: Unsloth side", "values, 4-bit: Unsloth vs transformers",
            "Reasoner 7: reasons for the test set", "Reasoner 7: reasons for the validation rows",
            "Predictor 1: SFT data", "Predictor 2: train", "Predictor 3: rate the test rows", "GRPO 1: two steps",
            "benchmark: Unsloth side"]


def test_gpu_check_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(out), "--work",
                             str(tmp_path / "work"), "--reviews", str(REAL_DATA)], cwd=tmp_path,
                            env=environment({"REASON4REC_BACKEND": "hf"}), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "steps.tsv"), delimiter="\t"))
    assert [r["process"] for r in rows[:15]] == ["prep"] * 15  # the model, the data, stages 1-2, transformers' sides
    required = {r["step"]: r for r in rows if r["required"] == "yes"}
    assert list(required) == SIDES + REQUIRED
    for name, r in required.items():
        if "4-bit" in name:  # bitsandbytes' 4-bit needs a CUDA GPU; the comparison needs both sides
            assert r["status"] in ("skipped: no CUDA device", "not run: a side has no values (see its row)"), r
            continue
        assert r["status"] == "ok", r
        if name == "values, not quantized: Unsloth vs transformers":  # compares files: loads no model
            assert (r["backend"], r["loads"]) == ("-", "0")
            continue
        assert (r["backend"], r["in_4bit"], r["device"]) == ("hf", "no", "cpu"), r
        assert r["expect"] == ("hf" if "transformers side" in name else "unsloth")
        assert r["expect_4bit"] == ("no" if name.startswith("values") else "yes")
        assert float(r["wall_s"]) > 0
    assert required["Predictor 2: train"]["loads"] == "2"  # the model trained, then the one scored on validation
    assert required["values, not quantized: Unsloth vs transformers"]["measured"] == \
        "float32: score 0 (at most 0.0001), log-likelihood 0 (at most 0.0001), greedy 0% differ (at most 0%)"
    assert required["GRPO 1: two steps"]["measured"].startswith("2 steps: reward -")
    summary = (out / "summary.md").read_text()
    assert "| not quantized | float32 | 0 (at most 0.0001) | 0 (at most 0.0001) | 0% (at most 0%) | yes |" in summary
    assert "GRPO 1: two steps: 2 steps: reward -" in summary
    assert "Unsloth / HF: " in summary and set(json.loads((out / "unsloth_vs_hf.json").read_text())["results"]) == \
        {"unsloth", "hf"}
    verdict = summary.strip().splitlines()[-1]
    assert verdict.startswith("GPU proof: no — no CUDA device; ran on cpu, not a CUDA device (")
    assert "backend hf, not unsloth (values, not quantized: Unsloth side, Reasoner 7" in verdict
    assert "not in 4-bit (benchmark: transformers side, Reasoner 7" in verdict
    assert "skipped: no CUDA device (values, 4-bit: transformers side, values, 4-bit: Unsloth side)" in verdict
    assert verdict in result.stdout  # printed too


def rows(**change):
    row = dict(step="Predictor 2: train", required="yes", expect="unsloth", expect_4bit="yes", status="ok",
               loads=[{"backend": "unsloth", "in_4bit": True, "device": "cuda:0"}])
    bench = dict(step="benchmark: transformers side", required="yes", expect="hf", expect_4bit="yes", status="ok",
                 loads=[{"backend": "hf", "in_4bit": True, "device": "cuda:0"}])
    values = dict(step="values, not quantized: Unsloth side", required="yes", expect="unsloth", expect_4bit="no",
                  status="ok", loads=[{"backend": "unsloth", "in_4bit": False, "device": "cuda:0"}])
    compared = dict(step="values, not quantized: Unsloth vs transformers", required="yes", expect="-",
                    expect_4bit="-", status="ok", loads=[])
    return [dict(step="Summarizer 3: train", required="no", expect="-", expect_4bit="-", status="ok",
                 loads=[{"backend": "hf", "in_4bit": False, "device": "cuda:0"}]), {**row, **change}, bench, values,
            compared]


def test_verdict(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_check.verdict(rows()).startswith("GPU proof: yes — all 4 required steps")
    bf16 = rows(loads=[{"backend": "unsloth", "in_4bit": True, "device": "cuda:0"},
                       {"backend": "unsloth", "in_4bit": False, "device": "cuda:0"}])
    assert gpu_check.verdict(bf16) == "GPU proof: no — not in 4-bit (Predictor 2: train)"
    assert gpu_check.verdict(rows(expect_4bit="no")) == \
        "GPU proof: no — in 4-bit, expected not quantized (Predictor 2: train)"
    hf = rows(loads=[{"backend": "hf", "in_4bit": True, "device": "cuda:0"}])
    assert gpu_check.verdict(hf) == "GPU proof: no — backend hf, not unsloth (Predictor 2: train)"
    assert gpu_check.verdict(rows(status="failed: error: x")) == "GPU proof: no — Predictor 2: train failed: error: x"
    assert gpu_check.verdict(rows(loads=[])) == "GPU proof: no — loaded no model (Predictor 2: train)"
    cut = gpu_check.verdict(rows(status="not run: the check stopped before it", loads=[]))
    assert cut == "GPU proof: no — not run: the check stopped before it (Predictor 2: train)"
    out_of_tolerance = rows()
    out_of_tolerance[-1]["status"] = "failed: not quantized values out of tolerance: score differs by 0.3 > 0.05"
    assert gpu_check.verdict(out_of_tolerance) == ("GPU proof: no — values, not quantized: Unsloth vs transformers "
                                                   "failed: not quantized values out of tolerance: score differs by "
                                                   "0.3 > 0.05")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = rows(loads=[{"backend": "unsloth", "in_4bit": False, "device": "cpu"}])
    assert gpu_check.verdict(cpu).startswith("GPU proof: no — no CUDA device; not in 4-bit (")


def test_grpo_is_measured_by_its_rewards_and_gradient_norms(tmp_path):
    log = tmp_path / "checkpoints" / gpu_check.DATASET / "Reasoner_GRPO" / "final_checkpoint" / "log_history.json"
    log.parent.mkdir(parents=True)

    def measure(*steps):
        log.write_text(json.dumps([{"loss": 0.1, "grad_norm": g, "reward": r, "reward_std": 0.5, "step": i}
                                   for i, (r, g) in enumerate(steps)] + [{"train_runtime": 3.0}]))
        return gpu_check.grpo_measure(tmp_path)

    assert measure((-1.25, 0.5), (0.0, 0.25)) == (
        "2 steps: reward -1.250, 0.000 (std 0.500, 0.500); grad norm 0.5, 0.25", None)
    assert measure((0.0, 0.5), (0.0, 0.25))[1].startswith("GRPO's reward was 0 in every step (2 steps")
    assert measure((-1.0, 0.5), (-1.0, math.nan))[1].startswith("a GRPO gradient norm is not finite")
    assert measure()[1] == "GRPO logged no step with a reward and a gradient norm"
