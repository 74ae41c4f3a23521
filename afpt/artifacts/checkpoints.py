"""Lightning checkpoints that are whole or absent, that load only safely, and that a preempted run leaves behind."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from afpt.errors import AfptError

CHECKPOINT_DIR = "checkpoints"
LIGHTNING_CKPT_ALIASES = ("last", "hpc", "registry")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes a local checkpoint to ``.<name>.tmp-<pid>`` beside its final name,
    fsyncs it and renames it: a full disk or a kill leaves the previous checkpoint, never a truncated one.

    (Lightning's own save stages the file in ``$TMPDIR`` and moves it, which across file systems is a copy
    under the final name.) Remote paths (``s3://`` ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically."""
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        buffer = io.BytesIO()  # serialised first, as Lightning does: a failed write is an OSError, not torch's
        torch.save(checkpoint, buffer)
        try:
            with open(tmp, "wb") as handle:
                handle.write(buffer.getbuffer())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(path)) from err
        finally:
            tmp.unlink(missing_ok=True)


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM (what SLURM sends on preemption and at its time limit), save ``last.ckpt`` before the run stops.

    Lightning stops the loop at the end of the current step with ``SIGTERMException``; the checkpoint taken
    here resumes the run exactly with ``ckpt_path=last``. The afpt command then exits with status 143.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Save the resumable checkpoint when the exception is Lightning's SIGTERM stop."""
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                    self.dirpath = Path(callback.dirpath)
            self.saved = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(self.saved, weights_only=False)


def runs_with_last(runs_root: Path) -> list[str]:
    """Names of the runs under ``runs_root`` that hold a ``checkpoints/last.ckpt``."""
    if not runs_root.is_dir():
        return []
    return sorted(p.parent.parent.name for p in runs_root.glob(f"*/{CHECKPOINT_DIR}/last.ckpt"))


def check_checkpoint(path: Path, key: str = "ckpt_path") -> None:
    """Refuse a file that is not a whole checkpoint afpt can load safely (``weights_only``), in one line."""
    if not zipfile.is_zipfile(path):
        raise AfptError(f"{key}={str(path)!r} is truncated or not a checkpoint file (not a torch zip archive)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise AfptError(
            f"{key}={str(path)!r} is not a trusted checkpoint: it holds objects besides tensors and plain values, "
            "and afpt never unpickles those"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise AfptError(f"{key}={str(path)!r} is truncated or corrupt: {str(err).splitlines()[0]}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise AfptError(f"{key}={str(path)!r} is not a Lightning checkpoint (it has no state_dict)")


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``ckpt_path`` as a checked file: ``last`` is this run's ``checkpoints/last.ckpt``, and must exist.

    Nothing is loaded but the checkpoint's index (memory-mapped), so this runs before any data work.
    """
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        path = run_dir / CHECKPOINT_DIR / "last.ckpt"
        if not path.is_file():
            names = runs_with_last(run_dir.parent)
            raise AfptError(
                f"ckpt_path=last: run {run_dir.name!r} has no {CHECKPOINT_DIR}/last.ckpt to resume; "
                + (
                    f"runs with one: {', '.join(names)} (name=<run>)"
                    if names
                    else f"no run under {run_dir.parent}/ has one"
                )
            )
    elif ckpt_path in LIGHTNING_CKPT_ALIASES:
        return ckpt_path
    else:
        path = Path(ckpt_path)
        if not path.is_file():
            raise AfptError(f"ckpt_path={ckpt_path!r} does not exist; give a checkpoint file written by an earlier run")
    check_checkpoint(path)
    return str(path)
