"""The shared virtual-token pass (prompt tuning / P-tuning on causal decoders).

PEFT prepends the n virtual tokens to every row and pushes ``B * (n + S)`` tokens through the
model. Under causal attention the virtual tokens sit at positions ``0 .. n-1`` and see only
each other, so their per-layer keys/values are the same for every row. We run them **once**
(one row, with autograd in training), keep each layer's K/V (keys already rotated) as a
shared prefix, and let the B rows attend to it through ``prefix_attention``: ``n + B * S``
tokens. Gradients reach the encoder through that single pass.

Exact when no dropout is active (eval, or models without dropout, like Llama): with dropout
the virtual tokens get one dropout mask shared by the batch instead of one per row.

Loss: PEFT's causal-LM loss also predicts each row's first real token from the last virtual
token; :func:`causal_lm_loss` keeps that term, using the shared pass's last hidden state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ptune_fast.encoders import encode


def virtual_token_kv(hf_model, backbone, prompts: torch.Tensor, state):
    """Run ``prompts [n, d]`` through ``backbone`` once; return per-layer ``(keys, values)``
    ``[L, Hkv, n, D]`` and store the last virtual token's final hidden state in ``state.extra``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf_model.config)
    # The virtual tokens attend only to each other: run the backbone with no prefix and no
    # position shift, whatever ptune_fast state is attached to the model.
    attached = getattr(hf_model, "_ptune_fast_attachment", None)
    prev = attached.state.computing if attached is not None else None
    if attached is not None:
        attached.state.computing = True
    try:
        out = backbone(inputs_embeds=prompts.unsqueeze(0), past_key_values=cache, use_cache=True, return_dict=True)
    finally:
        if attached is not None:
            attached.state.computing = prev
    layers = getattr(cache, "layers", None)
    if layers is not None:
        keys = torch.stack([layer.keys[0] for layer in layers])
        values = torch.stack([layer.values[0] for layer in layers])
    else:  # pragma: no cover - older cache API
        keys = torch.stack([k[0] for k in cache.key_cache])
        values = torch.stack([v[0] for v in cache.value_cache])
    state.extra["last_hidden"] = out.last_hidden_state[0, -1]
    return keys, values


def make_provider(hf_model, backbone, encoder, state, dtype_of):
    """Provider for :class:`PrefixState`: encoder once, then the shared pass."""

    def provider():
        prompts = encode(encoder).to(dtype_of())
        return virtual_token_kv(hf_model, backbone, prompts, state)

    return provider


def causal_lm_loss(hf_model, logits: torch.Tensor, labels: torch.Tensor, state) -> torch.Tensor:
    """PEFT's loss for ``[virtual ; real]`` sequences with labels ``-100`` on the virtual part,
    from the real tokens' ``logits [B, S, V]`` and the shared last virtual hidden state."""
    head = hf_model.get_output_embeddings()
    first = head(state.extra["last_hidden"].to(head.weight.dtype))  # [V], predicts each row's token 0
    B, S, Vv = logits.shape
    shifted = torch.cat([first.view(1, 1, Vv).expand(B, 1, Vv).to(logits.dtype), logits[:, :-1]], dim=1)
    return F.cross_entropy(shifted.float().reshape(-1, Vv), labels.reshape(-1).to(logits.device), ignore_index=-100)
