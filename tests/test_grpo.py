"""The GRPO stage (4_GRPO) and the choice of checkpoints on the validation rows, on the tiny model: the reward, a step
that changes the adapter, kill and resume, a run that learns nothing saying so, and selection."""
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from conftest import (DATASET, FAST, REPO, cut_short, file_hashes, kill_training_after, logged_steps, pipeline_env,
                      plant_in_log, run)
from reason_filter import grpo_reward, predictor_reward

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


@pytest.mark.parametrize("base", ["tiny", "smollm2"])
def test_the_grpo_reward_is_the_same_when_the_predictor_returns_every_position(tiny_model, base):
    """4_GRPO/1's reward (reason_filter.predictor_reward: the Predictor's rating of a batch of reasons of several
    lengths, scored in one right-padded pass) through a model that answers as Unsloth's fast forward does, every
    position's logits for a tensor logits_to_keep (unsloth_like), equals the reward through transformers'."""
    import llm
    import unsloth_like
    from histories import History, Review
    from peft import LoraConfig, get_peft_model

    path = tiny_model if base == "tiny" else REPO / "models" / "SmolLM2-135M-Instruct"
    if not (Path(path) / "config.json").exists():
        pytest.skip(f"{path} is not here: run setup.sh")
    predictor = llm.load_model(path)  # no cache: both passes compute
    predictor.model = get_peft_model(predictor.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))
    past = [Review(f"Strings {i}", float(i % 5 + 1), "bright, warm tone " * (i + 1), 1000 + i) for i in range(6)]
    histories = [History(past[:k], past[k:], 3.5, 4.0, k, 6 - k) for k in range(4)]
    titles = ["Capo", "Tuner", "Picks", "Strap"]
    reasons = ["It fits the user's taste for warm tones.", "", "a 5.0 album " * 3, "long, detailed praise " * 12]
    truth, cut_off = [4.0, 2.0, 5.0, 1.0], [False, False, False, True]

    def reward():
        return predictor_reward(predictor, "Musical Instruments", titles, histories, reasons, truth, cut_off)

    expected = reward()
    with unsloth_like.fast_forward(predictor.model):
        got = reward()
    np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-5)
    assert (got[1] == expected[1]).all() and (got[2] == expected[2]).all()


def test_a_grpo_step_changes_the_reasoner_and_must_beat_it_to_be_kept(finished):
    root = finished[0]
    out = experts(root) / "Reasoner_GRPO"
    sft, refined = weights(experts(root) / "Reasoner" / "final_checkpoint"), weights(out / "checkpoint-2")
    assert sft.keys() == refined.keys() and differs(sft, refined) > 0
    selection = json.loads((out / "selection.json").read_text())
    assert [(c["candidate"], c["step"]) for c in selection["candidates"]] == [
        ("start", 0), ("checkpoint-1", 1), ("final state", 2)]  # the SFT Reasoner is a candidate
    assert all(c["valid_metric"] is not None for c in selection["candidates"])
    assert selection["chosen"] == min(selection["candidates"], key=lambda c: c["valid_metric"])["candidate"]
    kept = weights(out / "final_checkpoint")
    assert differs(kept, sft if selection["chosen"] == "start" else refined if selection["chosen"] == "final state"
                   else weights(out / selection["chosen"])) == 0
    assert not (out / "final_checkpoint" / "ref").exists()  # the trained adapter alone, not TRL's frozen copy


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


def test_grpo_refuses_with_numbers_when_masking_would_erase_most_completions_and_else_says_it_learned_nothing(
        finished, tmp_path, tiny_model):
    """The SFT Reasoner's reasons, sampled before training, all run past 3 tokens: with truncated completions masked
    the run is refused, with the numbers; asked to train anyway, it learns nothing and says so."""
    work = copy(finished, tmp_path / "w")
    args = [a for a in GRPO if a not in ("--mask_truncated_completions", "false")] + ["--max_completion_length", "3",
                                                                                     "--select_on_valid", "false"]
    refused = run("4_GRPO/1_reasoner_grpo_train.sh", *args, "--cutoff_probe", "4", cwd=work,
                  env=pipeline_env(tiny_model), check=False)
    assert refused.returncode != 0
    assert "4 of 4 reasons (100%) that the SFT Reasoner samples for the first targets are cut off at " \
           "--max_completion_length 3" in refused.stderr
    assert not (experts(work) / "Reasoner_GRPO" / "final_checkpoint").exists()
    out = run("4_GRPO/1_reasoner_grpo_train.sh", *args, "--max_cutoff_rate", "1", cwd=work,
              env=pipeline_env(tiny_model)).stdout
    assert "GRPO learned nothing" in out
    provenance = json.loads((experts(work) / "Reasoner_GRPO" / "final_checkpoint" / "provenance.json").read_text())
    assert provenance["settings"]["learned_nothing"] is True
    probe = provenance["settings"]["cutoff_probe"]
    assert probe["cut_off"] == probe["targets"] > 0 and probe["rate"] == 1.0
    assert differs(weights(experts(work) / "Reasoner" / "final_checkpoint"),
                   weights(experts(work) / "Reasoner_GRPO" / "final_checkpoint")) == 0


def test_a_quick_run_on_a_few_targets_is_another_job_than_the_full_run(finished, tmp_path, tiny_model):
    """--limit (or --sample) trains on other targets: the full run must not resume from the quick run's checkpoints."""
    work = copy(finished, tmp_path / "w")
    quick = GRPO + ["--select_on_valid", "false", "--cutoff_probe", "0"]
    run("4_GRPO/1_reasoner_grpo_train.sh", *quick, "--limit", "4", "--max_steps", "1", cwd=work,
        env=pipeline_env(tiny_model))
    full = run("4_GRPO/1_reasoner_grpo_train.sh", *quick, "--max_steps", "1", cwd=work, env=pipeline_env(tiny_model),
               check=False)
    assert full.returncode != 0 and "holds checkpoints of another training job" in full.stderr
    assert "limit 4 -> None" in full.stderr and "target_rows 4 -> " in full.stderr


@pytest.mark.parametrize("reference", ["sft", "base"])
def test_the_kl_reference_is_the_one_asked_for_and_recorded(finished, tmp_path, tiny_model, reference):
    """TRL's KL at the first step shows what it measured against: 0 against a frozen copy of the SFT adapter (the policy
    itself, before any update; without dropout, which would make the two passes differ), more against the base model
    (the SFT adapter, planted larger here than two tiny training steps make it, changes the model)."""
    work = copy(finished, tmp_path / "w")
    sft = experts(work) / "Reasoner" / "final_checkpoint" / "adapter_model.safetensors"
    save_file({k: v + 0.05 * k.endswith("lora_B.weight") for k, v in load_file(sft).items()}, sft,
              metadata={"format": "pt"})
    run("4_GRPO/1_reasoner_grpo_train.sh", *GRPO, "--max_steps", "1", "--select_on_valid", "false", "--kl_reference",
        reference, "--disable_dropout", "true", cwd=work, env=pipeline_env(tiny_model))
    kept = experts(work) / "Reasoner_GRPO" / "final_checkpoint"
    first = json.loads((kept / "log_history.json").read_text())[0]
    assert (first["kl"] == 0) == (reference == "sft")
    provenance = json.loads((kept / "provenance.json").read_text())["settings"]
    assert provenance["kl_reference"]["used"] == reference == provenance["job"]["kl_reference"]


def test_selection_keeps_the_best_validation_checkpoint_when_the_last_is_planted_worse(finished, tmp_path, tiny_model):
    """Train the Predictor to 3 steps, one checkpoint per step; plant noise in the last checkpoint's weights and take
    final_checkpoint away (as a kill after the last checkpoint, before the choice, leaves the folder): the rerun
    resumes from checkpoint-3, which holds every step, so it trains nothing more and its final state is the planted
    one: the choice must fall elsewhere."""
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
    (out / "final_checkpoint").unlink()
    resumed = run("3_Predictor/2_predictor_train.sh", *args, cwd=work, env=pipeline_env(tiny_model)).stdout
    assert "holds all 3 steps: nothing left to train" in resumed
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


# A few GRPO steps over 8 targets, 2 per optimizer step, each sampled twice: one epoch is 4 optimizer steps.
SPIED = ["--config", str(REPO / "4_GRPO" / "reasoner_grpo.yaml"), "--limit", "8", "--num_train_epochs", "1",
         "--prompts_per_step", "2", "--num_generations", "2", "--per_device_train_batch_size", "1",
         "--max_completion_length", "8", "--mask_truncated_completions", "false", "--save_strategy", "no",
         "--select_on_valid", "false", "--cutoff_probe", "0"]


def generation_rounds(work, processes: str, model: str) -> list[dict]:
    """What each process generated for, per optimizer step (tests/grpo_spy.py), in a run on `processes` processes."""
    run("tests/grpo_spy.py", *SPIED, cwd=work, env=pipeline_env(model, NUM_GPUS=processes, GRPO_SPY=str(work / "spy")))
    return [json.loads(line) for f in sorted(work.glob("spy.*")) for line in f.read_text().splitlines()]


def test_grpo_on_two_processes_generates_for_every_target_once_and_for_the_prompts_of_one(finished, tmp_path,
                                                                                            tiny_model):
    """Two gloo processes, as NUM_GPUS=2 launches them: in one epoch every target's reasons are generated in one round,
    by one process, and each optimizer step covers the same targets as on one process (TRL's sampler and generation
    schedule follow the batch the processes really share)."""
    rounds = {n: generation_rounds(copy(finished, tmp_path / f"n{n}"), n, tiny_model) for n in ("1", "2")}
    two = rounds["2"]
    assert {r["process"] for r in two} == {0, 1}
    where = defaultdict(list)  # target: (process, step) of each of its generated reasons
    for r in two:
        for row in r["rows"]:
            where[row].append((r["process"], r["step"]))
    assert sorted(where) == list(range(8))  # every target of the epoch
    assert all(len(w) == 2 and len(set(w)) == 1 for w in where.values())  # its 2 reasons: one round, one process

    def per_step(records):
        return {s: sorted({row for r in records if r["step"] == s for row in r["rows"]}) for s in
                sorted({r["step"] for r in records})}

    assert per_step(two) == per_step(rounds["1"]) and len(per_step(two)) == 4
