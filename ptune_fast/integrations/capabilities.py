"""What a Hugging Face model *does*, detected from the model itself — no list of family names.

:func:`describe` answers, for any model:

* **attention** — probed: the model runs one tiny no-grad forward with a recording attention
  function and mask function registered with transformers' interfaces. That shows which
  modules call the attention interface (and with which ``layer_idx``), each layer's K/V
  shapes (``Hkv``, ``D``), whether attention is causal, and which extras a family passes
  (``softcap``, attention sinks ``s_aux``/``sinks``, ``sliding_window``, custom masks).
* **positions** — which rule gives the real tokens the positions transformers gives them when a
  P-token prefix sits in its cache: positions that follow the cache length (RoPE, absolute
  tables), positions from the attention mask (OPT-like), or from input ids and a padding index
  (RoBERTa-like). :mod:`ptune_fast.integrations.positions` *verifies* the rule by running the
  model both ways on a tiny input; a hint from the modules (a position module whose ``forward``
  takes ``attention_mask``; a position ``nn.Embedding`` with ``padding_idx``) orders the candidates.
* **refusals** — features ptune_fast cannot serve exactly raise :class:`UnsupportedModel`
  (a ``ValueError``) naming the model type and the feature: encoder-decoder models, attention
  outside the interface, logit softcapping, attention sinks, ALiBi / relative key-position
  biases, layers without attention or with different head counts / head dims, shared KV
  layers, key and value head dims that differ, chunked attention masks. Config fields that
  the probe cannot see are declared as data in :data:`CONFIG_FEATURES`.

A sliding window is not refused here: the attention function checks ``prefix + context``
against it at call time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Optional

import torch
from torch import nn

from ptune_fast.integrations import compat

PROBE_NAME = "ptune_fast_probe"
_lock = threading.Lock()
_records: Optional[dict] = None

#: config field -> (predicate on its value, feature named in the error). Only for what the
#: attention probe cannot observe.
CONFIG_FEATURES = {
    "is_encoder_decoder": (lambda v: bool(v), "encoder-decoder models"),
    "alibi": (lambda v: bool(v), "ALiBi key-position biases"),
    "use_alibi": (lambda v: bool(v), "ALiBi key-position biases"),
    "position_embedding_type": (lambda v: v in ("alibi", "relative_key", "relative_key_query"),
                                "relative / ALiBi key-position biases"),
    "attn_logit_softcapping": (lambda v: v is not None, "attention logit softcapping"),
    "num_kv_shared_layers": (lambda v: bool(v), "layers sharing KV with another layer"),
    "attention_chunk_size": (lambda v: v is not None, "chunked attention"),
}


class UnsupportedModel(ValueError):
    """The model uses a feature ptune_fast cannot serve exactly (raised at patch time)."""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    causal: bool  # every attention layer is causal (shared virtual-token pass, deep folding)
    positions: str  # "cache" | "mask" | "padding_idx"
    padding_idx: Optional[int]  # the position table's padding index ("padding_idx" positions)
    sliding_window: Optional[int]  # smallest window a layer uses, None for full attention
    backbone: str = "model"  # dotted name of the module that takes position_ids and the cache
    attention: tuple = ()  # dotted names of the modules that call the attention interface
    position_error: Optional[str] = None  # why no position rule reproduces the model (prefix paths refused)
    shared_error: Optional[str] = None  # why the shared virtual-token pass is not exact here (per-row instead)

    def spec(self) -> dict:
        """What an adapter must agree on with its base model."""
        return {"model_type": self.model_type, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "hidden_size": self.hidden_size}


def _model_type(hf_model) -> str:
    return str(getattr(getattr(hf_model, "config", None), "model_type", None) or type(hf_model).__name__)


def _refuse(hf_model, feature: str):
    raise UnsupportedModel(
        f"ptune_fast cannot serve model type {_model_type(hf_model)!r} ({type(hf_model).__name__}): {feature}"
    )


# ---------------------------------------------------------------------------------- the probe
def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    rec = _records
    if rec is not None:
        rec["calls"].append({
            "module": id(module),
            "layer_idx": getattr(module, "layer_idx", None),
            "key": tuple(key.shape), "value": tuple(value.shape), "query": tuple(query.shape),
            "mask": attention_mask is not None,
            "is_causal": kwargs.get("is_causal", getattr(module, "is_causal", None)),
            "softcap": kwargs.get("softcap"),
            "sinks": kwargs.get("s_aux", kwargs.get("sinks")),
            "sliding_window": kwargs.get("sliding_window"),
            "bias": [k for k in ("alibi", "position_bias", "attn_bias") if kwargs.get(k) is not None],
        })
    B, H, S, _ = query.shape
    return query.new_zeros(B, S, H, value.shape[-1]), None


def _probe_mask(*args, mask_function=None, **kwargs):
    rec = _records
    if rec is not None:
        rec["mask_functions"].append(getattr(mask_function, "__qualname__", repr(mask_function)))
    return None


def _register_probe():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PROBE_NAME, _probe_attention)
    AttentionMaskInterface.register(PROBE_NAME, _probe_mask)


@contextlib.contextmanager
def _eval(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def probe(hf_model) -> dict:
    """Run one tiny forward through the recording attention; return what it saw."""
    global _records
    _register_probe()
    config = hf_model.config
    previous = config._attn_implementation
    param = next(iter(hf_model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    vocab = getattr(hf_model.get_input_embeddings(), "num_embeddings", 8)
    ids = torch.full((1, 3), min(3, vocab - 1), dtype=torch.long, device=device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if compat.accepts(hf_model, "use_cache"):
        kwargs["use_cache"] = False
    entered = []  # (name, module) in the order their forward started

    def _enter(name):
        def hook(module, args, kw):
            entered.append((name, module))
        return hook

    with _lock:
        _records = {"calls": [], "mask_functions": [], "entered": entered}
        handles = [m.register_forward_pre_hook(_enter(n), with_kwargs=True)
                   for n, m in hf_model.named_modules() if n and next(m.children(), None) is not None]
        try:
            hf_model.set_attn_implementation(PROBE_NAME)
            if config._attn_implementation != PROBE_NAME:
                _refuse(hf_model, "it does not let an attention implementation be set (set_attn_implementation)")
            with torch.no_grad(), _eval(hf_model):
                hf_model(**kwargs)
            return _records
        except UnsupportedModel:
            raise
        except Exception as exc:  # the model cannot run with an interface-registered attention
            _refuse(hf_model, f"a forward through transformers' attention interface failed ({type(exc).__name__}: {exc})")
        finally:
            _records = None
            for h in handles:
                h.remove()
            hf_model.set_attn_implementation(previous)


# ------------------------------------------------------------------------------- positions
def _position_kind(backbone) -> tuple:
    for name, m in backbone.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if "pos" not in leaf and "pos" not in type(m).__name__.lower():
            continue
        params = compat._forward_params(type(m).forward)
        if "attention_mask" in params:
            return "mask", None
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            return "padding_idx", int(m.padding_idx)
    return "cache", None


def _find_backbone(hf_model, rec) -> str:
    """Name of the outermost module the forward actually entered that runs every attention layer
    and takes ``position_ids`` (``model`` for most; ``model.decoder`` for OPT's causal LM, whose
    head calls the decoder directly)."""
    attn = {c["module"] for c in rec["calls"]}
    seen = set()
    for name, module in rec["entered"]:
        if name in seen:
            continue
        seen.add(name)
        inner = {id(m) for m in module.modules()}
        if attn <= inner and compat.accepts(module, "position_ids") and compat.takes_cache(module):
            return name
    _refuse(hf_model, "no module that runs all attention layers takes position_ids and a cache")


def backbone_of(hf_model):
    """The module that takes ``position_ids`` and the cache and runs the layers (see :func:`describe`)."""
    caps = hf_model.__dict__.get("_ptune_fast_caps")
    if caps is None:
        from ptune_fast.integrations.core import describe as _cached

        caps = _cached(hf_model)
    return hf_model.get_submodule(caps.backbone)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def describe(hf_model) -> Capabilities:
    """Capabilities of ``hf_model`` or :class:`UnsupportedModel` naming what cannot be served."""
    config = getattr(hf_model, "config", None)
    if config is None or not isinstance(hf_model, nn.Module):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(hf_model).__name__}")
    text = _text_config(config)
    for cfg in {id(config): config, id(text): text}.values():
        for field, (pred, feature) in CONFIG_FEATURES.items():
            if pred(getattr(cfg, field, None)):
                _refuse(hf_model, feature)
    if hasattr(hf_model, "_can_set_attn_implementation") and not hf_model._can_set_attn_implementation():
        _refuse(hf_model, "its attention does not go through transformers' attention interface")
    rec = probe(hf_model)
    calls = rec["calls"]
    if not calls:
        _refuse(hf_model, "its attention does not go through transformers' attention interface")
    if any(c["layer_idx"] is None for c in calls):
        _refuse(hf_model, "attention modules without a layer_idx")
    layers = sorted({c["layer_idx"] for c in calls})
    n_layers = getattr(text, "num_hidden_layers", None) or len(layers)
    if layers != list(range(n_layers)) or len(calls) != n_layers:
        _refuse(hf_model, f"attention runs in layers {layers} of {n_layers} (hybrid layers without attention or "
                          "shared attention blocks)")
    if any(c["softcap"] is not None for c in calls):
        _refuse(hf_model, "attention logit softcapping")
    if any(c["sinks"] is not None for c in calls):
        _refuse(hf_model, "attention sinks")
    if any(c["bias"] for c in calls) or any(c["mask"] for c in calls):
        _refuse(hf_model, "an attention mask or key-position bias (ALiBi-like) built outside transformers' mask interface")
    if any("chunk" in f.lower() for f in rec["mask_functions"]):
        _refuse(hf_model, "chunked attention")
    shapes = {(c["key"][1], c["key"][3], c["value"][1], c["value"][3]) for c in calls}
    if len(shapes) != 1:
        _refuse(hf_model, f"layers with different KV heads or head dims {sorted(shapes)}")
    hkv, dk, hv, dv = shapes.pop()
    if (hkv, dk) != (hv, dv):
        _refuse(hf_model, f"keys and values of different shapes (K: {hkv}x{dk}, V: {hv}x{dv}; e.g. latent attention)")
    causal = all(bool(c["is_causal"]) for c in calls)
    backbone_name = _find_backbone(hf_model, rec)
    by_id = {id(m): n for n, m in hf_model.named_modules()}
    attention = tuple(dict.fromkeys(by_id[c["module"]] for c in calls))
    positions, padding_idx = _position_kind(hf_model.get_submodule(backbone_name))
    windows = [c["sliding_window"] for c in calls if c["sliding_window"]]
    emb = hf_model.get_input_embeddings()
    hidden = getattr(emb, "embedding_dim", None) or getattr(text, "hidden_size")
    return Capabilities(
        model_type=_model_type(hf_model), num_layers=n_layers, num_kv_heads=hkv, head_dim=dk, hidden_size=int(hidden),
        causal=causal, positions=positions, padding_idx=padding_idx, backbone=backbone_name, attention=attention,
        sliding_window=min(windows) if windows else None,
    )
