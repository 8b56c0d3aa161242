"""Backend selection shared by every op.

Order for CUDA tensors: compiled extension ``ptune_fast._C`` -> Triton -> ``sdpa`` (PyTorch's
fused SDPA, where an op has one). CPU tensors use ``sdpa`` (or the reference for ops without
one), unless ``PTUNE_FAST_BACKEND=triton`` forces the Triton kernels (they then run under
``TRITON_INTERPRET=1``: that is how CI tests them). ``reference`` is the oracle, run when forced.

``PTUNE_FAST_BACKEND=reference|sdpa|triton|cuda`` forces one backend; a forced backend that
cannot serve a call raises :class:`BackendUnavailable` instead of falling back. Every
automatic fallback is logged at debug level and counted in :data:`FALLBACKS`.
"""
from __future__ import annotations

import collections
import functools
import importlib.util
import logging
import os

logger = logging.getLogger("ptune_fast")

BACKENDS = ("reference", "sdpa", "triton", "cuda")
ENV_VAR = "PTUNE_FAST_BACKEND"

#: ``(op, from_backend, reason) -> count`` of automatic fallbacks since import.
FALLBACKS: "collections.Counter[tuple]" = collections.Counter()
#: ``(op, backend) -> count`` of calls served, for tests and ``ptune_fast info``.
CALLS: "collections.Counter[tuple]" = collections.Counter()


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve this call."""


def forced_backend() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS} or 'auto', got {value!r}")
    return value


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs only
        return False, f"import triton failed: {exc}"
    return True, ""


@functools.lru_cache(maxsize=None)
def cuda_extension() -> tuple[object | None, str]:
    """``(module, "")`` when ``ptune_fast._C`` is built and loads, else ``(None, why)``."""
    try:
        import torch

        from ptune_fast import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"extension not built ({exc})"
    if not torch.cuda.is_available():
        return None, "extension built but no CUDA device is visible"
    return _C, ""


def fallback(op: str, backend: str, reason: str) -> None:
    if _compiling():
        return
    FALLBACKS[(op, backend, reason)] += 1
    logger.debug("ptune_fast.%s: %s backend cannot serve this call (%s); falling back", op, backend, reason)


def _compiling() -> bool:
    try:
        import torch

        return torch.compiler.is_compiling()
    except Exception:  # noqa: BLE001 - torch without torch.compiler
        return False


def served(op: str, backend: str) -> None:
    """Count a call served (eager calls only: a counter updated inside traced code would become a
    guard and recompile the graph on every step)."""
    if _compiling():
        return
    CALLS[(op, backend)] += 1
