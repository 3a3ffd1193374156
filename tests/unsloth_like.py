"""Unsloth's behaviour where it differs from transformers, imitated on a CPU for the tests (Unsloth's own kernels need
a CUDA GPU, and its CPU fallback keeps transformers' code, so no CPU run of Unsloth shows these differences).

`fast_forward(model)`: the model's forward as Unsloth's `_CausalLM_fast_forward` (unsloth/models/llama.py), which
replaces `LlamaForCausalLM.forward` on a GPU, treats `logits_to_keep`.  transformers returns the logits of the kept
positions only, whether `logits_to_keep` is a count (the last N) or a tensor of positions.  Unsloth honours a count,
but on a tensor (the "selective-decode form") it sets the count to 0, which means every position:

    if isinstance(num_logits_to_keep, torch.Tensor) or isinstance(logits_to_keep, torch.Tensor):
        num_logits_to_keep = 0
    else:
        num_logits_to_keep = max(num_logits_to_keep, logits_to_keep)
    ...
    elif num_logits_to_keep != 0:
        logits = self.lm_head(hidden_states[:, -num_logits_to_keep:, :])
    else:
        logits = self.lm_head(hidden_states)
"""
from contextlib import contextmanager

import torch


@contextmanager
def fast_forward(model):
    """Within the block, `model` (a causal LM, or a PEFT model around one) answers `logits_to_keep` as Unsloth's fast
    forward does: a tensor of positions gives every position's logits.  Yields the model."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = vars(causal_lm).get("forward")  # a forward already set on this model (e.g. accelerate's device hook)
    original = causal_lm.forward

    def unsloth_forward(*args, num_logits_to_keep=0, logits_to_keep=0, **kwargs):
        if isinstance(num_logits_to_keep, torch.Tensor) or isinstance(logits_to_keep, torch.Tensor):
            num_logits_to_keep = 0
        else:
            num_logits_to_keep = max(num_logits_to_keep, logits_to_keep)
        return original(*args, logits_to_keep=num_logits_to_keep, **kwargs)  # 0: every position, as in transformers

    causal_lm.forward = unsloth_forward  # an instance attribute: PEFT's LoraModel calls the model, which finds it
    try:
        yield model
    finally:
        if own is None:
            del causal_lm.forward
        else:
            causal_lm.forward = own
