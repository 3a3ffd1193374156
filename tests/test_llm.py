"""Batched generation and rating prediction equal one-at-a-time, on the tiny model and on the real SmolLM2."""
from pathlib import Path

import numpy as np
import pytest

import llm
from cache import ResultCache

SMOLLM2 = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct"
QUESTIONS = [f"Question {i}: does the user like " + "bright guitar strings, " * (i % 4 + 1) for i in range(7)]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def model(request, tiny_model):
    if request.param == "smollm2" and not (SMOLLM2 / "config.json").exists():
        pytest.skip("models/SmolLM2-135M-Instruct is not here: run setup.sh")
    return llm.load_model(tiny_model if request.param == "tiny" else SMOLLM2)


def test_batched_generation_equals_one_at_a_time(model):
    batched = model.generate(QUESTIONS, max_new_tokens=12, batch_size=4)
    single = [model.generate([q], max_new_tokens=12, batch_size=1)[0] for q in QUESTIONS]
    assert batched == single and all(batched)


def test_batched_rating_prediction_equals_one_at_a_time(model):
    batched = model.score(QUESTIONS, batch_size=3)
    single = np.array([model.score([q], batch_size=1)[0] for q in QUESTIONS])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert ((batched >= 1) & (batched <= 5)).all()


def test_rating_prediction_is_the_expectation_over_the_five_digits(model):
    import torch

    tokenizer = model.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], tokenize=False,
                                         add_generation_prompt=True) + "Predicted Rating: "
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model.model(**ids).logits[0, -1]
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "12345"]
    expected = (torch.softmax(logits[digits], -1) * torch.arange(1.0, 6.0)).sum().item()
    assert model.score(QUESTIONS[:1])[0] == pytest.approx(expected, abs=1e-5)


def test_chat_text_comes_from_the_template_without_a_second_bos(model):
    tokenizer = model.tokenizer
    ids = tokenizer(llm.chat_text(tokenizer, "hello"), add_special_tokens=False).input_ids
    assert ids[0] != ids[1] or ids[0] != tokenizer.bos_token_id  # never two BOS tokens in a row


def test_generation_stops_on_a_stop_token_known_only_to_the_generation_config(model):
    """Stop tokens come from the tokenizer and the generation config (Llama-3's <|eot_id|> lives there), never from a
    hard-coded list: make a token the model is about to write a stop token of the config, and generation ends there."""
    m, tokenizer = model.model, model.tokenizer
    free = model.generate(QUESTIONS[:1], max_new_tokens=12)[0]
    ids = tokenizer(free, add_special_tokens=False).input_ids
    stop = ids[len(ids) // 2]  # a token in the middle of the free answer
    original = m.generation_config.eos_token_id
    configured = [original] if isinstance(original, int) else list(original or [])
    m.generation_config.eos_token_id = configured + [stop]
    try:
        stopped = model.generate(QUESTIONS[:1], max_new_tokens=12)[0]
    finally:
        m.generation_config.eos_token_id = original
    assert free.startswith(stopped) and len(stopped) < len(free)


def test_sampled_generation_is_reproducible(model):
    """The same seed samples the same texts (whatever the batching); another seed, other texts; neither is greedy."""
    a = model.generate(QUESTIONS[:4], max_new_tokens=8, temperature=1.0, seed=3, batch_size=2)
    b = model.generate(QUESTIONS[:4], max_new_tokens=8, temperature=1.0, seed=3, batch_size=2)
    other = model.generate(QUESTIONS[:4], max_new_tokens=8, temperature=1.0, seed=4, batch_size=2)
    greedy = model.generate(QUESTIONS[:4], max_new_tokens=8, batch_size=2)
    assert a == b and a != other and a != greedy


def test_cache_skips_what_is_done_and_keeps_the_same_answers(model, tmp_path):
    cached = llm.Expert(model.model, model.tokenizer, "m", cache=ResultCache(tmp_path / "c.sqlite"), batch_size=2)
    first = cached.generate(QUESTIONS[:5], max_new_tokens=6)
    assert len(cached.cache) == 5
    calls = []
    m = model.model
    original = m.generate
    m.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        assert cached.generate(QUESTIONS[:5], max_new_tokens=6) == first
    finally:
        m.generate = original
    assert not calls


def test_double_bos_reproduces_the_official_logits_weighted_predict(tiny_model):
    """--double_bos: the official logits_weighted_predict tokenizes the rendered chat text with the tokenizer's own
    BOS on top of the template's; by default the template's BOS stands alone."""
    import torch

    official = llm.load_model(tiny_model, double_bos=True)
    tokenizer = official.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], tokenize=False,
                                         add_generation_prompt=True) + "Predicted Rating: "
    inputs = tokenizer(text, return_tensors="pt")  # as the official code: special tokens added
    assert inputs.input_ids[0, 0] == inputs.input_ids[0, 1] == tokenizer.bos_token_id
    with torch.no_grad():
        logits = official.model(**inputs).logits[0, -1]
    probs = torch.softmax(logits[tokenizer.convert_tokens_to_ids(["1", "2", "3", "4", "5"])], dim=0)
    expected = min(max(float((probs * torch.tensor([1.0, 2, 3, 4, 5])).sum()), 1), 5)
    assert official.score(QUESTIONS[:1])[0] == pytest.approx(expected, abs=1e-5)
    single = llm.load_model(tiny_model)
    assert single.encode([text])[0] == inputs.input_ids[0, 1:].tolist()
    assert abs(single.score(QUESTIONS[:1])[0] - expected) > 1e-6  # the second BOS changes the numbers
