"""The pretrain stage through the real Hydra configs: smoke runs, artifacts, resume, bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import afpt.conf
import pytest
import torch
from helpers import afpt_cli, assert_one_line_error, compose_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import afpt.pretrain.stage as pretrain
from afpt.errors import AfptError

CONF = Path(afpt.conf.__file__).parent
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
FORGETTING = sorted(p.stem for p in (CONF / "forgetting").glob("*.yaml"))


def test_default_run_writes_a_loadable_model_metrics_logs_and_plot(tmp_run):
    cfg = compose_config(tmp_run, ["trainer.max_steps=8", "forgetting.every_n_steps=3"])
    metrics = pretrain.run(cfg)
    assert metrics["global_step"] == 8
    assert [r["step"] for r in metrics["resets"]] == [3, 6]
    saved = json.loads((tmp_run / "metrics.json").read_text())
    assert saved["resets"] == metrics["resets"]
    for lang in ("en", "xa", "xb", "xc"):
        assert saved[f"val/ppl/{lang}"] > 1.0
    model = AutoModelForCausalLM.from_pretrained(tmp_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_run / "model")
    assert (tmp_run / "model" / "model.safetensors").is_file()
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert tokenizer.decode(tokenizer("Niran keeps a hawk.")["input_ids"]) == "Niran keeps a hawk."
    assert list(tmp_run.glob("logs/*/metrics.csv"))
    png = (tmp_run / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert not list(tmp_run.glob(".*tmp*")), "no temporary artifacts left behind"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("forgetting", FORGETTING)
def test_every_model_and_forgetting_config_runs(tmp_run, model, forgetting):
    overrides = [f"model={model}", f"forgetting={forgetting}", "trainer.max_steps=3", "trainer.val_check_interval=3"]
    if model.startswith("mistral") or model.startswith("llama"):
        overrides.append("model.num_kv_heads=1")
    cfg = compose_config(tmp_run, overrides)
    metrics = pretrain.run(cfg)
    assert metrics["model"] == model and metrics["forgetting"] == forgetting
    assert len(metrics["resets"]) == (0 if forgetting in ("none", "probabilistic_temporary") else 1)
    config = json.loads((tmp_run / "model" / "config.json").read_text())
    assert config["model_type"] == cfg.model.family
    assert config["tie_word_embeddings"] == cfg.model.tie_word_embeddings


def test_paper_model_configs_have_the_promised_size():
    from omegaconf import OmegaConf

    from afpt.models import ModelConfig, build_model, count_parameters

    expected = {
        "mistral_400m": (380e6, 430e6),
        "mistral_1b6": (1.45e9, 1.7e9),
        "llama_350m": (330e6, 370e6),
        "gpt2_124m": (120e6, 130e6),
        "llama_124m": (115e6, 130e6),
    }
    for name, (low, high) in expected.items():
        values = OmegaConf.to_container(compose_config(Path("/tmp"), [f"model={name}"], tiny=False).model, resolve=True)
        cfg = ModelConfig.from_mapping(values)
        with torch.device("meta"):
            model = build_model(cfg, cfg.vocab_size, {})
        assert low < count_parameters(model)["total"] < high, name


def test_init_from_continues_from_a_saved_model(tmp_path):
    first = tmp_path / "first"
    pretrain.run(compose_config(first, ["forgetting=none", "trainer.max_steps=2"]))
    second = tmp_path / "second"
    metrics = pretrain.run(compose_config(second, [f"init_from={first / 'model'}", "trainer.max_steps=2"]))
    assert metrics["global_step"] == 2
    assert (
        AutoTokenizer.from_pretrained(second / "model").get_vocab()
        == AutoTokenizer.from_pretrained(first / "model").get_vocab()
    )


@pytest.mark.parametrize(
    ("variant", "resets"),
    [
        (["forgetting=every_k"], [2, 4, 6]),
        (["forgetting=partial"], [2, 4, 6]),
        (["forgetting=temporary", "forgetting.stop_after_steps=5"], [2, 4]),
        (["forgetting=bernoulli", "forgetting.stop_after_steps=7"], [2, 4, 6]),
    ],
    ids=["every_k", "partial", "temporary", "bernoulli"],
)
def test_resume_matches_an_uninterrupted_run(tmp_path, variant, resets):
    # K=2 puts a reset right at the checkpoint step 4: the resumed run must make it on its first batch.
    common = [
        *variant,
        "trainer.max_steps=8",
        "forgetting.every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "callbacks.model_checkpoint.save_top_k=-1",
        "trainer.val_check_interval=4",
    ]
    full = tmp_path / "full"
    full_metrics = pretrain.run(compose_config(full, common))
    # The step-4 checkpoint is exactly what a run killed after step 4 leaves behind.
    ckpt = full / "checkpoints" / "step4.ckpt"
    assert ckpt.is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "tokenizer", resumed / "tokenizer")
    resumed_metrics = pretrain.run(compose_config(resumed, common + [f"ckpt_path={ckpt}"]))
    assert [r["step"] for r in resumed_metrics["resets"]] == resets

    def strip(resets):
        return [{k: v for k, v in r.items() if k not in ("duration_ms", "host_ms")} for r in resets]

    assert strip(resumed_metrics["resets"]) == strip(full_metrics["resets"])
    a = load_file(full / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


BAD_INPUTS = [
    (["forgetting.every_n_steps=0"], "every_n_steps must be a positive integer"),
    (["forgetting.every_n_steps=2.5"], "every_n_steps must be a positive integer"),
    (["model.family=bert"], "model.family='bert' is unknown"),
    (["data=files", "data.files=/nonexistent/corpus.txt"], "does not exist"),
    (["model.vocab_size=100"], "smaller than the 4 special tokens"),
    (["data.block_size=100000"], "longer than the model's 64 positions"),
    (["init_from=/tmp"], "not a model directory"),
    (["ckpt_path=/nonexistent.ckpt"], "ckpt_path='/nonexistent.ckpt' does not exist"),
    (["data.mixture={zz: 1.0}"], "data.mixture names languages"),
    (["optim.loss=chunky"], "optim.loss must be one of"),
]


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed")
@pytest.mark.parametrize("loss", ["fused_linear_ce", "liger_ce"])
def test_liger_losses_without_liger_are_one_clear_error(tmp_run, loss):
    with pytest.raises(AfptError, match=f"optim.loss={loss} needs liger-kernel"):
        pretrain.run(compose_config(tmp_run, [f"optim.loss={loss}"]))


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[o[0][-1] for o in BAD_INPUTS])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_run, overrides, message):
    with pytest.raises(AfptError, match=message.replace("(", r"\(").replace("[", r"\[")):
        pretrain.run(compose_config(tmp_run, overrides))
    assert not (tmp_run / "model").exists()
    assert not (tmp_run / "metrics.json").exists()


def test_empty_data_file_is_refused(tmp_run, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(AfptError, match="is empty"):
        pretrain.run(compose_config(tmp_run, ["data=files", f"data.files={empty}"]))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    code, err = afpt_cli(capsys, "forgetting.every_n_steps=-1", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(code, err, "forgetting.every_n_steps must be a positive integer, got -1")
    assert not (tmp_path / "run").exists()


def test_cli_lists_choices_for_an_unknown_model(tmp_path, capsys):
    code, err = afpt_cli(capsys, "model=gpt5", f"hydra.run.dir={tmp_path}")
    assert code != 0
    assert "mistral_400m" in err and "tiny" in err


def test_runs_without_any_logger(tmp_run):
    metrics = pretrain.run(compose_config(tmp_run, ["logger=none", "trainer.max_steps=2"]))
    assert metrics["global_step"] == 2 and (tmp_run / "model" / "model.safetensors").is_file()
