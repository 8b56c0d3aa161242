"""Public ops, one per file: :func:`prefix_attention` (training and prefill, any number of
queries, autograd) and :func:`decode_attention` (the compiled CUDA decode kernel alone, no
autograd). ``prefix_attention`` picks its backend per call: CUDA tensors ``cuda`` (decode
kernel, when nothing needs grad) -> ``triton`` -> ``sdpa``; CPU tensors ``sdpa``;
``reference`` (the fp32/fp64 oracle) only when ``PTUNE_FAST_BACKEND=reference`` forces it
(see :mod:`ptune_fast._backend`). The modules themselves are ``ptune_fast.ops.prefix_attention``
etc. via ``importlib.import_module`` (the package attributes are the functions).
"""
from ptune_fast.ops.decode_attention import decode_attention
from ptune_fast.ops.prefix_attention import prefix_attention
from ptune_fast.ops.prefix_attention import warmup as warmup_prefix_attention

__all__ = ["prefix_attention", "decode_attention", "warmup_prefix_attention"]
