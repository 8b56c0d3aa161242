"""``encoder_mlp``: the prompt/prefix encoder's MLP head over the n virtual tokens, run once
per step (never once per batch row). Public op and backend dispatch.

``x [n, d_in]`` -> ``Linear (act Linear)*`` with ``act`` in {"tanh", "relu"} between layers,
fp32 accumulation, output in ``out_dtype`` (default ``x.dtype``). Prefix tuning's projection
is Linear-Tanh-Linear, P-tuning's MLP head Linear-ReLU-Linear-ReLU-Linear.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ptune_fast import _backend, reference

OP = "encoder_mlp"


def encoder_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    activation: str,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"x must be [n, d_in], got shape {tuple(x.shape)}")
    if len(weights) != len(biases) or not weights:
        raise ValueError("weights and biases must be non-empty sequences of the same length")
    d = x.shape[1]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != d:
            raise ValueError(f"weights[{i}] must be [out, {d}], got {tuple(w.shape)}")
        d = w.shape[0]
    forced = _backend.forced_backend()
    if forced == "cuda":
        raise _backend.BackendUnavailable(f"{_backend.ENV_VAR}=cuda: fused {OP} is not built")
    _backend.served(OP, "reference")
    return reference.encoder_mlp(x, weights, biases, activation, out_dtype)
