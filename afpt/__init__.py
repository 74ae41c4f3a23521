"""afpt: pretraining decoder language models with active forgetting, and carrying them to new languages.

The public classes load on first use (PEP 562), so ``afpt --help`` and shell completion do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from afpt.pretrain.forgetting import ActiveForgetting
    from afpt.pretrain.module import CausalLMModule

__all__ = ["ActiveForgetting", "CausalLMModule"]
__version__ = "0.1.0"

_LAZY = {"ActiveForgetting": "afpt.pretrain.forgetting", "CausalLMModule": "afpt.pretrain.module"}


def __getattr__(name: str) -> Any:
    """Import ``ActiveForgetting`` and ``CausalLMModule`` when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'afpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
