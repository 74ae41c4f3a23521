"""Probabilistic temporary forgetting on real Trainer runs: what the body sees, what is stored, when it stops."""

from __future__ import annotations

import pytest
import torch
from helpers import UserGPT2, fit, tiny_llama
from lightning.pytorch import Callback

from afpt.errors import AfptError
from afpt.models import find_model
from afpt.pretrain.token_swap import ProbabilisticTemporaryForgetting, swap_draw


class EmbeddingOutputs(Callback):
    """Per step: the batch, the input embedding's training output (through any hooks), the stored rows and
    the optimizer state, all taken just before the step's forward."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        embedding = find_model(pl_module).get_input_embeddings()
        ids = batch["input_ids"]
        with torch.no_grad():
            shown = embedding(ids)
        state = trainer.optimizers[0].state.get(embedding.weight, {})
        self.records.append(
            {
                "step": trainer.global_step,
                "ids": ids.clone(),
                "shown": shown.clone(),
                "stored": embedding.weight.detach().clone(),
                "exp_avg": state["exp_avg"].clone() if "exp_avg" in state else None,
            }
        )


def test_swap_shows_fresh_vectors_for_drawn_tokens_only_during_its_phase():
    swap = ProbabilisticTemporaryForgetting(probability=0.3, stop_after_steps=3, std=0.02, seed=5, pad_token_id=None)
    seen, module = EmbeddingOutputs(), UserGPT2()
    fit(module, [swap, seen], max_steps=5)  # the swap draws first, then the recorder looks
    assert [r["step"] for r in seen.records] == [0, 1, 2, 3, 4]
    drawn_any = 0
    for record in seen.records[:3]:
        mask, fresh = swap_draw(96, 32, 0.3, 0.02, 5, record["step"], torch.device("cpu"))
        ids, shown, stored = record["ids"], record["shown"], record["stored"]
        swapped = mask[ids]
        drawn_any += int(swapped.sum())
        # Every occurrence of a drawn token shows that step's fresh vector; every other token its stored row.
        assert torch.equal(shown[swapped], fresh[ids][swapped])
        assert torch.equal(shown[~swapped], stored[ids][~swapped])
    assert drawn_any > 0
    for record in seen.records[3:]:  # the phase is over: the plain embedding, and the hook is gone
        assert torch.equal(record["shown"], record["stored"][record["ids"]])
    # Nothing was reset: Adam's moments of the embedding never return to zero after the first step.
    assert all(r["exp_avg"].abs().sum() > 0 for r in seen.records[1:])
    assert swap.history == [] and swap.swapped_rows > 0
    assert not module.model.get_input_embeddings()._forward_hooks


def test_swapped_positions_send_no_gradient_to_their_stored_row():
    model = tiny_llama(tied=False)  # untied: the input rows' gradient comes from the input side only
    embedding = model.get_input_embeddings()
    swap = ProbabilisticTemporaryForgetting(probability=0.5, stop_after_steps=10, std=0.02, seed=1, pad_token_id=None)
    swap._mask = torch.zeros(96, dtype=torch.bool)
    swap._mask[7] = True
    swap._fresh = torch.randn(96, 32)
    handle = embedding.register_forward_hook(swap._swap)
    ids = torch.tensor([[7, 7, 8, 9]])
    model(input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    assert not embedding.weight.grad[7].any() and embedding.weight.grad[8].any()


def test_swap_resumes_bit_exactly(tmp_path):
    import shutil

    from helpers import compose_config
    from safetensors.torch import load_file

    import afpt.pretrain.stage as pretrain

    common = [
        "forgetting=probabilistic_temporary",
        "forgetting.stop_after_steps=6",
        "forgetting.probability=0.2",
        "trainer.max_steps=8",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "callbacks.model_checkpoint.save_top_k=-1",
        "trainer.val_check_interval=4",
    ]
    full = tmp_path / "full"
    metrics = pretrain.run(compose_config(full, common))
    assert metrics["forgetting"] == "probabilistic_temporary" and metrics["resets"] == []
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "tokenizer", resumed / "tokenizer")
    pretrain.run(compose_config(resumed, [*common, f"ckpt_path={full / 'checkpoints' / 'step4.ckpt'}"]))
    a, b = load_file(full / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = tmp_path / "plain"
    pretrain.run(compose_config(plain, ["forgetting=none", *common[3:]]))
    c = load_file(plain / "model" / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the swaps changed training


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"probability": 0}, "probability"),
        ({"probability": 1.5}, "probability"),
        ({"stop_after_steps": 0}, "stop_after_steps"),
        ({"std": -1.0}, "std"),
    ],
)
def test_bad_swap_options_are_one_clear_error(kwargs, key):
    with pytest.raises(AfptError, match=f"forgetting.{key} must be"):
        ProbabilisticTemporaryForgetting(**kwargs)
