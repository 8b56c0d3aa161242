"""transformers / PEFT integration: attention registration, patching, standalone entry points."""
from ptune_fast.integrations.attention import register
from ptune_fast.integrations.core import SUPPORTED_MODEL_TYPES

__all__ = ["register", "SUPPORTED_MODEL_TYPES"]
