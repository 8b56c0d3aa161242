"""Per-model prefix state: the per-layer K/V prefix, computed once per forward.

The prefix lives here, outside the HF cache, as ``keys/values [L, Hkv, P, D]`` (one shared
prefix) or ``[L, N, Hkv, P, D]`` (a task bank, with ``task_ids [B]``). Attention modules look
their layer up by ``module.layer_idx``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch


class PrefixState:
    """Holds the prefix of one patched model.

    ``provider()`` returns ``(keys, values)``, each ``[L, Hkv, P, D]`` or ``[L, N, Hkv, P, D]``.
    :meth:`refresh` calls it once per forward, so the prefix always follows the encoder's current
    weights, however they changed (optimizer steps, ``p.data.mul_`` EMA updates, ``load_state_dict``,
    ``torch.compile`` graphs: nothing is cached across forwards). Inside :meth:`holding` (one
    ``generate`` call) the first forward's prefix is reused by every decoding step.
    ``disabled`` (PEFT's ``disable_adapter``): no prefix, no position shift.
    """

    def __init__(self, provider: Callable[[], Tuple[torch.Tensor, torch.Tensor]], parameters: Callable,
                 num_virtual_tokens: int):
        self.provider = provider
        self.parameters = parameters
        self.num_virtual_tokens = num_virtual_tokens
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.task_ids: Optional[torch.Tensor] = None
        self.encoder_calls = 0  # how many times the encoder ran (tests, benchmarks)
        self.extra = {}  # provider by-products (e.g. the shared pass's last virtual token's logits)
        self.computing = False  # True while the provider runs the model itself (shared pass)
        self.disabled = False
        self._hold = 0

    @contextlib.contextmanager
    def holding(self):
        """Compute the prefix once for everything run inside (a ``generate`` call)."""
        if self._hold == 0:
            self.keys = self.values = None
        self._hold += 1
        try:
            yield self
        finally:
            self._hold -= 1
            if self._hold == 0:
                self.keys = self.values = None

    def refresh(self) -> None:
        if self._hold and self.keys is not None:
            return
        self.computing = True
        try:
            keys, values = self.provider()
        finally:
            self.computing = False
        self.keys, self.values = keys, values
        if not torch.compiler.is_compiling() and not getattr(self.provider, "static", False):
            # (a counter updated in traced code would be a recompile guard)
            self.encoder_calls += 1

    def layer(self, idx: Optional[int]):
        if self.computing or self.disabled or self.keys is None or idx is None or idx >= self.keys.shape[0]:
            return None
        return self.keys[idx], self.values[idx], self.task_ids

    def clear(self) -> None:
        self.keys = self.values = self.task_ids = None
        self.extra = {}
