"""``stage=prepare``: fill the token store ahead of training (on a CPU node, say), and report it."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from afpt.app.stages import to_dict
from afpt.artifacts.io import write_json
from afpt.data.blocks import CorpusDataModule
from afpt.models import ModelConfig, check_model_dir

log = logging.getLogger("afpt")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or load) the run's tokenizer and tokenise every part of ``cfg.data`` into ``paths.store_dir``.

    ``metrics.json``: every part's store, and the preparation's wall time and CPU seconds (its workers
    included; the tokenizer's training is ``tokenizer_s`` apart).
    """
    run_dir = Path(cfg.paths.run_dir)
    model_cfg = ModelConfig.from_mapping(to_dict(cfg.model))
    if cfg.get("init_from"):
        check_model_dir(cfg.init_from)
    datamodule = CorpusDataModule(
        to_dict(cfg.data),
        vocab_size=model_cfg.vocab_size,
        run_dir=str(run_dir),
        tokenizer_path=cfg.get("init_from"),
        trust_remote_code=model_cfg.trust_remote_code,
        seed=cfg.seed,
        store_dir=cfg.paths.store_dir,
    )
    parts = datamodule.train_parts + datamodule.val_parts
    started = time.perf_counter()
    store = datamodule.store  # trains (or loads) the tokenizer
    tokenizer_s = time.perf_counter() - started
    started, cpu, before = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    metas = store.prepare(parts)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [
        {
            "lang": m["lang"],
            "split": m["split"],
            "docs": m["docs"],
            "tokens": m["tokens"],
            "MB": round(m["bytes"] / 1e6, 2),
            "bytes_per_token": round(m["bytes"] / max(1, m["tokens"]), 3),
            "path": str(datamodule.store.path(p)),
        }
        for m, p in zip(metas, parts)
    ]
    metrics = {
        "stage": "prepare",
        "store_dir": str(datamodule.store.root),
        "tokenizer_sha256": datamodule.store.tokenizer_hash,
        "block_size": datamodule.store.block_size,
        "dtype": datamodule.store.dtype.name,
        "parts": rows,
        "tokens": sum(r["tokens"] for r in rows if r["split"] == "train"),
        "bytes": sum(m["bytes"] for m in metas),
        "tokenizer_s": round(tokenizer_s, 2),
        "wall_s": round(time.perf_counter() - started, 2),
        "cpu_s": round(
            time.process_time()
            - cpu
            + sum(getattr(children, k) - getattr(before, k) for k in ("ru_utime", "ru_stime")),
            2,
        ),
    }
    print("| language | split | documents | tokens | MB | bytes/token | store |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['lang']} | {r['split']} | {r['docs']} | {r['tokens']} | {r['MB']} | {r['bytes_per_token']} | {r['path']} |"
        )
    print(f"store {metrics['store_dir']}: {metrics['tokens']} training tokens, {metrics['bytes'] / 1e6:.1f} MB")
    write_json(metrics, run_dir / "metrics.json")
    return metrics
