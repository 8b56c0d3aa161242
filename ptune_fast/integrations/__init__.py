"""transformers / PEFT integration: attention registration, capabilities, patching."""
from ptune_fast.integrations.attention import register
from ptune_fast.integrations.capabilities import Capabilities, UnsupportedModel, describe

__all__ = ["register", "describe", "Capabilities", "UnsupportedModel"]
