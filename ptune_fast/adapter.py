"""``PromptAdapter``: one prompt-learning adapter for one base model, independent of PEFT.

It owns its encoder (trainable) or its folded tensors (static), and produces the per-layer
K/V prefix ``[L, Hkv, P, D]`` that ptune_fast's attention serves:

* ``prefix_tuning`` (with or without projection: prefix tuning / P-Tuning v2): the encoder
  output *is* the K/V prefix (PEFT's layout);
* ``p_tuning`` / ``prompt_tuning``: the virtual-token embeddings run once through the frozen
  causal decoder (:mod:`ptune_fast.integrations.shared_pass`) and their per-layer K/V become
  the prefix. Deep-folded adapters keep that K/V as static tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ptune_fast import reference
from ptune_fast.encoders import PrefixEncoder, PromptEmbedding, PromptEncoder, encode
from ptune_fast.integrations.capabilities import UnsupportedModel
from ptune_fast.integrations.core import describe

METHODS = ("prefix_tuning", "p_tuning", "prompt_tuning")


def model_spec(hf_model) -> dict:
    """What an adapter must agree on with its base model (probed: see ``integrations.capabilities``)."""
    return describe(hf_model).spec()


def is_causal(hf_model) -> bool:
    """Whether prompt / P-tuning adapters can run through the shared virtual-token pass here
    (causal attention, and the pass verified to reproduce PEFT's prepended layout)."""
    return describe(hf_model).shared_error is None


class PromptAdapter(nn.Module):
    def __init__(self, method: str, spec: dict, encoder: Optional[nn.Module] = None,
                 num_virtual_tokens: Optional[int] = None, shared_error: Optional[str] = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method != "prefix_tuning" and shared_error:
            raise UnsupportedModel(
                f"{method} without PEFT runs the shared virtual-token pass, which is not exact on "
                f"{spec['model_type']!r}: {shared_error}. "
                "Use PEFT's model with ptune_fast.patch() instead (prompts per row)."
            )
        self.method = method
        self.spec = dict(spec)
        self.encoder = encoder
        if num_virtual_tokens is None:
            num_virtual_tokens = encoder.num_virtual_tokens
        if int(num_virtual_tokens) < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens!r}")
        self.num_virtual_tokens = int(num_virtual_tokens)
        # folded tensors (buffers, saved with the adapter)
        self.register_buffer("static_tokens", None)  # [P, 2*L*Hkv*D] (prefix) or [n, hidden] (prompt methods)
        self.register_buffer("static_keys", None)  # [L, Hkv, n, D] deep-folded prompt methods
        self.register_buffer("static_values", None)
        self.register_buffer("static_last_hidden", None)  # [hidden] last virtual token, for the loss
        # [V] its logits through the model's own head (not saved: files keep the hidden state)
        self.register_buffer("static_first_logits", None, persistent=False)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def prefix_tuning(cls, hf_model, num_virtual_tokens: int, prefix_projection: bool = False,
                      encoder_hidden_size: Optional[int] = None, init: str = "normal"):
        s = model_spec(hf_model)
        enc = PrefixEncoder(num_virtual_tokens, s["num_layers"], s["num_kv_heads"], s["head_dim"],
                            prefix_projection, encoder_hidden_size, init)
        return cls("prefix_tuning", s, enc)

    @classmethod
    def p_tuning(cls, hf_model, num_virtual_tokens: int, encoder_type: str = "MLP",
                 encoder_hidden_size: Optional[int] = None, encoder_num_layers: int = 2):
        s = model_spec(hf_model)
        enc = PromptEncoder(num_virtual_tokens, s["hidden_size"], encoder_hidden_size or s["hidden_size"],
                            encoder_type, encoder_num_layers)
        return cls("p_tuning", s, enc, shared_error=describe(hf_model).shared_error)

    @classmethod
    def prompt_tuning(cls, hf_model, num_virtual_tokens: int, init: str = "random", init_token_ids=None,
                      init_text=None, tokenizer=None):
        s = model_spec(hf_model)
        enc = PromptEmbedding(num_virtual_tokens, s["hidden_size"], init, hf_model.get_input_embeddings(),
                              init_token_ids, init_text, tokenizer)
        return cls("prompt_tuning", s, enc, shared_error=describe(hf_model).shared_error)

    # ------------------------------------------------------------------ state
    @property
    def folded(self) -> str:
        if self.static_keys is not None:
            return "deep"
        if self.static_tokens is not None:
            return "static"
        return ""

    def tokens(self) -> torch.Tensor:
        """Encoder output ``[P, 2*L*Hkv*D]`` (prefix) or ``[n, hidden]`` (prompt methods)."""
        if self.static_tokens is not None:
            return self.static_tokens
        if self.encoder is None:
            raise RuntimeError("adapter has neither an encoder nor folded tensors")
        return encode(self.encoder)

    def kv(self, hf_model, backbone, state, dtype: torch.dtype):
        """Per-layer prefix ``(keys, values)`` ``[L, Hkv, P, D]`` in ``dtype``; also leaves the
        shared pass's last virtual hidden state in ``state.extra['last_hidden']`` (prompt methods)."""
        s = self.spec
        if self.static_keys is not None:
            state.extra["last_hidden"] = self.static_last_hidden
            state.extra["first_logits"] = self.static_first_logits
            return self.static_keys.to(dtype), self.static_values.to(dtype)
        out = self.tokens()
        if self.method == "prefix_tuning":
            state.extra["last_hidden"] = state.extra["first_logits"] = None
            k, v = reference.split_prefix(out.to(dtype), s["num_layers"], s["num_kv_heads"], s["head_dim"])
            return k, v
        from ptune_fast.integrations.shared_pass import virtual_token_kv

        return virtual_token_kv(hf_model, backbone, out.to(dtype), state)

    @torch.no_grad()
    def fold(self, hf_model=None, backbone=None, deep: bool = False) -> dict:
        """Replace the encoder by its static output (in place). ``deep`` (prompt methods on a
        causal decoder): also run the virtual tokens through the frozen model once and keep
        their per-layer K/V. Returns what was removed and what is now static."""
        report = {"method": self.method, "removed": [], "static": {}}
        if self.encoder is not None:
            heads = [n for n, _ in self.encoder.named_children() if n != "embedding"]
            report["removed"] = [f"encoder.{n}" for n in heads] or ["encoder (its embedding table is the output)"]
            self.static_tokens = self.tokens().detach().float().clone()
            self.encoder = None
        report["static"]["tokens"] = tuple(self.static_tokens.shape)
        if deep and self.method != "prefix_tuning" and self.static_keys is None:
            if hf_model is None:
                raise ValueError("deep folding needs the base model (hf_model)")
            from ptune_fast.integrations.shared_pass import virtual_token_kv

            class _Tmp:
                extra = {}

            tmp = _Tmp()
            k, v = virtual_token_kv(hf_model, backbone, self.static_tokens.to(hf_model.dtype), tmp)
            self.static_keys, self.static_values = k.detach().clone(), v.detach().clone()
            self.static_last_hidden = tmp.extra["last_hidden"].detach().clone()
            fl = tmp.extra.get("first_logits")
            self.static_first_logits = None if fl is None else fl.detach().clone()
        if self.static_keys is not None:
            report["static"]["keys"] = tuple(self.static_keys.shape)
            report["static"]["values"] = tuple(self.static_values.shape)
        return report

    def check_model(self, hf_model) -> None:
        if self.method != "prefix_tuning" and not is_causal(hf_model):
            caps = describe(hf_model)
            raise UnsupportedModel(f"{self.method} adapters need the shared virtual-token pass, not exact on "
                                   f"{caps.model_type!r}: {caps.shared_error}")
        got = model_spec(hf_model)
        if got != self.spec:
            diff = {k: (self.spec.get(k), got.get(k)) for k in set(got) | set(self.spec) if got.get(k) != self.spec.get(k)}
            raise ValueError(f"adapter was made for another model: (adapter, model) differ on {diff}")

    def extra_repr(self) -> str:
        return f"method={self.method}, P={self.num_virtual_tokens}, folded={self.folded or 'no'}"
