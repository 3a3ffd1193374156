"""The trainer: real LoRA training through qlora_finetune.py (and a *_train.sh), loss on the answer only."""
import json
import pickle

import numpy as np
import pytest
from safetensors import safe_open

import llm
from conftest import run
from utils import to_messages

EXAMPLES = [to_messages(f"How would user {k} rate the guitar strap number {k}?", f"Predicted Rating: {k % 5 + 1}.0")
            for k in range(24)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("finetune")
    (root / "sft.pkl").write_bytes(pickle.dumps(EXAMPLES))
    run("qlora_finetune.py", "--model_path", tiny_model, "--train_data_path", root / "sft.pkl", "--output_dir",
        root / "out", "--num_train_epochs", "4", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
        "--lora_rank", "8", "--lora_alpha", "16", "--tune_last_layer", "true", env={"REASON4REC_BACKEND": "hf"})
    return root / "out" / "final_checkpoint"


def test_loss_goes_down_and_the_adapter_changes_the_outputs(trained, tiny_model):
    losses = [e["loss"] for e in json.loads((trained / "log_history.json").read_text()) if "loss" in e]
    assert len(losses) == 24 and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5
    questions = [m["messages"][0]["content"] for m in EXAMPLES[:6]]
    before = llm.predict_ratings(*llm.load_model(tiny_model), questions)
    after = llm.predict_ratings(*llm.load_model(trained), questions)
    assert np.abs(after - before).max() > 0.05


def test_the_adapter_records_its_base_and_keeps_lm_head(trained, tiny_model):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model and config["modules_to_save"] == ["lm_head"]
    with safe_open(trained / "adapter_model.safetensors", "pt") as f:
        assert any("lm_head" in k for k in f.keys())  # the official code trains lm_head but never saves it


def test_loss_is_on_the_answer_only(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from qlora_finetune import to_dataset

    tokenizer = llm.prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), processing_class=tokenizer,
                         train_dataset=to_dataset(EXAMPLES[:3], mask_loss=True),
                         args=SFTConfig(output_dir="/tmp/unused", bf16=False, report_to="none", completion_only_loss=True))
    for example, row in zip(EXAMPLES, trainer.train_dataset):
        answer = [t for t in row["labels"] if t != -100]  # the tokens the loss is computed on
        assert tokenizer.decode(answer) == example["messages"][1]["content"] + tokenizer.eos_token
        assert tokenizer.decode(row["input_ids"]).count(example["messages"][0]["content"]) == 1


def test_train_script_passes_extra_arguments_and_names_missing_data(tmp_path, tiny_model):
    result = run("1_Summarizer/3_summarizer_train.sh", "--max_steps", "1", cwd=tmp_path, check=False,
                 env={"DATASET": "nowhere", "MODEL_PATH": tiny_model})
    assert result.returncode != 0
    assert "Data/nowhere/Summarizer_train_instruct.pkl not found" in result.stderr
    assert "1_Summarizer/2_construct_summarizer_train_data.py" in result.stderr
    result = run("2_Reasoner/6_reasoner_train.sh", cwd=tmp_path, check=False, env={"DATASET": "x", "MODEL_PATH": ""})
    assert result.returncode != 0 and "MODEL_PATH" in result.stderr
