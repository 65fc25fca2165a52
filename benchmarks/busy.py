"""A cold ``captioner caption examples/dog.jpg`` on a quiet machine and on a busy one.

    python benchmarks/busy.py [--rounds 5] [--load 2] [--out benchmarks/results/busy.json]

"Busy" is what a laptop user has: ``--load`` other processes (2 by default) each multiplying
1024 x 1024 matrices in a loop with PyTorch's default threads, started before the timed runs and
stopped after them. Every round runs, one after the other in fresh processes:

- ``import torch``: ``python -c "import torch"``, the floor any PyTorch command pays;
- **adaptive**: the command as it ships (each phase takes the cores that are free, see
  ``captioner.threads``);
- **baseline**: the same command with ``CAPTIONER_THREADS=torch`` (PyTorch's own thread count,
  one per core, whatever else runs: what it did before).

Quiet rounds first, then busy ones; each reported figure is the median wall time over rounds.
The targets: busy adaptive <= 3x quiet adaptive (a fair share of the cores), quiet adaptive <=
1.5x ``import torch``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOAD = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a = torch.tanh(a @ a)\n"
COMMANDS = {
    "import torch": ([sys.executable, "-c", "import torch"], {}),
    "adaptive": ([sys.executable, "-m", "captioner", "caption", "examples/dog.jpg"], {}),
    "baseline": ([sys.executable, "-m", "captioner", "caption", "examples/dog.jpg"], {"CAPTIONER_THREADS": "torch"}),
}


def wall_time(command: list[str], extra_env: dict[str, str]) -> tuple[float, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("CAPTIONER_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout.strip()


def rounds(count: int) -> tuple[dict[str, float], dict[str, str]]:
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    outputs: dict[str, str] = {}
    for _ in range(count):
        for name, (command, env) in COMMANDS.items():
            elapsed, outputs[name] = wall_time(command, env)
            seconds[name].append(elapsed)
    return {name: round(statistics.median(values), 2) for name, values in seconds.items()}, outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load", type=int, default=2, help="busy-loop processes beside the timed runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "busy.json")
    args = parser.parse_args()

    wall_time(*COMMANDS["adaptive"])  # warm the file cache: every timed run then reads from memory
    quiet, outputs = rounds(args.rounds)
    loaders = [subprocess.Popen([sys.executable, "-c", LOAD]) for _ in range(args.load)]
    try:
        time.sleep(2.0)  # the loaders past their own import
        busy, _ = rounds(args.rounds)
    finally:
        for loader in loaders:
            loader.kill()
            loader.wait()
    report = {
        "what": "median wall time (s) of a fresh process, quiet and beside busy-loop PyTorch processes",
        "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
        "rounds": args.rounds,
        "load_processes": args.load,
        "quiet_s": quiet,
        "busy_s": busy,
        "busy_over_quiet": {name: round(busy[name] / quiet[name], 2) for name in COMMANDS},
        "quiet_over_import_torch": {name: round(quiet[name] / quiet["import torch"], 2) for name in ("adaptive", "baseline")},
        "caption": outputs["adaptive"],
        "same_caption": outputs["adaptive"] == outputs["baseline"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({key: report[key] for key in ("quiet_s", "busy_s", "busy_over_quiet", "quiet_over_import_torch", "same_caption")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
