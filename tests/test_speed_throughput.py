"""Throughput and profiling callbacks."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import fit, loader, quiet_trainer, tiny_llama

from afpt import CausalLMModule


def test_kernel_breakdown_splits_the_profiled_steps_by_category(tmp_path):
    from afpt.speed.throughput import KernelBreakdown, is_host_sync, kernel_category

    profile = KernelBreakdown(str(tmp_path), start_step=2, steps=3, top=4)
    fit(CausalLMModule(tiny_llama(tied=True)), [profile], max_steps=6)
    written = json.loads((tmp_path / "profile.json").read_text())
    assert written == profile.result and written["steps"] == 3
    ms = written["kernel_ms_per_step"]
    for category in ("matmul", "attention", "loss (softmax / cross-entropy)", "optimizer + grad clip"):
        assert ms.get(category, 0) > 0, category
    assert sum(ms.values()) <= written["wall_ms_per_step"] * 1.05
    top = written["top_kernels_ms_per_step"]
    assert len(top) == 4 and list(top.values()) == sorted(top.values(), reverse=True)
    assert max(top.values()) <= max(ms.values()) and any("mm" in name or "linear" in name for name in top)
    assert kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kernel_category("flash_fwd_kernel") == "attention"
    assert kernel_category("triton_red_fused__log_softmax_0") == "loss (softmax / cross-entropy)"
    assert kernel_category("ncclDevKernel_AllGather_RING_LL") == "communication"
    assert kernel_category("triton_poi_fused_mul_rsqrt_1") == "other"
    assert written["host_syncs_per_step"] == 0 and written["sync_sites"] == {}  # CPU: nothing to wait for
    assert is_host_sync("cudaStreamSynchronize") and is_host_sync("cudaMemcpy")
    assert not is_host_sync("cudaMemcpyAsync") and not is_host_sync("cudaLaunchKernel")


def test_kernel_breakdown_names_the_line_of_an_implicit_sync():
    from afpt.speed.throughput import KernelBreakdown

    profile = KernelBreakdown("unused")
    message = UserWarning("called a synchronizing CUDA operation")
    for _ in range(2):
        profile._record_warning(message, UserWarning, "torch/cuda/__init__.py", 1)
    line = test_kernel_breakdown_names_the_line_of_an_implicit_sync.__code__.co_firstlineno + 6
    assert profile._stop_sync_debug() == {f"tests/test_speed_throughput.py:{line}": 2}
    with pytest.warns(UserWarning, match="unrelated"):  # other warnings are shown as usual
        profile._record_warning(UserWarning("unrelated"), UserWarning, __file__, 1)
    assert profile._stop_sync_debug() == {}


def test_idle_gaps_are_charged_to_the_host_operator_that_launched_the_next_kernel():
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    from afpt.speed.throughput import idle_by_launcher

    def event(id, name, start, end, device=DeviceType.CPU, parent=None):
        made = FunctionEvent(id, name, thread=1, start_us=start, end_us=end, device_type=device)
        if parent is not None:
            made.set_cpu_parent(parent)
        return made

    step = event(100, "Optimizer.step#AdamW.step", 0, 60)
    mm = event(101, "aten::mm", 10, 50, parent=step)
    events = [
        step,
        mm,
        event(1, "cudaLaunchKernel", 1, 2),  # queued long before the GPU got to it
        event(2, "cudaLaunchKernel", 45, 48, parent=mm),  # the GPU waited for the host to get here
        event(3, "cuLaunchKernel", 75, 76),  # no operator around it: launched from Python
        event(1, "gemm_a", 0, 20, device=DeviceType.CUDA),
        event(2, "gemm_b", 50, 70, device=DeviceType.CUDA),
        event(3, "triton_c", 80, 90, device=DeviceType.CUDA),
        event(4, "triton_d", 96, 99, device=DeviceType.CUDA),  # its launch is not in the profile
        event(5, "triton_e", 100, 101, device=DeviceType.CUDA),  # 1 us after the previous one: no gap
    ]
    assert idle_by_launcher(events) == {
        "Optimizer.step#AdamW.step": 30,
        "cuLaunchKernel": 10,
        "(no launch found)": 6,
    }
    assert idle_by_launcher(events, min_gap_us=8) == {"Optimizer.step#AdamW.step": 30, "cuLaunchKernel": 10}
    events[3] = event(2, "cudaLaunchKernel", 15, 16, parent=mm)  # gemm_b was queued while gemm_a ran
    assert idle_by_launcher(events, min_gap_us=5)["(launched before the gap)"] == 30


def test_throughput_callback_logs_tokens_per_second_in_windows():
    from afpt.speed.throughput import TokenThroughput, flops_per_token

    monitor = TokenThroughput(window=2)
    module = CausalLMModule(tiny_llama(tied=True), lr=1e-2)
    fit(module, [monitor], max_steps=6, accumulate_grad_batches=2)
    assert [r["step"] for r in monitor.records] == [2, 4, 6]
    # No MFU and no allocator counts on a CPU.
    assert all(r["tokens_per_s"] > 0 and "mfu" not in r and "device_mallocs" not in r for r in monitor.records)
    assert monitor.summary()["tokens_per_s"] > 0
    model = module.model
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    head = model.get_input_embeddings().weight.numel()  # tied: counted once as a parameter, computed as a matmul
    assert flops_per_token(model, 16) == 6 * (body + head) + 12 * 1 * 32 * 16


class SlowValidationAndACompile(CausalLMModule):
    """afpt's module whose validation sleeps and whose step 5 compiles a new graph (dynamo, eager backend)."""

    def validation_step(self, batch, batch_idx):
        time.sleep(0.3)
        return super().validation_step(batch, batch_idx)

    def training_step(self, batch, batch_idx):
        if self.global_step == 5:
            torch.compile(lambda x: x * 2, backend="eager")(torch.ones(3))
        return super().training_step(batch, batch_idx)


def test_throughput_leaves_validation_time_and_compiling_windows_out_of_the_steady_state():
    from afpt.speed.throughput import TokenThroughput

    monitor = TokenThroughput(window=2)
    trainer = quiet_trainer(max_steps=10, callbacks=[monitor], val_check_interval=2, limit_val_batches=2)
    trainer.fit(SlowValidationAndACompile(tiny_llama(tied=True), lr=1e-2), loader(), loader())
    records = monitor.records
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    # Four validation runs of 0.6 s each fall inside windows of 2 steps: counted, each would add 300 ms a step.
    assert max(r["step_ms"] for r in records if not r["new_graphs"]) < 250
    assert [r["new_graphs"] for r in records] == [0, 0, 1, 0, 0]
    summary = monitor.summary()
    assert summary["steady_windows"] == 3  # neither the first window nor the one that compiled
    steady = [records[1], records[3], records[4]]
    assert summary["tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"] for r in steady) / 3)
