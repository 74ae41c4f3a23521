"""stage=instruct and stage=generate through the real configs."""

from __future__ import annotations

import pytest
from helpers import compose_config
from transformers import AutoTokenizer

import afpt.instruct.generate as generate
import afpt.instruct.stage as instruct
import afpt.pretrain.stage as pretrain
from afpt.data import DataError
from afpt.instruct.chat import CHATML_TEMPLATE, load_conversations


def test_tuning_on_world_questions_raises_the_gold_answer_likelihood(tmp_path, capsys):
    base = tmp_path / "pretrain"
    pretrain.run(compose_config(base, ["forgetting=none", "trainer.max_steps=20", "model.max_position_embeddings=256"]))
    out = tmp_path / "instruct"
    metrics = instruct.run(
        compose_config(
            out,
            [
                "stage=instruct",
                f"init_from={base / 'model'}",
                "instruct.epochs=2",
                "instruct.optim.lr=5e-3",
                "instruct.eval_questions=10",
                "instruct.max_length=256",
            ],
        )
    )
    assert metrics["after"]["answer_logprob_per_token"] > metrics["before"]["answer_logprob_per_token"] + 0.5
    assert metrics["overflowed"]["train"] == 0
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template == CHATML_TEMPLATE
    reply = generate.run(
        compose_config(
            tmp_path / "gen",
            ["stage=generate", f"init_from={out / 'model'}", "prompt=Where does Niran live?", "stage.max_new_tokens=8"],
        )
    )["reply"]
    assert reply in capsys.readouterr().out


def test_overlong_conversations_are_skipped_with_a_count(tmp_path):
    base = tmp_path / "pretrain"
    pretrain.run(compose_config(base, ["forgetting=none", "trainer.max_steps=2"]))
    with pytest.raises(DataError, match="no training conversation left"):
        instruct.run(
            compose_config(tmp_path / "i", ["stage=instruct", f"init_from={base / 'model'}", "instruct.max_length=8"])
        )
    assert not (tmp_path / "i" / "model").exists()


def test_tuning_without_heldout_conversations_trains_every_one(tmp_path):
    """heldout_fraction=0: no validation and no before/after questions, every conversation trains."""
    base = tmp_path / "pretrain"
    pretrain.run(compose_config(base, ["forgetting=none", "trainer.max_steps=2", "model.max_position_embeddings=256"]))
    overrides = [
        "stage=instruct",
        f"init_from={base / 'model'}",
        "instruct.heldout_fraction=0",
        "instruct.max_length=256",
    ]
    metrics = instruct.run(compose_config(tmp_path / "i", [*overrides, "instruct.epochs=1", "instruct.batch_size=64"]))
    assert metrics["heldout_conversations"] == 0 and metrics["before"] == {}
    assert metrics["global_step"] == -(-metrics["train_conversations"] // 64) and (tmp_path / "i" / "model").is_dir()


def test_empty_instruction_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        load_conversations({"format": "messages", "files": str(path)})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("instruct.epochs=0", "instruct.epochs must be an integer >= 1, got 0"),
        ("instruct.epochs=-1", "instruct.epochs must be an integer >= 1, got -1"),
        ("instruct.eval_questions=-5", "instruct.eval_questions must be an integer >= 0, got -5"),
        ("instruct.heldout_fraction=1.5", r"instruct.heldout_fraction must be a number in \[0, 1\), got 1.5"),
    ],
)
def test_bad_instruct_options_are_refused_before_any_work(tmp_path, override, message):
    """Each is one error naming the key, before the model is even looked for (``init_from`` does not exist)."""
    from afpt.errors import AfptError

    cfg = compose_config(tmp_path / "run", [f"init_from={tmp_path / 'no-model'}", override])
    with pytest.raises(AfptError, match=message):
        instruct.run(cfg)
    assert not (tmp_path / "run").exists()


def test_a_zero_instruct_batch_is_refused():
    from afpt.instruct.chat import InstructDataModule

    examples = [{"input_ids": [5, 6], "labels": [5, 6]}]
    with pytest.raises(DataError, match="instruct.batch_size must be a positive integer, got 0"):
        InstructDataModule(examples, [], 0, 0, 0)
