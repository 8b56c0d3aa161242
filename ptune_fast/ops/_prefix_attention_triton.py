"""Triton kernels for prefix_attention (placeholder until the Triton issue lands)."""


def why_not(*args) -> str:
    return "Triton prefix-attention kernels are not implemented yet"


def run(*args):
    raise NotImplementedError("Triton prefix-attention kernels are not implemented yet")
