"""Faults and bad input as a user hits them: one line and exit 2, nothing half-written, nothing lost."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, afpt_cli, assert_one_line_error, run_afpt, tiny_llama
from safetensors.torch import load_file

from afpt.app.rundir import HOLDER_NAME, LOCK_NAME
from afpt.artifacts.io import atomic_save, clean_stale
from afpt.data.sources import corpus_parts
from afpt.data.tokenizer import train_tokenizer
from afpt.errors import AfptError
from afpt.models import save_model_dir

FAST = [
    *TINY,
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    """Real files a user might point afpt at by mistake."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 50)
    (folder / "latin1.txt").write_bytes("caf\xe9 r\xe9sum\xe9\n".encode("latin-1") * 50)
    lines = [json.dumps({"text": f"document {i} " * 10}) for i in range(40)]
    (folder / "malformed.jsonl").write_text("\n".join([*lines[:7], '{"text": "cut', *lines[7:]]) + "\n")
    half = [json.dumps({"text": f"doc {i} " * 10} if i % 2 else {"body": "x"}) for i in range(40)]
    (folder / "half.jsonl").write_text("\n".join(half) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": list(range(40))}), folder / "ints.parquet")
    return folder


@pytest.mark.parametrize(
    "case, needles",
    [
        ("binary.txt", ["binary.txt", "binary file"]),
        ("latin1.txt", ["latin1.txt", "line 1", "not UTF-8"]),
        ("malformed.jsonl", ["malformed.jsonl", "line 8", "not valid JSON"]),
        ("half.jsonl", ["half.jsonl line 1", "20 of 40 records", "data.max_dropped_fraction"]),
        ("ints.parquet", ["ints.parquet", "'text'", "not text"]),
    ],
)
def test_a_bad_data_file_is_one_line_naming_file_and_line(tmp_path, monkeypatch, capsys, bad_files, case, needles):
    monkeypatch.chdir(tmp_path)
    code, err = afpt_cli(capsys, *FAST, "data=files", f"data.files={bad_files / case}", "name=bad")
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "runs" / "bad").exists()


def test_dropped_records_are_counted_and_allowed_below_the_threshold(tmp_path):
    lines = [json.dumps({"text": f"doc {i} " * 10} if i != 3 else {"body": "x"}) for i in range(200)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {"source": "files", "files": str(tmp_path / "a.jsonl"), "max_dropped_fraction": 0.01}
    train, validation = corpus_parts(cfg)
    assert train[0].records == {"data.files[default]": {"records": 200, "dropped": 1}}
    assert sum(1 for _ in train[0].documents(0)) + sum(1 for _ in validation[0].documents(0)) == 199
    with pytest.raises(AfptError, match=r"1 of 200 records .*a\.jsonl line 4"):
        corpus_parts({**cfg, "max_dropped_fraction": 0.0})


def checkpoint_file(folder: Path, evil: bool) -> Path:
    """A pickle that runs code when unpickled, or a checkpoint cut short."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'PWNED'}",))

    path = folder / ("evil.ckpt" if evil else "cut.ckpt")
    torch.save({"state_dict": Evil() if evil else {"w": torch.zeros(1000)}}, path)
    if not evil:
        path.write_bytes(path.read_bytes()[:300])
    return path


def automap_model(tmp_path: Path, model_type: str) -> Path:
    """A saved tiny model whose config names custom code (``auto_map``)."""
    path = tmp_path / f"automap_{model_type}"
    tiny_llama(True).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoModelForCausalLM": "evil.EvilModel"})
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "case, needles",
    [
        ("evil", ["evil.ckpt", "not a trusted checkpoint"]),
        ("cut", ["cut.ckpt", "truncated"]),
        ("last", ["ckpt_path=last", "runs with one: earlier"]),
        ("name", ["name='../../escaped'", "hydra.run.dir"]),
        ("steps", ["trainer.max_steps=0"]),
        ("typo", ["forgetting", "evry"]),
        ("gpu", ["accelerator=gpu"]),
        ("languages", ["adapt.languages ['zz']"]),
        ("decoy", ["model.safetensors", "not a readable safetensors file"]),
        ("automap", ["model_type='evilnet'", "trust_remote_code"]),
        ("profiler", ["trainer.profiler: cannot build 'nope.Profiler'"]),
        ("tracker", ["logger.mlflow: cannot build 'afpt.artifacts.tracking.MLFlowLogger'", "nope://x"]),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_run_dir(tmp_path, monkeypatch, capsys, request, case, needles):
    if case == "gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "earlier" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "earlier" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    decoy = tmp_path / "decoy"
    tiny_llama(True).save_pretrained(decoy)
    (decoy / "model.safetensors").write_bytes(b"")
    args = {
        "evil": [f"ckpt_path={checkpoint_file(tmp_path, evil=True)}"],
        "cut": [f"ckpt_path={checkpoint_file(tmp_path, evil=False)}"],
        "last": ["ckpt_path=last"],
        "name": ["name=../../escaped"],
        "steps": ["trainer.max_steps=0"],
        "typo": ["+forgetting.evry=3"],
        "gpu": ["trainer.accelerator=gpu"],
        "languages": ["stage=adapt", "adapt.languages=[zz]"],
        "decoy": ["stage=adapt", f"init_from={decoy}"],
        "automap": ["stage=adapt", f"init_from={automap_model(tmp_path, 'evilnet')}"],
        "profiler": ["trainer.profiler={_target_: nope.Profiler}"],
        "tracker": ["logger=mlflow", "logger.mlflow.tracking_uri=nope://x"],
    }[case]
    if case == "tracker":
        pytest.importorskip("mlflow")
    if case == "languages":  # a whole model: the languages are what is wrong
        args.append(f"init_from={request.getfixturevalue('base_model')}")
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    code, err = afpt_cli(capsys, *FAST, *(["name=new"] if case != "name" else []), *args)
    assert_one_line_error(code, err, *needles)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("instruct.batchin=random", "Could not override 'instruct.batchin'"),
        ("model=nosuch", "Could not find 'model/nosuch'"),
        ("trainer.max_steps=[", "no viable alternative at input '['"),
    ],
)
def test_a_configuration_hydra_refuses_exits_2_with_hydras_message(tmp_path, monkeypatch, capsys, override, needle):
    monkeypatch.chdir(tmp_path)
    code, err = afpt_cli(capsys, override)
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a finished run's model directory."""
    return load_file(run_dir / "model" / "model.safetensors")


def test_a_second_writer_of_a_run_is_refused_naming_the_holder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "same"
    # The holder takes the lock the way afpt does (an OS file lock and a note of who holds it), without
    # importing torch: the test pays for one process start, not for a training run.
    script = (
        "import json, os, socket, sys; from filelock import FileLock; "
        f"d = {str(run_dir)!r}; os.makedirs(d); lock = FileLock(os.path.join(d, {LOCK_NAME!r})); lock.acquire(); "
        f"open(os.path.join(d, {HOLDER_NAME!r}), 'w').write(json.dumps("
        "{'pid': os.getpid(), 'host': socket.gethostname(), 'started': 'now'})); print('held', flush=True); input()"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = afpt_cli(capsys, *FAST, "name=same")
    finally:
        holder.communicate("\n", timeout=60)
    assert_one_line_error(code, err, "runs/same", f"pid {holder.pid}", "choose another name=")
    assert sorted(p.name for p in run_dir.iterdir()) == [".afpt.holder.json", ".afpt.lock"]  # as the holder left it


def test_a_full_disk_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert afpt_cli(capsys, *FAST, "name=r")[0] == 0
    last = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    size = last.stat().st_size

    def small_disk() -> None:  # writes past size // 2 bytes fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    done = run_afpt(*FAST, "name=r", "ckpt_path=last", "trainer.max_steps=4", cwd=tmp_path, preexec_fn=small_disk)
    assert_one_line_error(done.returncode, done.stderr, "cannot write", "checkpoints/step4.ckpt", "File too large")
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2 and last.stat().st_size == size
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "step2.ckpt"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    steps = [
        *TINY,
        "trainer.max_steps=60",
        "trainer.val_check_interval=30",
        "callbacks.model_checkpoint.every_n_train_steps=10",
    ]
    slow = ["+callbacks.slow._target_=helpers.SleepEachStep", "+callbacks.slow.seconds=0.1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    job = subprocess.Popen(
        [sys.executable, "-m", "afpt", *steps, *slow, "name=term"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = tmp_path / "runs" / "term" / "checkpoints"
    while job.poll() is None and not list(checkpoints.glob("step*.ckpt")):
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    err = job.communicate(timeout=120)[1]
    assert job.returncode == 143, err[-2000:]
    assert "afpt: error: stopped by SIGTERM" in err and "Traceback" not in err
    assert (checkpoints / "last.ckpt").is_file() and not (tmp_path / "runs" / "term" / "metrics.json").exists()
    stopped_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert 10 <= stopped_at < 60
    assert afpt_cli(capsys, *steps, "name=term", "ckpt_path=last")[0] == 0
    assert afpt_cli(capsys, *steps, "name=reference")[0] == 0
    resumed, reference = final_weights(tmp_path / "runs" / "term"), final_weights(tmp_path / "runs" / "reference")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["at_reset", "mid_checkpoint_write"])
def test_sigkill_at_a_reset_or_mid_write_resumes_bit_exactly(tmp_path, monkeypatch, capsys, kill):
    monkeypatch.chdir(tmp_path)
    steps = [
        *TINY,
        "trainer.max_steps=12",
        "++forgetting.every_n_steps=4",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    killer = {
        "at_reset": ["+callbacks.kill._target_=helpers.KillAt", "+callbacks.kill.step=8"],
        "mid_checkpoint_write": ["+trainer.plugins=[{_target_: helpers.DieMidWrite, step: 8}]"],
    }[kill]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = run_afpt(*steps, *killer, "name=killed", cwd=tmp_path, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    run_dir = tmp_path / "runs" / "killed"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert afpt_cli(capsys, *steps, "name=killed", "ckpt_path=last")[0] == 0
    assert not list(run_dir.rglob(".*.tmp-*"))
    assert afpt_cli(capsys, *steps, "name=reference")[0] == 0
    resumed, reference = final_weights(run_dir), final_weights(tmp_path / "runs" / "reference")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    history = json.loads((run_dir / "metrics.json").read_text())["resets"]
    assert [r["step"] for r in history] == [4, 8]


def test_a_replaced_model_dir_is_never_missing_and_stale_temporaries_are_cleaned(tmp_path):
    model, tokenizer = tiny_llama(True), train_tokenizer([f"document {i} of words" for i in range(50)], vocab_size=300)
    target = tmp_path / "run" / "model"
    save_model_dir(model, tokenizer, target)

    def killed_half_way(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(killed_half_way, target)
    assert (target / "model.safetensors").is_file() and not list(target.parent.glob(".model.*"))
    # What a SIGKILL between the two renames leaves: the old directory aside and no model/; and a temporary.
    os.replace(target, target.with_name(".model.old-123"))
    (target.parent / ".model.tmp-abc").mkdir()
    (target.parent / "checkpoints").mkdir()
    (target.parent / "checkpoints" / ".last.ckpt.tmp-9").write_bytes(b"half")
    clean_stale(target.parent)
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in target.parent.rglob(".*")) == []


def test_saved_models_follow_the_umask_and_drop_an_input_auto_map(tmp_path):
    model, tokenizer = tiny_llama(True), train_tokenizer([f"document {i} of words" for i in range(50)], vocab_size=300)
    model.config.auto_map = {"AutoModelForCausalLM": "evil.EvilModel"}
    tokenizer.init_kwargs["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    old = os.umask(0o022)
    try:
        target = save_model_dir(model, tokenizer, tmp_path / "model")
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in target.iterdir()} == {
        p.name: "0o644" for p in target.iterdir()
    }
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((target / name).read_text())
