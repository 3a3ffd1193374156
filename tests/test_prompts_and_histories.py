"""The prompts equal the official text word for word, and the histories are the official ones, without leakage."""
import numpy as np
import pandas as pd
import pytest

from official_reference import (OFFICIAL_SUMMARY_EXAMPLE, official_direct_prediction_prompt, official_histories,
                                official_rating_prompt, official_reason_prompt)
from prompts import direct_prediction_prompt, rating_prompt, reason_prompt, summary_prompt
from histories import HistoryIndex


def review_log(n=400, users=15, items=25, seed=0) -> pd.DataFrame:
    """A random review log with many ties in time (day granularity), heavy and light users, NaN-free."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": [f"u{k}" for k in rng.zipf(1.6, n) % users],
        "item_id": [f"i{k}" for k in rng.zipf(1.4, n) % items],
        "title": [f"Item title {k}" for k in rng.integers(0, 50, n)],
        "ratings": rng.integers(1, 6, n).astype(float),
        "reviews": [f"review text {k}" for k in range(n)],
        "unixReviewTime": rng.integers(0, 60, n) * 86400,
        "aspect_preference_summary": [f"Positive Aspects: p{k}\nNegative Aspects: n{k}\n" for k in range(n)],
    })


def test_summary_prompt_is_the_official_text():
    assert summary_prompt("Musical Instruments", "Snark SN-5 Tuner", 4.0,
                          "Clips on well, reads fast, a bit dim in sunlight.") == OFFICIAL_SUMMARY_EXAMPLE


def test_history_index_matches_the_official_scan():
    log = review_log()
    index = HistoryIndex(log)
    targets = review_log(n=120, seed=1)  # new targets at times that tie with the log's
    for row in targets.itertuples():
        users, items, user_avg, item_avg = official_histories(log, row)
        h = index(row.user_id, row.item_id, row.unixReviewTime)
        assert [r.summary for r in h.user] == users["aspect_preference_summary"].tolist()
        assert [r.summary for r in h.item] == items["aspect_preference_summary"].tolist()
        assert h.user_avg == pytest.approx(user_avg) if len(users) else h.user_avg is None
        assert h.item_avg == pytest.approx(item_avg) if len(items) else h.item_avg is None


def test_prompts_are_the_official_text():
    log = review_log()
    index = HistoryIndex(log)
    warm = [row for row in review_log(n=80, seed=2).itertuples()
            if len(official_histories(log, row)[0]) and len(official_histories(log, row)[1])]
    assert len(warm) > 20
    for row in warm:
        h = index(row.user_id, row.item_id, row.unixReviewTime)
        assert reason_prompt("Musical Instruments", row.title, h) == official_reason_prompt("Musical Instruments", row, log)
        assert reason_prompt("Book", row.title, h, hint=row.ratings) == \
            official_reason_prompt("Book", row, log, hint=row.ratings)
        assert rating_prompt("Book", row.title, h) == official_rating_prompt("Book", row, log)
        assert rating_prompt("Book", row.title, h, "It fits.") == official_rating_prompt("Book", row, log, "It fits.")
        assert direct_prediction_prompt("Book", row.title, h) == official_direct_prediction_prompt("Book", row, log)


def test_no_history_shows_na_never_nan():
    log = review_log()
    h = HistoryIndex(log)("new user", "new item", 10**9)
    for prompt in (reason_prompt("Book", "T", h), rating_prompt("Book", "T", h), rating_prompt("Book", "T", h, "A")):
        assert "nan" not in prompt.lower() and "N/A" in prompt
    assert "User's Average Rating (all previous ratings): N/A" in rating_prompt("Book", "T", h)


def test_missing_summary_is_empty_text_not_nan():
    log = review_log(n=5, users=1, items=1)
    log.loc[0, "aspect_preference_summary"] = np.nan
    h = HistoryIndex(log)("u0", "i0", 10**9)
    assert "nan" not in reason_prompt("Book", "T", h)


def test_histories_are_strictly_before_the_target_and_at_most_ten():
    log = review_log(n=600, users=5, items=5)
    index = HistoryIndex(log)
    for row in log.itertuples():
        h = index(row.user_id, row.item_id, row.unixReviewTime)
        assert len(h.user) <= 10 and len(h.item) <= 10
        assert all(r.time < row.unixReviewTime for r in h.user + h.item)  # ties with the target excluded too
        earlier = log[(log.user_id == row.user_id) & (log.unixReviewTime < row.unixReviewTime)]
        assert h.user_count == len(earlier)


def test_a_review_never_appears_in_its_own_history():
    log = review_log(n=300)
    index = HistoryIndex(log)
    for row in log.itertuples():
        h = index(row.user_id, row.item_id, row.unixReviewTime)
        assert row.aspect_preference_summary not in [r.summary for r in h.user + h.item]


def test_histories_from_the_whole_table_when_asked_as_the_authors_original_test_code():
    """before_target=False (a4fa718's test-time code, its time filter commented out): the latest reviews of the whole
    table and averages over all of them, whatever the target's time."""
    log = review_log(n=300, users=4, items=4)
    index = HistoryIndex(log, max_his=10)
    row = log.iloc[0]
    h = index(row.user_id, row.item_id, 0, before_target=False)
    users = log[log.user_id == row.user_id].sort_values("unixReviewTime", kind="stable")
    assert [r.summary for r in h.user] == users["aspect_preference_summary"].tail(10).tolist()
    assert h.user_avg == pytest.approx(users["ratings"].mean()) and h.user_count == len(users)


def test_has_history_is_what_the_lookup_finds_for_whole_splits():
    """The vectorized check that counts the rows with a user / item history (data preparation, evaluation) agrees
    with the per-row lookup the prompts are built from: ties in time (no history at the same time), unseen users and
    items, both boundaries."""
    log = review_log()
    index = HistoryIndex(log)
    targets = pd.concat([review_log(n=200, users=20, items=30, seed=3), log]).reset_index(drop=True)
    for before_target in (True, False):
        found = index.for_rows(targets, before_target)
        user, item = index.has_history(targets.set_axis(targets.index[::-1]), before_target)  # any index labels
        assert user.tolist() == [h.user_count > 0 for h in found]
        assert item.tolist() == [h.item_count > 0 for h in found]
        assert 0 < user.sum() < len(targets) and 0 < item.sum() < len(targets)
