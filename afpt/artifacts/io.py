"""Artifacts written whole or not at all (a temporary name in the same directory, then a rename), and the
run files every stage reads back: JSON and Lightning's metric CSVs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process umask applied: the permissions a plain ``open`` or ``mkdir`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_tree(root: Path) -> None:
    """Give every file and folder under ``root`` the user's umask permissions (some writers create 0600) and
    flush the files to disk."""
    root.chmod(umask_mode(0o777))
    for path in root.rglob("*"):
        if path.is_dir():
            path.chmod(umask_mode(0o777))
        else:
            path.chmod(umask_mode())
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())


def atomic_save(save_fn: Callable[[Path], Any], target: str | os.PathLike) -> Path:
    """Write a directory through ``save_fn(tmp_dir)`` and rename it to ``target`` when complete.

    An existing ``target`` is renamed aside (``.<name>.old-<pid>``) before the swap and deleted after it,
    so a kill at any point leaves the old or the new directory; ``clean_stale`` puts back an old one left
    aside without a new one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        save_fn(tmp)
        _publish_tree(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old.exists():
            shutil.rmtree(old)
    return target


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], Any]) -> Path:
    """Write a file through ``write_fn(tmp_path)`` (a sibling with the same suffix) and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries a killed writer left in ``folder`` and its subfolders (``.<name>.tmp-*``), and
    put back a directory renamed aside (``.<name>.old-*``) whose replacement never arrived. Returns what it
    removed or restored. Call it only while holding the folder's run lock."""
    folder = Path(folder)
    touched = []
    for path in sorted(folder.rglob(".*.tmp-*"), key=lambda p: len(p.parts), reverse=True):
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            touched.append(path)
    for path in folder.rglob(".*.old-*"):
        original = path.with_name(path.name[1:].rsplit(".old-", 1)[0])
        if original.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        else:
            os.replace(path, original)
        touched.append(path)
    return touched


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write JSON (sorted keys, indented) atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file written by ``write_json``."""
    return json.loads(Path(path).read_text())


def metric_csvs(run_dir: str | os.PathLike) -> list[Path]:
    """A run's Lightning CSV logs (``logs/**/metrics.csv``), oldest first, so later runs override earlier steps."""
    return sorted(Path(run_dir).glob("logs/**/metrics.csv"), key=lambda p: p.stat().st_mtime)


def read_metric(run_dir: str | os.PathLike, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric from a run's CSV logs; a resumed run's rows override earlier steps."""
    points: dict[int, float] = {}
    for path in metric_csvs(run_dir):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get(key) not in (None, "") and row.get("step") not in (None, ""):
                    points[int(float(row["step"]))] = float(row[key])
    return sorted(points.items())
