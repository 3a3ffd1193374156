"""Runs 4_GRPO/1_reasoner_grpo_train.py as a user does (the same arguments, the same relaunch under NUM_GPUS), and
records which targets each process generates reasons for: every call of TRL's
GRPOTrainer._generate_and_score_completions appends one JSON line {"process", "step", "rows"} (the optimizer step
about to be taken, the "row" of every prompt in the process's generation batch) to $GRPO_SPY.<process>."""
import json
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import llm  # noqa: E402,F401  (Unsloth first, where installed, as the script imports it)
import parallel  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

parallel.relaunch()  # under NUM_GPUS, this file is what each process runs (the script would relaunch itself alone)

generate_and_score = GRPOTrainer._generate_and_score_completions


def recorded(self, inputs):
    process = int(os.environ.get("RANK", 0))
    with open(f"{os.environ['GRPO_SPY']}.{process}", "a") as f:
        f.write(json.dumps({"process": process, "step": self.state.global_step, "rows": [x["row"] for x in inputs]})
                + "\n")
    return generate_and_score(self, inputs)


GRPOTrainer._generate_and_score_completions = recorded
runpy.run_path(str(REPO / "4_GRPO" / "1_reasoner_grpo_train.py"), run_name="__main__")
