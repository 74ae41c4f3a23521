"""CPU cost of the commands a user types before any work starts: ``afpt --help``, ``afpt --cfg job``, a shell
TAB completion, and ``import afpt``, each in a fresh process, against ``import torch`` as the yardstick.

Prints a table of CPU seconds (user + system, median of ``--repeat`` runs) and wall seconds, and writes the
rows as JSON to ``--out`` (default: $OUT or benchmarks/).

    python benchmarks/startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from record import print_table, write_record

COMMANDS = {
    "afpt --help": ([sys.executable, "-m", "afpt", "--help"], {}),
    "afpt --cfg job": ([sys.executable, "-m", "afpt", "--cfg", "job"], {}),
    "TAB completion (afpt stage=pre<TAB>)": (
        [sys.executable, "-m", "afpt", "-sc", "query=bash"],
        {"COMP_LINE": "afpt stage=pre", "COMP_POINT": "14"},
    ),
    "python -c 'import afpt'": ([sys.executable, "-c", "import afpt"], {}),
    "python -c 'import torch' (yardstick)": ([sys.executable, "-c", "import torch"], {}),
}


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """CPU seconds (user + system of the child) and wall seconds of one fresh run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall


def main() -> None:
    """Measure every command ``--repeat`` times; print and record the medians."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent)))
    args = parser.parse_args()
    rows = []
    for name, (argv, env) in COMMANDS.items():
        runs = [measure(argv, env) for _ in range(args.repeat)]
        rows.append(
            {
                "command": name,
                "cpu_s": statistics.median(r[0] for r in runs),
                "wall_s": statistics.median(r[1] for r in runs),
                "cpu_s_min": min(r[0] for r in runs),
            }
        )
        write_record(Path(args.out) / "startup.json", args, rows)
    print_table(rows, ["command", "cpu_s", "cpu_s_min", "wall_s"])


if __name__ == "__main__":
    main()
