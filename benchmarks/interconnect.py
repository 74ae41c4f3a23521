"""Bandwidth of the collectives FSDP and DDP run, between the GPUs of this host (NCCL; gloo on CPU).

Prints a table of all-gather, reduce-scatter and all-reduce times and bus bandwidths (NCCL-tests'
definition: all-gather / reduce-scatter move (n-1)/n of the buffer per rank, all-reduce twice that)
for a few message sizes, and writes it as JSON under ``--out`` (default: $OUT or benchmarks/). Read
it beside ``scaling.py``: a step can only scale as far as its communication hides behind compute.

    python benchmarks/interconnect.py --gpus 2 --sizes-mb 4 16 64 256
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def measure(rank: int, world: int, sizes_mb: list[float], iters: int, port: int, queue: mp.Queue) -> None:
    """One rank: time each collective per size (bf16 buffers of ``size`` MB per rank's full tensor)."""
    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rows = []
    for size in sizes_mb:
        numel = int(size * 2**20) // 2 // world * world
        full = torch.ones(numel, dtype=torch.bfloat16, device=device)
        shard = torch.ones(numel // world, dtype=torch.bfloat16, device=device)
        ops = {
            "all_gather": (partial(dist.all_gather_into_tensor, full, shard), (world - 1) / world),
            "reduce_scatter": (partial(dist.reduce_scatter_tensor, shard, full), (world - 1) / world),
            "all_reduce": (partial(dist.all_reduce, full), 2 * (world - 1) / world),
        }
        for name, (op, factor) in ops.items():
            for _ in range(3):
                op()
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                op()
            if cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / iters
            rows.append(
                {"op": name, "size_MB": size, "ms": 1000 * seconds, "bus_GBps": factor * 2 * numel / seconds / 1e9}
            )
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="ranks (processes); one GPU each when there are GPUs")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--port", type=int, default=29512)
    parser.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent)))
    args = parser.parse_args()
    if torch.cuda.is_available() and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"--gpus {args.gpus}: this host has {torch.cuda.device_count()} GPUs")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=measure, args=(r, args.gpus, args.sizes_mb, args.iters, args.port, queue))
        for r in range(args.gpus)
    ]
    for proc in procs:
        proc.start()
    rows = queue.get(timeout=600)
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"a rank exited with code {proc.exitcode}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record = {"device": device, "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".interconnect.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / "interconnect.json")
    print(f"device: {device} x {args.gpus}, bf16 buffers, {args.iters} iterations each")
    print("| collective | size (MB) | ms | bus bandwidth (GB/s) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['op']} | {row['size_MB']:g} | {row['ms']:.3f} | {row['bus_GBps']:.1f} |")


if __name__ == "__main__":
    main()
