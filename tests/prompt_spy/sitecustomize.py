"""Run by Python at start-up where this folder is on PYTHONPATH: with PROMPT_LOG set, every conversation that any
step shows a local model (inference, the local teacher, SFT and GRPO training: all render it through the tokenizer's
apply_chat_template) is appended to that file, one JSON line each, for a test to search.  Nothing else changes."""
import importlib.abc
import importlib.util
import json
import os
import sys

LOG = os.environ.get("PROMPT_LOG")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Wraps the tokenizer base class once transformers imports it (importing it here would slow every step)."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.tokenization_utils_base":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            _record(module.PreTrainedTokenizerBase)

        spec.loader.exec_module = exec_module
        return spec


def _record(cls):
    render = cls.apply_chat_template

    def apply_chat_template(self, conversation, *args, **kwargs):
        with open(LOG, "a") as f:
            f.write(json.dumps(conversation, default=str) + "\n")
        return render(self, conversation, *args, **kwargs)

    cls.apply_chat_template = apply_chat_template


if LOG:
    sys.meta_path.insert(0, _AfterImport())
