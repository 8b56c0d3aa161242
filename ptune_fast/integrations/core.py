"""Attach a prefix to a Hugging Face model: attention implementation, positions, state.

``attach_prefix(hf_model, state)``:

* switches the model to the ``"ptune_fast"`` attention and mask functions;
* hangs ``state`` on every attention module (looked up by ``module.layer_idx``);
* installs a forward pre-hook on the backbone (``hf_model.base_model``) that refreshes the
  prefix once per forward and gives the real tokens PEFT's positions: with PEFT the prefix
  sits in the cache, so the real tokens of a row start at position ``P`` (plus the real
  cache length). Explicit ``position_ids`` are shifted by ``P``, as PEFT does.

``Attachment.remove()`` undoes all of it (``unpatch`` and ``TaskBank.detach`` call it).
"""
from __future__ import annotations

import inspect

import torch

from ptune_fast.integrations import attention as _attention
from ptune_fast.integrations import compat
from ptune_fast.integrations import positions as _positions
from ptune_fast.integrations.capabilities import Capabilities, UnsupportedModel, backbone_of
from ptune_fast.integrations.capabilities import describe as _describe
from ptune_fast.integrations.state import PrefixState

#: ``Attachment.ignore_position_ids`` may be a bool tensor ``[N]``, one flag per bank task
PER_TASK_POSITION_POLICY = True

__all__ = ["Attachment", "attach_prefix", "attention_modules", "backbone_of", "describe", "require_positions"]


def describe(hf_model) -> Capabilities:
    """:func:`capabilities.describe`, probed once per model and kept on it."""
    caps = hf_model.__dict__.get("_ptune_fast_caps")
    if caps is None:
        caps = _positions.verify_shared(hf_model, _positions.verify(hf_model, _describe(hf_model)))
        hf_model.__dict__["_ptune_fast_caps"] = caps
    return caps


def attention_modules(hf_model):
    """The modules that call the attention interface (found by the probe)."""
    return [hf_model.get_submodule(n) for n in describe(hf_model).attention]


def require_positions(caps: Capabilities, what: str) -> None:
    if caps.position_error is not None:
        raise UnsupportedModel(f"ptune_fast cannot serve model type {caps.model_type!r} with {what}: "
                               f"{caps.position_error}")


def _seq_len_of(kw):
    if kw.get("input_ids") is not None:
        return kw["input_ids"].shape[0], kw["input_ids"].shape[1], kw["input_ids"].device
    emb = kw.get("inputs_embeds")
    if emb is None:
        raise ValueError("the model was called with neither input_ids nor inputs_embeds")
    return emb.shape[0], emb.shape[1], emb.device


class Attachment:
    """What ``attach_prefix`` changed on one model, so that it can be undone."""

    def __init__(self, hf_model, state: PrefixState, ignore_position_ids: bool = False):
        self.model = hf_model
        self.state = state
        self.caps = describe(hf_model)
        require_positions(self.caps, "a prefix kept outside its cache")
        self.model_type = self.caps.model_type
        self.backbone = backbone_of(hf_model)
        self.previous_attn = hf_model.config._attn_implementation
        self.modules = attention_modules(hf_model)
        if not self.modules:
            raise ValueError(f"found no attention modules with a layer_idx in {type(hf_model).__name__}")
        self._signature = inspect.signature(self.backbone.forward)
        self._handle = None
        # PEFT shifts explicit position_ids by P for prefix tuning, and drops them for prompt
        # methods (whose virtual tokens we serve through the shared pass).
        self.ignore_position_ids = ignore_position_ids

    def install(self):
        if getattr(self.model, "_ptune_fast_attachment", None) is not None:
            raise ValueError(
                f"this {type(self.model).__name__} is already served by ptune_fast (a patch or a TaskBank); "
                "unpatch()/detach() it first, or add tasks to the existing TaskBank"
            )
        _attention.register()
        self.model.set_attn_implementation(_attention.NAME)
        if self.model.config._attn_implementation != _attention.NAME:
            raise RuntimeError(f"could not switch {type(self.model).__name__} to the ptune_fast attention")
        for m in self.modules:
            m._ptune_fast_state = self.state
        self._handle = self.backbone.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self.model._ptune_fast_attachment = self
        return self

    def remove(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for m in self.modules:
            if hasattr(m, "_ptune_fast_state"):
                del m._ptune_fast_state
        self.model.set_attn_implementation(self.previous_attn)
        self.state.clear()
        self.model.__dict__.pop("_ptune_fast_attachment", None)

    def _check_checkpointing(self):
        """Reentrant checkpointing re-runs backward through the (shared) encoder graph once per
        layer, which autograd forbids; non-reentrant (transformers' default) works."""
        keys = self.state.keys
        if not self.model.training or keys is None or not keys.requires_grad:
            return
        fn = next((getattr(m, "_gradient_checkpointing_func", None) for m in self.model.modules()
                   if getattr(m, "gradient_checkpointing", False) is True), None)
        if fn is not None and getattr(fn, "keywords", {}).get("use_reentrant", False):
            raise ValueError(
                "gradient checkpointing with use_reentrant=True cannot train a prefix shared by all layers; "
                "call gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
                "(transformers' default)"
            )

    def _pre_hook(self, module, args, kwargs):
        if self.state.computing or self.state.disabled:  # shared pass / disable_adapter: run plainly
            return None
        if args:
            kwargs = dict(self._signature.bind_partial(*args, **kwargs).arguments)
            kwargs.update(kwargs.pop("kwargs", {}) or {})
        self.state.refresh()
        self._check_checkpointing()
        P = self.state.num_virtual_tokens
        B, S, device = _seq_len_of(kwargs)
        tids = self.state.task_ids
        if tids is not None and tids.shape[0] != B:  # beam search / num_return_sequences expand rows
            if B % tids.shape[0]:
                raise ValueError(f"task_ids has {tids.shape[0]} rows but the batch has {B}")
            self.state.task_ids = tids.repeat_interleave(B // tids.shape[0])
        past = compat.get_cache(kwargs)
        if past is not None and "static" in type(past).__name__.lower():
            raise NotImplementedError(
                f"ptune_fast does not serve {type(past).__name__} (generate(cache_implementation='static')): its "
                "fixed-size buffers break the prefix bookkeeping; use the default dynamic cache")
        past_len = compat.cache_length(past)
        ignore = self.ignore_position_ids
        if isinstance(ignore, torch.Tensor):  # one flag per bank task: each row follows its task
            tids = self.state.task_ids
            ignore = bool(ignore[0]) if tids is None else ignore.to(tids.device)[tids.long()]
        kwargs["position_ids"] = _positions.position_ids(self.caps, kwargs, P, S, past_len, device,
                                                         ignore_given=ignore)
        if kwargs.get("attention_mask") is None and past is None and torch.compiler.is_compiling():
            # Under torch.compile HF cannot rule out packed sequences from position_ids alone;
            # an explicit all-True padding mask keeps the mask function on the plain path.
            kwargs["attention_mask"] = torch.ones(B, S, dtype=torch.bool, device=device)
        return (), kwargs


def attach_prefix(hf_model, state: PrefixState, ignore_position_ids: bool = False) -> Attachment:
    return Attachment(hf_model, state, ignore_position_ids).install()
