"""Adapter files.

* ptune_fast's own format: a directory with ``ptune_fast_adapter.safetensors``. It keeps the
  trainable encoder (so training resumes, which PEFT's files cannot do: PEFT saves only the
  encoder's output) and any folded tensors; the metadata (JSON in the safetensors header)
  names the method, the encoder's construction arguments and the base model's shape.
* PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors`` or
  ``adapter_model.bin``) load directly as folded adapters.

Loading validates everything before it returns: a corrupted, truncated or mismatched file
raises ``ValueError`` naming the file and the problem, and the caller's model is untouched.
"""
from __future__ import annotations

import json
import os

import torch

from ptune_fast.adapter import PromptAdapter, model_spec
from ptune_fast.encoders import build_encoder

FILE = "ptune_fast_adapter.safetensors"
FORMAT = "ptune_fast.adapter/1"
_PEFT_METHODS = {"PREFIX_TUNING": "prefix_tuning", "P_TUNING": "p_tuning", "PROMPT_TUNING": "prompt_tuning"}


def save_adapter(adapter: PromptAdapter, directory: str) -> str:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items() if v is not None}
    meta = {
        "format": FORMAT,
        "method": adapter.method,
        "num_virtual_tokens": adapter.num_virtual_tokens,
        "spec": adapter.spec,
        "encoder": None if adapter.encoder is None else adapter.encoder.config,
    }
    path = os.path.join(directory, FILE)
    save_file(tensors, path, metadata={"ptune_fast": json.dumps(meta)})
    return path


def _read_safetensors(path: str):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt/truncated files
        raise ValueError(f"could not read adapter file {path}: {exc}") from exc
    return meta, tensors


def load_adapter(path: str, hf_model) -> PromptAdapter:
    """Load a ptune_fast or PEFT adapter directory (or a ptune_fast ``.safetensors`` file)
    for ``hf_model``. Raises ValueError if it is unreadable or made for another model."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json")):
        return load_peft_adapter(path, hf_model)
    file = os.path.join(path, FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ValueError(f"{path}: neither a ptune_fast adapter ({FILE}) nor a PEFT adapter directory")
    meta, tensors = _read_safetensors(file)
    try:
        info = json.loads(meta["ptune_fast"])
        if info.get("format") != FORMAT:
            raise ValueError(f"unknown format {info.get('format')!r}")
        enc = build_encoder(info["encoder"]) if info["encoder"] else None
        adapter = PromptAdapter(info["method"], info["spec"], enc, info["num_virtual_tokens"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: missing or invalid ptune_fast metadata ({exc})") from exc
    adapter.check_model(hf_model)
    for name in ("static_tokens", "static_keys", "static_values", "static_last_hidden"):
        if name in tensors:
            setattr(adapter, name, tensors[name].clone())
    try:
        adapter.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{file}: tensors do not match the adapter's layout: {exc}") from exc
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
    emb = tensors["prompt_embeddings"]
    spec = model_spec(hf_model)
    n = cfg.get("num_virtual_tokens")
    method = _PEFT_METHODS[peft_type]
    if method == "prefix_tuning":
        want = (n, 2 * spec["num_layers"] * spec["num_kv_heads"] * spec["head_dim"])
    else:
        want = (n, spec["hidden_size"])
    if tuple(emb.shape) != want:
        raise ValueError(
            f"{directory}: adapter was made for another model: prompt_embeddings has shape {tuple(emb.shape)}, "
            f"this {spec['model_type']} model needs {want}"
        )
    if method != "prefix_tuning" and spec["model_type"] not in ("gpt2", "llama", "mistral", "opt", "qwen2", "qwen3"):
        raise ValueError(f"{directory}: {peft_type} on {spec['model_type']!r} needs PEFT + ptune_fast.patch()")
    adapter = PromptAdapter(method, spec, None, n)
    adapter.static_tokens = emb.float()
    return adapter
