"""Every option of every config group, and every experiment, composes and builds what it configures.

As lightning-hydra-template's tests/test_configs.py: one composed config per option, then the objects the
stages build from it (the forgetting callback, the callbacks and loggers, the trainer's strategy and profiler),
and the checks the stages run on the other groups (model, optim and each stage's own optim, adapt's protocol).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import afpt.conf
import pytest
from helpers import compose_config
from omegaconf import DictConfig

from afpt.adapt.stage import check_protocol
from afpt.app.stages import build_forgetting, build_optim, stage_callbacks, to_dict
from afpt.artifacts.tracking import make_loggers
from afpt.errors import AfptError, build_target
from afpt.models import ModelConfig
from afpt.pretrain.optim import OptimConfig

CONF = Path(afpt.conf.__file__).parent
# Groups whose options are Hydra's own (launchers) or change the sweeper, not what a run builds.
NOT_BUILT = {"hydra", "hparams_search"}


def options() -> list[str]:
    """``group=option`` for every YAML file of every group in ``conf/``."""
    return sorted(
        f"{group.name}={option.stem}"
        for group in CONF.iterdir()
        if group.is_dir() and group.name not in NOT_BUILT and not group.name.startswith("_")
        for option in group.glob("*.yaml")
    )


def build_everything(cfg: DictConfig) -> list[object]:
    """What the stages build from ``cfg`` before training, in the order they build it; raises as they would."""
    built: list[object] = [ModelConfig.from_mapping(to_dict(cfg.model))]
    optims = [build_optim(cfg), build_optim(cfg, cfg.adapt.optim, "adapt.optim")]
    optims.append(build_optim(cfg, cfg.instruct.optim, "instruct.optim"))
    check_protocol(cfg.adapt)
    built.append(build_forgetting(cfg.forgetting))
    built += optims
    built += stage_callbacks(cfg)
    built += make_loggers(cfg)  # built, no tracker run started (that happens in training)
    for key in ("strategy", "profiler"):
        node = to_dict(cfg.trainer).get(key)
        if isinstance(node, dict):
            built.append(build_target(node, f"trainer.{key}"))
    return built


def test_every_group_option_is_found():
    found = options()
    assert {"model=llama_6m", "forgetting=probabilistic_temporary", "adapt=chen", "trainer=fsdp2"} <= set(found)
    assert not any(o.startswith("hydra=") for o in found)


@pytest.mark.parametrize("override", options())
def test_every_group_option_builds(tmp_path, override, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    cfg = compose_config(tmp_path, [override], tiny=False)
    if override == "logger=tensorboard" and importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(
            AfptError, match=r"logger.tensorboard needs the tensorboard package: pip install 'afpt\[tensorboard\]'"
        ):
            build_everything(cfg)
        return
    built = build_everything(cfg)
    group, option = override.split("=")
    if group == "forgetting":
        callback = built[1]
        assert (callback is None) == (option == "none")
        if callback is not None:
            assert type(callback).__name__ == cfg.forgetting._target_.rsplit(".", 1)[-1]
    if group == "model":
        assert built[0].name == option
    assert [type(b) for b in built[2:5]] == [OptimConfig] * 3
    if group == "logger" and option != "none":
        assert any(type(b).__name__.lower().startswith(option) for b in built)


def test_a_bad_target_in_a_group_is_one_clear_error(tmp_path):
    cfg = compose_config(tmp_path, ["forgetting._target_=afpt.pretrain.forgetting.NoSuchCallback"], tiny=False)
    with pytest.raises(AfptError, match="forgetting"):
        build_everything(cfg)


def test_the_optim_group_builds_an_optim_config_with_each_stage_s_settings_over_it(tmp_path):
    cfg = compose_config(tmp_path, ["optim.lr=0.01", "optim.eps=1e-6", "adapt.optim.lr=0.002"], tiny=False)
    assert cfg.optim._target_ == "afpt.pretrain.optim.OptimConfig.from_options"
    pretrain, adapt = build_optim(cfg), build_optim(cfg, cfg.adapt.optim, "adapt.optim")
    assert (pretrain.lr, pretrain.eps, adapt.lr, adapt.eps) == (0.01, 1e-6, 0.002, 1e-6)
    assert adapt.weight_decay == pretrain.weight_decay == cfg.optim.weight_decay
    assert isinstance(pretrain.betas, list) and pretrain.as_kwargs()["betas"] == [0.9, 0.95]
    cfg = compose_config(tmp_path, ["+adapt.optim.lrr=1"], tiny=False)
    with pytest.raises(AfptError, match=r"adapt.optim.lrr is not an optim setting; expected one of \['activation"):
        build_optim(cfg, cfg.adapt.optim, "adapt.optim")


class WideModelConfig(ModelConfig):
    """A user's own model spec: a subclass with other defaults."""

    def __init__(self, **values):
        super().__init__(**{"hidden_size": 256, **values})


def test_the_model_group_builds_the_class_its_target_names(tmp_path):
    cfg = compose_config(tmp_path, ["model=llama_6m"], tiny=False)
    assert cfg.model._target_ == "afpt.models.ModelConfig"
    assert type(ModelConfig.from_mapping(to_dict(cfg.model))) is ModelConfig
    cfg = compose_config(tmp_path, [f"model._target_={__name__}.WideModelConfig", "~model.hidden_size"], tiny=False)
    built = ModelConfig.from_mapping(to_dict(cfg.model))
    assert type(built) is WideModelConfig and built.hidden_size == 256 and built.name == "tiny"


@pytest.mark.parametrize(
    "target, message",
    [
        ("collections.OrderedDict", "must name afpt.models.ModelConfig or a subclass"),
        ("afpt.nowhere.X", "cannot be imported"),
    ],
)
def test_a_model_target_that_is_no_model_config_is_one_clear_error(tmp_path, target, message):
    cfg = compose_config(tmp_path, [f"model._target_={target}"], tiny=False)
    with pytest.raises(AfptError, match=message):
        ModelConfig.from_mapping(to_dict(cfg.model))
