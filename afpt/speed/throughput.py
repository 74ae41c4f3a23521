"""Tokens per second and model FLOPs utilisation (MFU), logged during real training runs."""

from __future__ import annotations

import json
import os
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from transformers import PreTrainedModel

from afpt.models import find_model

# Dense bf16 peak FLOP/s per GPU (no sparsity). Lightning's own table does not know the H200.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a CUDA device from afpt's table, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + 12 x layers x hidden x seq.

    Matmul parameters are all parameters except the input embedding (a lookup), plus a tied output
    head, which is counted once among the parameters but still costs its own matmul.
    """
    config = model.config
    if isinstance(model, PreTrainedModel):  # count full shapes, also when parameters are sharded (FSDP)
        with torch.device("meta"):
            model = type(model)(config)
    embedding = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters()) - embedding.numel()
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is not None and head.weight is embedding:
        params += embedding.numel()
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return 6 * params + 12 * layers * hidden * seq_len


# torch.cuda.memory_stats keys counted per window, and the names they are logged under.
ALLOCATOR_COUNTS = {"num_device_alloc": "device_mallocs", "num_alloc_retries": "alloc_retries"}


class TokenThroughput(Callback):
    """Log ``perf/tokens_per_s``, ``perf/step_ms`` and ``perf/mfu`` every ``window`` optimizer steps; for padded
    batches (a ``real_tokens`` count in the batch) also ``perf/real_tokens_per_s`` and ``perf/padding_fraction``;
    on CUDA ``perf/device_mallocs`` and ``perf/alloc_retries``, the caching allocator's device allocations and
    retries in the window (both 0 once a run with fixed shapes is warm).

    Times whole windows, so the only host syncs are one per window and two per validation run; the clock
    stops while validation runs. The first window (warm-up) and any window in which torch.compile built a
    training graph are logged but left out of ``summary()``.
    """

    def __init__(self, window: int = 50) -> None:
        super().__init__()
        self.window = window
        self.records: list[dict[str, float]] = []
        self._start: float | None = None
        self._start_step = 0
        self._tokens = 0
        self._real_tokens = 0
        self._flops_per_token: float | None = None
        self._graphs_at_start = 0.0
        self._val_graphs = 0.0
        self._val_started: tuple[float, float] | None = None
        self._allocator_at_start: dict[str, int] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Start the clock at the first batch, and count this micro-batch's tokens."""
        if self._start is None:
            self._sync(pl_module)
            self._open_window(trainer)
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        self._tokens += ids.numel() * trainer.world_size
        if isinstance(batch, dict) and "real_tokens" in batch:
            self._real_tokens += int(batch["real_tokens"]) * trainer.world_size

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Close a window every ``window`` optimizer steps and log its throughput."""
        steps = trainer.global_step - self._start_step
        if steps < self.window or trainer.fit_loop.epoch_loop._should_accumulate():
            return
        self._sync(pl_module)
        elapsed = time.perf_counter() - self._start
        model = find_model(pl_module)
        tokens_per_s = self._tokens / elapsed
        built = graphs()
        record = {
            "step": trainer.global_step,
            "tokens_per_s": tokens_per_s,
            "step_ms": 1000 * elapsed / steps,
            "compiled_graphs": built,
            "new_graphs": built - self._graphs_at_start - self._val_graphs,
        }
        if pl_module.device.type == "cuda":
            # cudaMalloc calls and out-of-memory retries of the caching allocator in this window: batches whose
            # shapes keep changing can make it allocate (each call synchronising) long after warm-up.
            stats = torch.cuda.memory_stats(pl_module.device)
            for key, name in ALLOCATOR_COUNTS.items():
                record[name] = stats.get(key, 0) - self._allocator_at_start.get(key, 0)
        if self._real_tokens:
            record["real_tokens_per_s"] = self._real_tokens / elapsed
            record["padding_fraction"] = 1 - self._real_tokens / self._tokens
        peak = peak_flops(pl_module.device)
        if peak:
            seq = (batch["input_ids"] if isinstance(batch, dict) else batch[0]).shape[-1]
            if self._flops_per_token is None:
                self._flops_per_token = flops_per_token(model, seq)
            record["mfu"] = tokens_per_s * self._flops_per_token / (peak * trainer.world_size)
        self.records.append(record)
        for key, value in record.items():
            if key != "step":
                # A host tensor: a Python number would be copied to the device, a blocking copy.
                pl_module.log(f"perf/{key}", torch.tensor(value), on_step=True, on_epoch=False)
        self._open_window(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Stop the clock while validation runs inside a training window."""
        if self._start is not None and not trainer.sanity_checking:
            self._sync(pl_module)
            self._val_started = (time.perf_counter(), graphs())

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Restart the clock; graphs compiled for validation are not the training window's."""
        if self._val_started is not None:
            self._sync(pl_module)
            started, graphs_before = self._val_started
            self._start += time.perf_counter() - started
            self._val_graphs += graphs() - graphs_before
            self._val_started = None

    def _open_window(self, trainer: Trainer) -> None:
        device = trainer.strategy.root_device
        self._allocator_at_start = torch.cuda.memory_stats(device) if device.type == "cuda" else {}
        self._start, self._start_step, self._tokens = time.perf_counter(), trainer.global_step, 0
        self._real_tokens = 0
        self._graphs_at_start, self._val_graphs = graphs(), 0.0

    def summary(self) -> dict[str, float]:
        """Means of the steady windows (after the first, with no training graph compiled in them; failing those,
        the first window that compiled nothing; no rates when every window compiled), their count
        ``steady_windows``, ``recompiles_after_warmup`` (graphs torch.compile built after the first window,
        validation's and resets' included), and ``compile_health``'s counts."""
        clean = [r for r in self.records if not r["new_graphs"]]
        steady = [r for r in self.records[1:] if not r["new_graphs"]] or clean[:1]
        keys = steady[0].keys() if steady else []
        skip = ("step", "compiled_graphs", "new_graphs")
        out = {k: sum(r[k] for r in steady) / len(steady) for k in keys if k not in skip}
        out["steady_windows"] = float(len(steady))
        if self.records:
            out["recompiles_after_warmup"] = self.records[-1]["compiled_graphs"] - self.records[0]["compiled_graphs"]
        return {**out, **compile_health()}

    @staticmethod
    def _sync(pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def graphs() -> float:
    """The number of graphs torch.compile has built in this process."""
    return float(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compile_health() -> dict[str, float]:
    """torch.compile counts of this process: ``graph_breaks``, and ``recompile_limit_hits`` (frames that
    hit dynamo's recompile limit and from then on run eagerly)."""
    counters = torch._dynamo.utils.counters
    hits = sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason.lower())
    return {"graph_breaks": float(sum(counters["graph_break"].values())), "recompile_limit_hits": float(hits)}


# Kernel-name fragments per category, matched in this order (lower case).
KERNEL_CATEGORIES = {
    "communication": ("nccl",),
    "attention": ("flash", "fmha", "sdpa", "attention", "attn"),
    "matmul": ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "splitk", "::mm", "addmm", "bmm", "::linear"),
    "optimizer + grad clip": ("adam", "multi_tensor", "foreach", "norm_kernel"),
    "loss (softmax / cross-entropy)": ("log_softmax", "softmax", "nll", "cross_entropy"),
    "memory copies": ("memcpy", "memset"),
}


# CUDA runtime calls that block the host until the GPU has caught up.
HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def is_host_sync(name: str) -> bool:
    """Whether a profiled CUDA runtime call blocks the host (``cudaMemcpyAsync`` does not by itself)."""
    return name in HOST_SYNCS


def idle_by_launcher(events: list, min_gap_us: float = 5.0) -> dict[str, float]:
    """GPU idle time (microseconds) by what the host was running when it launched the kernel that ended each gap.

    ``events``: a CUDA profile's ``FunctionEvent`` list. A gap is time covered by no kernel between the first
    and the last one. It is charged to the outermost host operator (``Optimizer.step#AdamW.step``, a compiled
    region, an ``aten::`` call from Python) around the runtime call that launched the next kernel, matched by
    correlation id; ``(launched before the gap)`` when that launch came before the gap began (the GPU waited on
    something else), ``(no launch found)`` when the profile holds none.
    """
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    kernels = sorted(
        (
            e
            for e in events
            if e.device_type == cuda and not e.is_user_annotation and e.time_range.end > e.time_range.start
        ),
        key=lambda e: e.time_range.start,
    )
    launches = {e.id: e for e in events if e.device_type == cpu and e.name.startswith("cu")}
    idle: Counter = Counter()
    reach = None
    for kernel in kernels:
        start, end = kernel.time_range.start, kernel.time_range.end
        if reach is not None and start - reach >= min_gap_us:
            launch = launches.get(kernel.id)
            if launch is None:
                label = "(no launch found)"
            elif launch.time_range.end <= reach:
                label = "(launched before the gap)"
            else:
                root = launch
                while root.cpu_parent is not None:
                    root = root.cpu_parent
                label = root.name
            idle[label] += start - reach
        reach = end if reach is None else max(reach, end)
    return dict(idle)


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel by its name; ``other`` (elementwise, norms, RoPE) when none matches."""
    lower = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES.items() if any(k in lower for k in keys)), "other")


class KernelBreakdown(Callback):
    """Profile ``steps`` optimizer steps from ``start_step`` and split GPU time by kernel category.

    Writes ``profile.json`` (and ``profile_trace.json``, a Chrome trace, with ``trace=True``) to
    ``dirpath``: wall time of the window, per-category kernel time, the ``top`` kernels by time (so one
    can see which attention or GEMM kernel actually ran), GPU idle time (wall time covered by no kernel
    on any stream), that idle time by the host operator that launched the kernel after each gap
    (``idle_by_launcher``), and the host's gap between batches (data loading and hooks). Kernels on different
    streams overlap (communication with compute), so the categories can add up to more than the wall time. On
    CPU the categories hold the operators' own CPU time.

    Host syncs: ``host_syncs_per_step`` counts the CUDA runtime calls that block the host
    (``HOST_SYNCS``), and ``sync_sites`` names the Python lines of the implicit ones (``.item()``,
    blocking copies), caught with ``torch.cuda.set_sync_debug_mode("warn")`` during the window.
    """

    def __init__(self, dirpath: str, start_step: int = 50, steps: int = 10, trace: bool = False, top: int = 12) -> None:
        super().__init__()
        self.dirpath, self.start_step, self.steps, self.trace, self.top = dirpath, start_step, steps, trace, top
        self.result: dict[str, Any] | None = None
        self._profiler: torch.profiler.profile | None = None
        self._start = 0.0
        self._batch_end: float | None = None
        self._gaps: list[float] = []
        self._warnings: warnings.catch_warnings | None = None
        self._sites: Counter = Counter()
        self._show = warnings.showwarning
        self._sync_mode = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Start at ``start_step``; record the host gap since the previous batch while profiling."""
        if self._profiler is not None and self._batch_end is not None:
            self._gaps.append(time.perf_counter() - self._batch_end)
        if trainer.global_step == self.start_step and self._profiler is None and self.result is None:
            TokenThroughput._sync(pl_module)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
            if pl_module.device.type == "cuda":
                self._warnings = warnings.catch_warnings()
                self._warnings.__enter__()
                warnings.simplefilter("always")
                self._sync_mode = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("warn")  # its own warning is not a sync of the run
                self._show, warnings.showwarning = warnings.showwarning, self._record_warning
            self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop after ``steps`` optimizer steps and write the breakdown."""
        self._batch_end = time.perf_counter()
        if self._profiler is None or trainer.global_step < self.start_step + self.steps:
            return
        sites = self._stop_sync_debug()
        TokenThroughput._sync(pl_module)
        wall_ms = 1000 * (time.perf_counter() - self._start)
        self._profiler.__exit__(None, None, None)
        categories, kernels, busy = self._categories(pl_module.device.type == "cuda", wall_ms)
        events = self._profiler.events()
        syncs = sum(1 for event in events if is_host_sync(event.name))
        idle = idle_by_launcher(events) if pl_module.device.type == "cuda" else {}
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[: self.top]
        self.result = {
            "steps": self.steps,
            "wall_ms_per_step": wall_ms / self.steps,
            "kernel_ms_per_step": {k: v / self.steps for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_per_step": {name[:160]: ms / self.steps for name, ms in top},
            "idle_ms_per_step": max(wall_ms - busy, 0.0) / self.steps,
            "busy_ms_per_step": busy / self.steps,
            "host_gap_ms_per_batch": 1000 * sum(self._gaps) / max(len(self._gaps), 1),
            "idle_ms_per_step_by_launcher": {
                name: us / 1000 / self.steps for name, us in sorted(idle.items(), key=lambda kv: -kv[1])[: self.top]
            },
            "host_syncs_per_step": syncs / self.steps,
            "sync_sites": dict(sites.most_common(self.top)),
        }
        if trainer.is_global_zero:
            out = Path(self.dirpath)
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / ".profile.json.tmp"
            tmp.write_text(json.dumps(self.result, indent=2))
            tmp.replace(out / "profile.json")
            if self.trace:
                self._profiler.export_chrome_trace(str(out / "profile_trace.json"))
        self._profiler = None

    def _record_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """Count a sync warning by the innermost calling line outside torch; show any other warning."""
        if "synchronizing" not in str(message):
            self._show(message, category, filename, lineno, file, line)
            return
        skip = (f"{os.sep}torch{os.sep}", warnings.__file__)
        frames = [f for f in traceback.extract_stack()[:-1] if not any(part in f.filename for part in skip)]
        frame = frames[-1] if frames else None
        where = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}" if frame else filename
        self._sites[where] += 1

    def _stop_sync_debug(self) -> Counter:
        """Leave sync debug mode and return the implicit syncs counted by calling line."""
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode(self._sync_mode)
            warnings.showwarning = self._show
            self._warnings.__exit__(None, None, None)
            self._warnings = None
        sites, self._sites = self._sites, Counter()
        return sites

    def _categories(self, cuda: bool, wall_ms: float) -> tuple[dict[str, float], dict[str, float], float]:
        """``kernel_times`` of this callback's profile."""
        return kernel_times(self._profiler, cuda, wall_ms)


def kernel_times(
    profiler: torch.profiler.profile, cuda: bool, wall_ms: float
) -> tuple[dict[str, float], dict[str, float], float]:
    """Milliseconds per kernel category and per kernel name in a finished profile, and busy time: the union of
    kernel intervals (streams overlap). Without CUDA, operators' own CPU time (they do not overlap)."""
    categories: dict[str, float] = {}
    kernels: dict[str, float] = {}
    if not cuda:
        for event in profiler.key_averages():
            if event.self_cpu_time_total > 0:
                cat = kernel_category(event.key)
                categories[cat] = categories.get(cat, 0.0) + event.self_cpu_time_total / 1000
                kernels[event.key] = kernels.get(event.key, 0.0) + event.self_cpu_time_total / 1000
        return categories, kernels, min(sum(categories.values()), wall_ms)
    intervals = []
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or event.is_user_annotation:
            continue
        start, end = event.time_range.start, event.time_range.end
        if end > start:
            cat = kernel_category(event.name)
            categories[cat] = categories.get(cat, 0.0) + (end - start) / 1000
            kernels[event.name] = kernels.get(event.name, 0.0) + (end - start) / 1000
            intervals.append((start, end))
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return categories, kernels, busy / 1000


def throughput_summary(trainer: Trainer) -> dict[str, float]:
    """The trainer's ``TokenThroughput`` summary (steady-state windows), or ``{}`` without that callback."""
    return next((c.summary() for c in trainer.callbacks if isinstance(c, TokenThroughput)), {})
