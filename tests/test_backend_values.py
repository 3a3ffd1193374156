"""scripts/backend_values.py, Unsloth's numbers against transformers': the comparison catches a rating path that reads
the wrong logits (Unsloth's fast forward, imitated by unsloth_like.fast_forward, with the read of the code before
llm._logits_from) and a dropped adapter, passes the real code, and compares only like with like."""
import math

import torch

import llm
import unsloth_like
from scripts.backend_values import TOLERANCES, compare, record
from scripts.build_random_llama import WORDS, build_adapter

# Inputs of several lengths, so that a batch holds rows whose last tokens lie at different positions.
GIVEN = {"rating": [" ".join(WORDS[i:i + n]) for i, n in ((0, 3), (5, 40), (9, 11), (2, 25), (30, 7))],
         "questions": [" ".join(WORDS[i:i + n]) for i, n in ((1, 30), (4, 6), (20, 18), (8, 2), (12, 12))],
         "answers": [" ".join(WORDS[i:i + n]) for i, n in ((40, 5), (3, 12), (50, 1), (6, 20), (0, 8))]}


def read_as_before(model, input_ids, first):
    """The rating path's read of the logits before llm._logits_from: the positions asked for as a tensor, and whatever
    the model returned taken to be those positions only."""
    keep = torch.arange(first, input_ids.shape[1])
    return model(input_ids=input_ids.to(model.device), logits_to_keep=keep.to(model.device)).logits


def test_the_value_comparison_catches_a_rating_path_that_reads_the_wrong_logits(tiny_model, tmp_path, monkeypatch):
    adapter = build_adapter(tiny_model, tmp_path / "adapter")
    transformers_side = record(llm.load_model(adapter, batch_size=4), GIVEN)
    unsloth_like_side = llm.load_model(adapter, batch_size=4)
    with unsloth_like.fast_forward(unsloth_like_side.model):  # every position's logits, as Unsloth on a GPU
        right = compare(transformers_side, record(unsloth_like_side, GIVEN))
        monkeypatch.setattr(llm, "_logits_from", read_as_before)
        wrong = compare(transformers_side, record(unsloth_like_side, GIVEN))
    assert right["precision"] == "float32" and right["problems"] == [], right
    assert [p.split()[0] for p in wrong["problems"]] == ["score", "loglikelihood"], wrong
    for name in ("score", "loglikelihood"):  # far outside, not at the edge
        assert wrong["differences"][name] > 100 * TOLERANCES["float32"][name]
    assert wrong["differences"]["greedy"] == 0  # generation reads no kept positions


def test_the_value_comparison_catches_a_dropped_adapter(tiny_model, tmp_path):
    """The check's adapter has random non-zero weights (a trained one starts at zero), so a backend that dropped it
    would differ in every value."""
    adapter = build_adapter(tiny_model, tmp_path / "adapter")
    dropped = compare(record(llm.load_model(adapter, batch_size=4), GIVEN),
                      record(llm.load_model(tiny_model, batch_size=4), GIVEN))
    assert [p.split()[0] for p in dropped["problems"]] == ["score", "loglikelihood", "greedy"], dropped


def test_values_compare_only_like_with_like():
    a = {"backend": "hf", "precision": "bfloat16", "inputs_sha256": "x", "score": [3.0, math.nan],
         "loglikelihood": [-1.0, math.nan], "greedy": ["a", "b"]}
    assert compare(a, {**a, "backend": "unsloth", "score": [3.09, math.nan], "greedy": ["a", "x"]})["problems"] == []
    assert compare(a, {**a, "score": [3.11, math.nan]})["problems"] == ["score differs by 0.11 > 0.1"]
    assert compare(a, {**a, "loglikelihood": [-1.0, -2.0]})["problems"] == ["loglikelihood differs by inf > 0.03"]
    assert compare(a, {**a, "greedy": ["c", "d"]})["problems"] == ["greedy differs by 1 > 0.5"]
    assert compare(a, {**a, "backend": "unsloth", "precision": "float32"})["problems"] == [
        "hf ran in bfloat16, unsloth in float32"]
    assert compare(a, {**a, "inputs_sha256": "y"})["problems"] == ["the two records are of different inputs"]
