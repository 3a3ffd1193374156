"""The GRPO stage (4_GRPO) and the choice of checkpoints on the validation rows, on the tiny model: the reward, a step
that changes the adapter, kill and resume, a run that learns nothing saying so, and selection."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from conftest import (DATASET, FAST, cut_short, file_hashes, kill_training_after, logged_steps, pipeline_env,
                      plant_in_log, run)
from reason_filter import grpo_reward

GRPO = FAST["GRPO_ARGS"].split()
ADAPTER = "final_checkpoint/adapter_model.safetensors"


def experts(root):
    return root / "checkpoints" / DATASET


def weights(folder):
    return load_file(folder / "adapter_model.safetensors")


def differs(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_the_reward_falls_with_the_predictors_error_and_applies_each_penalty():
    rewards, forbidden, cut = grpo_reward([4.0, 3.0, 4.0, 4.0, 4.0], [4.0] * 5,
                                          ["fits", "fits", "a 5.0 album", "", "fits"], [False, False, False, False, True],
                                          forbidden_penalty=1.0, cutoff_penalty=0.5)
    assert rewards.tolist() == [0.0, -1.0, -1.0, -0.5, -0.5]
    assert forbidden.tolist() == [False, False, True, False, False] and cut.tolist() == [False, False, False, True, True]
    assert grpo_reward([1.0], [4.0], ["x"], [False])[0][0] < grpo_reward([3.0], [4.0], ["x"], [False])[0][0]


def test_a_grpo_step_changes_the_reasoner(finished):
    root = finished[0]
    sft, refined = weights(experts(root) / "Reasoner" / "final_checkpoint"), weights(
        experts(root) / "Reasoner_GRPO" / "final_checkpoint")
    assert sft.keys() == refined.keys() and differs(sft, refined) > 0
    selection = json.loads((experts(root) / "Reasoner_GRPO" / "selection.json").read_text())
    assert all(c["valid_metric"] is not None for c in selection["candidates"]) and len(selection["candidates"]) == 2
    assert selection["chosen"] == min(selection["candidates"], key=lambda c: c["valid_metric"])["candidate"]


def copy(finished, dest):
    shutil.copytree(finished[0], dest, ignore=shutil.ignore_patterns("*.sqlite*", "Reasoner_GRPO"))
    return dest


RESUMABLE = GRPO + ["--max_steps", "4", "--select_on_valid", "false"]


def test_a_killed_grpo_run_resumes_to_the_adapter_of_an_uninterrupted_one(finished, tmp_path, tiny_model):
    """Killed after two checkpoints while saving the third (planted: checkpoint-3 without its trainer_state.json), a
    mark planted in checkpoint-2's log history: the rerun resumes from checkpoint-2 (the mark is in its log, followed
    by steps 3 and 4 only: a run from scratch lacks the mark), checkpoints 1-2 are byte for byte as they were, and the
    adapter is that of an uninterrupted run."""
    whole, killed = copy(finished, tmp_path / "whole"), copy(finished, tmp_path / "killed")
    run("4_GRPO/1_reasoner_grpo_train.sh", *RESUMABLE, cwd=whole, env=pipeline_env(tiny_model))
    out = experts(killed) / "Reasoner_GRPO"
    kill_training_after("4_GRPO/1_reasoner_grpo_train.sh", RESUMABLE, killed, tiny_model, out, 2)
    plant_in_log(out / "checkpoint-2")
    cut_short(out / "checkpoint-2", out / "checkpoint-3")
    before = file_hashes(out / "checkpoint-1", out / "checkpoint-2")
    resumed = run("4_GRPO/1_reasoner_grpo_train.sh", *RESUMABLE, cwd=killed, env=pipeline_env(tiny_model)).stdout
    folder = Path("checkpoints") / DATASET / "Reasoner_GRPO"
    assert f"skipping {folder / 'checkpoint-3'}: it was cut short" in resumed
    assert f"resuming from {folder / 'checkpoint-2'}" in resumed
    history = json.loads((out / "final_checkpoint" / "log_history.json").read_text())
    assert logged_steps(history) == [1, 2, "planted", 3, 4]
    assert file_hashes(out / "checkpoint-1", out / "checkpoint-2") == before
    a, b = weights(out / "final_checkpoint"), weights(experts(whole) / "Reasoner_GRPO" / "final_checkpoint")
    assert a.keys() == b.keys() and differs(a, b) < 1e-6


def test_a_run_whose_completions_are_all_cut_off_says_it_learned_nothing(finished, tmp_path, tiny_model):
    work = copy(finished, tmp_path / "w")
    args = [a for a in GRPO if a not in ("--mask_truncated_completions", "false")] + ["--max_completion_length", "3",
                                                                                     "--select_on_valid", "false"]
    out = run("4_GRPO/1_reasoner_grpo_train.sh", *args, cwd=work, env=pipeline_env(tiny_model)).stdout
    assert "GRPO learned nothing" in out
    provenance = json.loads((experts(work) / "Reasoner_GRPO" / "final_checkpoint" / "provenance.json").read_text())
    assert provenance["settings"]["learned_nothing"] is True
    assert differs(weights(experts(work) / "Reasoner" / "final_checkpoint"),
                   weights(experts(work) / "Reasoner_GRPO" / "final_checkpoint")) == 0


def test_selection_keeps_the_best_validation_checkpoint_when_the_last_is_planted_worse(finished, tmp_path, tiny_model):
    """Train the Predictor to 3 steps, one checkpoint per step; plant noise in the last checkpoint's weights; the rerun
    resumes from it (the job is done), so its final state is the planted one: the choice must fall elsewhere."""
    work = tmp_path / "w"
    shutil.copytree(finished[0], work, ignore=shutil.ignore_patterns("*.sqlite*", "Predictor"))
    args = ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size", "2"]
    run("3_Predictor/2_predictor_train.sh", *args, cwd=work, env=pipeline_env(tiny_model))
    out = experts(work) / "Predictor"
    first = json.loads((out / "selection.json").read_text())
    assert [c["candidate"] for c in first["candidates"]] == ["checkpoint-1", "checkpoint-2", "final state"]
    planted = out / "checkpoint-3" / "adapter_model.safetensors"
    tensors = load_file(planted)
    save_file({k: v + 5.0 * (k.endswith("lora_B.weight")) for k, v in tensors.items()}, planted,
              metadata={"format": "pt"})
    run("3_Predictor/2_predictor_train.sh", *args, cwd=work, env=pipeline_env(tiny_model))
    second = json.loads((out / "selection.json").read_text())
    scores = {c["candidate"]: c["valid_metric"] for c in second["candidates"]}
    assert scores["final state"] > max(scores["checkpoint-1"], scores["checkpoint-2"])  # the plant made it worse
    assert second["chosen"] == min(scores, key=scores.get) != "final state"
    chosen = weights(out / "final_checkpoint")
    assert differs(chosen, load_file(out / second["chosen"] / "adapter_model.safetensors")) == 0
    assert np.isclose(scores[second["chosen"]], next(
        c["valid_metric"] for c in first["candidates"] if c["candidate"] == second["chosen"]))


def test_select_on_valid_false_keeps_the_final_state_as_the_official_code(finished, tmp_path, tiny_model):
    work = tmp_path / "w"
    shutil.copytree(finished[0], work, ignore=shutil.ignore_patterns("*.sqlite*", "Predictor"))
    run("3_Predictor/2_predictor_train.sh", "--max_steps", "2", "--select_on_valid", "false", cwd=work,
        env=pipeline_env(tiny_model))
    selection = json.loads((experts(work) / "Predictor" / "selection.json").read_text())
    assert selection["chosen"] == "final state" and selection["metric"] is None
    assert "--select_on_valid false" in selection["why"]


@pytest.mark.parametrize("expert", ["Summarizer", "Reasoner"])
def test_experts_without_a_validation_metric_keep_their_final_state(finished, expert):
    selection = json.loads((experts(finished[0]) / expert / "selection.json").read_text())
    assert selection["chosen"] == "final state" and "no validation metric" in selection["why"]
