"""Adapter files.

* ptune_fast's own format: a directory with ``ptune_fast_adapter.safetensors``. It keeps the
  trainable encoder (so training resumes, which PEFT's files cannot do: PEFT saves only the
  encoder's output) and any folded tensors; the metadata (JSON in the safetensors header)
  names the method, the encoder's construction arguments and the base model's shape.
* PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors`` or
  ``adapter_model.bin``) load directly as folded adapters.
* In-memory PEFT models: :func:`adapter_from_peft` copies a ``PeftModel``'s prompt-learning
  adapter (its trainable encoder where it still has one) into a :class:`PromptAdapter`;
  :func:`save_peft_as_adapter` writes it as a resumable ptune_fast file.

Integrity (format ``ptune_fast.adapter/2``): the metadata lists every tensor's dtype and shape
(``tensors``) and a SHA-256 digest (``sha256``) over the metadata itself (canonical JSON, the
digest left out) and, per tensor in name order, its name, dtype, shape and bytes. Loading
cross-checks every metadata field against the tensors (method vs encoder kind, the number of
virtual tokens, the model shape vs the encoder and folded tensors, the tensor list), then
the digest. Files written before the digest existed (``ptune_fast.adapter/1``) still load,
after the same cross-checks, with a ``UserWarning`` that their bytes cannot be verified (save
them again to add a digest); a ``/2`` file without its digest is refused.

Loading validates everything before it returns: a corrupted, truncated or mismatched file
raises ``ValueError`` naming the file and the field or tensor at fault, and the caller's model
is untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch
from torch import nn

from ptune_fast.adapter import METHODS, PromptAdapter, model_spec
from ptune_fast.encoders import PrefixEncoder, PromptEmbedding, PromptEncoder, build_encoder, encode

FILE = "ptune_fast_adapter.safetensors"
FORMAT = "ptune_fast.adapter/2"
FORMAT_V1 = "ptune_fast.adapter/1"  # no tensor list, no digest (still loads, with a warning)
_PEFT_METHODS = {"PREFIX_TUNING": "prefix_tuning", "P_TUNING": "p_tuning", "PROMPT_TUNING": "prompt_tuning"}
_ENCODER_KIND = {"prefix_tuning": "PrefixEncoder", "p_tuning": "PromptEncoder", "prompt_tuning": "PromptEmbedding"}
_STATIC = ("static_tokens", "static_keys", "static_values", "static_last_hidden")
_SPEC_INTS = ("num_layers", "num_kv_heads", "head_dim", "hidden_size")


# ---------------------------------------------------------------------- digest
def _canonical(meta: dict) -> str:
    return json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True)


def _digest(meta: dict, tensors: dict) -> str:
    h = hashlib.sha256(_canonical(meta).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _manifest(tensors: dict) -> dict:
    return {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in sorted(tensors.items())}


# ---------------------------------------------------------------------- writing
def save_adapter(adapter: PromptAdapter, directory: str) -> str:
    """Write ``adapter`` to ``directory/ptune_fast_adapter.safetensors`` (format ``/2``)."""
    from safetensors.torch import save_file

    if not isinstance(adapter, PromptAdapter):
        raise TypeError(f"adapter must be a PromptAdapter, got {type(adapter).__name__}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items() if v is not None}
    meta = {
        "format": FORMAT,
        "method": adapter.method,
        "num_virtual_tokens": adapter.num_virtual_tokens,
        "spec": adapter.spec,
        "encoder": None if adapter.encoder is None else adapter.encoder.config,
        "tensors": _manifest(tensors),
    }
    meta = json.loads(json.dumps(meta))  # the digest covers exactly what a reader will parse
    meta["sha256"] = _digest(meta, tensors)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FILE)
    save_file(tensors, path, metadata={"ptune_fast": json.dumps(meta)})
    return path


def save_peft_as_adapter(peft_model, directory: str, adapter_name=None) -> str:
    """Write the prompt-learning adapter of a ``PeftModel`` (the active one, or ``adapter_name``)
    as a resumable ptune_fast file (see :func:`adapter_from_peft`). Returns the file's path."""
    return save_adapter(adapter_from_peft(peft_model, adapter_name), directory)


# ---------------------------------------------------------------------- reading
def _read_safetensors(path: str):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt/truncated files
        raise ValueError(f"could not read adapter file {path}: {exc}") from exc
    return meta, tensors


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_metadata(file: str, info: dict, tensors: dict) -> None:
    """Every metadata field against the tensors; raises ValueError naming the file and field."""

    def bad(field, msg):
        raise ValueError(f"{file}: metadata field {field!r}: {msg}")

    fmt = info.get("format")
    if fmt not in (FORMAT, FORMAT_V1):
        bad("format", f"unknown format {fmt!r} (this ptune_fast reads {FORMAT!r} and {FORMAT_V1!r})")
    method = info.get("method")
    if method not in METHODS:
        bad("method", f"{method!r} is not one of {METHODS}")
    n = info.get("num_virtual_tokens")
    if not _positive_int(n):
        bad("num_virtual_tokens", f"expected a positive int, got {n!r}")
    spec = info.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("model_type"), str) or \
            not all(_positive_int(spec.get(k)) for k in _SPEC_INTS):
        bad("spec", f"expected model_type and positive ints {_SPEC_INTS}, got {spec!r}")
    L, Hkv, D, hidden = spec["num_layers"], spec["num_kv_heads"], spec["head_dim"], spec["hidden_size"]
    for name, t in tensors.items():
        if not t.is_floating_point():
            bad("tensors", f"tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype")
    unknown = [k for k in tensors if not k.startswith("encoder.") and k not in _STATIC]
    if unknown:
        bad("tensors", f"unexpected tensors {unknown}")

    enc_cfg = info.get("encoder")
    has_enc_tensors = any(k.startswith("encoder.") for k in tensors)
    if enc_cfg is None:
        if has_enc_tensors:
            bad("encoder", "is null but the file holds encoder.* tensors")
        if "static_tokens" not in tensors:
            bad("encoder", "is null and the file has no static_tokens: neither an encoder nor folded tensors")
    else:
        if not isinstance(enc_cfg, dict):
            bad("encoder", f"expected an encoder config (dict) or null, got {enc_cfg!r}")
        if "static_tokens" in tensors:
            bad("encoder", "an adapter holds an encoder or its folded static_tokens, not both")
        if enc_cfg.get("kind") != _ENCODER_KIND[method]:
            bad("encoder", f"kind {enc_cfg.get('kind')!r} does not serve method {method!r} "
                           f"(expected {_ENCODER_KIND[method]!r})")
        if enc_cfg.get("num_virtual_tokens") != n:
            bad("num_virtual_tokens", f"{n} but the encoder config has {enc_cfg.get('num_virtual_tokens')!r}")
        if method == "prefix_tuning":
            for key, want in (("num_layers", L), ("num_kv_heads", Hkv), ("head_dim", D)):
                if enc_cfg.get(key) != want:
                    bad("spec", f"{key}={want} but the encoder config has {key}={enc_cfg.get(key)!r}")
        elif enc_cfg.get("token_dim") != hidden:
            bad("spec", f"hidden_size={hidden} but the encoder config has token_dim={enc_cfg.get('token_dim')!r}")
        try:
            with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's RNG alone
                expected = {f"encoder.{k}": tuple(v.shape) for k, v in build_encoder(enc_cfg).state_dict().items()}
        except (TypeError, ValueError) as exc:
            bad("encoder", f"cannot build the encoder: {exc}")
        got = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith("encoder.")}
        if got != expected:
            diff = {k: (expected.get(k), got.get(k)) for k in sorted(set(got) | set(expected))
                    if got.get(k) != expected.get(k)}
            bad("encoder", f"the encoder config does not match the tensors: (config, file) shapes differ on {diff}")

    width = 2 * L * Hkv * D if method == "prefix_tuning" else hidden
    want = {"static_tokens": (n, width)}
    if method != "prefix_tuning":
        want.update(static_keys=(L, Hkv, n, D), static_values=(L, Hkv, n, D), static_last_hidden=(hidden,))
    deep = [k for k in ("static_keys", "static_values", "static_last_hidden") if k in tensors]
    if deep and (method == "prefix_tuning" or len(deep) != 3):
        bad("method", f"{method!r} with deep-folded tensors {deep}: expected none (prefix tuning) or all three "
                      "of static_keys, static_values, static_last_hidden (deep-folded prompt methods)")
    for k, shape in want.items():
        if k in tensors and tuple(tensors[k].shape) != shape:
            got = tuple(tensors[k].shape)
            n_dim = {"static_tokens": 0, "static_keys": 2, "static_values": 2}.get(k)
            field = "num_virtual_tokens" if n_dim is not None and len(got) == len(shape) and \
                got[n_dim] != n and got[:n_dim] + got[n_dim + 1:] == shape[:n_dim] + shape[n_dim + 1:] else "spec"
            bad(field, f"num_virtual_tokens={n} and spec={spec} need {k} of shape {shape}, the file has {got}")

    if fmt == FORMAT_V1:
        if "sha256" in info or "tensors" in info:
            bad("format", f"{FORMAT_V1!r} files carry no 'tensors' list or 'sha256' digest")
        warnings.warn(f"{file}: written in the older format {FORMAT_V1!r}, without a checksum: its tensors were "
                      "cross-checked against the metadata but their bytes cannot be verified; save it again "
                      "(ptune_fast.io.save_adapter) to add one", UserWarning, stacklevel=3)
        return
    manifest = info.get("tensors")
    if manifest != _manifest(tensors):
        bad("tensors", f"the tensor list {manifest!r} does not match the file's tensors {_manifest(tensors)!r}")
    digest = info.get("sha256")
    if not isinstance(digest, str):
        bad("sha256", f"missing: a {FORMAT!r} file must carry the digest of its tensors")
    if digest != _digest(info, tensors):
        bad("sha256", "the digest does not match: the tensors or the metadata changed after the file was written")


def load_adapter(path: str, hf_model) -> PromptAdapter:
    """Load a ptune_fast or PEFT adapter directory (or a ptune_fast ``.safetensors`` file)
    for ``hf_model``. Raises ValueError if it is unreadable, inconsistent or made for another
    model (see the module docstring for what is checked)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory or file path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json")):
        return load_peft_adapter(path, hf_model)
    file = os.path.join(path, FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ValueError(f"{path}: neither a ptune_fast adapter ({FILE}) nor a PEFT adapter directory")
    meta, tensors = _read_safetensors(file)
    try:
        info = json.loads(meta["ptune_fast"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: missing or invalid ptune_fast metadata ({exc})") from exc
    if not isinstance(info, dict):
        raise ValueError(f"{file}: invalid ptune_fast metadata (expected a JSON object)")
    _check_metadata(file, info, tensors)
    spec = {k: info["spec"][k] for k in ("model_type",) + _SPEC_INTS}
    try:
        with torch.random.fork_rng(devices=[]):
            enc = build_encoder(info["encoder"]) if info["encoder"] else None
        adapter = PromptAdapter(info["method"], spec, enc, info["num_virtual_tokens"])
        adapter.check_model(hf_model)
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from exc
    for name in _STATIC:
        if name in tensors:
            setattr(adapter, name, tensors[name].clone())
    adapter.load_state_dict(tensors, strict=True)  # names and shapes were checked above
    return adapter


# ---------------------------------------------------------------------- PEFT
def _folded_peft_adapter(where: str, method: str, n, emb: torch.Tensor, hf_model) -> PromptAdapter:
    """A PEFT encoder output (``prompt_embeddings``, PEFT's inference layout) as a folded adapter."""
    spec = model_spec(hf_model)
    if method == "prefix_tuning":
        want = (n, 2 * spec["num_layers"] * spec["num_kv_heads"] * spec["head_dim"])
    else:
        want = (n, spec["hidden_size"])
    if tuple(emb.shape) != want:
        raise ValueError(
            f"{where}: adapter was made for another model: prompt_embeddings has shape {tuple(emb.shape)}, "
            f"this {spec['model_type']} model needs {want}"
        )
    try:
        adapter = PromptAdapter(method, spec, None, n)
        adapter.check_model(hf_model)  # prompt methods need a causal decoder
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    adapter.static_tokens = emb.detach().float().clone()
    return adapter


def load_peft_adapter(directory: str, hf_model) -> PromptAdapter:
    """A PEFT prompt-learning adapter directory as a folded :class:`PromptAdapter`."""
    cfg_path = os.path.join(directory, "adapter_config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read {cfg_path}: {exc}") from exc
    peft_type = cfg.get("peft_type")
    if peft_type not in _PEFT_METHODS:
        raise ValueError(f"{cfg_path}: peft_type {peft_type!r} is not a prompt-learning method ptune_fast serves "
                         f"({', '.join(_PEFT_METHODS)})")
    st = os.path.join(directory, "adapter_model.safetensors")
    if os.path.exists(st):
        _, tensors = _read_safetensors(st)
    elif os.path.exists(os.path.join(directory, "adapter_model.bin")):
        try:
            tensors = torch.load(os.path.join(directory, "adapter_model.bin"), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"could not read {directory}/adapter_model.bin: {exc}") from exc
    else:
        raise ValueError(f"{directory}: no adapter_model.safetensors or adapter_model.bin")
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{directory}: the adapter file has no 'prompt_embeddings' tensor")
    n = cfg.get("num_virtual_tokens")
    if not _positive_int(n):
        raise ValueError(f"{cfg_path}: num_virtual_tokens must be a positive int, got {n!r}")
    return _folded_peft_adapter(directory, _PEFT_METHODS[peft_type], n, tensors["prompt_embeddings"], hf_model)


def _is_peft_model(model) -> bool:
    return any(c.__name__ == "PeftModel" and c.__module__.startswith("peft") for c in type(model).__mro__)


def adapter_from_peft(peft_model, adapter_name=None) -> PromptAdapter:
    """Copy a ``PeftModel``'s prompt-learning adapter (the active one, or ``adapter_name``) into a
    :class:`PromptAdapter` for its base model. PEFT's model is not changed and shares nothing
    with the result.

    * an encoder PEFT still trains (prefix projection, P-tuning MLP/LSTM, prefix / prompt
      embedding tables) becomes the same trainable ptune_fast encoder (same parameter names and
      values: training resumes);
    * an encoder PEFT holds only as its output (``inference_mode=True``, or folded by
      :func:`ptune_fast.fold`) becomes that output, folded: a prefix table as P-Tuning v2's
      trainable table (same numbers), a P-tuning output as static tokens.
    """
    if not _is_peft_model(peft_model):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    name = peft_model.active_adapter if adapter_name is None else adapter_name
    if name not in peft_model.peft_config:
        raise ValueError(f"adapter_name: no adapter {name!r} in this PeftModel; it has {list(peft_model.peft_config)}")
    cfg = peft_model.peft_config[name]
    peft_type = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    where = f"PeftModel adapter {name!r}"
    if peft_type not in _PEFT_METHODS:
        raise ValueError(f"{where}: peft_type {peft_type} is not a prompt-learning method ptune_fast serves "
                         f"({', '.join(_PEFT_METHODS)})")
    if getattr(cfg, "num_transformer_submodules", 1) != 1:
        raise ValueError(f"{where}: encoder-decoder adapters (num_transformer_submodules=2) are not supported")
    hf = peft_model.get_base_model()
    spec = model_spec(hf)
    enc = peft_model.prompt_encoder[name]
    n = cfg.num_virtual_tokens
    method = _PEFT_METHODS[peft_type]
    heads = {h: getattr(enc, h, None) for h in ("transform", "lstm_head", "mlp_head")}
    heads = {h: m for h, m in heads.items() if m is not None and not isinstance(m, nn.Identity)}
    L, Hkv, D = spec["num_layers"], spec["num_kv_heads"], spec["head_dim"]
    with torch.random.fork_rng(devices=[]):  # fresh modules initialise weights: leave the caller's RNG alone
        if method == "prefix_tuning":
            project = "transform" in heads and bool(getattr(enc, "prefix_projection", False))
            ours = PrefixEncoder(n, L, Hkv, D, project, cfg.encoder_hidden_size if project else None)
        elif method == "p_tuning" and heads:
            etype = str(getattr(cfg.encoder_reparameterization_type, "value", cfg.encoder_reparameterization_type))
            ours = PromptEncoder(n, spec["hidden_size"], cfg.encoder_hidden_size, etype,
                                 cfg.encoder_num_layers, getattr(cfg, "encoder_dropout", 0.0))
        elif method == "prompt_tuning":
            ours = PromptEmbedding(n, spec["hidden_size"])
        else:  # P-tuning without its heads: only the output is left
            with torch.no_grad():
                return _folded_peft_adapter(where, method, n, encode(enc), hf)
    try:
        ours.load_state_dict(enc.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{where}: its encoder does not match this {spec['model_type']} model's layout "
                         f"(num_virtual_tokens={n}): {exc}") from exc
    try:
        adapter = PromptAdapter(method, spec, ours)
        adapter.check_model(hf)  # prompt methods need a causal decoder
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return adapter
