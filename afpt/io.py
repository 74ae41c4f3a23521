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


def atomic_save(save_fn: Callable[[Path], Any], target: str | os.PathLike) -> Path:
    """Write a directory through ``save_fn(tmp_dir)`` and rename it to ``target`` when complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        save_fn(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], Any]) -> Path:
    """Write a file through ``write_fn(tmp_path)`` (a sibling with the same suffix) and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
