"""Batched generation and rating prediction equal one-at-a-time, on the tiny model and on the real SmolLM2."""
from pathlib import Path

import numpy as np
import pytest

import llm
import unsloth_like
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


def test_ratings_and_likelihoods_are_the_same_when_the_model_returns_every_position(model, tiny_model):
    """Unsloth's fast forward ignores a tensor `logits_to_keep` and returns every position's logits (imitated by
    unsloth_like.fast_forward), and a model may return every position whatever it is asked: `score` and
    `loglikelihood` read the same numbers as from transformers, which returns the kept positions only; also through a
    LoRA adapter, as the experts are."""
    import torch
    from peft import LoraConfig, get_peft_model

    answers = [q[::-1] for q in QUESTIONS]  # of several lengths

    def numbers(expert):
        return expert.score(QUESTIONS, batch_size=3), expert.loglikelihood(QUESTIONS, answers, batch_size=3)

    adapted = llm.load_model(tiny_model)
    adapted.model = get_peft_model(adapted.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    for expert in (model, adapted):
        expected = numbers(expert)
        ids = torch.tensor([expert.encode(["hello there"])[0]])
        with unsloth_like.fast_forward(expert.model):
            assert expert.model(input_ids=ids, logits_to_keep=torch.tensor([1])).logits.shape[1] == ids.shape[1]
            assert expert.model(input_ids=ids, logits_to_keep=2).logits.shape[1] == 2
            got = numbers(expert)
        with unsloth_like.fast_forward(expert.model, unsloth_like.every_position):  # a model that ignores the count too
            assert expert.model(input_ids=ids, logits_to_keep=2).logits.shape[1] == ids.shape[1]
            got_all = numbers(expert)
        for g, a, e in zip(got, got_all, expected):
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
            np.testing.assert_allclose(a, e, rtol=0, atol=1e-5)


def test_answers_do_not_depend_on_the_tokenizers_padding_side(model):
    """Unsloth's for_training and its patched trainers set the shared tokenizer's padding_side to "right" (its
    from_pretrained and for_inference set "left"): generation and scoring pad each batch on the side they need
    themselves, so that setting changes no answer."""
    questions = QUESTIONS[:4]
    expected = model.generate(questions, max_new_tokens=8, batch_size=4), model.score(questions, batch_size=4)
    saved, model.tokenizer.padding_side = model.tokenizer.padding_side, "right"
    try:
        got = model.generate(questions, max_new_tokens=8, batch_size=4), model.score(questions, batch_size=4)
    finally:
        model.tokenizer.padding_side = saved
    assert got[0] == expected[0]
    np.testing.assert_allclose(got[1], expected[1], rtol=0, atol=1e-6)


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


def test_cached_answers_come_back_for_the_same_weights_run_the_same_way_only(tiny_model, tmp_path, monkeypatch):
    """Over one cache: a fresh load, a copy of the base model elsewhere and another batch size get the cached answers
    back without running the model; an adapter on another base model, another dtype, another backend or a 4-bit base
    are other models, whose answers are computed anew."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model

    from scripts.build_random_llama import build

    cache = ResultCache(tmp_path / "c.sqlite")
    first = llm.load_model(tiny_model, cache=cache, batch_size=2)
    expected = first.score(QUESTIONS)
    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    again = llm.load_model(copy, cache=cache, batch_size=3)
    again.model.forward = lambda *a, **k: pytest.fail("the model ran for a cached answer")
    assert (again.score(QUESTIONS) == expected).all() and len(cache) == len(QUESTIONS)

    peft = get_peft_model(llm.load_model(tiny_model).model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    other_base = build(tmp_path / "other", "tiny", seed=1)
    on_tiny = llm.load_model(tmp_path / "adapter", cache=cache).score(QUESTIONS)
    on_other = llm.load_model(tmp_path / "adapter", model_path=other_base, cache=cache).score(QUESTIONS)
    assert len(cache) == 3 * len(QUESTIONS) and np.abs(on_tiny - on_other).max() > 1e-4

    with monkeypatch.context() as m:
        m.setattr(llm, "default_dtype", lambda: torch.bfloat16)
        in_bf16 = llm.load_model(tiny_model, cache=cache)
        assert in_bf16.model.dtype == torch.bfloat16
        in_bf16.score(QUESTIONS)
    assert len(cache) == 4 * len(QUESTIONS)

    model = first.model  # the backend and the quantization count as loaded (neither loads on a CPU)
    with monkeypatch.context() as m:
        m.setattr(llm, "backend", lambda: "unsloth")
        assert llm.model_id(model, tiny_model) != first.model_id
    with monkeypatch.context() as m:
        m.setattr(model, "is_loaded_in_4bit", True, raising=False)
        assert llm.model_id(model, tiny_model) != first.model_id
    assert llm.model_id(model, tiny_model) == first.model_id
