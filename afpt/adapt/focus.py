"""FOCUS (Dobler and de Melo, 2023) through its official implementation, ``deepfocus``.

fastText is trained on the adaptation corpus tokenised with the merged tokenizer; every token the merged
and the model's vocabularies share keeps its source row, and each new token becomes a sparsemax-weighted
(sparse, convex) combination of the shared tokens' source rows, weighted by fastText similarity. New tokens
fastText has no vector for are drawn from N(mean, std) of the source rows with FOCUS's own seeded generator.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from afpt.artifacts.io import write_text
from afpt.errors import AfptError
from afpt.models import untied_head


def focus_rows(
    source: torch.Tensor,
    base_tokenizer,
    merged_tokenizer,
    texts: Sequence[str],
    work_dir: Path,
    seed: int,
    dim: int = 100,
    epochs: int = 3,
    min_count: int = 10,
    threads: int = 1,
) -> torch.Tensor:
    """Rows (``len(merged_tokenizer)`` x ``source.shape[1]``) for the merged vocabulary, by deepfocus's ``FOCUS``.

    ``source`` holds the model's rows of ``base_tokenizer``'s tokens (an untied head's rows may be concatenated
    along dim 1: the weights are the same for every column). ``threads`` > 1 trains fastText faster, but not
    bit-reproducibly; with 1 the result is a pure function of the inputs and ``seed``.
    """
    if importlib.util.find_spec("deepfocus") is None:
        raise AfptError("adapt.init=focus runs the official FOCUS (deepfocus): pip install 'afpt[focus]'")
    from deepfocus import FOCUS

    corpus = "\n".join(t.replace("\n", " ") for t in texts if t.strip()) + "\n"
    # deepfocus caches the tokenised text by file path: a content-addressed name keeps that cache honest.
    path = work_dir / f"focus-corpus-{hashlib.sha256(corpus.encode()).hexdigest()[:16]}.txt"
    if not path.is_file():
        write_text(path, corpus)
    logging.getLogger("deepfocus").setLevel(logging.WARNING)
    rows = FOCUS(
        target_tokenizer=merged_tokenizer,
        source_tokenizer=base_tokenizer,
        source_embeddings=source.float().cpu(),
        target_training_data_path=str(path),
        fasttext_model_epochs=epochs,
        fasttext_model_dim=dim,
        fasttext_model_min_count=min_count,
        processes=threads,
        seed=seed,
        verbosity="silent",
    )
    return rows.float()


def focus_new_rows(
    model, n_old: int, base_tokenizer, merged_tokenizer, texts: Sequence[str], work_dir: Path, seed: int, **options
) -> torch.Tensor:
    """The new tokens' rows (ids ``n_old`` on) for the input embedding and an untied head, side by side in
    that order, from one FOCUS run over both (``options``: ``focus_rows``'s dim, epochs, min_count, threads)."""
    head = untied_head(model)
    matrices = [model.get_input_embeddings().weight] + ([] if head is None else [head.weight])
    source = torch.cat([weight[:n_old].detach() for weight in matrices], dim=1)
    return focus_rows(source, base_tokenizer, merged_tokenizer, texts, work_dir, seed, **options)[n_old:]
