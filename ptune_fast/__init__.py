"""ptune_fast: fused kernels for prompt-learning fine-tuning of Hugging Face models.

One import, one call::

    import ptune_fast
    model = ptune_fast.patch(peft_model)   # same numbers as PEFT, faster, less memory

Names are imported on first use (PEP 562), so ``python -m ptune_fast --help`` does not pay for
importing torch and transformers.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "patch": "ptune_fast.api", "unpatch": "ptune_fast.api", "is_patched": "ptune_fast.api",
    "prefix_attention": "ptune_fast.ops",
    "UnsupportedModel": "ptune_fast.integrations.capabilities",
    "PromptAdapter": "ptune_fast.adapter",
    "TaskBank": "ptune_fast.bank", "prefix_tuning": "ptune_fast.bank", "p_tuning": "ptune_fast.bank",
    "prompt_tuning": "ptune_fast.bank",
    "fold": "ptune_fast.folding",
}
__all__ = sorted(_LAZY) + ["__version__"]


_SUBMODULES = ("ops", "integrations", "reference", "oracle", "encoders", "adapter", "bank", "folding", "io", "api",
               "info", "demo", "versions")


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        if name in _SUBMODULES:  # ``import ptune_fast; ptune_fast.ops.prefix_attention(...)``
            return importlib.import_module(f"ptune_fast.{name}")
        raise AttributeError(f"module 'ptune_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
