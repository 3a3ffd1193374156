"""The quality of the reasons (3_Predictor/5_evaluate_reasons.py): GPTScore as llm.Expert.loglikelihood computes it,
ROUGE-L, the LLM judge, the paired bootstrap, and the step itself on bad input and on a finished pipeline."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import llm
from conftest import DATASET, pipeline_env, run
from prompts import gptscore_prompt, gptscore_reverse_prompt, judge_score
from stats import paired_interval
from utils import COLUMNS

SMOLLM2 = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct"
SCRIPT = "3_Predictor/5_evaluate_reasons.py"
REVIEWS = [
    "These strings sound bright and warm on my acoustic, and they stayed in tune for a week of daily playing. "
    "The coating feels smooth, though they cost more than the ones I used before.",
    "The clamp of this capo is far too weak: the high E buzzes on every fret and the rubber pad came off after a "
    "month. I went back to my old one.",
    "Solid stand. It holds my bass and my electric without wobbling, folds flat for gigs, and the padding has not "
    "marked the finish. Worth the money.",
]
UNRELATED = "The user enjoys slow-cooked stews and will probably like a cookbook with many one-pot recipes."


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def model(request, tiny_model):
    if request.param == "smollm2" and not (SMOLLM2 / "config.json").exists():
        pytest.skip("models/SmolLM2-135M-Instruct is not here: run setup.sh")
    return llm.load_model(tiny_model if request.param == "tiny" else SMOLLM2)


def by_hand(model, question, answer):
    """The mean log-probability of the answer's tokens after the chat-template user turn, from the model's logits."""
    import torch

    tokenizer = model.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    tokens = tokenizer(answer, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logprobs[-len(tokens):].mean().item()


def test_gptscore_is_the_mean_log_probability_of_the_review_tokens(model):
    questions = [gptscore_prompt(r) for r in (REVIEWS[0], UNRELATED, "")]
    got = model.loglikelihood(questions, [REVIEWS[0], REVIEWS[1], REVIEWS[2]])
    expected = [by_hand(model, q, a) for q, a in zip(questions, REVIEWS)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_batched_gptscore_equals_one_at_a_time(model):
    questions = [gptscore_prompt(r) for r in REVIEWS + [UNRELATED, "", REVIEWS[1][:40]]]
    answers = [REVIEWS[i % 3] for i in range(len(questions) - 1)] + [""]  # the last: no answer tokens at all
    batched = model.loglikelihood(questions, answers, batch_size=4)
    single = np.array([model.loglikelihood([q], [a], batch_size=1)[0] for q, a in zip(questions, answers)])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)
    assert np.isfinite(batched[:-1]).all() and np.isnan(batched[-1])


def test_gptscore_is_cached_under_the_model_the_prompt_and_the_answer(model, tmp_path):
    from cache import ResultCache

    cached = llm.Expert(model.model, model.tokenizer, model.model_id, cache=ResultCache(tmp_path / "c.sqlite"))
    first = cached.loglikelihood([gptscore_prompt(UNRELATED)] * 2, REVIEWS[:2])
    assert len(cached.cache) == 2
    assert (cached.loglikelihood([gptscore_prompt(UNRELATED)] * 2, REVIEWS[:2]) == first).all()
    cached.loglikelihood([gptscore_prompt(UNRELATED)], [REVIEWS[2]])  # another answer: another key
    assert len(cached.cache) == 3


def test_a_reason_copied_from_the_review_scores_higher_than_an_unrelated_one():
    if not (SMOLLM2 / "config.json").exists():
        pytest.skip("models/SmolLM2-135M-Instruct is not here: run setup.sh (a random model prefers nothing)")
    from rouge_score import rouge_scorer

    evaluator = llm.load_model(SMOLLM2)
    copied = evaluator.loglikelihood([gptscore_prompt(r) for r in REVIEWS], REVIEWS)
    unrelated = evaluator.loglikelihood([gptscore_prompt(UNRELATED)] * 3, REVIEWS)
    assert (copied > unrelated + 0.5).all(), (copied, unrelated)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for review in REVIEWS:
        assert scorer.score(review, review)["rougeL"].fmeasure == 1.0
        assert scorer.score(review, UNRELATED)["rougeL"].fmeasure < 0.3
        assert scorer.score(review, "")["rougeL"].fmeasure == 0.0


def test_bootstrap_intervals_are_reproducible_with_a_fixed_seed():
    differences = np.random.default_rng(1).normal(0.2, 1.0, size=40)
    low, high = paired_interval(differences)
    assert (low, high) == paired_interval(differences)
    assert low < differences.mean() < high
    assert paired_interval(differences, seed=1) != (low, high)


def test_bootstrap_draws_its_resamples_in_chunks_with_the_interval_of_all_at_once():
    """10,000 resamples of 2,001 rows drawn at once hold 320 MB (the values and their indices); a test set of 10,000
    rows, 1.6 GB.  In chunks, memory stays at a few MB whatever the rows, and the interval is the same."""
    import tracemalloc

    from scipy.stats import bootstrap

    differences = np.random.default_rng(2).normal(0.1, 1.0, size=2_001)  # the last chunk is a partial one
    tracemalloc.start()
    try:
        interval = paired_interval(differences)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2 ** 20, f"{peak / 2 ** 20:.0f} MB"
    at_once = bootstrap((differences,), np.mean, n_resamples=10_000, method="percentile",
                        rng=np.random.default_rng(0)).confidence_interval
    assert interval == (float(at_once.low), float(at_once.high))


def test_judge_scores_are_read_robustly():
    assert judge_score("Score: 7\nIt anticipates the buzzing.") == 7
    assert judge_score("**Score:** 9/10") == 9 and judge_score("score = 3") == 3
    assert judge_score("I would give it a 7.") is None and judge_score("Score: 0") is None
    assert judge_score("Score: 11") is None and judge_score("") is None


# --------------------------------------------------------------------------------------------------- the step
def toy(tmp_path, reasons, reviews=None, rows=None):
    """Data/toy with a test split of four rows and a Reasoner file of `reasons` (for `rows` of them, default all)."""
    data = tmp_path / "Data" / "toy"
    (data / "raw_data").mkdir(parents=True)
    test = pd.DataFrame({"user_id": ["a", "b", "c", "d"], "item_id": ["x", "y", "x", "z"], "title": "Capo",
                         "ratings": [5.0, 2.0, 4.0, 3.0], "reviews": reviews or [REVIEWS[0], REVIEWS[1], REVIEWS[2], "ok"],
                         "unixReviewTime": [10, 11, 12, 13]})[COLUMNS]
    test.to_pickle(data / "raw_data" / "test.pkl")
    test.iloc[rows if rows is not None else slice(None)].assign(reasoner_reply=reasons).to_pickle(
        data / "reason_for_test_by_reasoner.pkl")
    return data


def test_a_reason_file_of_other_rows_is_refused_with_the_row_counts(tmp_path, tiny_model):
    data = toy(tmp_path, ["r1", "r2", "r3"], rows=[0, 1, 2])
    env = pipeline_env(tiny_model)
    result = run(SCRIPT, "--dataset", "toy", "--product_class", "Capo", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "holds 3 rows, 3 of them rows of raw_data/test.pkl, which has 4" in result.stderr
    other = pd.read_pickle(data / "raw_data" / "test.pkl").assign(reasoner_reply="r")
    other.loc[3, "unixReviewTime"] = 99  # as many rows, one of them another review
    other.to_pickle(data / "reason_for_test_by_reasoner.pkl")
    result = run(SCRIPT, "--dataset", "toy", "--product_class", "Capo", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 1 and "holds 4 rows, 3 of them rows of raw_data/test.pkl, which has 4" in result.stderr
    assert "2_Reasoner/7_generate_reason_for_test.py" in result.stderr


def test_empty_or_missing_reasons_are_counted_and_scored(tmp_path, tiny_model):
    data = toy(tmp_path, ["", None, np.nan, "The user will like the bright tone."],
               reviews=[REVIEWS[0], REVIEWS[1], "  ", REVIEWS[2]])
    out = run(SCRIPT, "--dataset", "toy", "--product_class", "Capo", cwd=tmp_path, env=pipeline_env(tiny_model)).stdout
    report = json.loads((data / "reason_quality.json").read_text())
    sft = report["test"]["results"]["Reasoner (SFT)"]
    # the row without review text is left out of every metric (its reason, NaN, with it): 3 rows, 2 empty reasons
    assert report["test"]["rows"] == 3 and report["test"]["rows_without_review_text"] == 1
    assert sft["rows"] == 3 and sft["empty_or_missing"] == 2 and np.isfinite(sft["GPTScore"])
    assert sft["ROUGE-L"] > 0  # only the one real reason overlaps its review
    assert report["evaluator"] == Path(tiny_model).name and "1 without review text left out" in out
    assert (data / "bleurt" / "reasoner-sft.candidates.txt").read_text().split("\n") == \
        ["", "", "The user will like the bright tone.", ""]


def test_gptscore_both_directions_their_mean_the_no_reason_control_and_the_lengths(tmp_path, tiny_model):
    """reason_quality.json's GPTScore figures, recomputed here from the evaluator: the review given the reason, the
    reason given the review (an empty reason has no tokens: left out there and in the mean), the mean of the two per
    row, the review given an empty reason (the control, and each variant's gain over it), and the reasons' lengths."""
    reasons = ["The user will like the bright tone.", "", "A weak clamp that buzzes.", "Solid, folds flat."]
    data = toy(tmp_path, reasons)
    out = run(SCRIPT, "--dataset", "toy", "--product_class", "Capo", cwd=tmp_path, env=pipeline_env(tiny_model)).stdout
    report = json.loads((data / "reason_quality.json").read_text())
    evaluator, reviews = llm.load_model(tiny_model), pd.read_pickle(data / "raw_data" / "test.pkl")["reviews"].tolist()
    forward = evaluator.loglikelihood([gptscore_prompt(r) for r in reasons], reviews)
    reverse = evaluator.loglikelihood([gptscore_reverse_prompt(r) for r in reviews], reasons)
    control = evaluator.loglikelihood([gptscore_prompt("")] * 4, reviews)
    assert np.isnan(reverse[1]) and np.isfinite(np.delete(reverse, 1)).all()
    lengths = [len(evaluator.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in reasons]
    results = report["test"]["results"]
    assert list(results) == ["No reason (control)", "Reasoner (SFT)"]
    sft, none = results["Reasoner (SFT)"], results["No reason (control)"]
    expected = {"GPTScore review|reason": forward.mean(), "GPTScore reason|review": np.nanmean(reverse),
                "GPTScore": np.nanmean((forward + reverse) / 2), "reason_tokens": np.mean(lengths)}
    for key, value in expected.items():
        assert sft[key] == pytest.approx(value, abs=1e-4), key
    assert none["GPTScore review|reason"] == pytest.approx(control.mean(), abs=1e-4)
    assert none["GPTScore"] is none["GPTScore reason|review"] is none["ROUGE-L"] is None and none["reason_tokens"] == 0
    gain, = [c for c in report["test"]["comparisons"] if c["against"] == "No reason (control)"]
    assert gain["metric"] == "GPTScore review|reason" and gain["method"] == "Reasoner (SFT)"
    assert gain["difference"] == pytest.approx((forward - control).mean(), abs=1e-4)
    assert gain["ci95"][0] <= gain["difference"] <= gain["ci95"][1]
    assert report["provenance"]["settings"]["gptscore_reverse_prompt"] == gptscore_reverse_prompt("<review>")
    header = out[out.index("quality of the reasons"):].splitlines()[1]
    assert header.split() == ["variant", "rows", "empty", "tokens", "GPTScore", "review|reason", "reason|review",
                              "ROUGE-L", "evaluator"]
    assert "the paper publishes neither its template nor its evaluator" in out


def test_the_step_on_a_finished_pipeline(finished, tmp_path, tiny_model):
    """Both Reasoner files present (a GRPO file copying the real reviews, as a known-best variant), the tables,
    reason_quality.json and the BLEURT inputs; a rerun gives the same bytes (cached scores, seeded bootstrap)."""
    work = tmp_path / "w"
    shutil.copytree(finished[0] / "Data", work / "Data")
    data = work / "Data" / DATASET
    test = pd.read_pickle(data / "raw_data" / "test.pkl")
    test.assign(reasoner_reply=test.reviews).iloc[::-1].to_pickle(data / "reason_for_test_by_reasoner_grpo.pkl")
    env = pipeline_env(tiny_model)
    out = run(SCRIPT, "--batch_size", "4", cwd=work, env=env).stdout
    report = json.loads((data / "reason_quality.json").read_text())
    n = len(test)
    assert report["dataset"] == DATASET and report["evaluator"] == Path(tiny_model).name and report["test"]["rows"] == n
    results = report["test"]["results"]
    assert list(results) == ["No reason (control)", "Reasoner (SFT)", "Reasoner (GRPO)"]
    assert "judge" not in results["Reasoner (SFT)"]
    assert results["Reasoner (GRPO)"]["ROUGE-L"] == 1.0 > results["Reasoner (SFT)"]["ROUGE-L"]
    empty = int((pd.read_pickle(data / "reason_for_test_by_reasoner.pkl")["reasoner_reply"].fillna("").str.strip()
                 == "").sum())
    assert results["Reasoner (SFT)"]["empty_or_missing"] == empty and results["Reasoner (GRPO)"]["empty_or_missing"] == 0
    assert all(r["rows"] == n for r in results.values())
    comparisons = report["test"]["comparisons"]
    assert [(c["metric"], c["method"], c["against"]) for c in comparisons] == [
        ("GPTScore review|reason", "Reasoner (SFT)", "No reason (control)"),
        ("GPTScore review|reason", "Reasoner (GRPO)", "No reason (control)"),
        *((metric, "Reasoner (GRPO)", "Reasoner (SFT)") for metric in
          ("GPTScore", "GPTScore review|reason", "GPTScore reason|review", "ROUGE-L"))]
    assert all(c["ci95"][0] <= c["difference"] <= c["ci95"][1] and c["rows"] == n for c in comparisons)
    assert report["provenance"]["inputs"].keys() >= {str(Path("Data") / DATASET / "reason_for_test_by_reasoner.pkl")}
    assert "quality of the reasons" in out and "Reasoner (GRPO)" in out and "paired bootstrap 95% interval" in out
    bleurt = data / "bleurt"
    assert sorted(p.name for p in bleurt.iterdir()) == ["reasoner-grpo.candidates.txt", "reasoner-sft.candidates.txt",
                                                        "references.txt"]
    assert bleurt.joinpath("reasoner-grpo.candidates.txt").read_text() == bleurt.joinpath("references.txt").read_text()
    assert all(len(p.read_text().splitlines()) == n for p in bleurt.iterdir())
    before = (data / "reason_quality.json").read_bytes()
    run(SCRIPT, "--batch_size", "4", cwd=work, env=env)
    assert (data / "reason_quality.json").read_bytes() == before


def test_with_teacher_asks_the_http_teacher_once_and_a_rerun_asks_nothing(finished, tmp_path, tiny_model):
    work = tmp_path / "w"
    shutil.copytree(finished[0] / "Data", work / "Data")
    data = work / "Data" / DATASET
    n = len(pd.read_pickle(data / "raw_data" / "test.pkl"))
    server = finished[2]  # the endpoint run_all.sh used: the teacher's cache key holds it
    env = pipeline_env(tiny_model, server)
    received, repeated = server.received, server.repeated
    run(SCRIPT, "--with_teacher", "--judge", cwd=work, env=env)
    report = json.loads((data / "reason_quality.json").read_text())
    # run_all.sh judged the Reasoner's reasons already (same teacher settings, same cache): only the teacher's own
    # reasons (one per test row) and their judgements (one per row with review text) are new
    asked = server.received - received
    assert asked == n + report["test"]["rows"] and server.repeated == repeated
    teacher = "Teacher (gpt-3.5-turbo)"
    assert set(report["test"]["results"]) == {"No reason (control)", "Reasoner (SFT)", "Reasoner (GRPO)", teacher}
    assert report["judge"] == "gpt-3.5-turbo"
    for name, result in report["test"]["results"].items():
        if name != "No reason (control)":  # not judged: it has no reason
            assert 1 <= result["judge"] <= 10 and result["judge_unreadable"] == 0
    reasons = pd.read_pickle(data / "reason_for_test_by_teacher.pkl")["reasoner_reply"]
    assert len(reasons) == n and reasons.str.startswith("Given the user's focus").all()
    assert {c["metric"] for c in report["test"]["comparisons"]} == {
        "GPTScore", "GPTScore review|reason", "GPTScore reason|review", "ROUGE-L", "judge"}
    before = (data / "reason_quality.json").read_bytes()
    run(SCRIPT, "--with_teacher", "--judge", cwd=work, env=env)
    assert server.received - received == asked and (data / "reason_quality.json").read_bytes() == before
