"""Per-model prefix state: the per-layer K/V prefix, computed once per forward.

The prefix lives here, outside the HF cache, as ``keys/values [L, Hkv, P, D]`` (one shared
prefix) or ``[L, N, Hkv, P, D]`` (a task bank, with ``task_ids [B]``). Attention modules look
their layer up by ``module.layer_idx``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch


class PrefixState:
    """Holds the prefix of one patched model.

    ``provider()`` returns ``(keys, values)``, each ``[L, Hkv, P, D]`` or ``[L, N, Hkv, P, D]``.
    :meth:`refresh` calls it once per forward; with autograd off and unchanged encoder
    parameters it reuses the last result (generation encodes the prefix once, not per step).
    """

    def __init__(self, provider: Callable[[], Tuple[torch.Tensor, torch.Tensor]], parameters: Callable, num_virtual_tokens: int):
        self.provider = provider
        self.parameters = parameters
        self.num_virtual_tokens = num_virtual_tokens
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.task_ids: Optional[torch.Tensor] = None
        self._cache_key = None
        self.encoder_calls = 0  # how many times the encoder ran (tests, benchmarks)
        self.extra = {}  # provider by-products (e.g. the shared pass's last virtual hidden state)
        self.computing = False  # True while the provider runs the model itself (shared pass)

    def refresh(self) -> None:
        params = list(self.parameters())
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = None if needs_grad else tuple((id(p), p._version, p.device, p.dtype) for p in params)
        if key is not None and key == self._cache_key and self.keys is not None:
            return
        self.computing = True
        try:
            keys, values = self.provider()
        finally:
            self.computing = False
        self.keys, self.values = keys, values
        self._cache_key = key
        self.encoder_calls += 1

    def layer(self, idx: Optional[int]):
        if self.computing or self.keys is None or idx is None or idx >= self.keys.shape[0]:
            return None
        return self.keys[idx], self.values[idx], self.task_ids

    def clear(self) -> None:
        self.keys = self.values = self.task_ids = None
        self._cache_key = None
        self.extra = {}
