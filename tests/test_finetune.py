"""The trainer: real LoRA training through qlora_finetune.py (and a *_train.sh), loss on the answer only."""
import json
import pickle

import numpy as np
import pytest
from safetensors import safe_open

import llm
from conftest import REPO, run
from prompts import to_messages

EXAMPLES = [to_messages(f"How would user {k} rate the guitar strap number {k}?", f"Predicted Rating: {k % 5 + 1}.0")
            for k in range(24)]


def train(root, tiny_model, output: str, *extra):
    (root / "sft.pkl").write_bytes(pickle.dumps(EXAMPLES))
    run("qlora_finetune.py", "--model_path", tiny_model, "--train_data", root / "sft.pkl", "--expert", "test",
        "--output_dir", root / output, "--num_train_epochs", "4", "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", "--lora_rank", "8", "--lora_alpha", "16", "--tune_last_layer", "true", *extra,
        env={"REASON4REC_BACKEND": "hf"})
    return root / output / "final_checkpoint"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    return train(tmp_path_factory.mktemp("finetune"), tiny_model, "out")


def test_the_official_adapter_without_its_trained_lm_head_on_request(trained, tiny_model, tmp_path):
    """--save_lm_head false: lm_head is trained (the LoRA weights are those of a run that saves it) but left out of the
    adapter, as the official trainer's published reward model and Predictor were."""
    from safetensors.torch import load_file

    official = train(tmp_path, tiny_model, "official", "--save_lm_head", "false")
    ours, theirs = load_file(trained / "adapter_model.safetensors"), load_file(official / "adapter_model.safetensors")
    assert not any("lm_head" in k for k in theirs) and any("lm_head" in k for k in ours)
    assert theirs.keys() == {k for k in ours if "lm_head" not in k}
    assert all((ours[k] - theirs[k]).abs().max() < 1e-6 for k in theirs)
    assert json.loads((official / "adapter_config.json").read_text())["modules_to_save"] is None
    questions = [m["messages"][0]["content"] for m in EXAMPLES[:6]]
    assert np.abs(llm.load_model(official).score(questions) - llm.load_model(trained).score(questions)).max() > 1e-4


def test_loss_goes_down_and_the_adapter_changes_the_outputs(trained, tiny_model):
    losses = [e["loss"] for e in json.loads((trained / "log_history.json").read_text()) if "loss" in e]
    assert len(losses) == 24 and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5
    questions = [m["messages"][0]["content"] for m in EXAMPLES[:6]]
    before = llm.load_model(tiny_model).score(questions)
    after = llm.load_model(trained).score(questions)
    assert np.abs(after - before).max() > 0.05


def test_the_adapter_records_its_base_and_keeps_lm_head(trained, tiny_model):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model and config["modules_to_save"] == ["lm_head"]
    with safe_open(trained / "adapter_model.safetensors", "pt") as f:
        assert any("lm_head" in k for k in f.keys())  # the official code trains lm_head but never saves it


@pytest.mark.parametrize("mask_loss", ["true", "false"])
def test_loss_is_on_the_answer_only(tmp_path, tiny_model, mask_loss):
    """The loss qlora_finetune.py logs at its first step (one example, one step: before any update LoRA's B is zero,
    so the model is the base model) is the base model's mean cross-entropy over the answer's tokens (the assistant's
    text and its end-of-turn token) with --mask_loss true, and over every token after the first with false."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    example = EXAMPLES[0]
    (tmp_path / "one.pkl").write_bytes(pickle.dumps([example]))
    run("qlora_finetune.py", "--model_path", tiny_model, "--train_data", tmp_path / "one.pkl", "--expert", "test",
        "--output_dir", tmp_path / "out", "--max_steps", "1", "--per_device_train_batch_size", "1", "--mask_loss",
        mask_loss, env={"REASON4REC_BACKEND": "hf"})
    history = json.loads((tmp_path / "out" / "final_checkpoint" / "log_history.json").read_text())
    logged = next(e["loss"] for e in history if "loss" in e)

    tokenizer, model = AutoTokenizer.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model)
    prompt = tokenizer.apply_chat_template(example["messages"][:1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(example["messages"], tokenize=False)
    answer = whole.removeprefix(prompt)
    assert answer == example["messages"][1]["content"] + tokenizer.eos_token
    ids = tokenizer(whole, add_special_tokens=False, return_tensors="pt").input_ids
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids[0, :len(prompt_ids)].tolist() == prompt_ids
    answer_tokens = ids.shape[1] - len(prompt_ids)
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    expected = losses[-answer_tokens:].mean() if mask_loss == "true" else losses.mean()
    assert logged == pytest.approx(expected.item(), abs=1e-5)
    assert abs(losses[-answer_tokens:].mean() - losses.mean()) > 1e-3  # far apart enough to tell them apart


def test_train_script_passes_extra_arguments_and_names_missing_data(tmp_path, tiny_model):
    result = run("1_Summarizer/3_summarizer_train.sh", "--max_steps", "1", cwd=tmp_path, check=False,
                 env={"DATASET": "nowhere", "MODEL_PATH": tiny_model})
    assert result.returncode != 0
    assert "Data/nowhere/Summarizer_train_instruct.pkl not found" in result.stderr
    assert "1_Summarizer/2_construct_summarizer_train_data.py" in result.stderr
    result = run("2_Reasoner/6_reasoner_train.sh", cwd=tmp_path, check=False, env={"DATASET": "x", "MODEL_PATH": ""})
    assert result.returncode != 0 and "MODEL_PATH" in result.stderr


# The official hyper-parameters of each expert, as its *_train.sh of Peter-Fy/Reason4Rec passes them.
SETTINGS = ("lora_rank", "lora_alpha", "lora_dropout", "tune_last_layer", "num_train_epochs",
            "per_device_train_batch_size", "learning_rate", "warmup_steps")
OFFICIAL = {"1_Summarizer/summarizer.yaml": (16, 32, 0.0, False, 5, 16, 3e-4, 100),
            "2_Reasoner/reward_model.yaml": (8, 16, 0.0, True, 3, 16, 3e-6, 0.1),
            "2_Reasoner/reasoner.yaml": (16, 32, 0.1, False, 3, 32, 3e-4, 100),
            "3_Predictor/predictor.yaml": (8, 16, 0.0, True, 3, 16, 3e-5, 0.1)}


@pytest.mark.parametrize("config", OFFICIAL)
def test_each_experts_config_holds_the_official_values_and_flags_override_them(config, tiny_model, monkeypatch):
    import qlora_finetune

    monkeypatch.setenv("MODEL_PATH", tiny_model)
    monkeypatch.setenv("DATASET", "mi")
    _, args, trainer = qlora_finetune.parse(["--config", str(REPO / config)])
    values = {**vars(args), **trainer.to_dict()}
    assert tuple(values[k] for k in SETTINGS) == OFFICIAL[config]
    assert trainer.gradient_accumulation_steps == 1 and trainer.seed == 42 and args.max_len == 4096
    assert trainer.output_dir == f"checkpoints/mi/{args.expert}"
    _, args, trainer = qlora_finetune.parse(["--config", str(REPO / config), "--learning_rate", "1e-3",
                                             "--lora_rank", "4", "--output_dir", "elsewhere"])
    assert trainer.learning_rate == 1e-3 and args.lora_rank == 4 and trainer.output_dir == "elsewhere"


def test_several_processes_keep_the_configured_global_batch(tiny_model, monkeypatch):
    """NUM_GPUS=N: the configured batch (per device x accumulation, the official one for one GPU) stays the global
    batch; a process count that cannot split it exactly is refused unless asked for."""
    import qlora_finetune

    monkeypatch.setenv("MODEL_PATH", tiny_model)
    monkeypatch.setenv("DATASET", "mi")
    config = ["--config", str(REPO / "3_Predictor/predictor.yaml")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    _, _, trainer = qlora_finetune.parse(config)
    assert (trainer.per_device_train_batch_size, trainer.gradient_accumulation_steps) == (8, 1)
    _, _, trainer = qlora_finetune.parse(config + ["--per_device_train_batch_size", "3",
                                                   "--gradient_accumulation_steps", "4"])
    assert (trainer.per_device_train_batch_size, trainer.gradient_accumulation_steps) == (3, 2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="global batch 16 x 1 cannot be split over 3 processes"):
        qlora_finetune.parse(config)
    _, _, trainer = qlora_finetune.parse(config + ["--exact_global_batch", "false"])
    assert trainer.per_device_train_batch_size == 16


def job(tiny_model, tmp_path, *flags):
    import qlora_finetune

    (tmp_path / "sft.pkl").write_bytes(pickle.dumps(EXAMPLES))
    data, args, config = qlora_finetune.parse(["--model_path", str(tiny_model), "--train_data", "sft.pkl",
                                               "--expert", "test", "--dataset", "mi", *flags])
    return qlora_finetune.job_of(args, config, EXAMPLES, tmp_path / "sft.pkl")


def test_every_setting_that_changes_the_weights_makes_another_job_and_cosmetic_ones_do_not(tiny_model, tmp_path,
                                                                                           monkeypatch):
    import shutil

    from scripts.build_random_llama import build

    first = job(tiny_model, tmp_path, "--learning_rate", "3e-4", "--max_steps", "4")
    cosmetic = ["--logging_steps", "3", "--per_device_eval_batch_size", "2", "--save_strategy", "no",
                "--save_total_limit", "1", "--report_to", "none"]
    assert job(tiny_model, tmp_path, "--max_steps", "4", *cosmetic, "--learning_rate", "3e-4") == first
    moved = shutil.copytree(tiny_model, tmp_path / "moved")  # the same weights elsewhere: the same job
    assert job(moved, tmp_path, "--learning_rate", "3e-4", "--max_steps", "4") == first
    changes = {"max_grad_norm": ["--max_grad_norm", "0.5"], "adam_beta1": ["--adam_beta1", "0.8"],
               "adam_beta2": ["--adam_beta2", "0.99"], "adam_epsilon": ["--adam_epsilon", "1e-6"],
               "lr_scheduler_kwargs": ["--lr_scheduler_kwargs", '{"num_cycles": 2}'], "packing": ["--packing", "true"],
               "fp16": ["--fp16", "true"]}
    for name, flags in changes.items():
        other = job(tiny_model, tmp_path, "--learning_rate", "3e-4", "--max_steps", "4", *flags)
        assert {k for k in first if first[k] != other[k]} == {name}, name
    build(moved, "tiny", seed=1)  # other weights at the same path
    other = job(moved, tmp_path, "--learning_rate", "3e-4", "--max_steps", "4")
    assert {k for k in first if first[k] != other[k]} == {"base_model"}
    monkeypatch.setenv("REASON4REC_BACKEND", "unsloth")
    other = job(tiny_model, tmp_path, "--learning_rate", "3e-4", "--max_steps", "4")
    assert {k for k in first if first[k] != other[k]} == {"backend"}


def test_sample_is_refused_rather_than_ignored(tiny_model, tmp_path):
    with pytest.raises(SystemExit, match="takes no --sample"):
        job(tiny_model, tmp_path, "--sample", "8")


def files(folder):
    """{relative path: bytes} of every file under `folder`, through links."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_another_job_without_checkpoints_is_refused_and_deletes_nothing(tmp_path, tiny_model):
    """--save_strategy no leaves only final_checkpoint: another job in the folder is refused as if it held
    checkpoints, and nothing there changes; the same job (flags reordered, another logging interval) runs again."""
    quick = ["--max_steps", "2", "--save_strategy", "no"]
    final = train(tmp_path, tiny_model, "out", *quick)
    out = final.parent
    assert not list(out.glob("checkpoint-*"))
    before = files(out)
    again = run("qlora_finetune.py", "--model_path", tiny_model, "--train_data", tmp_path / "sft.pkl", "--expert",
                "test", "--output_dir", out, "--learning_rate", "1e-2", *quick, check=False,
                env={"REASON4REC_BACKEND": "hf"})
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 1 and len(errors) == 1 and "another training job" in errors[0], again.stderr[-2000:]
    assert "a final_checkpoint" in errors[0] and "learning_rate" in errors[0]
    assert files(out) == before
    weights = (final / "adapter_model.safetensors").read_bytes()
    train(tmp_path, tiny_model, "out", *quick[2:], *quick[:2], "--logging_steps", "2")
    assert (final / "adapter_model.safetensors").read_bytes() == weights  # the same job: the same weights again


def test_a_kill_while_final_checkpoint_is_replaced_leaves_the_old_or_the_new_one(tiny_model, tmp_path, monkeypatch):
    """training.finish puts a new final_checkpoint in the place of the old one.  Killed at each file operation in
    turn (every rename, link, unlink and rmdir, also inside the libraries' savers), it leaves a complete
    final_checkpoint, the old one or the new one; the rerun then puts the new one in place and leaves nothing else."""
    import os
    import shutil
    from itertools import count
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    import training

    base = llm.load_model(tiny_model)
    model = get_peft_model(base.model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    out, pristine = tmp_path / "out", tmp_path / "pristine"

    def finish(run):
        trainer = SimpleNamespace(model=model, state=SimpleNamespace(global_step=1, log_history=[]))
        training.finish(trainer, model, base.tokenizer, out, {"run": run})

    def kept():
        final = out / "final_checkpoint"
        assert (final / "adapter_model.safetensors").stat().st_size > 0
        return json.loads((final / "provenance.json").read_text())["run"]

    class Killed(BaseException):
        pass

    left = 0

    def killing(operation):
        def wrapped(*args, **kwargs):
            nonlocal left
            left -= 1
            if left == 0:
                raise Killed
            return operation(*args, **kwargs)
        return wrapped

    finish("old")
    shutil.copytree(out, pristine, symlinks=True)
    for k in count(1):
        shutil.rmtree(out)
        shutil.copytree(pristine, out, symlinks=True)
        left = k
        with monkeypatch.context() as m:
            for name in ("replace", "rename", "symlink", "unlink", "rmdir"):
                m.setattr(os, name, killing(getattr(os, name)))
            try:
                finish("new")
                killed = False
            except Killed:
                killed = True
        assert kept() in ("old", "new"), k
        finish("new")
        assert kept() == "new"
        assert [p.name for p in out.glob(".final_checkpoint*")] == [os.readlink(out / "final_checkpoint")]
        if not killed:
            break
    assert k > 10  # the kills fell on that many operations
