"""afpt: pretraining decoder language models with active forgetting, and carrying them to new languages."""

from afpt.pretrain.forgetting import ActiveForgetting
from afpt.pretrain.module import CausalLMModule

__all__ = ["ActiveForgetting", "CausalLMModule"]
__version__ = "0.1.0"
