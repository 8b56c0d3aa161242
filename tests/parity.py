"""Shared parity helpers: run a model, compare with the PEFT-free oracle and with PEFT where PEFT works."""
from __future__ import annotations

import contextlib

import pytest
import torch

import ptune_fast
from ptune_fast.integrations.core import backbone_of, describe
from ptune_fast.oracle import PREFIX, Oracle


def run(model, ids, mask, labels, **kw):
    """``(logits, loss, grads of trainable params)`` of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_grad_close(got, ref, name):
    # Relative to the tensor's scale: PEFT sums the prefix gradient over B encoder copies and
    # attends to a concatenated K/V, we do neither, so fp32 summation orders differ (measured
    # worst case ~3e-6 of the largest element on these models).
    err = (got - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item() + 1e-6, f"{name}: max abs err {err}"


def real(logits, mask, S):
    """The S real positions' logits, padding zeroed (LM heads); classification logits unchanged."""
    if logits.dim() == 2:
        return logits
    return logits[:, -S:] * mask[:, :, None]


def oracle_for(pm, method) -> Oracle:
    """The PEFT-free oracle of a PEFT prompt-learning model (computed from its encoder's weights)."""
    cfg = pm.active_peft_config
    hf = pm.get_base_model()
    backbone = backbone_of(hf) if method in PREFIX else None  # prompt methods need no cache hand-off
    return Oracle(hf, method, pm.prompt_encoder[pm.active_adapter], backbone,
                  cfg.num_layers, cfg.num_attention_heads)


@contextlib.contextmanager
def unpatched(pm):
    """Run the oracle on the plain transformers model of a patched PEFT model."""
    was = ptune_fast.is_patched(pm)
    prompt_pass = pm._ptune_fast_patch.prompt_pass if was else None
    if was:
        ptune_fast.unpatch(pm)
    try:
        yield pm.get_base_model()
    finally:
        if was:
            ptune_fast.patch(pm, prompt_pass=prompt_pass)


def oracle_run(pm, method, ids, mask, labels, causal_lm=True, **kw):
    """Oracle ``(logits, loss, grads)`` with the gradient keys named as in the PEFT model."""
    orc = oracle_for(pm, method)
    with unpatched(pm):
        pm.zero_grad(set_to_none=True)
        out = orc.forward(ids, mask, labels, causal_lm=causal_lm, **kw)
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad and p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same(got, ref, mask, S, what):
    lg, lr = real(got[0], mask, S), real(ref[0], mask, S)
    assert lg.shape == lr.shape, what
    # fp32 rounding, relative to the logits' scale: the shared pass and PEFT's layout sum in other
    # orders. Measured: the same comparison in fp64 agrees to 9e-16 (granite), in fp32 the worst
    # zoo case is 2.5e-5 at |logits| 5.2 (4.8e-6 relative); the bound is 1e-5 relative.
    scale = max(1.0, lr.abs().max().item())
    assert (lg - lr).abs().max().item() <= 1e-5 * scale, (what, (lg - lr).abs().max().item(), scale)
    assert abs(got[1].item() - ref[1].item()) <= 1e-5 * max(1.0, abs(ref[1].item())), (what, got[1].item(), ref[1].item())
    assert ref[2] and ref[2].keys() == got[2].keys(), (what, sorted(ref[2]), sorted(got[2]))
    for name in ref[2]:
        assert_grad_close(got[2][name], ref[2][name], f"{what}: {name}")


def peft_works_or_skip(fn, what):
    """Run PEFT's own path; where PEFT itself is broken on the installed transformers (it raises),
    skip that comparison — the oracle comparison already ran."""
    try:
        return fn()
    except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as exc:
        pytest.skip(f"PEFT itself fails here ({what}): {type(exc).__name__}: {exc}")


def is_prefix(method):
    return method in PREFIX


def caps(model):
    return describe(model)
