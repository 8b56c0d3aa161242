"""Inference-time folding (``ptune_fast.fold``; the module is ``folding`` so that the name stays the function): what does not change between requests is computed once.

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


_HEADS = ("transform", "mlp_head", "lstm_head")


def _heads(enc: nn.Module) -> list:
    return [n for n in _HEADS if getattr(enc, n, None) is not None and not isinstance(getattr(enc, n), nn.Identity)]


def _fold_peft_encoder(enc: nn.Module, out: torch.Tensor) -> list:
    """Replace ``enc``'s heads by its output ``out`` (computed beforehand) in place."""
    removed = _heads(enc)
    if not removed:
        return []
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
    """Fold a TaskBank or a patched PEFT model in place (see the module docstring).

    Validate first, then act: everything that can fail (arguments, the model, the encoder's
    output, the deep fold's virtual-token pass) runs before the model is changed, so a failed
    fold leaves the model exactly as it was (outputs, trainable parameters, config)."""
    from ptune_fast.bank import TaskBank
    from ptune_fast.integrations.peft import is_patched

    if isinstance(model, TaskBank):
        return model.fold(deep)
    if not is_patched(model):
        raise TypeError(f"fold() expects a ptune_fast.TaskBank or a PEFT model patched by ptune_fast.patch(), "
                        f"got {type(model).__name__}")
    if deep not in (None, True, False):
        raise TypeError(f"deep must be None, True or False, got {deep!r}")
    patch = model._ptune_fast_patch
    patch.check_adapter()
    want_deep = patch.shared if deep is None else deep
    if want_deep and not patch.shared:
        raise ValueError(
            f"deep=True: deep folding needs prompt tuning / P-tuning on a causal-LM decoder served with the shared "
            f"pass (got {patch.method} on {patch.hf_model.config.model_type!r}); prefix tuning's folded table "
            "already is its per-layer K/V (use deep=False), and bidirectional encoders cannot be deep-folded because "
            "their virtual tokens attend to the row's tokens"
        )
    enc = model.prompt_encoder[patch.adapter]
    # ---- compute (nothing changes yet)
    with torch.no_grad():
        out = encode(enc).detach().float().clone() if _heads(enc) else None
        if want_deep:
            state = patch.state
            state.clear()
            try:
                state.refresh()  # the encoder as it is: its output equals the folded table's
                keys, values, extra = state.keys.detach(), state.values.detach(), dict(state.extra)
            finally:
                state.clear()
    # ---- act
    report = {"method": patch.method, "removed": [] if out is None else _fold_peft_encoder(enc, out), "static": {}}
    model.peft_config[patch.adapter].inference_mode = True  # PEFT saves the folded table as it is
    for p in enc.parameters():
        p.requires_grad_(False)
    report["static"]["tokens"] = tuple(enc.embedding.weight.shape)
    if want_deep:

        def static():
            state.extra.update(extra)
            return keys, values

        static.static = True  # no encoder, no virtual-token pass: PrefixState does not count it as an encoder run
        state.provider = static
        state.clear()
        report["static"]["keys"] = tuple(keys.shape)
        report["static"]["values"] = tuple(values.shape)
    return report
