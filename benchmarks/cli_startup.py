"""Wall time of ``clipshot --help`` / ``--version`` / ``serve --help`` in fresh interpreters (median of N).

Usage: ``python benchmarks/cli_startup.py [--runs 7]``. The target is < 1 s for the help screens: the CLI
imports a command's module only when that command runs, and heavy packages only in its handler. For scale
it also times ``python -c pass`` (the interpreter alone) and ``import torch``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = {
    "python -c pass": ["-c", "pass"],
    "clipshot --help": ["-m", "app.cli", "--help"],
    "clipshot --version": ["-m", "app.cli", "--version"],
    "clipshot serve --help": ["-m", "app.cli", "serve", "--help"],
    "clipshot train fewshot --help": ["-m", "app.cli", "train", "fewshot", "--help"],
    "import torch": ["-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print("| command | median s | min s |\n|---|---:|---:|")
    for name, args in CASES.items():
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        print(f"| `{name}` | {statistics.median(times):.2f} | {min(times):.2f} |")


if __name__ == "__main__":
    main()
