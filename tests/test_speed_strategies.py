"""The trainer configs' strategies (DDP, FSDP, FSDP2) build, and bad options are refused."""

from __future__ import annotations

import pytest
from helpers import compose_config

from afpt.app.stages import build_trainer
from afpt.errors import AfptError
from afpt.speed.distributed import fsdp_strategy


def test_fsdp_without_original_parameters_is_refused():
    with pytest.raises(AfptError, match="use_orig_params=false is not supported"):
        fsdp_strategy(use_orig_params=False)


def test_a_strategy_that_cannot_be_built_names_its_target(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "strategy": {"_target_": "afpt.speed.distributed.nope"}}})
    with pytest.raises(AfptError, match="trainer.strategy: cannot build 'afpt.speed.distributed.nope'"):
        build_trainer(cfg, tmp_path, [])


def test_shipped_ddp_and_fsdp2_configs_build_their_strategies(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    from afpt.speed.distributed import FSDP2Strategy

    cfg = compose_config(tmp_path, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.strategy.comm_hook=bf16"])
    strategy = build_trainer(cfg, tmp_path, []).strategy
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_comm_hook.__name__ == "bf16_compress_hook"
    assert strategy._ddp_kwargs == {"bucket_cap_mb": 25, "gradient_as_bucket_view": True}
    cfg = compose_config(tmp_path, ["trainer=fsdp2", "trainer.accelerator=cpu"])
    strategy = build_trainer(cfg, tmp_path, []).strategy
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.shard_options == {"reshard_after_forward": False, "reduce_dtype": "float32", "prefetch": 1}
    cfg = compose_config(tmp_path, ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.strategy.prefetch=2"])
    assert build_trainer(cfg, tmp_path, []).strategy.shard_options["prefetch"] == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer=ddp", "trainer.strategy.comm_hook=int8"], "trainer.strategy.comm_hook must be null or one of"),
        (["trainer=fsdp2", "trainer.strategy.reduce_dtype=fp8"], "trainer.strategy.reduce_dtype must be one of"),
        (["trainer=fsdp2", "trainer.strategy.prefetch=-1"], "trainer.strategy.prefetch must be a non-negative"),
    ],
)
def test_bad_strategy_options_are_refused_by_name(tmp_path, overrides, message):
    cfg = compose_config(tmp_path, [*overrides, "trainer.accelerator=cpu"])
    with pytest.raises(AfptError, match=message):
        build_trainer(cfg, tmp_path, [])
