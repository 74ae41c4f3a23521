"""ActiveForgetting on real Trainer runs: reset timing, values, optimizer state, heads, schedules."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import UserGPT2, fit, tiny_llama
from lightning.pytorch import Callback

from afpt import ActiveForgetting, CausalLMModule
from afpt.errors import AfptError
from afpt.pretrain.forgetting import find_model, reinitialize_, reset_seed
from afpt.pretrain.schedule import episode_step, lr_factor


class Snapshot(Callback):
    """Copies of the embedding, head and optimizer state at every ``on_train_batch_start``."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        model = find_model(pl_module)
        names = {p: n for n, p in model.named_parameters()}
        optimizer = trainer.optimizers[0]
        state = {
            names[p]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
            for p, s in optimizer.state.items()
        }
        self.records.append(
            {
                "step": trainer.global_step,
                "batch_idx": batch_idx,
                "emb": model.get_input_embeddings().weight.detach().clone(),
                "head": model.get_output_embeddings().weight.detach().clone(),
                "state": state,
                "emb_name": names[model.get_input_embeddings().weight],
            }
        )


def expected_reset(shape, seed: int, index: int, name: str, std: float, pad: int | None) -> torch.Tensor:
    """What reset ``index`` must produce: N(0, std) from the (seed, index) generator, pad row zero."""
    generator = torch.Generator().manual_seed(reset_seed(seed, index, name))
    values = torch.randn(shape, generator=generator) * std
    if pad is not None:
        values[pad] = 0
    return values


def run_with_snapshots(module, forgetting, max_steps, **kwargs):
    before, after = Snapshot(), Snapshot()
    trainer = fit(module, [before, forgetting, after], max_steps, **kwargs)
    return trainer, before.records, after.records


def test_resets_at_exactly_k_2k_and_not_after_final_step():
    module = CausalLMModule(tiny_llama(tied=True), lr=1e-2, warmup_fraction=0.0)
    forgetting = ActiveForgetting(every_n_steps=3, seed=7)
    _, before, after = run_with_snapshots(module, forgetting, max_steps=9)
    assert [h["step"] for h in forgetting.history] == [3, 6]
    shape = after[0]["emb"].shape
    expected = {i: expected_reset(shape, 7, i, "embedding", 0.02, pad=0) for i in (1, 2)}
    for b, a in zip(before, after):
        if a["step"] in (3, 6):
            assert torch.equal(a["emb"], expected[a["step"] // 3])
            assert not torch.equal(b["emb"], a["emb"])
            assert torch.count_nonzero(a["emb"][0]) == 0, "padding row must be zero after a reset"
        else:
            assert torch.equal(b["emb"], a["emb"]), f"unexpected change at step {a['step']}"
            assert not any(torch.equal(a["emb"], e) for e in expected.values())
    assert after[-1]["step"] == 8, "training ends at step 9 without another reset"
    assert all(np.isfinite(h["loss_before"]) and np.isfinite(h["loss_after"]) for h in forgetting.history)


@pytest.mark.parametrize("policy", ["auto", "always", "never"])
def test_untied_head_follows_policy(policy):
    module = CausalLMModule(tiny_llama(tied=False), lr=1e-2)
    forgetting = ActiveForgetting(every_n_steps=2, head=policy, seed=3)
    _, before, after = run_with_snapshots(module, forgetting, max_steps=3)
    b, a = before[2], after[2]
    assert a["step"] == 2 and not torch.equal(b["emb"], a["emb"])
    head_expected = expected_reset(a["head"].shape, 3, 1, "head_weight", 0.02, pad=None)
    if policy == "always":
        assert torch.equal(a["head"], head_expected)
    else:
        assert torch.equal(a["head"], b["head"])
        assert a["state"]["lm_head.weight"]["exp_avg"].abs().sum() > 0


def test_tied_head_is_reset_with_the_embedding_and_never_is_refused():
    module = CausalLMModule(tiny_llama(tied=True), lr=1e-2)
    forgetting = ActiveForgetting(every_n_steps=2)
    _, _, after = run_with_snapshots(module, forgetting, max_steps=3)
    assert torch.equal(after[2]["head"], after[2]["emb"])
    with pytest.raises(AfptError, match="tied"):
        fit(CausalLMModule(tiny_llama(tied=True)), [ActiveForgetting(every_n_steps=2, head="never")], 2)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_optimizer_state_of_exactly_the_embedding_is_zeroed(fused):
    module = UserGPT2(fused=fused)  # a user's own module, tied GPT-2
    forgetting = ActiveForgetting(every_n_steps=2)
    _, before, after = run_with_snapshots(module, forgetting, max_steps=5)
    emb_name = after[0]["emb_name"]
    for b, a in zip(before, after):
        for name, state in a["state"].items():
            reset_now = a["step"] in (2, 4) and name == emb_name
            for key, value in state.items():
                if reset_now:
                    assert torch.is_tensor(value) and torch.count_nonzero(value) == 0, (name, key)
                else:
                    assert torch.equal(value, b["state"][name][key]), (a["step"], name, key)
    assert torch.is_tensor(after[2]["state"][emb_name]["step"])
    # after the reset, the embedding's own step counter restarts while the body's goes on
    assert float(after[3]["state"][emb_name]["step"]) == 1.0
    assert float(after[3]["state"]["transformer.h.0.mlp.c_fc.weight"]["step"]) == 3.0


def test_reset_values_do_not_depend_on_the_global_rng():
    class TouchGlobalRng(Callback):
        def on_train_batch_start(self, *args):
            torch.randn(100)
            random.random()
            np.random.rand()

    resets = []
    for extra in ([], [TouchGlobalRng()]):
        snapshot = Snapshot()
        fit(UserGPT2(), [*extra, ActiveForgetting(every_n_steps=2, seed=11), snapshot], max_steps=3)
        resets.append(snapshot.records[2]["emb"])
    assert torch.equal(resets[0], resets[1])


def test_gradient_accumulation_counts_optimizer_steps():
    module = CausalLMModule(tiny_llama(tied=True), lr=1e-2)
    forgetting = ActiveForgetting(every_n_steps=2)
    _, before, after = run_with_snapshots(module, forgetting, max_steps=6, accumulate_grad_batches=2)
    assert [h["step"] for h in forgetting.history] == [2, 4]
    changed = [a["batch_idx"] for b, a in zip(before, after) if not torch.equal(b["emb"], a["emb"])]
    assert changed == [4, 8], "reset before the first micro-batch after optimizer steps 2 and 4"


def test_episode_lr_schedule_shape():
    class LrRecorder(Callback):
        def __init__(self):
            self.emb, self.body = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
            self.emb.append(groups["embeddings"])
            self.body.append(groups["decay"])

    module = CausalLMModule(tiny_llama(tied=True), lr=1e-2, warmup_fraction=0.0, decay="cosine")
    forgetting = ActiveForgetting(
        every_n_steps=4, episode_lr=True, episode_warmup_fraction=0.25, episode_decay="linear", total_steps=12
    )
    recorder = LrRecorder()
    fit(module, [forgetting, recorder], max_steps=12)
    # T=12, K=4: episode steps 0,3,6,9 in every episode; warmup 3 steps, then linear decay to 0 over 9.
    one_episode = [1e-2 * f for f in (1 / 3, 1.0, 2 / 3, 1 / 3)]
    assert recorder.emb == pytest.approx(one_episode * 3)
    assert recorder.body[:4] != pytest.approx(recorder.body[4:8]), "the body keeps its own global schedule"
    assert recorder.body == pytest.approx([1e-2 * lr_factor(s, 12, 0, 0.1, "cosine") for s in range(12)])


def test_schedule_functions():
    assert [episode_step(s, 150_000, 10_000) for s in (0, 1, 9_999, 10_000)] == [0, 15, 149_985, 0]
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_mean_std_init_keeps_per_dimension_statistics():
    weight = torch.randn(4096, 32) * torch.linspace(0.5, 3.0, 32) + torch.arange(32.0)
    mean, std = weight.mean(0), weight.std(0)
    reinitialize_(weight, torch.Generator().manual_seed(1), init="mean_std", pad_token_id=3, mean_std_scope="dim")
    assert torch.allclose(weight.mean(0), mean, atol=float(0.1 * std.max()))
    assert torch.allclose(weight.std(0), std, rtol=0.1)
    assert torch.count_nonzero(weight[3]) == 0


def test_mean_std_matrix_scope_draws_from_one_scalar_mean_and_std():
    weight = torch.randn(4096, 32) * torch.linspace(0.5, 3.0, 32) + torch.arange(32.0)
    mean, std = weight.mean(), weight.std()
    reinitialize_(weight, torch.Generator().manual_seed(1), init="mean_std")  # Chen et al.'s scalar variant
    assert weight.mean().item() == pytest.approx(mean.item(), abs=0.05)
    assert weight.std().item() == pytest.approx(std.item(), rel=0.02)
    # One distribution for every dimension: the per-dimension means no longer follow arange(32).
    assert weight.mean(0).std() < 0.2 and weight.std(0).min() > 0.9 * std


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10"])
def test_bad_every_n_steps_is_one_clear_error(bad):
    with pytest.raises(AfptError, match="every_n_steps must be a positive integer"):
        ActiveForgetting(every_n_steps=bad)


def test_module_without_embeddings_is_refused():
    class NoEmbeddings(UserGPT2):
        def __init__(self):
            super().__init__()
            self.net = self.model
            del self.model

        def training_step(self, batch, batch_idx):
            return self.net(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    with pytest.raises(TypeError, match="get_input_embeddings"):
        fit(NoEmbeddings(), [ActiveForgetting(every_n_steps=2)], 2)


def test_temporary_forgetting_stops_after_its_step():
    forgetting = ActiveForgetting(every_n_steps=4, stop_after_steps=6)
    fit(CausalLMModule(tiny_llama(tied=True), lr=1e-2), [forgetting], max_steps=12)
    assert [h["step"] for h in forgetting.history] == [4]


@pytest.mark.parametrize("tied", [True, False])
def test_partial_reset_redraws_exactly_the_drawn_rows_and_their_moments(tied):
    from afpt.pretrain.forgetting import reset_rows

    module = CausalLMModule(tiny_llama(tied=tied), lr=1e-2)
    forgetting = ActiveForgetting(every_n_steps=4, fraction=0.25, seed=5, head="always")
    _, before, after = run_with_snapshots(module, forgetting, max_steps=5)
    b, a = before[4], after[4]  # the first batch after step 4: the reset happened between the two snapshots
    rows = reset_rows(96, 0.25, 5, 1)
    assert len(rows) == round(0.25 * 96) == forgetting.history[0]["rows"]
    kept = torch.ones(96, dtype=torch.bool)
    kept[rows] = False
    expected = expected_reset((96, 32), 5, 1, "embedding", 0.02, pad=None)
    pad_in_rows = 0 in rows.tolist()  # the padding row (id 0) is zeroed only when it is drawn
    expected[0] = 0 if pad_in_rows else expected[0]
    assert torch.equal(a["emb"][kept], b["emb"][kept])
    assert torch.equal(a["emb"][rows], expected[rows])
    emb = b["emb_name"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a["state"][emb][key][kept], b["state"][emb][key][kept])
        assert not a["state"][emb][key][rows].any()
    assert torch.equal(a["state"][emb]["step"], b["state"][emb]["step"])  # per tensor: left alone
    if not tied:
        assert torch.equal(a["head"][kept], b["head"][kept]) and not torch.equal(a["head"][rows], b["head"][rows])


def test_the_model_is_saved_at_the_end_of_each_episode(tmp_path):
    from transformers import AutoModelForCausalLM

    module = CausalLMModule(tiny_llama(tied=True), lr=1e-2)
    forgetting = ActiveForgetting(every_n_steps=2, save_before_reset=True)
    _, before, _ = run_with_snapshots(module, forgetting, max_steps=5, default_root_dir=str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "episodes").iterdir()) == ["step2", "step4"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "episodes" / "step4")
    assert torch.equal(saved.get_input_embeddings().weight, before[4]["emb"])  # the trained rows, not the reset


def test_probabilistic_reset_redraws_each_row_with_its_probability_until_it_stops():
    from afpt.pretrain.forgetting import reset_rows

    module = CausalLMModule(tiny_llama(tied=True), lr=1e-2)
    forgetting = ActiveForgetting(every_n_steps=2, row_probability=0.3, stop_after_steps=5, seed=3, pad_token_id=None)
    _, before, after = run_with_snapshots(module, forgetting, max_steps=8)
    assert [h["step"] for h in forgetting.history] == [2, 4]
    drawn = [reset_rows(96, 1.0, 3, i, row_probability=0.3) for i in (1, 2)]
    assert [h["rows"] for h in forgetting.history] == [len(r) for r in drawn]
    assert len(drawn[0]) != len(drawn[1]) or not torch.equal(drawn[0], drawn[1])  # a fresh draw per reset
    counts = [len(reset_rows(96, 1.0, 3, i, row_probability=0.3)) for i in range(1, 201)]
    assert abs(sum(counts) / len(counts) - 0.3 * 96) < 1.0  # Bernoulli(0.3) per row: mean 28.8 rows
    for step, rows in zip((2, 4), drawn):
        b, a = before[step], after[step]
        kept = torch.ones(96, dtype=torch.bool)
        kept[rows] = False
        expected = expected_reset((96, 32), 3, step // 2, "embedding", 0.02, pad=None)
        assert torch.equal(a["emb"][kept], b["emb"][kept])
        assert torch.equal(a["emb"][rows], expected[rows])
        for key in ("exp_avg", "exp_avg_sq"):
            state = a["state"][b["emb_name"]][key]
            assert torch.equal(state[kept], b["state"][b["emb_name"]][key][kept]) and not state[rows].any()
    assert torch.equal(before[6]["emb"], after[6]["emb"])  # stopped: no reset at step 6


@pytest.mark.parametrize(
    "bad",
    [
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"stop_after_steps": 0},
        {"row_probability": 0.0},
        {"row_probability": 2},
        {"row_probability": 0.5, "fraction": 0.5},
        {"mean_std_scope": "row"},
    ],
)
def test_bad_variant_options_are_one_clear_error(bad):
    with pytest.raises(AfptError, match=f"forgetting.{next(iter(bad))} must be"):
        ActiveForgetting(every_n_steps=2, **bad)
