"""Inference-time folding: what does not change between requests is computed once.

``fold(model)`` on a :class:`~ptune_fast.TaskBank` or a patched PEFT model, in place:

* every trained encoder (prefix projection, P-tuning MLP, biLSTM+MLP) is replaced by its static
  output (PEFT's ``inference_mode`` layout: the embedding table holds the output);
* ``deep`` (default for prompt tuning / P-tuning on causal decoders): the virtual tokens' per-layer
  K/V (keys already rotated) are computed once and served as a static prefix, so no request
  pushes the n virtual tokens through the layers again. Bidirectional encoders are refused:
  there the virtual tokens attend to the row's tokens.

Returns a report of what was removed and what is now static.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ptune_fast.encoders import encode


def _fold_peft_encoder(enc: nn.Module) -> list:
    removed = [n for n in ("transform", "mlp_head", "lstm_head") if getattr(enc, n, None) is not None]
    if not removed:
        return []
    with torch.no_grad():
        out = encode(enc).detach().float().clone()
    for n in removed:
        delattr(enc, n)
    enc.embedding = nn.Embedding.from_pretrained(out, freeze=True)
    if hasattr(enc, "prefix_projection"):
        enc.prefix_projection = False
    if "mlp_head" in removed:
        # keep PEFT's own PromptEncoder.forward working (save_pretrained calls it): an identity head
        enc.mlp_head = nn.Identity()
        enc.encoder_type = type(enc.encoder_type)("MLP") if not isinstance(enc.encoder_type, str) else "MLP"
    return removed


def fold(model, deep: Optional[bool] = None) -> dict:
    from ptune_fast.bank import TaskBank
    from ptune_fast.integrations.peft import is_patched

    if isinstance(model, TaskBank):
        return model.fold(deep)
    if not is_patched(model):
        raise TypeError(f"fold() expects a ptune_fast.TaskBank or a PEFT model patched by ptune_fast.patch(), "
                        f"got {type(model).__name__}")
    patch = model._ptune_fast_patch
    enc = model.prompt_encoder[patch.adapter]
    report = {"method": patch.method, "removed": _fold_peft_encoder(enc), "static": {}}
    model.peft_config[patch.adapter].inference_mode = True  # PEFT saves the folded table as it is
    for p in enc.parameters():
        p.requires_grad_(False)
    report["static"]["tokens"] = tuple(enc.embedding.weight.shape)
    want_deep = patch.shared if deep is None else deep
    if want_deep:
        if not patch.shared:
            raise ValueError(
                "deep folding needs prompt tuning / P-tuning on a causal-LM decoder served with the shared pass "
                f"(got {patch.method} on {patch.hf_model.config.model_type!r}); bidirectional encoders cannot be "
                "deep-folded because their virtual tokens attend to the row's tokens"
            )
        state = patch.state
        with torch.no_grad():
            state.clear()
            state.refresh()
        keys, values, extra = state.keys.detach(), state.values.detach(), dict(state.extra)

        def static():
            state.extra.update(extra)
            return keys, values

        state.provider = static
        state.clear()
        report["static"]["keys"] = tuple(keys.shape)
        report["static"]["values"] = tuple(values.shape)
    return report
