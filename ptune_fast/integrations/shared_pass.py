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

import contextlib

import torch
import torch.nn.functional as F

from ptune_fast.encoders import encode
from ptune_fast.integrations import compat


@contextlib.contextmanager
def _no_checkpointing(model):
    """Gradient checkpointing off for the shared pass (n tokens, once per step): with it on,
    transformers drops the cache the pass reads its K/V from. The rows' pass keeps checkpointing."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def virtual_token_kv(hf_model, backbone, prompts: torch.Tensor, state, all_logits: bool = False):
    """Run ``prompts [n, d]`` through ``backbone`` once; return per-layer ``(keys, values)``
    ``[L, Hkv, n, D]``. ``state.extra`` gets the last virtual token's final hidden state and logits
    (``last_hidden``, ``first_logits``) and, with ``all_logits``, every virtual token's logits
    (``virtual_logits [n, V]``, PEFT's output layout)."""
    cache = compat.new_dynamic_cache(hf_model.config)
    # The virtual tokens attend only to each other: run the backbone with no prefix and no
    # position shift, whatever ptune_fast state is attached to the model.
    attached = getattr(hf_model, "_ptune_fast_attachment", None)
    prev = attached.state.computing if attached is not None else None
    if attached is not None:
        attached.state.computing = True
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    seen = {}
    # .clone(): some families scale inputs_embeds in place (CTRL), and a prompt table is a leaf
    try:
        if head is not None:
            # Run the whole causal LM: its own head gives the last virtual token's logits (which
            # predict each row's first real token) with every family's logit scaling / capping.
            grab = backbone.register_forward_hook(lambda m, a, o: seen.setdefault("hidden", o))
            kw = {"logits_to_keep": 1} if compat.accepts(hf_model, "logits_to_keep") and not all_logits else {}
            try:
                with _no_checkpointing(hf_model):
                    out = hf_model(inputs_embeds=prompts.unsqueeze(0).clone(), use_cache=True, return_dict=True,
                                   **{compat.cache_kwarg(hf_model): cache}, **kw)
            finally:
                grab.remove()
            state.extra["first_logits"] = out.logits[0, -1]
            state.extra["virtual_logits"] = out.logits[0] if all_logits else None
            hidden = seen["hidden"]
        else:
            with _no_checkpointing(hf_model):
                hidden = backbone(inputs_embeds=prompts.unsqueeze(0).clone(), use_cache=True, return_dict=True,
                                  **{compat.cache_kwarg(backbone): cache})
            state.extra["first_logits"] = None
    finally:
        if attached is not None:
            attached.state.computing = prev
    layers = compat.cache_layers(cache)
    keys = torch.stack([k[0] for k, _ in layers])
    values = torch.stack([v[0] for _, v in layers])
    h = getattr(hidden, "last_hidden_state", None)
    state.extra["last_hidden"] = (h if h is not None else hidden[0])[0, -1]
    return keys, values


def first_logits(hf_model, extra) -> torch.Tensor:
    """Logits ``[V]`` of the last virtual token (from the shared pass's own LM head), or, for
    adapters restored from files that keep only its hidden state, the output embedding applied
    to that state (exact for heads without logit scaling or capping)."""
    logits = extra.get("first_logits")
    if logits is not None:
        return logits
    hidden = extra["last_hidden"]
    head = hf_model.get_output_embeddings()
    return head(hidden.to(head.weight.dtype))


def causal_lm_loss(hf_model, logits: torch.Tensor, labels: torch.Tensor, first: torch.Tensor,
                   has_first=None, num_items_in_batch=None) -> torch.Tensor:
    """PEFT's loss for ``[virtual ; real]`` sequences with labels ``-100`` on the virtual part,
    from the real tokens' ``logits [B, S, V]`` and the last virtual token's logits ``first``
    (``[V]`` shared, or ``[B, V]`` per row, see :func:`first_logits`), which predict each row's
    first real token. ``has_first [B]`` (bool) drops that term for rows without virtual tokens
    (prefix-tuning rows of a mixed task bank)."""
    B, S, V = logits.shape
    first = first.reshape(1, V).expand(B, V) if first.dim() == 1 else first  # [B, V]
    first_labels = labels[:, :1].to(logits.device)
    if has_first is not None:
        first_labels = first_labels.masked_fill(~has_first.to(logits.device)[:, None], -100)
    shifted = torch.cat([first[:, None].to(logits.dtype), logits[:, :-1]], dim=1)
    lab = torch.cat([first_labels, labels[:, 1:].to(logits.device)], dim=1)
    if num_items_in_batch is None:
        return F.cross_entropy(shifted.float().reshape(-1, V), lab.reshape(-1), ignore_index=-100)
    # HF Trainer passes the number of label tokens of the whole (accumulated) batch: sum / count,
    # as transformers' ForCausalLMLoss does
    total = F.cross_entropy(shifted.float().reshape(-1, V), lab.reshape(-1), ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
