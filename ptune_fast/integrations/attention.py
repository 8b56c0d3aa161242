"""The transformers attention function and mask function registered as ``"ptune_fast"``.

``AttentionInterface`` hands us ``query [B,H,S,D]`` and ``key/value [B,Hkv,T,D]`` (HF cache
already concatenated, prefix *not* in it). The per-layer prefix comes from the
:class:`~ptune_fast.integrations.state.PrefixState` attached to the attention module by
``patch``; ``prefix_attention`` attends to it without expanding or concatenating it.

The mask function keeps HF's 2-D padding mask ``[B, T]`` (True = real token) instead of
building a 4-D float mask: the kernels apply causality (bottom-right) and padding themselves.
"""
from __future__ import annotations

import torch

from ptune_fast.ops.prefix_attention import prefix_attention

NAME = "ptune_fast"
_registered = False



def ptune_fast_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` entry: returns ``(out [B,S,H,D], None)``."""
    state = getattr(module, "_ptune_fast_state", None)
    layer = state.layer(getattr(module, "layer_idx", None)) if state is not None else None
    pk = pv = task_ids = None
    dev = query.device.type
    if torch.is_autocast_enabled(dev):
        # SDPA is on autocast's lower-precision list; a custom op is not cast by autocast, so do
        # what autocast does to SDPA (under autocast RoPE can leave q/k in fp32 and v in bf16).
        dt = torch.get_autocast_dtype(dev)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    if layer is not None:
        pk, pv, task_ids = layer
        if pk.dtype != query.dtype:  # e.g. autocast: the prefix follows the activations
            pk, pv = pk.to(query.dtype), pv.to(query.dtype)
    P = 0 if pk is None else pk.shape[-2]
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("ptune_fast attention does not support logit softcapping (softcap)")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError("ptune_fast attention does not support attention sinks")
    window = kwargs.get("sliding_window")
    if window is not None and P + key.shape[2] > window:
        raise NotImplementedError(
            f"sliding window {window} is shorter than prefix + context ({P} + {key.shape[2]}); "
            "ptune_fast attention implements full attention only"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "ptune_fast attention expects HF's 2-D padding mask [B, T]; got a "
            f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}. Pass a 2-D attention_mask."
        )
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if key.shape[2] < query.shape[2]:  # no cache and a non-causal encoder: T == S always here
        raise ValueError(f"keys ({key.shape[2]}) shorter than queries ({query.shape[2]})")
    try:
        out = _attend(query, key, value, pk, pv, task_ids, attention_mask, is_causal, scaling, dropout, module)
    except ValueError as exc:  # name the user's argument, not the op's
        if "key_padding_mask" in str(exc):
            raise ValueError(str(exc).replace("key_padding_mask", "attention_mask")) from None
        raise
    return out, None


def _attend(query, key, value, pk, pv, task_ids, attention_mask, is_causal, scaling, dropout, module):
    return prefix_attention(
        query, key, value, pk, pv, task_ids,
        key_padding_mask=attention_mask,
        causal=bool(is_causal),
        scale=scaling,
        dropout_p=float(dropout) if module.training else 0.0,
        out_layout="bshd",  # transformers' layout, written in place by the Triton kernel (no transpose copy)
    )


def ptune_fast_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, config=None, **kwargs):
    """``AttentionMaskInterface`` entry: the 2-D bool padding mask ``[B, kv_length]`` or None."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    plain = mask_function is None or mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    # Sliding-window closures are allowed: the attention function checks the window against
    # prefix + context. Anything else (packed sequences, custom or/and masks) cannot be
    # represented by "causal + 2-D padding". Under torch.compile the check is skipped (the
    # patch passes an explicit padding mask there, which keeps HF on the plain path).
    if not plain and not getattr(config, "sliding_window", None) and not torch.compiler.is_compiling():
        raise NotImplementedError(
            f"ptune_fast attention cannot represent the mask function {getattr(mask_function, '__qualname__', mask_function)!r} "
            "(packed sequences, custom or/and masks); only causal/bidirectional masks plus 2-D padding"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask  # a custom 4-D mask: the attention function raises a clear error
    m = attention_mask[:, kv_offset: kv_offset + kv_length] if isinstance(kv_length, int) else attention_mask
    return m.to(torch.bool)


def register() -> str:
    """Register ``"ptune_fast"`` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, ptune_fast_attention)
        AttentionMaskInterface.register(NAME, ptune_fast_mask)
        _registered = True
    return NAME
