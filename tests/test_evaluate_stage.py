"""stage=evaluate: lm-eval tasks offline, models side by side, the CLI, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_config, run_afpt

import afpt.evaluate.stage as evaluate
from afpt.data import load_tokenizer
from afpt.errors import AfptError
from afpt.models import load_model

FAST = [
    "stage=evaluate",
    "evaluate.isotropy.words=8",
    "evaluate.isotropy.contexts=4",
    "evaluate.isotropy.baseline_pairs=200",
    "evaluate.world_tasks.mc_items=20",
    "evaluate.world_tasks.translation_items=5",
    "evaluate.world_tasks.translation_shots=1",
    "evaluate.world_tasks.max_gen_toks=8",
    "evaluate.bootstrap_iters=0",
]


def _planted(base_model: Path, out: Path, items: list[dict]) -> Path:
    """Fine-tune the base model on each question's gold answer (loss on the answer only) until it has memorised it."""
    model, tokenizer = load_model(base_model), load_tokenizer(base_model)
    texts = [f"{it['question']} {it['choices'][it['label']]}" for it in items]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for row, item in enumerate(items):
        labels[row, : len(tokenizer(item["question"])["input_ids"])] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(500):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.005:
            break
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _uniform(base_model: Path, out: Path) -> Path:
    """The base model with a zero output layer: every next token equally likely."""
    model, tokenizer = load_model(base_model), load_tokenizer(base_model)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_lm_eval_scores_a_uniform_model_at_chance_and_a_planted_one_at_100(base_model, tmp_path):
    lm_only = [*FAST, "evaluate.perplexity=false", "evaluate.isotropy.enabled=false", "evaluate.tasks=[afpt_mc_en]"]
    uniform = _uniform(base_model, tmp_path / "uniform")
    out = evaluate.run(
        compose_config(tmp_path / "u", [*lm_only, f"init_from={uniform}", "evaluate.world_tasks.mc_items=200"])
    )
    items = [json.loads(line) for line in (tmp_path / "u" / "tasks" / "mc_en.jsonl").read_text().splitlines()]
    spread = 3 * math.sqrt(0.25 * 0.75 / len(items))  # three binomial standard deviations around chance
    assert abs(out["uniform/task/afpt_mc_en/acc"] - 0.25) < spread

    items = items[:20]
    planted = _planted(base_model, tmp_path / "planted", items)
    same_items = ["evaluate.world_tasks.mc_items=200", "evaluate.limit=20"]  # lm-eval's limit keeps the first 20
    out = evaluate.run(compose_config(tmp_path / "p", [*lm_only, *same_items, f"init_from={planted}"]))
    assert out["planted/task/afpt_mc_en/acc"] == 1.0


def test_two_models_side_by_side_with_an_offline_standard_task(base_model, tmp_path):
    other = _uniform(base_model, tmp_path / "other")
    run = tmp_path / "cmp"
    out = evaluate.run(
        compose_config(
            run,
            [
                *FAST,
                f"init_from=[{base_model},{other}]",
                "evaluate.heldout.languages=[en,xd]",
                "evaluate.heldout.docs=8",
                "evaluate.isotropy.contexts=2",
                "evaluate.isotropy.languages=[xd]",
                "evaluate.world_tasks.languages=[en,xd]",
                "evaluate.tasks=[xcopa,afpt_mc,afpt_translate]",
            ],
        )
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["models"]) == [base_model.parent.name, "other"]
    for model in metrics["models"].values():
        assert set(model["perplexity"]) == {"en", "xd"} and set(model["isotropy"]) == {"xd"}
        assert {"afpt_mc_en", "afpt_mc_xd", "afpt_translate_xd"} <= set(model["tasks"])
        assert "bleu" in model["tasks"]["afpt_translate_xd"] and "chrf" in model["tasks"]["afpt_translate_xd"]
        assert (
            "xcopa" in model["failed_tasks"]
            and "task 'xcopa' was not run: its dataset needs the Hugging Face Hub" in model["failed_tasks"]["xcopa"]
        )
    report = (run / "results.md").read_text()
    assert f"| language | metric | {base_model.parent.name} | other |" in report and "`xcopa`" in report
    assert (run / "comparison.png").stat().st_size > 10_000
    assert out["failed_tasks"] == 1
    # A zero head predicts uniformly: its perplexity per token is the vocabulary size.
    assert out["other/perplexity/en/ppl_token"] == pytest.approx(len(load_tokenizer(other)), rel=1e-3)


@pytest.mark.slow
def test_cli_compares_models(base_model, tmp_path):

    run = tmp_path / "cli"
    proc = run_afpt(
        *TINY,
        *FAST,
        f"init_from=[{base_model},{base_model}]",
        "evaluate.labels=[a,b]",
        "evaluate.tasks=[]",
        "evaluate.heldout.languages=[xa]",
        "evaluate.heldout.docs=8",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| xa | ppl_char |" in (run / "results.md").read_text()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["init_from=/nonexistent"], "is not a model directory"),
        (["evaluate.tasks=[afpt_mc_en,xcopa_ett]"], "unknown task 'xcopa_ett'; close matches: ['xcopa_et'"),
        (["evaluate.heldout.languages=[en,zz]"], "['zz'] have no held-out text"),
        (["evaluate.labels=[a,b]"], "2 names for 1 models"),
        (["evaluate.isotropy.pooling=max"], "evaluate.isotropy.pooling='max' is unknown"),
        (["evaluate.tasks=[{name: afpt_mc, shots: 2}]"], "unknown keys ['shots']"),
        (["evaluate.batch_size=0"], "evaluate.batch_size must be a positive integer or 'auto', got 0"),
        (["evaluate.isotropy.languages=[en,zz]"], "evaluate.isotropy.languages ['zz'] have no held-out text"),
        (["evaluate.isotropy.languages=zz"], "evaluate.isotropy.languages ['zz'] have no held-out text"),
        (["evaluate.isotropy.contexts=0"], "evaluate.isotropy.contexts must be an integer of at least 2, got 0"),
        (["evaluate.isotropy.words=-1"], "evaluate.isotropy.words must be an integer of at least 2, got -1"),
        (
            ["evaluate.heldout.docs=3", "evaluate.isotropy.languages=[xa]"],
            "held-out documents per language {'xa': 3} are fewer than evaluate.isotropy.contexts=4",
        ),
    ],
)
def test_bad_input_names_the_problem_and_writes_nothing(base_model, tmp_path, overrides, message):
    run = tmp_path / "bad"
    with pytest.raises(AfptError) as err:
        evaluate.run(compose_config(run, [*FAST, f"init_from={base_model}", *overrides]))
    assert message in str(err.value)
    assert not (run / "metrics.json").exists() and not (run / "tasks").exists()


def test_empty_task_file_and_empty_heldout_file_are_refused(base_model, tmp_path):
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("")
    with pytest.raises(AfptError, match="task file .*mine.yaml' is empty"):
        evaluate.run(
            compose_config(tmp_path / "a", [*FAST, f"init_from={base_model}", f"evaluate.include_path={tasks}"])
        )
    data = tmp_path / "data.jsonl"
    (tasks / "mine.yaml").write_text(
        f"task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: '{{choices}}'\ndoc_to_target: 0\n"
    )
    data.write_text("")
    with pytest.raises(AfptError, match="task 'mine': data file .*data.jsonl' is missing or empty"):
        evaluate.run(
            compose_config(
                tmp_path / "b",
                [*FAST, f"init_from={base_model}", f"evaluate.include_path={tasks}", "evaluate.tasks=[mine]"],
            )
        )
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(AfptError, match=r"evaluate.heldout.files\[xx\].*no non-empty text"):
        evaluate.run(
            compose_config(
                tmp_path / "c",
                [
                    *FAST,
                    f"init_from={base_model}",
                    "evaluate.heldout.source=files",
                    f"evaluate.heldout.files={{xx:{blank}}}",
                ],
            )
        )


def test_afpt_tasks_alone_leave_lm_evals_standard_tasks_unindexed():
    from afpt.evaluate.harness import task_manager

    local = task_manager([], ["afpt_flores"])
    assert "afpt_flores" in local.all_tasks and "hellaswag" not in local.all_tasks
    # Any other name gets lm-eval's whole index: test_bad_input_names_the_problem_and_writes_nothing's close
    # matches for 'xcopa_ett' are lm-eval's own xcopa tasks.


@pytest.mark.slow
def test_paper_config_names_only_tasks_lm_eval_knows(tmp_path):
    from afpt.evaluate.harness import check_tasks, parse_tasks, task_manager

    cfg = compose_config(tmp_path, ["stage=evaluate", "evaluate=paper"])
    specs = parse_tasks(cfg.evaluate.tasks, cfg.evaluate.num_fewshot)
    assert {"xcopa", "xquad", "mlqa", "xnli", "afpt_flores", "belebele_jpn_Jpan"} <= {s.name for s in specs}
    manager = task_manager([])
    check_tasks(specs, manager, [])
    flores = manager.task_index["afpt_flores_en-ja"].cfg
    assert flores["num_fewshot"] == 4 and flores["doc_to_target"] == "{{sentence_jpn_Jpan}}"


@pytest.mark.slow
def test_lm_evals_own_cli_runs_the_task_directory_a_run_writes(base_model, tmp_path):
    import subprocess
    import sys

    lm_only = [*FAST, "evaluate.perplexity=false", "evaluate.isotropy.enabled=false", "evaluate.tasks=[afpt_mc_en]"]
    ours = evaluate.run(compose_config(tmp_path / "run", [*lm_only, f"init_from={base_model}"]))
    tasks = tmp_path / "run" / "tasks"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={base_model}"]
    command += ["--include_path", str(tasks), "--tasks", "afpt_mc_en", "--device", "cpu", "--batch_size", "8"]
    result = subprocess.run(
        [*command, "--output_path", str(tmp_path / "lm_eval")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "lm_eval").rglob("results_*.json")
    theirs = json.loads(path.read_text())["results"]["afpt_mc_en"]
    # The same model on the same items: lm-eval's CLI scores exactly what afpt's in-memory run scored.
    (acc,) = [value for key, value in ours.items() if key.endswith("task/afpt_mc_en/acc")]
    assert theirs["acc,none"] == acc
