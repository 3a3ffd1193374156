"""The switches that give the authors' original choices where the official code disagrees with itself (README,
"Differences"), each run as the user runs it on a copy of a finished pipeline."""
import pickle
import shutil

import pandas as pd

from conftest import DATASET, FAST, pipeline_env, run
from teacher_server import TeacherServer


def copy(finished, tmp_path, *drop):
    work = tmp_path / "w"
    shutil.copytree(finished[0], work, ignore=shutil.ignore_patterns("*.sqlite*", *drop))
    return work, work / "Data" / DATASET


def test_the_first_reasons_temperature(finished, tmp_path, tiny_model):
    """1.0 by default (official HEAD); --first_temperature 0.2 (a4fa718) for the unhinted round only.  --tau -10 keeps
    no reason, so that every target also goes through the hinted round (and the step ends saying nothing was kept)."""
    work, data = copy(finished, tmp_path)
    for first, hinted in ((None, 1.0), (0.2, 1.0)):
        for cached in data.glob("teacher_cache.sqlite*"):  # the server must see every request
            cached.unlink()
        server = TeacherServer()
        flags = [] if first is None else ["--first_temperature", str(first)]
        result = run("2_Reasoner/4_distilling_possible_reason.py", *FAST["GEN_ARGS"].split(), "--tau", "-10",
                     "--max_sample_num", "1", *flags, cwd=work, env=pipeline_env(tiny_model, server), check=False)
        assert result.returncode == 1 and "no reason was kept for any target" in result.stderr
        unhinted = [b["temperature"] for b in server.bodies if "(Hint:" not in b["messages"][-1]["content"]]
        hints = [b["temperature"] for b in server.bodies if "(Hint:" in b["messages"][-1]["content"]]
        assert set(unhinted) == {1.0 if first is None else first} and set(hints) == {hinted}
        assert len(hints) == len(unhinted) > 0  # every target asked once unhinted, once hinted
        server.close()


def test_the_predictor_learns_from_all_targets_on_request(finished, tmp_path, tiny_model):
    work, data = copy(finished, tmp_path, "Predictor_train_instruct.pkl")
    kept = pd.read_pickle(data / "distilling_high_quality_reasons.pkl")
    kept.head(2).to_pickle(data / "distilling_high_quality_reasons.pkl")  # few kept reasons: the two sets differ
    for targets, expected in (("kept", 2), ("all", len(pd.read_pickle(data / "train_12000.pkl")))):
        run("3_Predictor/1_construct_predictor_train_data.py", *FAST["GEN_ARGS"].split(), "--targets", targets,
            cwd=work, env=pipeline_env(tiny_model))
        assert len(pickle.loads((data / "Predictor_train_instruct.pkl").read_bytes())) == expected > 0


def test_the_summarizer_learns_from_a_random_sample_on_request(finished, tmp_path, tiny_model):
    """--sample N --sample_seed 42: the rows of pandas' sample(N, random_state=42), in that order (a4fa718)."""
    work, data = copy(finished, tmp_path, "Summarizer_train_instruct.pkl")
    run("1_Summarizer/2_construct_summarizer_train_data.py", "--sample", "7", "--sample_seed", "42", cwd=work,
        env=pipeline_env(tiny_model))
    summaries = pd.read_pickle(data / "train_aspect_preference_summary.pkl").sample(7, random_state=42)
    examples = pickle.loads((data / "Summarizer_train_instruct.pkl").read_bytes())
    assert [x["messages"][1]["content"] for x in examples] == summaries["review_summary"].tolist()
    limited = run("1_Summarizer/2_construct_summarizer_train_data.py", "--limit", "7", cwd=work,
                  env=pipeline_env(tiny_model))
    assert limited.returncode == 0
    first = pickle.loads((data / "Summarizer_train_instruct.pkl").read_bytes())
    assert [x["messages"][1]["content"] for x in first] == \
        pd.read_pickle(data / "train_aspect_preference_summary.pkl")["review_summary"].head(7).tolist()
