"""ptune_fast: fused kernels for prompt-learning fine-tuning of Hugging Face models.

One import, one call::

    import ptune_fast
    model = ptune_fast.patch(peft_model)   # same numbers as PEFT, faster, less memory
"""
from ptune_fast.ops import prefix_attention
from ptune_fast.api import patch, unpatch, is_patched
from ptune_fast.integrations.capabilities import UnsupportedModel

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "is_patched", "prefix_attention", "UnsupportedModel", "__version__"]

from ptune_fast.adapter import PromptAdapter
from ptune_fast.bank import TaskBank, p_tuning, prefix_tuning, prompt_tuning
from ptune_fast.fold import fold

__all__ += ["PromptAdapter", "TaskBank", "prefix_tuning", "p_tuning", "prompt_tuning", "fold"]
