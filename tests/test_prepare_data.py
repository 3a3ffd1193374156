"""Data/prepare_data.py, run as the user runs it: on real Amazon 2014 reviews (the committed slice of the Musical
Instruments 5-core file, tests/fixtures/make_review_slice.py), on small files in the other formats, and on bad inputs
(one clear message, no partial dataset)."""
import gzip
import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from utils import COLUMNS  # noqa: E402

SCRIPT = REPO / "Data" / "prepare_data.py"
REAL = REPO / "tests" / "fixtures" / "reviews_Musical_Instruments_5.60users.json.gz"
SPLITS = ("train", "valid", "test")
DTYPES = {"user_id": "str", "item_id": "str", "title": "str", "ratings": "float64", "reviews": "str",
          "unixReviewTime": "int64"}


def prepare(data_dir, *args):
    return subprocess.run([sys.executable, str(SCRIPT), "--data_dir", str(data_dir), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True)


def prepared(data_dir, name, *args):
    run = prepare(data_dir, "--dataset", name, *args)
    assert run.returncode == 0, run.stderr
    splits = {s: pd.read_pickle(data_dir / name / "raw_data" / f"{s}.pkl") for s in SPLITS}
    return splits, json.loads((data_dir / name / "dataset.json").read_text()), run.stdout


def write_lines(path, lines, gz=False):
    with (gzip.open if gz else open)(path, "wt", encoding="utf-8") as f:
        f.writelines(f"{line}\n" for line in lines)
    return path


def jsonl(path, records, gz=False):
    return write_lines(path, [json.dumps(r) for r in records], gz)


def amazon2014(n=10, times=None):
    times = times or range(1_000_000_000, 1_000_000_000 + n * 86_400, 86_400)
    return [{"reviewerID": f"U{i % 3}", "asin": f"B{i % 4}", "reviewerName": "x", "helpful": [0, 0],
             "reviewText": f"text {i}", "overall": float(1 + i % 5), "summary": f"summary {i}",
             "unixReviewTime": t, "reviewTime": "01 1, 2001"} for i, t in enumerate(times)]


def everything(splits):
    return pd.concat(splits.values(), ignore_index=True)


def file_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- the real file
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp("data"), "Musical_Instruments", "--input", REAL)


def test_real_file_columns_dtypes_and_counts(real):
    splits, info, _ = real
    for df in splits.values():
        assert list(df.columns) == COLUMNS
        assert {c: str(t) for c, t in df.dtypes.items()} == DTYPES
        assert df["ratings"].between(1, 5).all()
        assert list(df.index) == list(range(len(df)))
    df = everything(splits)
    assert len(df) == 416
    assert (df["user_id"].nunique(), df["item_id"].nunique()) == (60, 299)
    assert (df["title"] == df["item_id"]).all()  # no --meta: the id stands in
    assert (df["reviews"] == "").sum() == 1


def test_real_split_is_chronological_and_keeps_ties_together(real):
    splits, info, _ = real
    train, valid, test = (splits[s]["unixReviewTime"] for s in SPLITS)
    assert train.max() < valid.min() and valid.max() < test.min()  # strict: no timestamp in two splits
    assert info["split"]["cut_times"] == [valid.min(), test.min()]
    for df in splits.values():
        assert df["unixReviewTime"].is_monotonic_increasing
    shares = [len(splits[s]) / 416 for s in SPLITS]
    assert shares == pytest.approx([0.8, 0.1, 0.1], abs=0.02)


def test_real_dataset_json(real):
    splits, info, stdout = real
    assert info["source_md5"] == "ce65ee40983704a437d646358462bf16"
    assert (info["format"], info["product_class"], info["meta"], info["meta_md5"]) == (
        "amazon2014", "Musical Instruments", None, None)
    assert info["total"] == {"rows": 416, "users": 60, "items": 299}
    for s in SPLITS:
        assert info["splits"][s] == {"rows": len(splits[s]), "users": splits[s]["user_id"].nunique(),
                                     "items": splits[s]["item_id"].nunique()}
    assert "1 reviews have no text" in stdout
    assert "no --meta given" in stdout


def test_real_max_users_is_an_exact_deterministic_sample(tmp_path):
    runs = [prepared(tmp_path / str(i), "MI", "--input", REAL, "--max_users", 50) for i in range(2)]
    assert everything(runs[0][0])["user_id"].nunique() == 50
    assert runs[0][1]["max_users"] == 50 and runs[0][1]["total"]["users"] == 50
    assert file_bytes(tmp_path / "0" / "MI") == file_bytes(tmp_path / "1" / "MI")
    other_seed, _, _ = prepared(tmp_path / "2", "MI", "--input", REAL, "--max_users", 50, "--seed", 1)
    assert set(everything(other_seed)["user_id"]) != set(everything(runs[0][0])["user_id"])


def with_history(splits) -> dict:
    """The rows of each split with a user / item history, by the pipeline's own lookup."""
    from histories import history_coverage, history_shares

    return history_shares(history_coverage(splits["train"], {s: splits[s] for s in SPLITS[1:]}))


def test_real_dense_slice_gives_every_held_out_row_both_histories_and_is_deterministic(tmp_path):
    runs = [prepared(tmp_path / str(i), "MI", "--input", REAL, "--dense_slice", 150, "--seed", 1) for i in range(2)]
    splits, info, stdout = runs[0]
    df, whole = everything(splits), everything(prepared(tmp_path / "whole", "MI", "--input", REAL)[0])
    assert 0 < len(df) <= 150 and info["dense_slice"] == 150 and info["total"]["rows"] == len(df)
    assert len(df.merge(whole, on=COLUMNS)) == len(df)  # whole reviews of the file, unchanged
    assert len(df) / df["item_id"].nunique() > len(whole) / whole["item_id"].nunique()  # denser than the file
    shares = with_history(splits)
    for split in ("valid", "test"):
        assert shares[split]["with_both"] == shares[split]["rows"] == len(splits[split]) > 0
    for split, counts in shares.items():  # the summary prints the same shares
        assert re.search(rf"\n{split} +{counts['rows']} +{counts['with_user_history']} \(\d+%\) +"
                         rf"{counts['with_item_history']} \(\d+%\) +{counts['with_both']} \(", stdout), split
    assert file_bytes(tmp_path / "0" / "MI") == file_bytes(tmp_path / "1" / "MI")
    other_seed, _, _ = prepared(tmp_path / "2", "MI", "--input", REAL, "--dense_slice", 150, "--seed", 2)
    assert set(everything(other_seed)["user_id"]) != set(df["user_id"])


def test_real_dense_slice_too_sparse_to_keep_warm_held_out_rows_says_what_to_do(tmp_path):
    """The file's 60 users are a random sample: dropping the held-out reviews without histories moves the cut times
    again and again until, with this seed, no validation review is left."""
    run = prepare(tmp_path / "data", "--dataset", "x", "--input", REAL, "--dense_slice", 200, "--seed", 0)
    assert run.returncode == 1 and run.stderr.count("error:") == 1 and "Traceback" not in run.stderr
    assert "split would be empty" in run.stderr and "a larger --dense_slice) or another --seed" in run.stderr
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------------- small files
def reviews(pairs) -> list[dict]:
    """Amazon 2014 records of (user, item) pairs, one day apart in this order."""
    return [{**record, "reviewerID": user, "asin": item}
            for record, (user, item) in zip(amazon2014(len(pairs)), pairs)]


def test_dense_slice_peels_the_least_reviewed_users_and_items_first(tmp_path):
    """Six one-off reviews (new users of new items), then three users who each reviewed the same three items: a slice
    of 9 is the block, whatever the seed; a slice of 12 keeps the block and three one-off reviews, which ones drawn
    from the seed.  (The one-off reviews come first, in the training split: the warm step alone would keep them.)"""
    one_off = [(f"X{i}", f"C{i}") for i in range(6)]
    block = [(f"U{(i + d) % 3}", f"B{i}") for d in range(3) for i in range(3)]
    file = jsonl(tmp_path / "r.json", reviews(one_off + block))

    def kept(n, seed):
        splits, _, stdout = prepared(tmp_path / f"{n}-{seed}", "x", "--input", file, "--dense_slice", n, "--seed", seed)
        return set(zip(everything(splits)["user_id"], everything(splits)["item_id"])), stdout

    assert len(kept(15, 0)[0]) == 15  # nothing to peel, and every held-out review is warm
    for seed in (0, 1):
        pairs, stdout = kept(9, seed)
        assert pairs == set(block) and "kept 3 of 9 users, 3 of 9 items, 9 of 15 reviews" in stdout
    (first, _), (second, _) = kept(12, 0), kept(12, 1)
    assert set(block) < first and set(block) < second and len(first) == len(second) == 12 and first != second


def test_dense_slice_drops_cold_held_out_rows_until_none_is_left(tmp_path):
    """Ten reviews: the test review's user (D) has no earlier one, so it goes; the cut times move, and C's only
    review, a training review before, is a validation review now, without a history: it goes too.  One pass would
    have kept it."""
    pairs = [("A", "X"), ("B", "Y"), ("A", "Y"), ("B", "X"), ("A", "X"), ("B", "Y"), ("A", "Y"), ("C", "X"), ("A", "X"),
             ("D", "Y")]
    splits, _, _ = prepared(tmp_path / "data", "x", "--input", jsonl(tmp_path / "r.json", reviews(pairs)),
                            "--dense_slice", 10)
    assert [len(splits[s]) for s in SPLITS] == [6, 1, 1]
    assert set(everything(splits)["user_id"]) == {"A", "B"}
    shares = with_history(splits)
    assert shares["valid"]["with_both"] == shares["test"]["with_both"] == 1


def test_amazon2014_with_python_literal_meta(tmp_path):
    reviews = jsonl(tmp_path / "reviews_Musical_Instruments_5.json", amazon2014())
    meta = write_lines(tmp_path / "meta_Musical_Instruments.json", [
        repr({"asin": "B0", "title": "Guitar's Strings", "price": 3.5, "related": {"also_bought": ["B1"]}}),
        repr({"asin": "B1", "title": 'A "Capo"'}),
        repr({"asin": "B2", "categories": [["Musical Instruments"]]}),  # no title: the id stands in
        repr({"asin": "B9", "title": "not reviewed"}),
    ])
    splits, info, stdout = prepared(tmp_path / "data", "MI", "--input", reviews, "--meta", meta)
    df = everything(splits)
    assert dict(zip(df["item_id"], df["title"])) == {"B0": "Guitar's Strings", "B1": 'A "Capo"', "B2": "B2",
                                                     "B3": "B3"}
    assert "2 of 4 items have no title" in stdout
    assert (info["format"], info["product_class"], info["items_without_title"]) == (
        "amazon2014", "Musical Instruments", 2)
    assert [len(splits[s]) for s in SPLITS] == [8, 1, 1]
    assert df["ratings"].tolist() == [float(1 + i % 5) for i in range(10)]
    assert df["reviews"].tolist() == [f"text {i}" for i in range(10)]


def test_amazon2018_without_meta(tmp_path):
    records = [{**r, "verified": True, "vote": "2", "style": {"Color:": " Red"}} for r in amazon2014()]
    del records[3]["reviewText"]
    splits, info, stdout = prepared(tmp_path / "data", "x", "--input", jsonl(tmp_path / "Musical_Instruments.json",
                                                                             records))
    df = everything(splits)
    assert info["format"] == "amazon2018" and info["product_class"] == "Musical Instruments"
    assert (df["title"] == df["item_id"]).all()
    assert df["reviews"][3] == "" and "1 reviews have no text" in stdout
    assert df["unixReviewTime"].tolist() == [r["unixReviewTime"] for r in records]


def test_amazon2023_gzipped_with_millisecond_times_and_meta(tmp_path):
    start = 1_600_000_000
    records = [{"rating": float(1 + i % 5), "title": f"review title {i}", "text": f"text {i}", "images": [],
                "asin": f"C{i % 2}", "parent_asin": f"P{i % 2}", "user_id": f"U{i % 3}",
                "timestamp": (start + i * 3600) * 1000 + 123, "helpful_vote": 0, "verified_purchase": True}
               for i in range(10)]
    reviews = jsonl(tmp_path / "All_Beauty.jsonl", records, gz=True)  # gzipped, though the name does not say so
    meta = jsonl(tmp_path / "meta_All_Beauty.jsonl.gz", [{"main_category": "All Beauty", "title": "Lip Balm",
                                                           "parent_asin": "P0"},
                                                          {"title": "Hair Brush", "parent_asin": "P1"}], gz=True)
    splits, info, _ = prepared(tmp_path / "data", "beauty", "--input", reviews, "--meta", meta, "--format", "auto")
    df = everything(splits)
    assert info["format"] == "amazon2023" and info["product_class"] == "All Beauty"
    assert df["item_id"].tolist() == [f"P{i % 2}" for i in range(10)]
    assert dict(zip(df["item_id"], df["title"])) == {"P0": "Lip Balm", "P1": "Hair Brush"}
    assert df["unixReviewTime"].tolist() == [start + i * 3600 for i in range(10)]
    assert df["reviews"].tolist() == [f"text {i}" for i in range(10)]


def test_yelp_with_business_file(tmp_path):
    dates = [f"2016-03-{d:02d} 00:44:15" for d in range(1, 11)]
    records = [{"review_id": f"R{i}", "user_id": f"U{i % 3}", "business_id": f"X{i % 2}", "stars": 1 + i % 5,
                "useful": 0, "funny": 0, "cool": 0, "text": f"text {i}", "date": d} for i, d in enumerate(dates)]
    business = jsonl(tmp_path / "yelp_academic_dataset_business.json",
                     [{"business_id": "X0", "name": "Café Rouge", "city": "Tampa", "stars": 4.5},
                      {"business_id": "X1", "name": "Joe's Tacos", "city": "Reno", "stars": 3.0}])
    splits, info, _ = prepared(tmp_path / "data", "yelp", "--input",
                               jsonl(tmp_path / "yelp_academic_dataset_review.json", records), "--meta", business)
    df = everything(splits)
    assert info["format"] == "yelp" and info["product_class"] == "Yelp Business"
    assert dict(zip(df["item_id"], df["title"])) == {"X0": "Café Rouge", "X1": "Joe's Tacos"}
    assert df["ratings"].tolist() == [float(1 + i % 5) for i in range(10)]
    expected = [int(datetime(2016, 3, d, 0, 44, 15, tzinfo=timezone.utc).timestamp()) for d in range(1, 11)]
    assert df["unixReviewTime"].tolist() == expected


def test_ties_stay_in_one_split_and_the_order_is_stable(tmp_path):
    records = amazon2014(times=[9, 7, 7, 7, 6, 5, 4, 3, 2, 1])  # newest first: the script sorts by time
    splits, info, _ = prepared(tmp_path / "data", "x", "--input", jsonl(tmp_path / "r.json", records),
                               "--product_class", "Gadget")
    assert [len(splits[s]) for s in SPLITS] == [6, 3, 1]
    assert info["split"]["cut_times"] == [7, 9] and info["product_class"] == "Gadget"
    assert splits["valid"]["reviews"].tolist() == ["text 1", "text 2", "text 3"]  # file order among equal times


def test_reruns_are_byte_identical_and_warn_about_stale_later_outputs(tmp_path):
    reviews = jsonl(tmp_path / "r.json", amazon2014(n=20))
    prepared(tmp_path / "a", "x", "--input", reviews)
    prepared(tmp_path / "b", "x", "--input", reviews)
    assert file_bytes(tmp_path / "a" / "x") == file_bytes(tmp_path / "b" / "x")
    (tmp_path / "a" / "x" / "train_aspect_preference_summary.pkl").write_bytes(b"later")
    _, _, stdout = prepared(tmp_path / "a", "x", "--input", reviews, "--overwrite")
    assert "stale" not in stdout  # same splits
    _, _, stdout = prepared(tmp_path / "a", "x", "--input", reviews, "--split", "0.7,0.2,0.1", "--overwrite")
    assert "train_aspect_preference_summary.pkl" in stdout and "stale" in stdout
    assert (tmp_path / "a" / "x" / "train_aspect_preference_summary.pkl").read_bytes() == b"later"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x"]  # no staging folder left


# ---------------------------------------------------------------------------------------------- bad inputs
def bad_rating(path):
    records = amazon2014()
    records[2]["overall"] = 6.0
    return jsonl(path, records)


def malformed(path):
    first, second = (json.dumps(r) for r in amazon2014(n=2))
    return write_lines(path, [first, '{"reviewerID": "U1", "asin": ', second])


BAD = {  # name: (write the input file, extra arguments, expected message)
    "missing input": (None, [], "--input file {input} not found"),
    "unknown format": (lambda p: jsonl(p, [{"foo": 1, "bar": 2}]), [], "unknown format; its first record has the "
                                                                       "keys ['bar', 'foo']"),
    "ratings only": (lambda p: jsonl(p, [{k: v for k, v in r.items() if k != "reviewText"} for r in amazon2014()]),
                     [], "has ratings but no review text"),
    "no rating": (lambda p: jsonl(p, [{k: v for k, v in r.items() if k != "overall"} for r in amazon2014()]),
                  [], "line 1: no rating"),
    "rating out of range": (bad_rating, [], "line 3: rating 6.0 is outside 1-5"),
    "malformed JSON": (malformed, [], "line 2: not valid JSON"),
    "missing meta": (lambda p: jsonl(p, amazon2014()), ["--meta", "nope.json"], "--meta file nope.json not found"),
    "empty input": (lambda p: p.write_bytes(b""), [], "is empty"),
    "empty split": (lambda p: jsonl(p, amazon2014(times=[5] * 10)), [], "the train split would be empty"),
    "wrong meta": (lambda p: jsonl(p, amazon2014()), ["--meta", SCRIPT], "neither JSON nor a Python dict literal"),
    "two slices": (lambda p: jsonl(p, amazon2014()), ["--max_users", "2", "--dense_slice", "5"],
                   "--max_users and --dense_slice are two ways to cut a slice: pass one of them"),
    "empty dense slice": (lambda p: jsonl(p, amazon2014()), ["--dense_slice", "0"], "--dense_slice must be at least 1"),
    "no warm slice": (lambda p: jsonl(p, [{**r, "reviewerID": f"U{i}"} for i, r in enumerate(amazon2014())]),
                      ["--dense_slice", "10"], "ask for more (a larger --dense_slice) or another --seed"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, case):
    write, extra, message = BAD[case]
    path = tmp_path / "reviews.json"
    if write:
        write(path)
    run = prepare(tmp_path / "data", "--dataset", "x", "--input", path, *extra)
    assert run.returncode != 0
    assert message.format(input=path) in run.stderr
    assert run.stderr.count("error:") == 1 and "Traceback" not in run.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("case", ["malformed JSON", "empty split"])
def test_failed_run_leaves_an_earlier_dataset_untouched(tmp_path, case):
    data = tmp_path / "data"
    prepared(data, "x", "--input", jsonl(tmp_path / "good.json", amazon2014()))
    before = file_bytes(data)
    write, extra, message = BAD[case]
    run = prepare(data, "--dataset", "x", "--input", write(tmp_path / "bad.json"), *extra, "--overwrite")
    assert run.returncode != 0 and message in run.stderr
    assert file_bytes(data) == before
    assert sorted(p.name for p in data.iterdir()) == ["x"]


def test_an_existing_dataset_is_never_replaced_unasked_and_its_recorded_settings_survive(tmp_path):
    """Data/<dataset>/ may be the authors' archive; dataset.json holds what later steps recorded there."""
    reviews = jsonl(tmp_path / "r.json", amazon2014(n=20))
    prepared(tmp_path, "x", "--input", reviews, "--max_his", "5")
    info = tmp_path / "x" / "dataset.json"
    later = {"eval_limit": 7, "drop_leaked_history_rows": True, "test_history_before_target": True}
    info.write_text(json.dumps({**json.loads(info.read_text()), **later}))
    before = file_bytes(tmp_path / "x")

    refused = prepare(tmp_path, "--dataset", "x", "--input", reviews, "--split", "0.6,0.2,0.2")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "already exists and holds dataset.json, raw_data/test.pkl, raw_data/train.pkl, raw_data/valid.pkl" in \
        refused.stderr and "--overwrite" in refused.stderr and "another --dataset" in refused.stderr
    changed = prepare(tmp_path, "--dataset", "x", "--input", reviews, "--overwrite", "--max_his", "10")
    assert changed.returncode == 1 and "--max_his 10 differs from the 5 recorded in" in changed.stderr
    assert file_bytes(tmp_path / "x") == before  # nothing replaced

    splits, recorded, _ = prepared(tmp_path, "x", "--input", reviews, "--split", "0.6,0.2,0.2", "--overwrite")
    assert recorded["split"]["fractions"] == [0.6, 0.2, 0.2] and len(splits["test"]) == 4
    assert {k: recorded[k] for k in later} == later and recorded["max_his"] == 5
