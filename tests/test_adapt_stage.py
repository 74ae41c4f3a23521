"""stage=adapt through the real configs: adaptation, CLP/FOCUS helpers, bad input, resume."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import compose_config, tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

import afpt.adapt.stage as adapt
import afpt.pretrain.stage as pretrain
from afpt.errors import AfptError


def test_pretrain_then_adapt_to_a_held_out_language(tmp_path):
    base_dir = tmp_path / "pretrain"
    pretrain.run(compose_config(base_dir, ["forgetting=none", "trainer.max_steps=30"]))
    out = tmp_path / "adapt"
    cfg = compose_config(
        out,
        [
            "stage=adapt",
            f"init_from={base_dir / 'model'}",
            "adapt.languages=[xd]",
            "adapt.new_tokens=256",
            "adapt.token_budget=5000",
            "adapt.eval_docs=8",
            "adapt.val_every_n_steps=10",
        ],
    )
    metrics = adapt.run(cfg)
    assert metrics["new_tokens"] > 100 and metrics["frozen_unchanged"]
    assert metrics["trainable_parameters"]["body"] == 0
    assert metrics["after"]["xd"]["ppl_char"] < metrics["before"]["xd"]["ppl_char"] / 100
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["vocab_size_after"] == len(AutoTokenizer.from_pretrained(out / "model"))
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.get_input_embeddings().weight.shape[0] >= saved["vocab_size_after"]
    assert (out / "adaptation.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("init", ["clp", "focus_helper", "focus"])
def test_clp_and_focus_initialise_the_new_rows(tmp_path, init):
    if init == "focus":
        pytest.importorskip("deepfocus")
    base_dir = tmp_path / "pretrain"
    pretrain.run(compose_config(base_dir, ["forgetting=none", "trainer.max_steps=4"]))
    cfg = compose_config(
        tmp_path / "adapt",
        [
            "stage=adapt",
            f"init_from={base_dir / 'model'}",
            "adapt.languages=[xe]",
            f"adapt.init={init}",
            "adapt.new_tokens=128",
            "adapt.token_budget=500",
            "adapt.eval_docs=4",
            "adapt.helper.steps=5",
            "adapt.helper.batch_size=4",
            "adapt.focus.min_count=2",
        ],
    )
    metrics = adapt.run(cfg)
    assert metrics["init"] == init and metrics["fallback_rows"] == 0 and metrics["new_tokens"] > 50


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapt.policy=everything"], "adapt.policy='everything' is unknown"),
        (["adapt.init=fasttext"], "adapt.init='fasttext' is unknown"),
        (["adapt.vocab_size=10"], "adapt.vocab_size=10 is smaller"),
        (["adapt.token_budget=0"], "adapt.token_budget must be a positive number of tokens, got 0"),
    ],
)
def test_adapt_bad_input(tmp_path, overrides, message):
    base_dir = tmp_path / "pretrain"
    pretrain.run(compose_config(base_dir, ["forgetting=none", "trainer.max_steps=2"]))
    out = tmp_path / "adapt"
    with pytest.raises(AfptError, match=message.replace("(", r"\(")):
        adapt.run(compose_config(out, ["stage=adapt", f"init_from={base_dir / 'model'}", *overrides]))
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


def test_adapt_refuses_a_model_without_tokenizer_and_an_empty_corpus(tmp_path):
    model = tiny_llama(tied=True)
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(AfptError, match="holds no tokenizer"):
        adapt.run(compose_config(tmp_path / "a", ["stage=adapt", f"init_from={tmp_path / 'bare'}"]))
    base_dir = tmp_path / "pretrain"
    pretrain.run(compose_config(base_dir, ["forgetting=none", "trainer.max_steps=2"]))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(AfptError, match="is empty"):
        adapt.run(
            compose_config(
                tmp_path / "b",
                [
                    "stage=adapt",
                    f"init_from={base_dir / 'model'}",
                    "data=files",
                    f"data.files={{xd: {empty}}}",
                    "adapt.languages=[xd]",
                ],
            )
        )
    assert not (tmp_path / "b" / "model").exists()
    sharded = ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    with pytest.raises(AfptError, match="stage=adapt runs on one device or under DDP"):
        adapt.run(compose_config(tmp_path / "c", ["stage=adapt", f"init_from={base_dir / 'model'}", *sharded]))
    assert not (tmp_path / "c" / "model").exists()


def test_adapt_resume_matches_an_uninterrupted_run(tmp_path):
    import shutil

    from safetensors.torch import load_file

    base_dir = tmp_path / "pretrain"
    pretrain.run(compose_config(base_dir, ["forgetting=none", "trainer.max_steps=4"]))
    common = [
        "stage=adapt",
        f"init_from={base_dir / 'model'}",
        "adapt.languages=[xd]",
        "adapt.new_tokens=128",
        "adapt.token_budget=1024",
        "adapt.eval_docs=4",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    full = tmp_path / "full"
    adapt.run(compose_config(full, common))
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "tokenizer", resumed / "tokenizer")
    adapt.run(compose_config(resumed, [*common, f"ckpt_path={full / 'checkpoints' / 'step4.ckpt'}"]))
    a, b = load_file(full / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_entry_stops_adaptation_but_never_pretraining(tmp_path, base_model):
    from afpt.stages import build_trainer

    callbacks = "callbacks=[default,early_stopping,rich_progress_bar,model_summary]"
    bar = "trainer.enable_progress_bar=true"
    pretrain_cfg = compose_config(tmp_path / "pre", [callbacks, bar])
    kinds = {type(c).__name__ for c in build_trainer(pretrain_cfg, tmp_path / "pre", []).callbacks}
    assert {"RichProgressBar", "RichModelSummary", "ModelCheckpoint"} <= kinds and "EarlyStopping" not in kinds
    out = tmp_path / "adapt"
    stop_at_once = ["callbacks.early_stopping.patience=0", "callbacks.early_stopping.min_delta=100"]
    cfg = compose_config(
        out,
        ["stage=adapt", f"init_from={base_model}", "adapt.languages=[xd]", "adapt.new_tokens=64"]
        + ["adapt.token_budget=5000", "adapt.eval_docs=4", "adapt.val_every_n_steps=10", callbacks, bar, *stop_at_once],
    )
    metrics = adapt.run(cfg)
    # 40 steps were budgeted; no validation loss improves by 100, so the stage stops after its second check.
    assert metrics["max_steps"] == 40 and metrics["global_step"] == 20
    assert (out / "model" / "model.safetensors").is_file()
