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
    from afpt.app.stages import build_trainer

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


def test_chen_relearning_replaces_the_tokenizer_and_every_row_and_keeps_the_best_weights(tmp_path, base_model):
    from safetensors.torch import load_file

    out = tmp_path / "relearn"
    cfg = compose_config(
        out,
        [
            "stage=adapt",
            f"init_from={base_model}",
            "adapt.languages=[xd]",
            "adapt.tokenizer=replace",
            "adapt.reinit=all_rows",
            "adapt.policy=embeddings",
            "adapt.vocab_size=400",
            "adapt.corpus_tokens=300",
            "adapt.token_budget=6000",
            "adapt.val_every_n_steps=5",
            "adapt.eval_docs=4",
            "adapt.optim.lr=0.1",  # 20 epochs over 7 blocks: validation loss turns up, so the best step is early
        ],
    )
    metrics = adapt.run(cfg)
    new_tok, old_tok = AutoTokenizer.from_pretrained(out / "model"), AutoTokenizer.from_pretrained(base_model)
    assert len(new_tok) == 400 and new_tok.get_vocab() != old_tok.get_vocab()
    assert new_tok.get_vocab() == AutoTokenizer.from_pretrained(out / "tokenizer").get_vocab()
    before, after = load_file(base_model / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    emb = "model.embed_tokens.weight"
    assert after[emb].shape[0] == 448  # 400 tokens, padded to a multiple of 64
    rows = min(before[emb].shape[0], after[emb].shape[0])
    assert (before[emb][:rows] != after[emb][:rows]).any(dim=1).all()  # every row was redrawn and relearned
    assert all(torch.equal(before[k], after[k]) for k in before if k != emb)  # the body, bit for bit
    # The corpus: the xd documents holding 300 tokens, 7 blocks of 32 under the final tokenizer, trained on for
    # 6000 / (4 x 32) = 47 steps.
    assert metrics["corpus_tokens"] == 7 * 32 and metrics["max_steps"] == 47 and metrics["epochs"] > 1
    curve = dict(metrics["val_curve"])
    assert sorted(curve) == [5, 10, 15, 20, 25, 30, 35, 40, 45, 47]
    assert metrics["best_val_loss"] == min(curve.values()) and curve[metrics["best_step"]] == metrics["best_val_loss"]
    assert metrics["best_step"] < 47
    # The saved weights are the best step's: their validation loss is the best one, not the last one.
    from afpt.data import load_corpus, pack_corpus

    corpus = load_corpus(cfg.data, ["xd"])
    _, val = pack_corpus(corpus, new_tok, 32, cfg.data.max_val_blocks)
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with torch.no_grad():
        losses = [model(input_ids=b["input_ids"][None], labels=b["input_ids"][None]).loss for b in val["xd"]]
    assert float(torch.stack(losses).mean()) == pytest.approx(metrics["best_val_loss"], rel=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapt.tokenizer=swap"], "adapt.tokenizer='swap' is unknown"),
        (["adapt.reinit=some"], "adapt.reinit='some' is unknown"),
        (["adapt.tokenizer=replace"], "adapt.tokenizer=replace needs adapt.reinit=all_rows"),
        (["adapt.reinit=all_rows"], "adapt.reinit=all_rows with adapt.policy=new_rows_and_head"),
        (["adapt.corpus_tokens=0"], "adapt.corpus_tokens must be null or a positive number of tokens, got 0"),
    ],
)
def test_protocol_bad_input(tmp_path, base_model, overrides, message):
    out = tmp_path / "adapt"
    with pytest.raises(AfptError, match=message):
        adapt.run(compose_config(out, ["stage=adapt", f"init_from={base_model}", *overrides]))
    assert not (out / "model").exists()


def test_splice_joins_an_english_tuned_body_with_relearned_embeddings(tmp_path):
    from safetensors.torch import load_file

    import afpt.instruct.stage as instruct
    from afpt.adapt import splice

    pretrain.run(
        compose_config(
            tmp_path / "pre", ["forgetting=none", "trainer.max_steps=4", "model.max_position_embeddings=256"]
        )
    )
    base_model = tmp_path / "pre" / "model"
    body_dir, vocab_dir, out = tmp_path / "instruct", tmp_path / "relearn", tmp_path / "splice"
    instruct.run(
        compose_config(
            body_dir,
            ["stage=instruct", f"init_from={base_model}", "instruct.freeze_embeddings=true", "instruct.epochs=1"]
            + ["instruct.eval_questions=0", "instruct.max_length=256"],
        )
    )
    adapt.run(
        compose_config(
            vocab_dir,
            ["stage=adapt", f"init_from={base_model}", "adapt.languages=[xd]", "adapt.tokenizer=replace"]
            + ["adapt.reinit=all_rows", "adapt.policy=embeddings", "adapt.vocab_size=400", "adapt.token_budget=640"]
            + ["adapt.eval_docs=4"],
        )
    )
    base, body = load_file(base_model / "model.safetensors"), load_file(body_dir / "model" / "model.safetensors")
    emb = "model.embed_tokens.weight"
    assert torch.equal(base[emb], body[emb])  # frozen through instruction tuning
    assert any(not torch.equal(base[k], body[k]) for k in base if k != emb)  # while the body learned
    metrics = splice.run(
        compose_config(
            out, ["stage=splice", f"init_from={vocab_dir / 'model'}", f"splice.body_from={body_dir / 'model'}"]
        )
    )
    vocab, spliced = (
        load_file(vocab_dir / "model" / "model.safetensors"),
        load_file(out / "model" / "model.safetensors"),
    )
    assert torch.equal(spliced[emb], vocab[emb]) and metrics["vocab_size"] == 400
    assert all(torch.equal(spliced[k], body[k]) for k in body if k != emb)
    assert (
        AutoTokenizer.from_pretrained(out / "model").get_vocab()
        == AutoTokenizer.from_pretrained(vocab_dir / "model").get_vocab()
    )
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # loads as a plain HF model, tied as before
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with pytest.raises(AfptError, match="splice needs splice.body_from"):
        splice.run(compose_config(tmp_path / "x", ["stage=splice", f"init_from={vocab_dir / 'model'}"]))
