"""stage=pipeline: the whole study, its report and resume; every experiment config."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import afpt.conf
import pytest
from helpers import TINY, compose_config

import afpt.study.pipeline as pipeline
from afpt.data import world_from_config
from afpt.instruct.chat import world_conversations

FAST_STUDY = [
    "stage=pipeline",
    "adapt.token_budget=1024",
    "adapt.new_tokens=64",
    "adapt.tokenizer_sample_docs=60",
    "adapt.val_every_n_steps=4",
    "instruct.epochs=1",
    "callbacks.throughput.window=2",
    "instruct.eval_questions=2",
    "instruct.max_length=256",
    "model.max_position_embeddings=256",
    "evaluate.heldout.docs=8",
    "evaluate.isotropy.words=4",
    "evaluate.isotropy.contexts=2",
    "evaluate.isotropy.baseline_pairs=50",
    "evaluate.world_tasks.mc_items=8",
    "evaluate.world_tasks.translation_items=2",
    "evaluate.world_tasks.translation_shots=1",
    "evaluate.world_tasks.max_gen_toks=4",
    "evaluate.bootstrap_iters=0",
]


def _mtimes(study: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime for p in study.glob("*/metrics.json")}


@pytest.mark.slow
def test_pipeline_runs_every_stage_reports_and_resumes(tmp_path):
    study = tmp_path / "study"
    cfg = compose_config(study, [*FAST_STUDY])
    out = pipeline.run(cfg)
    stages = {f"{s}_{arm}" for s in ("pretrain", "adapt", "instruct") for arm in ("af", "baseline")} | {"evaluate"}
    assert stages <= set(_mtimes(study))
    af, base = (json.loads((study / f"pretrain_{a}" / "metrics.json").read_text()) for a in ("af", "baseline"))
    assert [r["step"] for r in af["resets"]] == [2, 4] and base["resets"] == []
    assert af["tokens_seen"] == base["tokens_seen"]  # everything but forgetting is equal
    evaluation = json.loads((study / "evaluate" / "metrics.json").read_text())
    models = ["baseline", "af", "baseline_adapted", "af_adapted", "baseline_instructed", "af_instructed"]
    assert set(evaluation["models"]) == set(models)
    assert "| language | metric | " + " | ".join(models) + " |" in (study / "evaluate" / "results.md").read_text()
    report = (study / "report" / "report.md").read_text()
    for section in ("## Pretraining", "## Adaptation", "## Instruction tuning", "## Evaluation of every model"):
        assert section in report
    for png in ("pretrain_af/loss.png", "adapt_af/adaptation.png", "evaluate/comparison.png"):
        assert (study / png).stat().st_size > 5_000
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):  # every plot the report links exists
        assert (study / "report" / link).is_file(), link
    assert "af/adapt/mean_ppl_char" in out and "adapt_ppl_char_gain" in out
    # One definition of held-out perplexity: adapt's "after" is the evaluate stage's number for the adapted model.
    for arm in ("af", "baseline"):
        adapted = json.loads((study / f"adapt_{arm}" / "metrics.json").read_text())
        for lang, values in adapted["after"].items():
            scored = evaluation["models"][f"{arm}_adapted"]["perplexity"][lang]["ppl_char"]
            assert values["ppl_char"] == pytest.approx(scored, rel=1e-4), (arm, lang)
    # Retention: every evaluated language's ratio after adaptation and instruction tuning, in the report too.
    models = evaluation["models"]

    def ppl(model: str, lang: str) -> float:
        return models[model]["perplexity"][lang]["ppl_char"]

    for lang in ("en", "xa", "xd"):
        expected = ppl("af_instructed", lang) / ppl("af_adapted", lang)
        assert out[f"af/retention/{lang}/instructed"] == pytest.approx(expected)
    assert out["af/retention/en/adapted"] == pytest.approx(ppl("af_adapted", "en") / ppl("af", "en"))
    assert "af/retention/xd/adapted" not in out  # a new language has no 'before' to retain
    assert re.search(r"\| af \| xd \| [^|]+ \| [^|]+ \| [^|]+ \| new \| [0-9.]+x \|", report)
    # Each stage's wall time and throughput; instruct counts its real (non-pad) tokens.
    assert "## Time and throughput of each stage" in report
    instructed = json.loads((study / "instruct_af" / "metrics.json").read_text())
    assert 0 < instructed["throughput"]["real_tokens_per_s"] < instructed["throughput"]["tokens_per_s"]
    assert f"| instruct_af | {instructed['wall_time_s']:.1f} |" in report
    assert re.search(r"\| evaluate \(6 models, cpu\) \| [0-9.]+ \|", report)
    assert "eval/af_adapted/task/afpt_mc/acc" in out and "eval/baseline/isotropy/mean/self_similarity" in out

    # Started again: nothing reruns.
    before = _mtimes(study)
    pipeline.run(compose_config(study, [*FAST_STUDY]))
    assert _mtimes(study) == before

    # Interrupted in adapt_baseline (no metrics.json, a half-written dir): that stage and what follows rerun.
    (study / "adapt_baseline" / "metrics.json").unlink()
    (study / "adapt_baseline" / "model" / "model.safetensors").unlink()
    pipeline.run(compose_config(study, [*FAST_STUDY]))
    after = _mtimes(study)
    rerun = {name for name in after if after[name] != before.get(name)}
    assert rerun == {"adapt_baseline", "instruct_baseline", "evaluate"}


def test_pipeline_needs_forgetting_to_compare(tmp_path):
    from afpt.errors import AfptError

    with pytest.raises(AfptError, match="compares forgetting with none"):
        pipeline.run(compose_config(tmp_path, ["stage=pipeline", "forgetting=none"]))


def test_forgetting_none_ignores_the_k_an_experiment_sets(tmp_path, caplog):
    """real_text sets forgetting.every_n_steps; with forgetting=none that K is ignored (a warning), not an error,
    and the pipeline still refuses to compare none with none."""
    from afpt.app.stages import build_forgetting
    from afpt.errors import AfptError

    cfg = compose_config(tmp_path, ["experiment=real_text", "forgetting=none"])
    assert dict(cfg.forgetting) == {"every_n_steps": 200}
    with caplog.at_level("WARNING", logger="afpt"):
        assert build_forgetting(cfg.forgetting) is None
    assert "forgetting=none: ignoring the forgetting options ['every_n_steps']" in caplog.text
    with pytest.raises(AfptError, match="compares forgetting with none"):
        pipeline.arms(cfg)
    on = compose_config(tmp_path, ["experiment=real_text"])
    assert type(build_forgetting(on.forgetting)).__name__ == "ActiveForgetting"


@pytest.mark.slow
def world_corpus(corpus: Path, cfg) -> Path:
    """World text in the man-page corpus's file layout (experiment=real_text's files), with instructions."""
    world = world_from_config(cfg.data.world)
    docs = {
        code: {part: world.documents(code, part, n) for part, n in (("train", 150), ("validation", 20))}
        for code in ("en", "xa", "xd")
    }
    for i, lang in enumerate(cfg.data.files):
        for part, chunk in docs[["en", "xa", "xd"][i % 3]].items():
            (corpus / lang).mkdir(parents=True, exist_ok=True)
            (corpus / lang / f"{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
    chats = [{"messages": m} for m in world_conversations(world, 0.1)[0][:40]]
    (corpus / "instruct.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return corpus


def plasticity_cell(tmp_path: Path) -> None:
    """experiment=plasticity's runs, as plasticity.sh names them, on world text: then its report."""
    import subprocess
    import sys

    import afpt.adapt.stage as adapt
    import afpt.pretrain.stage as pretrain

    cfg = compose_config(tmp_path, ["experiment=plasticity"], tiny=False)
    assert cfg.forgetting.episode_lr and cfg.trainer.max_steps // cfg.forgetting.every_n_steps >= 20
    assert cfg.adapt.corpus_tokens and cfg.pipeline.instruct is False
    chen = compose_config(tmp_path, ["experiment=plasticity", "adapt=chen"], tiny=False).adapt
    assert (chen.tokenizer, chen.reinit, chen.keep_best) == ("replace", "all_rows", True)
    corpus = world_corpus(tmp_path / "corpus", compose_config(tmp_path, ["experiment=plasticity"]))
    runs = tmp_path / "runs"
    common = ["experiment=plasticity", f"corpus_dir={corpus}", "model=tiny", "trainer.max_steps=8"]
    common += [
        "trainer.val_check_interval=4",
        "data.block_size=64",
        "data.batch_size=4",
        "data.tokenizer.sample_docs=50",
    ]
    for arm, forgetting in (("base", "forgetting=none"), ("k2", "forgetting.every_n_steps=2")):
        pre = runs / f"pre_llama_6m_{arm}_s0"
        pretrain.run(compose_config(pre, [*common, forgetting]))
        for protocol, group in (("chen", "adapt=chen"), ("afa", "adapt=default")):
            adapt.run(
                compose_config(
                    runs / f"ada_llama_6m_{arm}_s0_{protocol}_2000",
                    [*common, "stage=adapt", group, f"init_from={pre / 'model'}", "adapt.corpus_tokens=2000"]
                    + [
                        "adapt.token_budget=2560",
                        "adapt.val_every_n_steps=4",
                        "adapt.eval_docs=4",
                        "adapt.vocab_size=600",
                    ],
                )
            )
    report = Path(__file__).parents[1] / "experiments" / "plasticity_report.py"
    done = subprocess.run([sys.executable, report, runs, "--out", tmp_path / "report"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| llama_6m | k2 | 3 | 1 |" in text  # the gate row: 3 resets in 8 steps at K=2
    assert "| llama_6m | chen | 2,000 | k2 | 1 |" in text and "| llama_6m | afa | 2,000 | k2 | 1 |" in text
    assert (tmp_path / "report" / "curves.png").read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader((tmp_path / "report" / "runs.csv").open()))
    assert len(rows) == 6  # 2 pretraining runs, 2 arms x 2 protocols of adaptation
    k2 = next(r for r in rows if r["stage"] == "pretrain" and r["arm"] == "k2")
    assert k2["resets"] == "3" and float(k2["val_loss"]) == pytest.approx(
        json.loads((runs / "pre_llama_6m_k2_s0" / "metrics.json").read_text())["val/loss"], abs=1e-4
    )
    assert {r["protocol"] for r in rows if r["stage"] == "adapt"} == {"chen", "afa"}


# The end-to-end studies (pretrain, adapt and more on CPU, 15-50 s each) run with the slow tests.
STUDIES = {"world_study", "real_text", "plasticity"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name in STUDIES else name
        for name in sorted(p.stem for p in (Path(afpt.conf.__file__).parent / "experiment").glob("*.yaml"))
    ],
)
def test_every_experiment_config_runs(tmp_path, name):
    """Each experiment composes; a fast run exercises it (the paper one pretrains on the world, on CPU)."""
    if name == "afa_paper":
        cfg = compose_config(tmp_path, [f"experiment={name}"], tiny=False)
        assert cfg.model.family == "mistral" and cfg.model.vocab_size == 32000 and not cfg.model.tie_word_embeddings
        assert cfg.forgetting.every_n_steps == 10000 and cfg.trainer.max_steps == 150000
        assert cfg.adapt.vocab_size == 48000 and cfg.data.source == "hub" and cfg.evaluate.heldout.source == "hub"
        assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.0 and cfg.optim.warmup_fraction == 0.1
        assert len(cfg.data.languages) == 12 and cfg.data.mixture_alpha == 1.0 and cfg.data.hub.max_tokens is None
        overrides = [
            f"experiment={name}",
            "stage=pretrain",
            "data=world",
            "trainer=cpu",
            "trainer.devices=1",
            "trainer.precision=32-true",
            "optim.compile=false",
            "optim.fused=false",
            "model.num_kv_heads=null",
            "model.max_position_embeddings=64",
            "data.block_size=32",
            "data.num_workers=0",
            "data.pin_memory=false",
            "callbacks.model_checkpoint.every_n_train_steps=3",
            "trainer.val_check_interval=3",
            *TINY,
        ]
        import afpt.pretrain.stage as pretrain

        metrics = pretrain.run(compose_config(tmp_path, overrides, tiny=False))
        assert metrics["global_step"] == 6
    elif name == "real_text":
        # The man-page corpus is experiment data: the config runs here on world text in the same file layout.
        cfg = compose_config(tmp_path, [f"experiment={name}"])
        new = list(cfg.data.new_languages)
        assert set(new).isdisjoint(cfg.data.languages or []) and set(new) <= set(cfg.data.files)
        assert cfg.evaluate.heldout.files == cfg.data.validation_files and cfg.instruct.source == "dataset"
        corpus = world_corpus(tmp_path / "corpus", cfg)
        fast = [o for o in FAST_STUDY if not o.startswith("evaluate.world_tasks")]
        out = pipeline.run(
            compose_config(
                tmp_path / "study",
                [
                    f"experiment={name}",
                    f"corpus_dir={corpus}",
                    "model=tiny",
                    "trainer.max_steps=4",
                    "forgetting.every_n_steps=2",
                    "data.block_size=64",
                    "data.batch_size=4",
                    "instruct.batch_size=8",
                    "data.tokenizer.sample_docs=50",
                    *fast,
                ],
            )
        )
        assert {f"af/adapt/{lang}/ppl_char" for lang in new} <= set(out)
        assert "af/retention/en/instructed" in out
    elif name == "plasticity":
        plasticity_cell(tmp_path)
    else:
        cfg = compose_config(tmp_path, [f"experiment={name}"])
        assert cfg.stage.name == "pipeline"
        assert pipeline.run(compose_config(tmp_path, [f"experiment={name}", *FAST_STUDY]))["af/adapt/mean_ppl_char"] > 0


@pytest.mark.parametrize("instruct", [True, False])
def test_the_pipeline_is_a_list_of_steps_each_starting_from_the_last(tmp_path, instruct):
    cfg = compose_config(tmp_path, [f"pipeline.instruct={str(instruct).lower()}"])
    steps = pipeline.plan(cfg, tmp_path)
    chain = ["pretrain", "adapt", "instruct"] if instruct else ["pretrain", "adapt"]
    arms = [(f"{stage}_{arm}", stage) for arm in ("af", "baseline") for stage in chain]
    assert [(s.name, s.stage) for s in steps] == [*arms, ("evaluate", "evaluate")]
    for before, step in zip(steps, steps[1:-1]):
        if step.stage != "pretrain":  # each later stage starts from the model of the step before it
            assert step.after == before.name and step.keys["init_from"] == str(tmp_path / before.name / "model")
    assert steps[0].keys["forgetting"] is cfg.forgetting and steps[len(chain)].keys["forgetting"] is None
    evaluate = steps[-1]
    assert evaluate.after == "*" and evaluate.keys["evaluate.labels"][:4] == [
        "baseline",
        "af",
        "baseline_adapted",
        "af_adapted",
    ]
    sub = pipeline.sub_config(cfg, evaluate, tmp_path / "evaluate")
    assert sub.stage.name == "evaluate" and list(sub.evaluate.labels) == evaluate.keys["evaluate.labels"]
    assert list(sub.init_from) == evaluate.keys["init_from"] and cfg.evaluate.labels != sub.evaluate.labels
