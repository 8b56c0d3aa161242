"""Public entry points: ``patch`` / ``unpatch``."""
from __future__ import annotations


def _is_peft_model(model) -> bool:
    return any(c.__name__ == "PeftModel" and c.__module__.startswith("peft") for c in type(model).__mro__)


def patch(model, prompt_pass: str = "auto", outputs: str = "peft"):
    """Patch a PEFT prompt-learning model in place so that it runs on ptune_fast's kernels with
    PEFT's numbers. Returns ``model``.

    ``prompt_pass`` (prompt / P-tuning): ``"auto"`` runs the virtual tokens once per step (the
    shared pass) where that is exact (causal attention, positions reproduced), else per row as
    PEFT does; ``"shared"`` / ``"per_row"`` force one. ``outputs`` (shared pass): ``"peft"``
    returns PEFT's shapes (logits for the n virtual + S real positions, the virtual ones computed
    once and broadcast); ``"real"`` returns the S real positions only (no ``[B, n, V]`` logits).
    Refuses with :class:`ptune_fast.UnsupportedModel` what cannot be served exactly."""
    if _is_peft_model(model):
        from ptune_fast.integrations.peft import patch_peft

        return patch_peft(model, prompt_pass=prompt_pass, outputs=outputs)
    raise TypeError(
        f"patch() expects a peft.PeftModel with a prompt-learning adapter, got {type(model).__name__}; "
        "for a plain transformers model use ptune_fast.prefix_tuning / p_tuning / prompt_tuning"
    )


def unpatch(model):
    """Undo :func:`patch`: the model runs PEFT's original code paths again."""
    if _is_peft_model(model):
        from ptune_fast.integrations.peft import unpatch_peft

        return unpatch_peft(model)
    raise TypeError(f"unpatch() expects a patched peft.PeftModel, got {type(model).__name__}")


def is_patched(model) -> bool:
    from ptune_fast.integrations.peft import is_patched as _p

    return _p(model)
