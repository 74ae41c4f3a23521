"""Adaptation to new languages: tokenizer merging, new-row initialisers, expansion and freeze policies, and
``stage=adapt``."""
