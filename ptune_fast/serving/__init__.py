"""Serve many prompt-learning tasks from one model through transformers' continuous batching
(:class:`TaskBatchingManager`) and ``transformers serve``'s OpenAI-compatible server
(:mod:`ptune_fast.serving.http`, ``python -m ptune_fast.serving``)."""
import importlib

_LAZY = {"TaskBatchingManager": "ptune_fast.serving.batching", "check_servable": "ptune_fast.serving.batching",
         "build_app": "ptune_fast.serving.http", "serve": "ptune_fast.serving.http"}
__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ptune_fast.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
