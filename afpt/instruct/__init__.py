"""Instruction tuning: ChatML conversations, ``stage=instruct`` and ``stage=generate``."""
