"""The run directory: a name that stays under ``runs/``, one writer at a time, and nothing left behind by a
refused run. Light to import: the ``afpt`` command's Hydra callback runs before any stage is loaded."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from afpt.artifacts.io import clean_stale
from afpt.errors import AfptError

LOCK_NAME = ".afpt.lock"
HOLDER_NAME = ".afpt.holder.json"
# What a run directory holds before the stage writes anything: Hydra's config copy, the job log, the lock.
RUN_BOOKKEEPING = (".hydra", LOCK_NAME, HOLDER_NAME)
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``afpt: error: <message>`` on stderr and exit with ``code`` (2: bad input)."""
    print(f"afpt: error: {message}", file=sys.stderr)
    sys.exit(code)


def check_run_name(name: Any) -> None:
    """A run name is one folder under ``runs/``: no path separators, no ``..``, not hidden."""
    text = str(name)
    if not text or "/" in text or "\\" in text or text.startswith(".") or "\0" in text:
        raise AfptError(
            f"name={text!r} must be a single folder name under runs/ (no '/', no '..', not starting with '.'); "
            "to write a run elsewhere, set hydra.run.dir=<path>"
        )


def is_rank_zero() -> bool:
    """True in the process that owns the run directory: not a rank > 0 started by a launcher or scheduler."""
    return all(os.environ.get(var, "0") == "0" for var in RANK_VARIABLES)


# Run directories this process created (before Hydra did): only these are removed after bad input.
CREATED: set[Path] = set()


def _probe_writable(folder: Path) -> None:
    if not folder.exists():
        CREATED.add(folder.resolve())
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()


class RunDirGuard(Callback):
    """Hydra callback: refuse a bad ``name`` and an unwritable run (or sweep) directory before Hydra creates it,
    and take a single run's lock before Hydra writes its config copy (``.hydra/``) there."""

    def _check(self, config: DictConfig, folder_key: str) -> Path:
        try:
            check_run_name(config.get("name"))
        except AfptError as err:
            fail(str(err))
        folder = Path(str(config.hydra[folder_key].dir))
        try:
            _probe_writable(folder)
        except OSError as err:
            fail(f"cannot write the run directory {str(folder)!r}: {err.strerror}; set hydra.run.dir or name=")
        return folder

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before a single run."""
        folder = self._check(config, "run")
        try:
            acquire(folder)
        except AfptError as err:
            fail(str(err))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before a sweep."""
        self._check(config, "sweep")


def is_fresh(run_dir: Path) -> bool:
    """True when this process created ``run_dir`` and it holds nothing but what Hydra and the lock put there."""
    if not run_dir.is_dir():
        return True
    if run_dir.resolve() not in CREATED:
        return False
    return all(p.name in RUN_BOOKKEEPING or p.suffix == ".log" for p in run_dir.iterdir())


def discard(run_dir: Path) -> None:
    """Remove a run directory that a refused run created, so bad input leaves nothing behind."""
    shutil.rmtree(run_dir, ignore_errors=True)


def _holder(run_dir: Path) -> str:
    try:
        info = json.loads((run_dir / HOLDER_NAME).read_text())
        return f"pid {info['pid']} on host {info['host']} (since {info['started']})"
    except (OSError, ValueError, KeyError):
        return "another process"


_HELD: dict[Path, FileLock] = {}


def acquire(run_dir: Path) -> None:
    """Take the run directory's lock for this process (once), or raise an error naming its holder.

    Only the process that owns the run takes it (ranks > 0 of a launcher share the directory). The lock is
    an OS file lock, released when the holder exits, however it exits.
    """
    key = run_dir.resolve()
    if key in _HELD or not is_rank_zero():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise AfptError(
            f"run directory {str(run_dir)!r} is in use by {_holder(run_dir)}; wait for it to finish "
            "or choose another name="
        ) from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (run_dir / HOLDER_NAME).write_text(json.dumps(holder))
    _HELD[key] = lock


def release(run_dir: Path) -> None:
    """Give the run directory's lock back (a no-op where this process does not hold it)."""
    lock = _HELD.pop(run_dir.resolve(), None)
    if lock is not None:
        (run_dir / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the whole run (``acquire``), and clean the stale temporaries a killed
    writer left once it is held."""
    acquire(run_dir)
    try:
        if is_rank_zero():
            clean_stale(run_dir)
        yield
    finally:
        release(run_dir)
