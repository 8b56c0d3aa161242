"""Public ops. One op per file; each dispatches CUDA extension -> Triton -> reference."""
from ptune_fast.ops.prefix_attention import prefix_attention

__all__ = ["prefix_attention"]
