"""Everything that differs between transformers releases, read from what the installed one does.

One place, no version checks: each helper inspects the installed transformers (signatures,
attributes) once and answers for it. Tested on transformers 5.17 - 5.24 (see setup.py).

* The cache argument of a model's ``forward``: ``past_key_values`` up to 5.23, ``cache`` from
  5.24 (5.24 still accepts the old name through a deprecation shim that warns).
  :func:`cache_kwarg` reads the name from the signature of the forward being called.
* The cache field of model outputs: ``past_key_values`` up to 5.23, ``cache`` from 5.24.
* ``DynamicCache``'s storage: ``cache.layers[i].keys`` (5.x).
"""
from __future__ import annotations

import functools
import inspect

CACHE_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _forward_params(fn) -> frozenset:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return frozenset()


def cache_kwarg(module) -> str:
    """The name under which ``module.forward`` takes the KV cache (``cache`` or ``past_key_values``)."""
    params = _forward_params(type(module).forward)
    for name in CACHE_NAMES:
        if name in params:
            return name
    return "past_key_values"


def accepts(module, name: str) -> bool:
    """Whether ``module.forward`` takes a keyword ``name`` (or any ``**kwargs``)."""
    fn = type(module).forward
    params = _forward_params(fn)
    if name in params:
        return True
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover
        return False


def takes_cache(module) -> bool:
    params = _forward_params(type(module).forward)
    return any(name in params for name in CACHE_NAMES)


def get_cache(kwargs: dict):
    """The cache passed in ``kwargs`` under either name (None if absent)."""
    for name in CACHE_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def output_cache(out):
    """The cache an HF model output carries under either name."""
    for name in CACHE_NAMES:
        value = getattr(out, name, None) if not isinstance(out, dict) else out.get(name)
        if value is not None:
            return value
    return None


def cache_length(cache) -> int:
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def cache_layers(cache):
    """``[(keys, values)]`` per layer of a ``DynamicCache`` (``[B, Hkv, T, D]`` each)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))  # pragma: no cover - pre-5 caches


def new_dynamic_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # pragma: no cover - caches without a config argument
        return DynamicCache()


def prefix_cache(config, keys, values):
    """A ``DynamicCache`` holding ``keys/values`` (``[L, B, Hkv, P, D]``) as its first P positions:
    how PEFT hands a prefix to transformers (used by the PEFT-free oracle)."""
    cache = new_dynamic_cache(config)
    for i in range(keys.shape[0]):
        cache.update(keys[i], values[i], i)
    return cache
