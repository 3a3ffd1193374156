"""scripts/plan.py: the work and the bill of a whole run, from a prepared dataset alone (no model, no teacher, no
network), counted as the steps will count it."""
import math
import re

import pandas as pd

from conftest import DATASET, run


def plan(work, *args, **env):
    """What plan.py prints for Data/<DATASET>/ under `work`, with neither a base model nor a teacher key set."""
    return run("scripts/plan.py", "--dataset", DATASET, *args, cwd=work,
               env={"MODEL_PATH": "", "OPENAI_API_KEY": "", "TEACHER": "openai", **env}).stdout


def line(out: str, step: str) -> str:
    return next(x for x in out.splitlines() if x.startswith(step))


def number(text: str, before: str) -> float:
    return float(re.search(rf"([\d,.]+)M? {before}", text).group(1).replace(",", ""))


def test_the_plan_counts_every_step_from_the_data_alone(workspace):
    data = workspace / "Data" / DATASET
    before = sorted(p.name for p in data.iterdir())
    out = plan(workspace)
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written: no cache, no recorded setting

    train = pd.read_pickle(data / "raw_data" / "train.pkl")
    assert number(line(out, "Summarizer 1: teacher summaries"), "teacher requests") == len(train)
    # 2_Reasoner/1's targets: reviews with an earlier review of their user and of their item, 2:3 when under 20,000
    earlier = {k: train.groupby(k)["unixReviewTime"].rank(method="min") - 1 for k in ("user_id", "item_id")}
    eligible = int(((earlier["user_id"] > 0) & (earlier["item_id"] > 0)).sum())
    n_reward = round(eligible * 8000 / 20000)
    assert number(line(out, "Reasoner 3: train the reward model"), "examples") == n_reward
    assert number(line(out, "Reasoner 4: teacher reasons, first try"), "teacher requests") == eligible - n_reward
    assert number(line(out, "Reasoner 4: hinted retries"), "teacher requests") == 10 * (eligible - n_reward)
    grpo = line(out, "GRPO 1: train")
    assert number(grpo, "optimizer steps") == math.ceil(n_reward / 1) * 2  # 1 target per step, 2 epochs (the yaml's)
    cost = line(out, "Summarizer 1: teacher summaries")
    one, batch = (float(x) for x in re.findall(r"\$([\d.]+)", cost))
    assert one > 0 and batch == round(one / 2, 4)  # list price, and the Batch API's half
    assert "no measured throughput" in out and "GPU time:" in out

    faster = plan(workspace, "--prompts_per_step", "4", "--generate_tokens_per_s", "1000",
                  "--prompt_tokens_per_s", "20000", "--train_tokens_per_s", "5000", TEACHER_MODEL="gpt-4o-mini")
    assert number(line(faster, "GRPO 1: train"), "optimizer steps") == math.ceil(n_reward / 4) * 2
    hours = [float(h) for h in re.findall(r"([\d.]+) GPU h", faster)]
    total = float(re.search(r"GPU time: ([\d,.]+) hours", faster).group(1))
    assert len(hours) == len([x for x in faster.splitlines() if "prompts" in x or "examples" in x])
    assert abs(sum(hours) - total) < 0.005 * len(hours) + 0.05
    cheaper = float(re.findall(r"\$([\d.]+)", line(faster, "Summarizer 1: teacher summaries"))[0])
    assert cheaper < one  # gpt-4o-mini's list price, from teacher.PRICES
