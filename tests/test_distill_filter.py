"""The reason filter of 2_Reasoner/4, rule by rule: tau, hints, forbidden words, dropped targets."""
import pytest

import reason_filter as distill


class Scripted:
    """A teacher whose k-th answer for target i is given, and a reward model whose prediction for a reason is given:
    the rule is tested, not any model."""

    def __init__(self, answers, predictions):
        self.answers, self.predictions, self.asked, self.scored = answers, predictions, [], []

    def ask(self, rows, attempt):
        self.asked.append((list(rows), attempt))
        return [self.answers[i][attempt] for i in rows]

    def score(self, rows, reasons):
        self.scored.append(list(rows))
        return [self.predictions[text] for text in reasons]


def test_first_try_kept_when_it_helps_by_more_than_nothing():
    # truth 5, without 4: |5-4.2| - |5-4| = -0.2 < 0.1 -> kept at attempt 0; target 1 gets no hint round
    s = Scripted({0: ["helps"], 1: ["neutral"]}, {"helps": 4.2, "neutral": 4.05})
    kept, report = distill.keep_helpful_reasons([5, 5], [4, 4], s.ask, s.score)
    assert kept == {0: ("helps", 0), 1: ("neutral", 0)}  # 0.95 - 1 = -0.05 < 0.1: also kept
    assert report["accepted_per_attempt"] == {0: 2} and report["dropped"] == 0 and s.asked == [([0, 1], 0)]


@pytest.mark.parametrize("pred_with, kept", [(4.4375, True), (4.375, False), (4.25, False), (5.0, True)])
def test_tau_is_a_strict_bound(pred_with, kept):
    # truth 5, without 4.5 (error 0.5), tau 0.125 (exact in binary): kept iff |5 - pred_with| - 0.5 < 0.125
    s = Scripted({0: ["r"]}, {"r": pred_with})
    result, _ = distill.keep_helpful_reasons([5], [4.5], s.ask, s.score, tau=0.125, max_sample_num=0)
    assert (0 in result) == kept


def test_the_defaults_are_the_papers():
    assert distill.TAU == distill.FilterArguments().tau == 0.1
    assert distill.MAX_SAMPLE_NUM == distill.FilterArguments().max_sample_num == 10
    assert distill.FORBIDDEN_WORDS == ["1.0", "2.0", "3.0", "4.0", "5.0", "rating ", "star ", "stars "]


def test_hinted_retries_until_one_passes_and_forbidden_words_are_rejected_unseen():
    answers = {0: ["bad", "rated 5.0 stars", "the star of the show", "good", "never asked"]}
    s = Scripted(answers, {"bad": 2.0, "good": 4.8, "the star of the show": 4.9})
    kept, report = distill.keep_helpful_reasons([5], [4], s.ask, s.score)
    assert kept == {0: ("good", 3)}
    assert [a for _, a in s.asked] == [0, 1, 2, 3]  # stops at the first kept
    assert report["forbidden_rejected"] == 2  # "5.0" ... "stars " and "star " never reach the reward model
    assert report["accepted_per_attempt"] == {0: 0, 1: 0, 2: 0, 3: 1}


def test_unhinted_reasons_are_not_checked_for_forbidden_words():
    s = Scripted({0: ["a 5.0 rating seems likely"]}, {"a 5.0 rating seems likely": 5.0})
    kept, _ = distill.keep_helpful_reasons([5], [3], s.ask, s.score)
    assert kept == {0: ("a 5.0 rating seems likely", 0)}  # as the official code and the paper


def test_targets_without_a_kept_reason_are_dropped_and_counted_after_ten_hints():
    answers = {0: ["worse"] * 11, 1: ["better"]}
    s = Scripted(answers, {"worse": 1.0, "better": 3.0})
    kept, report = distill.keep_helpful_reasons([4, 3], [4, 2], s.ask, s.score, max_sample_num=10)
    assert kept == {1: ("better", 0)}
    assert len(s.asked) == 11 and s.asked[-1] == ([0], 10)
    assert report["dropped"] == 1 and report["kept"] == 1 and report["dropped_rate"] == 0.5


def test_each_round_scores_all_its_candidates_in_one_call():
    answers = {i: ["x", "y"] for i in range(5)}
    s = Scripted(answers, {"x": 1.0, "y": 5.0})
    distill.keep_helpful_reasons([5] * 5, [4] * 5, s.ask, s.score, max_sample_num=1)
    assert s.scored == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
