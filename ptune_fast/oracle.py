"""A PEFT-free oracle: PEFT's *specified* semantics computed through the unpatched transformers model.

It never runs PEFT's code, so a PEFT or transformers release that breaks PEFT cannot break or
fake our parity tests (tests/), and the demo and benchmarks have a reference where PEFT itself
fails (PEFT 0.21.2 on transformers 5.24):

* encoder outputs from ``ptune_fast.reference`` (fp64-capable, readable) on the encoder's weights
  (PEFT's parameter names: ``embedding``, ``transform``, ``mlp_head``, ``lstm_head``);
* prefix tuning / P-Tuning v2: the output ``[P, 2*L*Hkv*D]`` viewed ``(P, 2L, Hkv, D)`` (layer
  ``i``: K = ``2i``, V = ``2i+1``), expanded over the batch and put into a transformers
  ``DynamicCache`` handed to the backbone, with ``P`` ones prepended to the 2-D mask;
* prompt tuning / P-tuning: the virtual-token embeddings prepended to the input embeddings
  (mask: ``n`` ones prepended; causal-LM labels: ``n`` times -100 prepended);
* explicit ``position_ids``: shifted by P for prefix methods, ignored for prompt methods (PEFT);
* generation: a plain greedy loop that re-runs the whole sequence every step (no cache but the
  prefix). ``generate`` hands the model padding-aware positions (``cumsum(mask) - 1``, pads at 0);
  the loop passes the same, so left-padded rows mean what they mean in ``generate``.

The model passed in must be unpatched (plain transformers attention).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ptune_fast import reference
from ptune_fast.integrations import compat

PREFIX = ("prefix", "prefix_proj")


def _linears(seq):
    lins = [m for m in seq if isinstance(m, nn.Linear)]
    return [m.weight for m in lins], [m.bias for m in lins]


def encoder_output(enc: nn.Module) -> torch.Tensor:
    """``[n, dim]``: the encoder's output for its virtual tokens, from the reference ops."""
    emb = enc.embedding.weight
    transform = getattr(enc, "transform", None)
    if getattr(enc, "prefix_projection", False) and transform is not None:
        return reference.prefix_encoder(emb, *_linears(transform))
    lstm, mlp = getattr(enc, "lstm_head", None), getattr(enc, "mlp_head", None)
    if isinstance(mlp, nn.Identity):
        mlp = None
    if lstm is not None and mlp is not None:
        return reference.prompt_encoder_lstm(emb, lstm, *_linears(mlp))
    if mlp is not None:
        return reference.prompt_encoder_mlp(emb, *_linears(mlp))
    return emb


def prefix_kv(out: torch.Tensor, num_layers: int, num_kv_heads: int, batch: int):
    """PEFT's layout, written out independently of ``reference.split_prefix``:
    ``[B, P, 2L, Hkv, D]`` permuted to ``[2L, B, Hkv, P, D]``; returns ``(keys, values)`` ``[L, B, Hkv, P, D]``."""
    P = out.shape[0]
    x = out.unsqueeze(0).expand(batch, -1, -1).reshape(batch, P, 2 * num_layers, num_kv_heads, -1)
    x = x.permute(2, 0, 3, 1, 4)
    return x[0::2].contiguous(), x[1::2].contiguous()


@contextlib.contextmanager
def _prefix_in_cache(hf_model, backbone, keys, values):
    """Hand ``keys/values`` to ``backbone`` as a DynamicCache and prepend P ones to its mask."""
    P = keys.shape[-2]
    name = compat.cache_kwarg(backbone)

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        kwargs[name] = compat.prefix_cache(hf_model.config, keys, values)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)
        return args, kwargs

    handle = backbone.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class Oracle:
    """PEFT semantics for one adapter on one unpatched model.

    ``method``: prefix | prefix_proj | ptuning_mlp | ptuning_lstm | prompt; ``encoder``: an encoder
    module with PEFT's parameter names; ``spec``: ``(num_layers, num_kv_heads)`` for prefix methods;
    ``backbone``: the module that takes the cache (``ptune_fast.integrations.core.backbone_of``).
    """

    def __init__(self, hf_model, method, encoder, backbone=None, num_layers=None, num_kv_heads=None):
        self.model, self.method, self.encoder = hf_model, method, encoder
        self.backbone = backbone if backbone is not None else hf_model.base_model
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.dtype = hf_model.get_input_embeddings().weight.dtype

    @property
    def n(self):
        return self.encoder.embedding.weight.shape[0]

    def forward(self, input_ids, attention_mask, labels=None, causal_lm=True, position_ids=None, **kwargs):
        out = encoder_output(self.encoder).to(self.dtype)
        B = input_ids.shape[0]
        if self.method in PREFIX:
            keys, values = prefix_kv(out, self.num_layers, self.num_kv_heads, B)
            kw = {} if position_ids is None else {"position_ids": position_ids + out.shape[0]}
            with _prefix_in_cache(self.model, self.backbone, keys, values):
                return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw, **kwargs)
        emb = self.model.get_input_embeddings()(input_ids)
        embeds = torch.cat([out.unsqueeze(0).expand(B, -1, -1).to(emb.dtype), emb], dim=1)
        mask = torch.cat([attention_mask.new_ones(B, self.n), attention_mask], dim=1)
        if labels is not None and causal_lm:
            labels = torch.cat([labels.new_full((B, self.n), -100), labels], dim=1)
        return self.model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)

    def real_logits(self, logits, S):
        """The S real positions' logits (prompt methods also return the n virtual ones)."""
        return logits[:, -S:] if logits.dim() == 3 else logits

    @torch.no_grad()
    def greedy(self, input_ids, attention_mask, max_new_tokens, pad_token_id=1):
        """Greedy tokens as ``generate`` returns them: a row that emitted an EOS token continues
        with ``pad_token_id``; the loop ends early once every row has finished."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        ids, mask = input_ids, attention_mask
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            logits = self.forward(ids, mask, position_ids=pos).logits[:, -1]
            nxt = logits.argmax(-1).masked_fill(done, pad_token_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            done |= torch.tensor([t in eos for t in nxt.tolist()], device=ids.device)
            if done.all():
                break
        return ids


class PeftSpec(nn.Module):
    """A stand-in for a PEFT prefix-tuning model whose own forward is broken: PEFT's specified
    semantics (:class:`Oracle`) with the PEFT model's own parameters (trainable as they are).
    The PEFT model must not be patched."""

    def __init__(self, peft_model, method="prefix"):
        super().__init__()
        from ptune_fast.integrations.core import backbone_of

        self.peft_model = peft_model
        cfg = peft_model.active_peft_config
        hf = peft_model.get_base_model()
        task = str(getattr(cfg.task_type, "value", cfg.task_type))
        self.causal_lm = task == "CAUSAL_LM"
        self.oracle = Oracle(hf, method, peft_model.prompt_encoder[peft_model.active_adapter], backbone_of(hf),
                             cfg.num_layers, cfg.num_attention_heads)

    @property
    def peft_config(self):
        return self.peft_model.peft_config

    def get_base_model(self):
        return self.peft_model.get_base_model()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        return self.oracle.forward(input_ids, attention_mask, labels, causal_lm=self.causal_lm, **kwargs)
