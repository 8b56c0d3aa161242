"""Adopt a PEFT prompt-learning model as it is: ``patch(peft_model)`` / ``unpatch(peft_model)``.

* PREFIX_TUNING (with or without projection, i.e. prefix tuning and P-Tuning v2): the prefix
  encoder runs once per forward on the P virtual tokens (PEFT runs it on B copies), the
  per-layer K/V stays outside the HF cache and is attended by ``prefix_attention``; the cache
  of ``generate`` holds only real tokens. Gradient checkpointing works.
* P_TUNING / PROMPT_TUNING: the encoder output is computed once and broadcast (a view) over
  the batch instead of ``repeat``-ed; the virtual tokens are prepended as PEFT does.

Numbers equal PEFT's; ``unpatch`` restores PEFT's own code paths.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import types
import warnings

import torch

from ptune_fast import reference
from ptune_fast.encoders import encode
from ptune_fast.integrations import compat, shared_pass
from ptune_fast.integrations.capabilities import UnsupportedModel
from ptune_fast.integrations.core import attach_prefix, backbone_of, describe
from ptune_fast.integrations.state import PrefixState

_ATTR = "_ptune_fast_patch"
_METHODS = {"PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING"}


def _peft_type(cfg) -> str:
    t = cfg.peft_type
    return str(getattr(t, "value", t))


def is_patched(model) -> bool:
    return hasattr(model, _ATTR)


def _serialised(fn):
    """Run ``fn`` under the patch's lock: one call at a time per patched model (threads)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with getattr(self, _ATTR).lock:
            return fn(self, *args, **kwargs)

    return wrapper


@_serialised
def _patched_forward_prefix(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                            output_attentions=None, output_hidden_states=None, return_dict=None,
                            task_ids=None, **kwargs):
    """PEFT's prefix-tuning forward without the DynamicCache, the mask prepend and the B-row encoder."""
    patch = getattr(self, _ATTR)
    patch.check_adapter()
    if task_ids is not None:
        raise ValueError("task_ids: a patched single-adapter model has no task bank (see ptune_fast.TaskBank)")
    common = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                  return_dict=return_dict)
    # The prefix is served by the attention function, so every head (causal LM, sequence
    # classification, ...) runs as the plain transformers model: no cache argument needed.
    return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           labels=labels, **common, **kwargs)


@_serialised
def _patched_forward_shared(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                            output_attentions=None, output_hidden_states=None, return_dict=None,
                            task_ids=None, **kwargs):
    """Prompt/P-tuning with the shared virtual-token pass: outputs cover the S real tokens."""
    patch = getattr(self, _ATTR)
    patch.check_adapter()
    if task_ids is not None:
        raise ValueError("task_ids: a patched single-adapter model has no task bank (see ptune_fast.TaskBank)")
    if kwargs.get("position_ids") is not None:
        warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
        kwargs["position_ids"] = None
    out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                          output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                          return_dict=True, **kwargs)
    extra = patch.state.extra
    if labels is not None:
        out.loss = shared_pass.causal_lm_loss(patch.hf_model, out.logits, labels,
                                              shared_pass.first_logits(patch.hf_model, extra),
                                              num_items_in_batch=kwargs.get("num_items_in_batch"))
    if patch.outputs == "peft" and not patch.state.disabled:
        # PEFT's layout: the n virtual positions first. Their logits are the same for every row:
        # computed once by the shared pass and broadcast.
        virtual = extra["virtual_logits"].to(out.logits.dtype)
        B = out.logits.shape[0]
        out.logits = torch.cat([virtual.unsqueeze(0).expand(B, -1, -1), out.logits], dim=1)
    return out if return_dict is not False else out.to_tuple()


def _patched_get_prompt_prefix(self, batch_size, task_ids=None, max_cache_len=None):
    return None  # the prefix lives in PrefixState, not in a cache


def _patched_get_prompt_tokens(self, batch_size, task_ids=None, max_cache_len=None):
    """Virtual-token embeddings computed once and broadcast over the batch (no ``repeat``)."""
    enc = self.prompt_encoder[self.active_adapter]
    prompts = encode(enc)
    getattr(self, _ATTR).encoder_calls += 1
    return prompts.unsqueeze(0).expand(batch_size, -1, -1)


def _patched_prepare_inputs_for_generation(self, *args, **kwargs):
    """PEFT 0.21 tells the first generation step (where it prepends the virtual tokens) from
    ``model_kwargs["past_key_values"]``; transformers >= 5.24 passes the cache as ``cache``, so PEFT
    would prepend the virtual tokens at every step. Show PEFT the cache under the name it reads."""
    patch = getattr(self, _ATTR)
    name = patch.cache_name
    base_prepare = self.base_model_prepare_inputs_for_generation

    def aliased(*a, **k):  # PEFT reads the base model's prepared inputs under the old name
        prepared = base_prepare(*a, **k)
        if prepared.get(name) is not None and prepared.get("past_key_values") is None:
            prepared["past_key_values"] = prepared[name]
        return prepared

    self.base_model_prepare_inputs_for_generation = aliased
    try:
        out = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
    finally:
        self.base_model_prepare_inputs_for_generation = base_prepare
    cache = out.pop("past_key_values", None)
    if cache is not None and out.get(name) is None:
        out[name] = cache
    return out


@contextlib.contextmanager
def _patched_disable_adapter(self):
    """PEFT's ``disable_adapter`` plus ours: no prefix and no position shift inside."""
    patch = getattr(self, _ATTR)
    state = patch.state
    with type(self).disable_adapter(self):
        prev = None if state is None else state.disabled
        if state is not None:
            state.disabled = True
        try:
            yield
        finally:
            if state is not None:
                state.disabled = prev


@_serialised
def _patched_generate_prefix(self, *args, **kwargs):
    patch = getattr(self, _ATTR)
    if not patch.state.disabled:
        patch.check_adapter()
    with patch.state.holding():  # the prefix is computed once for the whole generate call
        return _generate_base(self, *args, **kwargs)


def _generate_base(self, *args, **kwargs):
    base = self.base_model
    if hasattr(base, "model"):
        base.model.generation_config = self.generation_config
    else:
        base.generation_config = self.generation_config
    return base.generate(*args, **kwargs)


class PeftPatch:
    def __init__(self, peft_model, prompt_pass: str = "auto", outputs: str = "peft"):
        self.peft_model = peft_model
        self.outputs = outputs
        # The prefix state is per model: calls from several threads are serialised (one at a time).
        self.lock = threading.RLock()
        self.adapter = peft_model.active_adapter
        cfg = peft_model.peft_config[self.adapter]
        self.method = _peft_type(cfg)
        self.attachment = None
        self.saved = {}
        self.encoder_calls = 0
        hf = peft_model.get_base_model()
        self.hf_model = hf
        self.prompt_pass = prompt_pass
        self.cache_name = compat.cache_kwarg(hf)
        task = str(getattr(cfg.task_type, "value", cfg.task_type))
        try:
            caps = describe(hf)
        except UnsupportedModel as exc:
            # Prompt methods per row need nothing from the attention (PEFT's own layout, encoder run
            # once and broadcast): only the prefix paths need what was refused.
            if self.method == "PREFIX_TUNING" or prompt_pass == "shared":
                raise
            caps = None
            refused = str(exc)
        if caps is None:
            can_share, model_type, shared_error = False, str(hf.config.model_type), refused
        else:
            can_share = (self.method in ("P_TUNING", "PROMPT_TUNING") and task == "CAUSAL_LM"
                         and caps.shared_error is None)
            model_type, shared_error = caps.model_type, caps.shared_error
        if prompt_pass == "shared" and not can_share:
            raise ValueError(
                "prompt_pass='shared' needs P_TUNING or PROMPT_TUNING on a CAUSAL_LM model with causal attention "
                f"whose positions ptune_fast reproduces; got {self.method} / {task} / {model_type!r} "
                f"({shared_error})"
            )
        if self.method == "PREFIX_TUNING":
            peft_layout = (cfg.num_layers, cfg.num_attention_heads, cfg.token_dim // cfg.num_attention_heads)
            model_layout = (caps.num_layers, caps.num_kv_heads, caps.head_dim)
            if peft_layout != model_layout:
                raise UnsupportedModel(
                    f"ptune_fast cannot serve this PEFT prefix on model type {caps.model_type!r}: PEFT's prefix layout "
                    f"(layers, kv heads, head dim) = {peft_layout} does not match the model's attention {model_layout}"
                )
        self.shared = can_share and prompt_pass != "per_row"
        if self.method != "PREFIX_TUNING" and not self.shared and getattr(peft_model, "word_embeddings", None) is None:
            raise UnsupportedModel(
                f"ptune_fast cannot serve {self.method} per row on model type {model_type!r}: PEFT found no "
                f"word embeddings in it (its own forward fails the same way); the shared pass is not exact here: "
                f"{shared_error}")

    def __getstate__(self):  # copy.deepcopy / pickle: a lock is not copied, the copy gets its own
        state = dict(self.__dict__)
        state.pop("lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.RLock()

    # Providers are bound methods (not closures): copy.deepcopy of the patched model rebinds them
    # to the copy's own encoder.
    def _encoder(self):
        return self.peft_model.prompt_encoder[self.adapter]

    def _encoder_parameters(self):
        return self._encoder().parameters()

    def _prefix_kv(self):
        cfg = self.peft_model.peft_config[self.adapter]
        P, L, Hkv = cfg.num_virtual_tokens, cfg.num_layers, cfg.num_attention_heads
        out = encode(self._encoder())[:P]
        dtype = self.peft_model.base_model_torch_dtype
        if dtype is not None:
            out = out.to(dtype)
        keys, values = reference.split_prefix(out, L, Hkv, cfg.token_dim // Hkv)
        return keys.contiguous(), values.contiguous()

    def _shared_kv(self):
        prompts = encode(self._encoder()).to(self.hf_model.get_input_embeddings().weight.dtype)
        return shared_pass.virtual_token_kv(self.hf_model, backbone_of(self.hf_model), prompts, self.state,
                                            all_logits=self.outputs == "peft")

    def _override(self, name, fn):
        self.saved[name] = self.peft_model.__dict__.get(name, None)
        setattr(self.peft_model, name, types.MethodType(fn, self.peft_model))

    def install(self):
        pm = self.peft_model
        if self.method == "PREFIX_TUNING":
            cfg = pm.peft_config[self.adapter]
            state = PrefixState(self._prefix_kv, self._encoder_parameters, cfg.num_virtual_tokens)
            self.attachment = attach_prefix(self.hf_model, state)
            self._override("forward", _patched_forward_prefix)
            self._override("get_prompt", _patched_get_prompt_prefix)
            if hasattr(type(pm), "generate"):
                self._override("generate", _patched_generate_prefix)
        elif self.shared:
            cfg = pm.peft_config[self.adapter]
            state = PrefixState(self._shared_kv, self._encoder_parameters, cfg.num_virtual_tokens)
            self.attachment = attach_prefix(self.hf_model, state, ignore_position_ids=True)
            self._override("forward", _patched_forward_shared)
            self._override("generate", _patched_generate_prefix)
        else:
            self._override("get_prompt", _patched_get_prompt_tokens)
            if self.cache_name != "past_key_values" and hasattr(type(pm), "prepare_inputs_for_generation"):
                self._override("prepare_inputs_for_generation", _patched_prepare_inputs_for_generation)
        if self.attachment is not None:
            self._override("disable_adapter", _patched_disable_adapter)
        setattr(pm, _ATTR, self)
        return pm

    def check_adapter(self):
        if self.peft_model.active_adapter != self.adapter:
            raise ValueError(
                f"the active PEFT adapter changed from {self.adapter!r} to {self.peft_model.active_adapter!r} "
                "after ptune_fast.patch(); unpatch() and patch() again, or serve several adapters with ptune_fast.TaskBank"
            )

    @property
    def state(self):
        return None if self.attachment is None else self.attachment.state

    def remove(self):
        pm = self.peft_model
        for name, prev in self.saved.items():
            if prev is None:
                pm.__dict__.pop(name, None)
            else:
                pm.__dict__[name] = prev
        if self.attachment is not None:
            self.attachment.remove()
        delattr(pm, _ATTR)


def patch_peft(peft_model, prompt_pass: str = "auto", outputs: str = "peft"):
    """Patch a PEFT ``PeftModel`` in place (see the module docstring). Returns the model.

    ``prompt_pass`` (P_TUNING / PROMPT_TUNING): ``"shared"`` runs the virtual tokens once per
    step and attends to their K/V as a prefix (causal-LM decoders only; outputs then cover
    the real tokens only), ``"per_row"`` prepends them to every row as PEFT does, ``"auto"``
    picks ``"shared"`` where it is exact.
    """
    if prompt_pass not in ("auto", "shared", "per_row"):
        raise ValueError(f"prompt_pass must be 'auto', 'shared' or 'per_row', got {prompt_pass!r}")
    if outputs not in ("peft", "real"):
        raise ValueError(f"outputs must be 'peft' (n virtual + S real positions, as PEFT) or 'real' (S real "
                         f"positions only), got {outputs!r}")
    if is_patched(peft_model):
        current = getattr(peft_model, _ATTR)
        for name, want in (("prompt_pass", prompt_pass), ("outputs", outputs)):
            if getattr(current, name) != want:
                raise ValueError(
                    f"this model is already patched with {name}={getattr(current, name)!r}; unpatch() it before "
                    f"patching with {name}={want!r}"
                )
        return peft_model
    cfg = peft_model.active_peft_config
    method = _peft_type(cfg)
    if method not in _METHODS:
        raise ValueError(f"ptune_fast patches PREFIX_TUNING, P_TUNING and PROMPT_TUNING PEFT models, got {method}")
    if getattr(cfg, "num_transformer_submodules", 1) != 1:
        raise ValueError("ptune_fast does not support encoder-decoder (num_transformer_submodules=2) PEFT models")
    task = str(getattr(cfg.task_type, "value", cfg.task_type))
    if task not in ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION"):
        raise ValueError(f"ptune_fast supports task types CAUSAL_LM, SEQ_CLS, TOKEN_CLS, FEATURE_EXTRACTION, got {task}")
    if not cfg.num_virtual_tokens or cfg.num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be >= 1, got {cfg.num_virtual_tokens!r} in the PEFT config")
    return PeftPatch(peft_model, prompt_pass, outputs).install()


def unpatch_peft(peft_model):
    if is_patched(peft_model):
        getattr(peft_model, _ATTR).remove()
    return peft_model
