"""Sharded training: Lightning strategies for FSDP (v1) and FSDP2, and helpers that see through sharding.

Active forgetting and model saving need the full value of a sharded parameter. Three layouts exist:

- ``replicated``: single device or DDP; every rank holds the whole tensor.
- ``fsdp``: Lightning's ``FSDPStrategy`` (``use_orig_params=True``); a parameter is a flat shard
  outside ``FullyShardedDataParallel.summon_full_params``.
- ``fsdp2``: ``ModelParallelStrategy`` (``fully_shard``); a parameter is a ``DTensor``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from afpt.errors import AfptError
from afpt.models import find_model

# Decoder-layer classes of the families afpt builds; each becomes its own FSDP unit.
DEFAULT_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "GPT2Block")


# Gradient compression for DDP's all-reduce (``torch.distributed.algorithms.ddp_comm_hooks``).
COMM_HOOKS = ("bf16", "fp16")
REDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def ddp_strategy(comm_hook: str | None = None, **kwargs: Any) -> DDPStrategy:
    """Lightning's ``DDPStrategy``; ``comm_hook`` (``bf16`` or ``fp16``) all-reduces compressed gradients.

    Other keyword arguments go to ``DDPStrategy`` and from there to ``DistributedDataParallel``
    (``bucket_cap_mb``, ``gradient_as_bucket_view``, ``find_unused_parameters``, ``static_graph``...).
    Under ``torch.compile`` the graph is split at bucket boundaries, so ``bucket_cap_mb`` also sets
    how many compiled graphs the model has.
    """
    if comm_hook is not None:
        if comm_hook not in COMM_HOOKS:
            raise AfptError(f"trainer.strategy.comm_hook must be null or one of {COMM_HOOKS}, got {comm_hook!r}")
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        kwargs["ddp_comm_hook"] = getattr(default_hooks, f"{comm_hook}_compress_hook")
    return DDPStrategy(**kwargs)


def _wrap_by_name(module: nn.Module, recurse: bool, nonwrapped_numel: int, names: frozenset[str]) -> bool:
    return recurse or type(module).__name__ in names


def fsdp_strategy(
    layers: Iterable[str] = DEFAULT_LAYERS,
    activation_checkpointing: bool = False,
    **kwargs: Any,
) -> FSDPStrategy:
    """Lightning's ``FSDPStrategy`` with one FSDP unit per decoder layer, named by class name.

    ``activation_checkpointing`` recomputes each layer's activations in the backward pass. Other
    keyword arguments (``sharding_strategy``, ``state_dict_type``, ``cpu_offload``...) go to
    ``FSDPStrategy``; ``use_orig_params=False`` is refused, because active forgetting and the
    param groups address the original parameters.
    """
    if kwargs.get("use_orig_params") is False:
        raise AfptError("trainer.strategy.use_orig_params=false is not supported: afpt addresses original parameters")
    names = frozenset(layers)
    policy = functools.partial(_wrap_by_name, names=names)
    if activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = functools.partial(_wrap_by_name, names=names)
    return FSDPStrategy(auto_wrap_policy=policy, **kwargs)


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure FSDP2: every process is one data-parallel shard (no tensor parallelism).

    ``CausalLMModule.configure_model`` applies ``fully_shard`` (see ``fully_shard_model``) with:

    - ``reshard_after_forward=False`` (default): keep each layer's gathered parameters from the forward
      to the backward pass (ZeRO-2-like: one all-gather per layer and step instead of two, more memory);
      ``True`` frees them after the forward (ZeRO-3);
    - ``reduce_dtype``: ``float32`` or ``bfloat16`` gradient reduce-scatter (bf16 halves the traffic);
    - ``prefetch``: all-gather this many layers ahead explicitly (0: FSDP2's implicit prefetching).

    benchmarks/README.md compares the settings.
    """

    def __init__(
        self, reshard_after_forward: bool = False, reduce_dtype: str = "float32", prefetch: int = 1, **kwargs: Any
    ) -> None:
        if reduce_dtype not in REDUCE_DTYPES:
            raise AfptError(
                f"trainer.strategy.reduce_dtype must be one of {sorted(REDUCE_DTYPES)}, got {reduce_dtype!r}"
            )
        if not isinstance(prefetch, int) or prefetch < 0:
            raise AfptError(f"trainer.strategy.prefetch must be a non-negative integer, got {prefetch!r}")
        kwargs.setdefault("data_parallel_size", "auto")
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self.shard_options = {
            "reshard_after_forward": reshard_after_forward,
            "reduce_dtype": reduce_dtype,
            "prefetch": prefetch,
        }

    def setup_environment(self) -> None:
        """Use all processes of all nodes for data parallelism."""
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def layout(trainer: Trainer | None) -> str:
    """``replicated``, ``fsdp`` or ``fsdp2``; DeepSpeed and tensor parallelism are refused."""
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, DeepSpeedStrategy):
        raise AfptError("DeepSpeed is not supported: use trainer=ddp, trainer=fsdp or trainer=fsdp2")
    if isinstance(strategy, FSDPStrategy):
        if strategy.kwargs.get("use_orig_params") is False:
            raise AfptError("FSDP with use_orig_params=false is not supported: afpt addresses original parameters")
        return "fsdp"
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    return "replicated"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: modules whose class is in its ``_no_split_modules`` (or afpt's known ones)."""
    names = set(getattr(model, "_no_split_modules", None) or DEFAULT_LAYERS)
    # By class or base class: fully_shard turns LlamaDecoderLayer into a subclass FSDPLlamaDecoderLayer.
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise AfptError(f"no decoder layers found in {type(model).__name__} (looked for {sorted(names)})")
    return layers


def fully_shard_model(
    model: nn.Module,
    mesh: Any,
    bf16: bool,
    reshard_after_forward: bool = True,
    reduce_dtype: str = "float32",
    prefetch: int = 1,
) -> None:
    """Apply FSDP2's ``fully_shard`` to each decoder layer (the model's ``_no_split_modules``), then the root.

    An untied input embedding and head become units of their own (so the head's gradients are
    reduce-scattered while the layers' backward runs); a tied pair stays in the root unit. The head
    unit is not resharded after forward: the backward pass starts with it. See ``FSDP2Strategy``
    for ``reduce_dtype`` and ``prefetch``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if bf16 or reduce_dtype != "float32":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=REDUCE_DTYPES[reduce_dtype]
        )
    layers = decoder_layers(model)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied = head is not None and embedding is not None and head.weight is not embedding.weight
    if untied:
        fully_shard(embedding, **kwargs)
    for layer in layers:
        fully_shard(layer, **kwargs)
    if untied:
        fully_shard(head, **{**kwargs, "reshard_after_forward": False})
    fully_shard(model, **kwargs)
    for i, layer in enumerate(layers[:-1] if prefetch else []):
        layer.set_modules_to_forward_prefetch(layers[i + 1 : i + 1 + prefetch])
    for i, layer in enumerate(layers[1:] if prefetch else [], start=1):
        layer.set_modules_to_backward_prefetch(layers[max(0, i - prefetch) : i][::-1])


@contextlib.contextmanager
def full_parameters(trainer: Trainer | None, writeback: bool) -> Iterator[None]:
    """Inside, FSDP (v1) parameters hold their full values; with ``writeback`` changes reach every shard.

    Every rank must enter it (it all-gathers). A no-op for other layouts.
    """
    if layout(trainer) != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=writeback, with_grads=False):
        yield


def full_value(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of ``param``: gathered from its shards for a DTensor (a collective), else itself."""
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param


@torch.no_grad()
def assign_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor, identical on every rank, into ``param`` (each rank keeps its own shard of a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (the local shard of a DTensor)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The indices into ``local(tensor)`` of those global ``rows`` this rank holds: all of them for a whole
    tensor, the ones inside this rank's row range (shifted to it) for an FSDP2 ``DTensor`` sharded on dim 0."""
    from torch.distributed.tensor import DTensor, Shard

    rows = rows.to(local(tensor).device)
    if not isinstance(tensor, DTensor):
        return rows
    if tuple(tensor.placements) != (Shard(0),):
        raise AfptError(f"a partial reset needs row-sharded (Shard(0)) parameters, got {tuple(tensor.placements)}")
    # DTensor's Shard(0) cuts rows like torch.chunk: ceil(n / ranks) rows each, the last ranks short or empty.
    chunk = -(-tensor.shape[0] // tensor.device_mesh.size())
    start = min(tensor.device_mesh.get_local_rank() * chunk, tensor.shape[0])
    mine = rows[(rows >= start) & (rows < start + local(tensor).shape[0])]
    return mine - start


def full_state_dict(trainer: Trainer | None, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's full state dict on CPU: gathered on rank 0 under FSDP (every rank must call), else as is."""
    if layout(trainer) == "replicated":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_model_state_dict(trainer: Trainer, pl_module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The Hugging Face model's full weights, keyed as its own ``state_dict``, gathered from a sharded model
    (every rank must call; rank 0 gets them); None when nothing is sharded (the model's own weights serve)."""
    state_dict = full_state_dict(trainer, trainer.strategy.model)
    if state_dict is None:
        return None
    prefix = "" if find_model(pl_module) is pl_module else "model."
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


def bit_checksum(tensor: torch.Tensor) -> int:
    """A position-weighted sum of the raw bits, exact and independent of reduction order (below 2**53)."""
    flat = tensor.detach().contiguous().reshape(-1)
    bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]).long()
    weights = torch.arange(flat.numel(), device=flat.device) % 251 + 1
    return int((bits % 65521 * weights).sum() % (2**52))


@torch.no_grad()
def verify_reset(
    trainer: Trainer,
    pl_module: nn.Module,
    params: list[torch.Tensor],
    values: list[torch.Tensor],
    rows: torch.Tensor | None = None,
) -> None:
    """Check on every rank that the reset tensors ``params`` hold the drawn values and their optimizer state
    (of the reset ``rows``, for a partial reset) is zero.

    Gathers the full tensors (through any sharding), compares them with the values this rank drew,
    sums this rank's shard of the optimizer state, and all-gathers the results.
    """
    with full_parameters(trainer, writeback=False):
        observed = [full_value(p).detach() for p in params]
        exact = all(torch.equal(o, v) for o, v in zip(observed, values))
        checksums = [float(bit_checksum(o)) for o in observed]
    state_abs = sum(
        float((local(value) if rows is None else local(value)[local_rows(value, rows)]).double().abs().sum())
        for optimizer in trainer.optimizers
        for param in params
        for value in optimizer.state.get(param, {}).values()
        if torch.is_tensor(value) and (rows is None or value.shape == param.shape)
    )
    mine = torch.tensor([float(exact), state_abs, *checksums], dtype=torch.float64, device=pl_module.device)
    gathered = trainer.strategy.all_gather(mine).reshape(trainer.world_size, -1)
    agree = torch.equal(gathered[:, 2:].min(dim=0).values, gathered[:, 2:].max(dim=0).values)
    if not (bool((gathered[:, 0] == 1).all()) and bool((gathered[:, 1] == 0).all()) and agree):
        raise RuntimeError(
            "ranks disagree after an embedding reset (per rank: values exact, |optimizer state|, checksums): "
            f"{gathered.tolist()}"
        )
