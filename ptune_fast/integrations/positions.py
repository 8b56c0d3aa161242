"""Positions of the real tokens when the prefix is kept outside transformers' cache.

With PEFT the P prefix tokens sit in the cache, so transformers derives the real tokens'
positions as if P tokens came first. Families derive positions differently; three rules cover
them, applied by :func:`position_ids`:

* ``"cache"``: ``arange(S) + past + P`` (RoPE and absolute tables: Llama, GPT-2, BERT, ...);
* ``"mask"``: from the attention mask with P ones prepended (OPT-like learned tables);
* ``"padding_idx"``: from input ids and the padding index (RoBERTa-like tables).

:func:`verify` decides which rule a model follows *by behaviour*: it runs the model once with a
random prefix in a transformers cache (PEFT's semantics, the model's own attention) and once
per candidate rule through ptune_fast's attention, on a tiny left-padded batch, and keeps the
first rule that reproduces the hidden states. No rule -> the prefix paths are refused for that
model (``Capabilities.position_error``).

:func:`verify_shared` checks the shared virtual-token pass the same way (virtual tokens run once
and attended as a prefix vs prepended to every row, PEFT's layout); where they differ (e.g. hybrid
models whose recurrent layers carry the virtual tokens in a state, not in attention K/V),
``Capabilities.shared_error`` says why and prompt methods run per row.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from ptune_fast.integrations import attention as _attention
from ptune_fast.integrations import compat

RULES = ("cache", "mask", "padding_idx")


def position_ids(caps, kw, P, S, past_len, device, ignore_given=False):
    """The positions transformers gives the real tokens when the P prefix tokens sit in its cache.

    Explicit ``position_ids`` are shifted by P (PEFT, prefix tuning) unless ``ignore_given``
    (PEFT ignores them for prompt methods): one bool, or a bool tensor ``[B]`` per row (mixed banks)."""
    given = kw.get("position_ids")
    per_row = isinstance(ignore_given, torch.Tensor)
    if given is not None and not per_row and not ignore_given:
        return given + P
    derived = _derived(caps, kw, P, S, past_len, device)
    if given is not None and per_row:
        return torch.where(ignore_given.to(given.device)[:, None], derived.expand_as(given), given + P)
    return derived


def _derived(caps, kw, P, S, past_len, device):
    mask = kw.get("attention_mask")
    if caps.positions == "mask" and mask is not None and mask.dim() == 2:
        m = mask.long()
        pos = (torch.cumsum(m, dim=1) + P) * m - 1
        return pos[:, -S:]
    if caps.positions == "padding_idx":
        pad = caps.padding_idx
        ids = kw.get("input_ids")
        if ids is not None:
            m = ids.ne(pad).long()
            return (torch.cumsum(m, dim=1) + P + past_len) * m + pad
        # RoBERTa-like models ignore the cache length for inputs_embeds (HF and PEFT alike)
        return torch.arange(pad + 1, S + pad + 1, device=device).unsqueeze(0)
    return (torch.arange(S, device=device) + (past_len + P)).unsqueeze(0)


class _StaticState:
    """The minimal state the attention function reads: a fixed prefix, no task ids."""

    computing = False

    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    def layer(self, idx):
        return self.keys[idx], self.values[idx], None


@contextlib.contextmanager
def _trial(hf_model, modules):
    """Eval mode and no grad for a behaviour check; afterwards the model's attention, mode and
    modules are as they were."""
    previous = hf_model.config._attn_implementation
    was_training = hf_model.training
    hf_model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m in modules:
            m.__dict__.pop("_ptune_fast_state", None)
        hf_model.set_attn_implementation(previous)
        hf_model.train(was_training)


def _serve_prefix(hf_model, modules, keys, values):
    """From here on the model attends through ptune_fast's attention to a fixed prefix."""
    _attention.register()
    hf_model.set_attn_implementation(_attention.NAME)
    state = _StaticState(keys, values)
    for m in modules:
        m._ptune_fast_state = state


def _hidden(out):
    h = getattr(out, "last_hidden_state", None)
    return h if h is not None else out[0]


def verify(hf_model, caps):
    """``caps`` with the position rule the model follows (or ``position_error`` set)."""
    backbone = hf_model.get_submodule(caps.backbone)
    modules = [hf_model.get_submodule(n) for n in caps.attention]
    emb = hf_model.get_input_embeddings()
    device, dtype = emb.weight.device, emb.weight.dtype
    L, H, D, P = caps.num_layers, caps.num_kv_heads, caps.head_dim, 2
    S = 5 if caps.sliding_window is None else max(2, min(5, caps.sliding_window - P))  # fit the window
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(L, H, P, D, generator=g).to(device, dtype)
    values = torch.randn(L, H, P, D, generator=g).to(device, dtype)
    pad = caps.padding_idx if caps.padding_idx is not None else getattr(hf_model.config, "pad_token_id", None)
    vocab = emb.num_embeddings
    if not isinstance(pad, int) or not 0 <= pad < vocab:
        pad = 0
    low = min(max(pad, 2) + 1, vocab - 1)
    ids = torch.randint(low, vocab, (2, S), generator=g).to(device)
    mask = torch.ones(2, S, dtype=torch.long, device=device)
    mask[1, :2] = 0
    ids[1, :2] = pad
    candidates = [caps.positions] + [r for r in RULES if r != caps.positions]
    if caps.padding_idx is None:
        candidates.remove("padding_idx")
    errors = {}
    with _trial(hf_model, modules):
        cache = compat.prefix_cache(hf_model.config, keys[:, None].expand(L, 2, H, P, D).contiguous(),
                                    values[:, None].expand(L, 2, H, P, D).contiguous())
        full_mask = torch.cat([mask.new_ones(2, P), mask], dim=1)
        try:
            ref = _hidden(backbone(input_ids=ids, attention_mask=full_mask, **{compat.cache_kwarg(backbone): cache}))
        except Exception as exc:  # noqa: BLE001 - no prefix in its cache: PEFT's prefix cannot work either
            return dataclasses.replace(caps, position_error=(
                f"it does not take a prefix in its cache ({type(exc).__name__}: {exc})"))
        _serve_prefix(hf_model, modules, keys, values)
        real = mask.bool()[..., None]
        tol = _scale_tol(ref, real, dtype)
        for rule in candidates:
            trial = dataclasses.replace(caps, positions=rule)
            pos = position_ids(trial, {"input_ids": ids, "attention_mask": mask}, P, S, 0, device)
            try:
                out = _hidden(backbone(input_ids=ids, attention_mask=mask, position_ids=pos))
            except Exception as exc:  # noqa: BLE001
                errors[rule] = f"{type(exc).__name__}: {exc}"
                continue
            err = (out.float() - ref.float()).masked_fill(~real, 0).abs().max().item()
            errors[rule] = f"max |diff| {err:.3g} (tolerance {tol:.3g})"
            if err <= tol:
                return dataclasses.replace(caps, positions=rule, position_error=None)
    return dataclasses.replace(caps, position_error=(
        "no position rule reproduces the model with a cached prefix (its forward may ignore position_ids): "
        + "; ".join(f"{r}: {e}" for r, e in errors.items())))


def _scale_tol(ref, real, dtype):
    scale = ref.float().masked_fill(~real, 0).abs().max().item() + 1e-6
    return (1e-4 if dtype in (torch.float32, torch.float64) else 3e-2) * scale


def verify_shared(hf_model, caps):
    """``caps`` with ``shared_error`` set where the shared pass does not reproduce the per-row layout."""
    if not caps.causal:
        return dataclasses.replace(caps, shared_error="bidirectional attention: virtual tokens see the row")
    if caps.position_error is not None:
        return dataclasses.replace(caps, shared_error=caps.position_error)
    from ptune_fast.integrations.shared_pass import virtual_token_kv

    backbone = hf_model.get_submodule(caps.backbone)
    modules = [hf_model.get_submodule(n) for n in caps.attention]
    emb = hf_model.get_input_embeddings()
    device, dtype = emb.weight.device, emb.weight.dtype
    n = 3
    S = 4 if caps.sliding_window is None else max(2, min(4, caps.sliding_window - n))  # fit the window
    g = torch.Generator().manual_seed(1)
    vocab = emb.num_embeddings
    ids = torch.randint(min(3, vocab - 1), vocab, (2, S), generator=g).to(device)
    mask = torch.ones(2, S, dtype=torch.long, device=device)
    mask[1, :1] = 0
    with _trial(hf_model, modules):
        prompts = emb(torch.randint(min(3, vocab - 1), vocab, (n,), generator=g).to(device))
        try:
            embeds = torch.cat([prompts.unsqueeze(0).expand(2, -1, -1), emb(ids)], dim=1)
            ref = _hidden(backbone(inputs_embeds=embeds, attention_mask=torch.cat([mask.new_ones(2, n), mask], 1)))
            ref = ref[:, n:]

            class _Extra:
                extra = {}

            keys, values = virtual_token_kv(hf_model, backbone, prompts, _Extra())
        except Exception as exc:  # noqa: BLE001
            return dataclasses.replace(caps, shared_error=f"the virtual-token pass fails ({type(exc).__name__}: {exc})")
        _serve_prefix(hf_model, modules, keys, values)
        pos = position_ids(caps, {"input_ids": ids, "attention_mask": mask}, n, S, 0, device, ignore_given=True)
        out = _hidden(backbone(input_ids=ids, attention_mask=mask, position_ids=pos))
        real = mask.bool()[..., None]
        err = (out.float() - ref.float()).masked_fill(~real, 0).abs().max().item()
        tol = _scale_tol(ref, real, dtype)
        if err > tol:
            return dataclasses.replace(caps, shared_error=(
                f"running the virtual tokens once does not reproduce prepending them (max |diff| {err:.3g}, "
                f"tolerance {tol:.3g}; e.g. recurrent layers carry them in a state)"))
        loss_error = _check_loss(hf_model, embeds, mask, ids, n)
        if loss_error:
            return dataclasses.replace(caps, shared_error=loss_error)
    return caps


def _check_loss(hf_model, embeds, mask, ids, n):
    """The shared pass rebuilds PEFT's causal-LM loss as the shifted token cross-entropy; check the
    model's own loss is that (some heads expect pre-shifted labels, e.g. Whisper's decoder)."""
    from ptune_fast.integrations.shared_pass import causal_lm_loss

    if not hasattr(hf_model, "get_output_embeddings") or hf_model.get_output_embeddings() is None:
        return None
    labels = ids.masked_fill(mask == 0, -100)
    full_labels = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
    full_mask = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    try:
        out = hf_model(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels)
    except Exception as exc:  # noqa: BLE001
        return f"its forward with labels fails on inputs_embeds ({type(exc).__name__}: {exc})"
    if getattr(out, "loss", None) is None:
        return "its forward returns no loss"
    mine = causal_lm_loss(hf_model, out.logits[:, n:], labels, out.logits[:, n - 1])
    if abs(mine.item() - out.loss.item()) > 1e-4 * max(1.0, abs(out.loss.item())):
        return (f"its causal-LM loss is not the shifted token cross-entropy ({out.loss.item():.5g} vs "
                f"{mine.item():.5g}), which the shared pass rebuilds")
    return None
