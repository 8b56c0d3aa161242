"""Batch-independent prefix / prompt encoders.

Every encoder returns the n virtual tokens' output **once**, ``[n, dim]``, whatever the batch
size: callers broadcast it (a view) instead of running the encoder on ``B`` copies of the same
tokens, as PEFT does for prefix tuning.

Parameter names and shapes equal PEFT's (``embedding``, ``transform``, ``mlp_head``,
``lstm_head``), so a PEFT state dict loads into these modules and :func:`encode` serves both
PEFT's modules and ours.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ptune_fast.ops.prompt_encoder import encoder_mlp

__all__ = ["PrefixEncoder", "PromptEncoder", "PromptEmbedding", "encode", "linear_stack", "build_encoder"]


def build_encoder(config: dict) -> nn.Module:
    """Rebuild an encoder from its ``.config`` (as saved by :mod:`ptune_fast.io`)."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    classes = {"PrefixEncoder": PrefixEncoder, "PromptEncoder": PromptEncoder, "PromptEmbedding": PromptEmbedding}
    if kind not in classes:
        raise ValueError(f"unknown encoder kind {kind!r}; expected one of {sorted(classes)}")
    return classes[kind](**cfg)


def linear_stack(seq: nn.Sequential):
    """The ``(weights, biases)`` of the Linear layers of an MLP head."""
    lins = [m for m in seq if isinstance(m, nn.Linear)]
    return [m.weight for m in lins], [m.bias for m in lins]


def _mlp_activation(seq: nn.Sequential) -> str:
    acts = {type(m) for m in seq if not isinstance(m, nn.Linear)}
    if acts == {nn.Tanh}:
        return "tanh"
    if acts == {nn.ReLU}:
        return "relu"
    raise ValueError(f"unsupported encoder head {seq}: expected Linear layers separated by Tanh or ReLU")


def encode(module: nn.Module, indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output of a prompt-learning encoder (ours or PEFT's) for its virtual tokens, once: ``[n, dim]``.

    * prefix encoder without projection / any encoder in inference mode: the embedding table;
    * prefix encoder with projection: ``transform(embedding)`` (Linear-Tanh-Linear);
    * P-tuning MLP: ``mlp_head(embedding)``; P-tuning LSTM: ``mlp_head(biLSTM(embedding))``.

    ``indices`` selects virtual tokens (default: all, in order, as PEFT's ``prompt_tokens``).
    """
    weight = module.embedding.weight
    x = weight if indices is None else weight.index_select(0, indices)
    transform = getattr(module, "transform", None)
    if getattr(module, "prefix_projection", False) and transform is not None:
        w, b = linear_stack(transform)
        return encoder_mlp(x, w, b, _mlp_activation(transform))
    lstm = getattr(module, "lstm_head", None)
    mlp = getattr(module, "mlp_head", None)
    if isinstance(mlp, nn.Identity):  # a folded PEFT encoder: the embedding table is the output
        mlp = None
    if lstm is not None and mlp is not None:
        h = lstm(x.unsqueeze(0))[0].squeeze(0)
        w, b = linear_stack(mlp)
        return encoder_mlp(h, w, b, _mlp_activation(mlp))
    if mlp is not None:
        w, b = linear_stack(mlp)
        return encoder_mlp(x, w, b, _mlp_activation(mlp))
    return x


class PrefixEncoder(nn.Module):
    """Prefix tuning (``prefix_projection=True``: Embedding -> Linear-Tanh-Linear) and
    P-Tuning v2 (``prefix_projection=False``: the embedding *is* the per-layer K/V).

    Output ``[P, 2 * num_layers * num_kv_heads * head_dim]`` in PEFT's layout (see
    :func:`ptune_fast.reference.split_prefix`).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        prefix_projection: bool = False,
        encoder_hidden_size: Optional[int] = None,
        init: str = "normal",
    ):
        super().__init__()
        for name, val in (("num_virtual_tokens", num_virtual_tokens), ("num_layers", num_layers),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if init not in ("normal", "zero"):
            raise ValueError(f"init must be 'normal' or 'zero', got {init!r}")
        self.config = dict(kind="PrefixEncoder", num_virtual_tokens=num_virtual_tokens, num_layers=num_layers,
                           num_kv_heads=num_kv_heads, head_dim=head_dim, prefix_projection=prefix_projection,
                           encoder_hidden_size=encoder_hidden_size)
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.prefix_projection = prefix_projection
        token_dim = num_kv_heads * head_dim
        out_dim = 2 * num_layers * token_dim
        if prefix_projection:
            hidden = encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))
            if init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out_dim)
            if init == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        return encode(self)


class PromptEncoder(nn.Module):
    """P-tuning (v1) prompt encoder: Embedding -> MLP (Linear-ReLU-Linear-ReLU-Linear) or
    biLSTM -> (Linear-ReLU-Linear). Output ``[n, token_dim]`` prepended to the input embeddings."""

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        encoder_hidden_size: int,
        encoder_type: str = "MLP",
        encoder_num_layers: int = 2,
        encoder_dropout: float = 0.0,
    ):
        super().__init__()
        encoder_type = str(getattr(encoder_type, "value", encoder_type)).upper()
        if encoder_type not in ("MLP", "LSTM"):
            raise ValueError(f"encoder_type must be 'MLP' or 'LSTM', got {encoder_type!r}")
        self.encoder_type = encoder_type
        self.config = dict(kind="PromptEncoder", num_virtual_tokens=num_virtual_tokens, token_dim=token_dim,
                           encoder_hidden_size=encoder_hidden_size, encoder_type=encoder_type,
                           encoder_num_layers=encoder_num_layers, encoder_dropout=encoder_dropout)
        self.num_virtual_tokens, self.token_dim = num_virtual_tokens, token_dim
        h = encoder_hidden_size
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(token_dim, h, num_layers=encoder_num_layers, dropout=encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, token_dim))

    def forward(self) -> torch.Tensor:
        return encode(self)


class PromptEmbedding(nn.Module):
    """Prompt tuning: a learned ``[n, token_dim]`` table prepended to the input embeddings.

    ``init``: ``"random"`` (N(0, 1), as ``nn.Embedding``), ``"sample_vocab"`` (rows of
    ``word_embeddings`` at random token ids) or ``"text"`` (the embeddings of
    ``init_token_ids`` -- or of ``tokenizer(init_text)`` -- repeated/truncated to n, as PEFT does
    with its init text).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        init: str = "random",
        word_embeddings: Optional[nn.Embedding] = None,
        init_token_ids: Optional[Sequence[int]] = None,
        init_text: Optional[str] = None,
        tokenizer=None,
    ):
        super().__init__()
        if init_text is not None:
            if tokenizer is None:
                raise ValueError("init_text needs a tokenizer (init_token_ids = tokenizer(init_text)['input_ids'])")
            init_token_ids = tokenizer(init_text)["input_ids"]
        self.num_virtual_tokens, self.token_dim = num_virtual_tokens, token_dim
        self.config = dict(kind="PromptEmbedding", num_virtual_tokens=num_virtual_tokens, token_dim=token_dim)
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        init = init.lower()
        if init == "random":
            return
        if init not in ("sample_vocab", "text"):
            raise ValueError(f"init must be 'random', 'sample_vocab' or 'text', got {init!r}")
        if word_embeddings is None:
            raise ValueError(f"init={init!r} needs word_embeddings (the model's input embedding layer)")
        if init == "sample_vocab":
            ids = torch.randint(0, word_embeddings.num_embeddings, (num_virtual_tokens,))
        else:
            if not init_token_ids:
                raise ValueError("init='text' needs init_token_ids (the tokenized init text)")
            ids = list(init_token_ids)
            ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
            ids = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            w = word_embeddings(ids.to(word_embeddings.weight.device)).detach().float()
        self.embedding.weight = nn.Parameter(w.to(self.embedding.weight.device))

    def forward(self) -> torch.Tensor:
        return encode(self)

