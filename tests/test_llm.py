"""Batched generation and rating prediction equal one-at-a-time, on the tiny model and on the real SmolLM2."""
from pathlib import Path

import numpy as np
import pytest

import llm
from utils import ResultCache

SMOLLM2 = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct"
QUESTIONS = [f"Question {i}: does the user like " + "bright guitar strings, " * (i % 4 + 1) for i in range(7)]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def model(request, tiny_model):
    if request.param == "smollm2" and not (SMOLLM2 / "config.json").exists():
        pytest.skip("models/SmolLM2-135M-Instruct is not here: run setup.sh")
    return llm.load_model(tiny_model if request.param == "tiny" else SMOLLM2)


def test_batched_generation_equals_one_at_a_time(model):
    batched = llm.generate(*model, QUESTIONS, max_new_tokens=12, batch_size=4)
    single = [llm.generate(*model, [q], max_new_tokens=12, batch_size=1)[0] for q in QUESTIONS]
    assert batched == single and all(batched)


def test_batched_rating_prediction_equals_one_at_a_time(model):
    batched = llm.predict_ratings(*model, QUESTIONS, batch_size=3)
    single = np.array([llm.predict_ratings(*model, [q], batch_size=1)[0] for q in QUESTIONS])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert ((batched >= 1) & (batched <= 5)).all()


def test_rating_prediction_is_the_expectation_over_the_five_digits(model):
    import torch

    m, tokenizer = model
    text = llm.chat_text(tokenizer, QUESTIONS[0], "Predicted Rating: ")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = m(**ids).logits[0, -1]
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "12345"]
    expected = (torch.softmax(logits[digits], -1) * torch.arange(1.0, 6.0)).sum().item()
    assert llm.predict_ratings(m, tokenizer, QUESTIONS[:1])[0] == pytest.approx(expected, abs=1e-5)


def test_chat_text_comes_from_the_template_without_a_second_bos(model):
    _, tokenizer = model
    ids = tokenizer(llm.chat_text(tokenizer, "hello"), add_special_tokens=False).input_ids
    assert ids[0] != ids[1] or ids[0] != tokenizer.bos_token_id  # never two BOS tokens in a row
    assert llm.stop_token_ids(model[0], tokenizer)  # from the tokenizer and generation config, never hard-coded


def test_sampled_generation_is_reproducible(model):
    a = llm.generate(*model, QUESTIONS[:4], max_new_tokens=8, temperature=1.0, seed=3, batch_size=2)
    b = llm.generate(*model, QUESTIONS[:4], max_new_tokens=8, temperature=1.0, seed=3, batch_size=2)
    assert a == b


def test_cache_skips_what_is_done_and_keeps_the_same_answers(model, tmp_path):
    cache = ResultCache(tmp_path / "c.sqlite")
    first = llm.generate(*model, QUESTIONS[:5], max_new_tokens=6, batch_size=2, cache=cache, model_id="m")
    assert len(cache) == 5
    calls = []
    m, tokenizer = model
    original = m.generate
    m.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        assert llm.generate(m, tokenizer, QUESTIONS[:5], max_new_tokens=6, batch_size=2, cache=cache,
                            model_id="m") == first
    finally:
        m.generate = original
    assert not calls
