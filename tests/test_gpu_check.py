"""scripts/gpu_check.py, the GPU proof: on this CPU it runs every step the proof requires, in its two processes, each
row says how its models were loaded (llm.LOADS), and the verdict says no, naming why; the verdict's rule itself on
made-up rows (a CUDA run cannot happen here)."""
import csv
import subprocess
import sys

from conftest import REAL_DATA, REPO, environment
from scripts import gpu_check

REQUIRED = ["Reasoner 7: reasons for the test set", "Reasoner 7: reasons for the validation rows",
            "Predictor 1: SFT data", "Predictor 1: SFT data, no reason", "Predictor 2: train",
            "Predictor 2: train, no reason", "Predictor 3: rate the test rows",
            "Predictor 3: rate the test rows, no reason", "benchmark: unsloth side", "benchmark: hf side"]


def test_gpu_check_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(out), "--work",
                             str(tmp_path / "work"), "--reviews", str(REAL_DATA)], cwd=tmp_path,
                            env=environment({"REASON4REC_BACKEND": "hf"}), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "steps.tsv"), delimiter="\t"))
    assert [r["process"] for r in rows[:12]] == ["prep"] * 12  # the model, the data, stages 1-2 up to the Reasoner
    required = {r["step"]: r for r in rows if r["required"] == "yes"}
    assert list(required) == REQUIRED
    for name, r in required.items():
        if name == "benchmark: unsloth side" and "No module named 'unsloth'" in r["status"]:
            continue  # Unsloth is not installed here
        assert r["status"] == "ok", r
        if name == "Predictor 1: SFT data, no reason":  # data only
            assert (r["backend"], r["loads"]) == ("-", "0")
            continue
        backend = r["expect"] if name.startswith("benchmark") else "hf"  # each side of the benchmark forces its own
        assert (r["backend"], r["in_4bit"], r["device"]) == (backend, "no", "cpu"), r
        assert float(r["wall_s"]) > 0
    assert required["Predictor 2: train"]["loads"] == "2"  # the model trained, then the one scored on validation
    summary = (out / "summary.md").read_text()
    assert "GPU proof: no — no CUDA device; backend hf, not unsloth" in summary
    assert "not in 4-bit (every required step that loaded a model" in summary
    assert summary.strip().splitlines()[-1] in result.stdout  # printed too


def rows(**change):
    row = dict(step="Predictor 2: train", required="yes", expect="unsloth", status="ok",
               loads=[{"backend": "unsloth", "in_4bit": True, "device": "cuda:0"}])
    bench = dict(step="benchmark: hf side", required="yes", expect="hf", status="ok",
                 loads=[{"backend": "hf", "in_4bit": True, "device": "cuda:0"}])
    return [dict(step="Summarizer 3: train", required="no", expect="-", status="ok",
                 loads=[{"backend": "hf", "in_4bit": False, "device": "cuda:0"}]), {**row, **change}, bench]


def test_verdict(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_check.verdict(rows()).startswith("GPU proof: yes — all 2 required steps")
    bf16 = rows(loads=[{"backend": "unsloth", "in_4bit": True, "device": "cuda:0"},
                       {"backend": "unsloth", "in_4bit": False, "device": "cuda:0"}])
    assert gpu_check.verdict(bf16) == "GPU proof: no — not in 4-bit (Predictor 2: train)"
    hf = rows(loads=[{"backend": "hf", "in_4bit": True, "device": "cuda:0"}])
    assert gpu_check.verdict(hf) == "GPU proof: no — backend hf, not unsloth (Predictor 2: train)"
    assert gpu_check.verdict(rows(status="failed: error: x")) == "GPU proof: no — Predictor 2: train failed: error: x"
    assert gpu_check.verdict(rows(loads=[])) == "GPU proof: no — loaded no model (Predictor 2: train)"
    cut = gpu_check.verdict(rows(status="not run: the check stopped before it", loads=[]))
    assert cut == "GPU proof: no — not run: the check stopped before it (Predictor 2: train)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = rows(loads=[{"backend": "unsloth", "in_4bit": False, "device": "cpu"}])
    assert gpu_check.verdict(cpu).startswith("GPU proof: no — no CUDA device; not in 4-bit (")
