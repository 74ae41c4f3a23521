"""The token store's preparation: throughput against raw ``encode_batch``, memory, disk, reuse, DDP.

For each corpus size (the embedded world, ``--docs`` documents per language, 4 languages) and each
``--num-proc``, runs ``afpt stage=prepare`` as a user would, in a fresh process and a fresh store, then
once more on the same store, and reports wall time, CPU seconds (the process and its workers), peak RSS,
tokens per CPU-second against the single-process ``encode_batch`` rate on the same documents, and the
store's bytes per token. ``--ddp`` adds a 2-rank CPU pretraining run on a fresh store and counts its
preparations. The last table extrapolates to 10B tokens. Rows go to ``--out``/data.json.

    python benchmarks/data.py --docs 1000 5000 20000 --num-proc 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import print_table, write_record

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.vocab_size=4096", "trainer.enable_progress_bar=false"]
TARGET_TOKENS = 10e9


def measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` and return its wall time, CPU seconds and peak RSS (the process and its waited children)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed: {err[-2000:]}")
    return {
        "wall_s": time.perf_counter() - start,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_MB": usage.ru_maxrss / 1024,
        "log": out + err,
    }


def encode_rate(docs: int) -> float:
    """Tokens per CPU-second of one process's ``encode_batch`` (no threads) on the world's documents."""
    code = f"""
import os, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
from afpt.data import train_tokenizer
from afpt.data.world import World, WorldConfig
world = World(WorldConfig(seed=0, train_docs_per_language={docs}))
texts = [t for lang in ("en", "xa", "xb", "xc") for t in world.documents(lang)]
tok = train_tokenizer([t for t in texts[:: max(1, len(texts) // 8000)]], 4096).backend_tokenizer
start = time.process_time()
n = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
print(n / (time.process_time() - start))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def world_files(docs: int, work: Path) -> str:
    """The world's documents written as one text file per language (a ``data=files`` corpus); its override."""
    from afpt.data.world import World, WorldConfig

    world = World(WorldConfig(seed=0, train_docs_per_language=docs))
    paths = {}
    for lang in ("en", "xa", "xb", "xc"):
        paths[lang] = work / f"{lang}_{docs}.txt"
        if not paths[lang].is_file():
            with open(paths[lang], "w") as handle:
                for text in world.iter_documents(lang):
                    handle.write(text + "\n")
    return "data.files={" + ",".join(f"{k}:{v}" for k, v in paths.items()) + "}"


def prepare_row(source: str, docs: int, num_proc: int, work: Path, rate: float) -> dict:
    """A first and a second ``afpt stage=prepare`` on a fresh store."""
    store = work / f"store_{source}_{docs}_{num_proc}"
    shutil.rmtree(store, ignore_errors=True)
    corpus = [f"data.world.train_docs_per_language={docs}"]
    if source == "files":
        corpus = ["data=files", world_files(docs, work), "data.validation_fraction=0.05"]
    args = [
        sys.executable,
        "-m",
        "afpt",
        "stage=prepare",
        *TINY_MODEL,
        *corpus,
        f"data.store.num_proc={num_proc}",
        f"paths.store_dir={store}",
    ]
    first = measured([*args, f"hydra.run.dir={work / f'prep_{docs}_{num_proc}'}"])
    metrics = json.loads((work / f"prep_{docs}_{num_proc}" / "metrics.json").read_text())
    second = measured([*args, f"hydra.run.dir={work / f'prep_{docs}_{num_proc}'}"])
    again = json.loads((work / f"prep_{docs}_{num_proc}" / "metrics.json").read_text())
    tokens = metrics["tokens"] + sum(p["tokens"] for p in metrics["parts"] if p["split"] == "validation")
    return {
        "setting": f"{source} {docs} docs/lang, num_proc={num_proc}",
        "docs": docs,
        "num_proc": num_proc,
        "tokens": tokens,
        "wall_s": first["wall_s"],
        "cpu_s": first["cpu_s"],
        "tokenizer_s": metrics["tokenizer_s"],
        "prepare_wall_s": metrics["wall_s"],
        "stage_cpu_s": metrics["cpu_s"],
        "tokens_per_cpu_s": tokens / metrics["cpu_s"],
        "vs_encode_batch_pct": 100 * tokens / metrics["cpu_s"] / rate,
        "tokens_per_s_vs_cores_x_encode_pct": 100 * tokens / metrics["wall_s"] / (rate * num_proc),
        "peak_rss_MB": first["peak_rss_MB"],
        "bytes_per_token": metrics["bytes"] / tokens,
        "second_cpu_s": second["cpu_s"],
        "second_stage_cpu_s": again["cpu_s"],
        "second_vs_first_pct": 100 * again["cpu_s"] / metrics["cpu_s"],
    }


def ddp_row(docs: int, work: Path) -> dict:
    """Pretraining under DDP with 2 CPU ranks on a fresh store: how many preparations, how many copies."""
    store = work / "store_ddp"
    shutil.rmtree(store, ignore_errors=True)
    run = measured(
        [
            sys.executable,
            "-m",
            "afpt",
            *TINY_MODEL,
            "trainer=ddp_cpu",
            "trainer.max_steps=2",
            "logger=none",
            f"data.world.train_docs_per_language={docs}",
            f"paths.store_dir={store}",
            f"hydra.run.dir={work / 'ddp'}",
        ]
    )
    return {
        "setting": f"DDP 2 CPU ranks, world {docs} docs/lang",
        "preparations": run["log"].count("store: preparing en/train"),
        "stores_on_disk": len(list(store.glob("*/meta.json"))),
        "store_MB": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6,
        "wall_s": run["wall_s"],
        "cpu_s": run["cpu_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", nargs="+", type=int, default=[1000, 5000, 20000])
    parser.add_argument("--num-proc", nargs="+", type=int, default=[1, os.cpu_count() or 1])
    parser.add_argument("--sources", nargs="+", default=["world", "files"], choices=["world", "files"])
    parser.add_argument("--ddp", action="store_true", help="also a 2-rank DDP pretraining run")
    parser.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent)))
    args = parser.parse_args()
    out = Path(args.out) / "data.json"
    work = Path(tempfile.mkdtemp(prefix="afpt-data-bench-"))
    rate = encode_rate(max(args.docs))
    rows = []
    for source in args.sources:
        for docs in args.docs:
            for num_proc in args.num_proc:
                rows.append({"encode_batch_tokens_per_cpu_s": rate, **prepare_row(source, docs, num_proc, work, rate)})
                write_record(out, args, rows)
    ddp = [ddp_row(min(args.docs), work)] if args.ddp else []
    write_record(out, args, rows + ddp)
    print(f"cores: {os.cpu_count()}; raw encode_batch, one process: {rate:,.0f} tokens per CPU-second")
    print_table(
        rows,
        [
            "setting",
            "tokens",
            "wall_s",
            "cpu_s",
            "tokenizer_s",
            "prepare_wall_s",
            "stage_cpu_s",
            "tokens_per_cpu_s",
            "vs_encode_batch_pct",
            "tokens_per_s_vs_cores_x_encode_pct",
            "peak_rss_MB",
            "bytes_per_token",
            "second_stage_cpu_s",
            "second_vs_first_pct",
        ],
    )
    if ddp:
        print_table(ddp, ["setting", "preparations", "stores_on_disk", "store_MB", "wall_s", "cpu_s"])
    last = [r for r in rows if r["num_proc"] == max(args.num_proc) and r["setting"].startswith(args.sources[-1])]
    biggest, smallest = max(last, key=lambda r: r["docs"]), min(last, key=lambda r: r["docs"])
    per_core = biggest["tokens"] / biggest["stage_cpu_s"]
    print(
        f"\n10B tokens, extrapolated from {biggest['setting']}: {TARGET_TOKENS / (per_core * 64) / 3600:.2f} h on 64 cores at this run's "
        f"{per_core:,.0f} tokens per CPU-second (assumes the same per-core rate and text like this corpus); "
        f"{TARGET_TOKENS * biggest['bytes_per_token'] / 1e9:.1f} GB of store; peak RSS {biggest['peak_rss_MB']:.0f} MB "
        f"at {biggest['docs'] // smallest['docs']}x the corpus against {smallest['peak_rss_MB']:.0f} MB "
        f"({biggest['peak_rss_MB'] / smallest['peak_rss_MB']:.2f}x)"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
