"""Cold commands on a quiet machine and on a busy one: a caption, and the README's shapes training.

    python benchmarks/busy.py [--rounds 5] [--train-rounds 3] [--load 2] [--out benchmarks/results/busy.json]

"Busy" is what a laptop user has: ``--load`` other processes (2 by default) each multiplying
1024 x 1024 matrices in a loop with PyTorch's default threads, started before the timed runs and
stopped after them. Every round runs, one after the other in fresh processes:

- ``import torch``: ``python -c "import torch"``, the floor any PyTorch command pays;
- **adaptive**: ``captioner caption examples/dog.jpg`` as it ships (each phase takes the cores that
  are free, see ``captioner.threads``);
- **baseline**: the same command with ``CAPTIONER_THREADS=torch`` (PyTorch's own thread count,
  one per core, whatever else runs: what it did before);
- **train adaptive** / **train baseline** (``--train-rounds`` rounds, 0 to skip): the README's
  "Train your own" training, ``captioner train --config configs/shapes-quickstart.toml
  --overwrite`` (8 epochs on 400 generated images), as shipped and with ``CAPTIONER_THREADS=torch``,
  in a folder prepared once (its feature cache built before the timed runs).

Quiet rounds first, then busy ones; each reported figure is the median wall time over rounds.
The targets: busy adaptive <= 3x quiet adaptive (a fair share of the cores), quiet adaptive <=
1.5x ``import torch``; training should not collapse either.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOAD = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a = torch.tanh(a @ a)\n"
CAPTION = [sys.executable, "-m", "captioner", "caption", "examples/dog.jpg"]
TRAIN = [sys.executable, "-m", "captioner", "train", "--config", str(ROOT / "configs" / "shapes-quickstart.toml"), "--overwrite", "--set", "progress=false"]
PYTORCH_THREADS = {"CAPTIONER_THREADS": "torch"}


def wall_time(command: list[str], extra_env: dict[str, str], cwd: Path = ROOT) -> tuple[float, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("CAPTIONER_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env={**env, **extra_env}, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout.strip()


def prepare_shapes(folder: Path) -> None:
    """The README block's first two commands, then one training run to build its feature cache."""
    captioner = [sys.executable, "-m", "captioner"]
    subprocess.run([*captioner, "shapes", "demo/shapes", "--num-images", "400"], cwd=folder, check=True, capture_output=True)
    prepare = ["prepare", "demo/shapes/dataset_shapes.json", "--out", "demo/prepared", "--min-word-freq", "1", "--overwrite"]
    subprocess.run([*captioner, *prepare], cwd=folder, check=True, capture_output=True)
    wall_time(TRAIN, {}, folder)


def rounds(commands: dict[str, tuple[list[str], dict[str, str], Path]], count: int) -> tuple[dict[str, float], dict[str, str]]:
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    outputs: dict[str, str] = {}
    for _ in range(count):
        for name, (command, env, cwd) in commands.items():
            elapsed, outputs[name] = wall_time(command, env, cwd)
            seconds[name].append(elapsed)
    return {name: round(statistics.median(values), 2) for name, values in seconds.items()}, outputs


def best_line(output: str) -> str:
    return next((line for line in reversed(output.splitlines()) if line.startswith("best epoch")), output[-200:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-rounds", type=int, default=3, help="rounds of the shapes training (0: skip it)")
    parser.add_argument("--load", type=int, default=2, help="busy-loop processes beside the timed runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "busy.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="busy-shapes-"))
    captions = {"import torch": ([sys.executable, "-c", "import torch"], {}, ROOT), "adaptive": (CAPTION, {}, ROOT), "baseline": (CAPTION, PYTORCH_THREADS, ROOT)}
    training = {"train adaptive": (TRAIN, {}, work), "train baseline": (TRAIN, PYTORCH_THREADS, work)} if args.train_rounds else {}
    wall_time(CAPTION, {})  # warm the file cache: every timed run then reads from memory
    if training:
        prepare_shapes(work)

    def both(label: str) -> tuple[dict[str, float], dict[str, str]]:
        seconds, outputs = rounds(captions, args.rounds)
        trained, train_outputs = rounds(training, args.train_rounds)
        print(label, json.dumps({**seconds, **trained}), flush=True)
        return {**seconds, **trained}, {**outputs, **train_outputs}

    quiet, outputs = both("quiet")
    loaders = [subprocess.Popen([sys.executable, "-c", LOAD]) for _ in range(args.load)]
    try:
        time.sleep(2.0)  # the loaders past their own import
        busy, busy_outputs = both("busy")
    finally:
        for loader in loaders:
            loader.kill()
            loader.wait()
    report = {
        "what": "median wall time (s) of a fresh process, quiet and beside busy-loop PyTorch processes",
        "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
        "rounds": args.rounds,
        "train_rounds": args.train_rounds,
        "load_processes": args.load,
        "quiet_s": quiet,
        "busy_s": busy,
        "busy_over_quiet": {name: round(busy[name] / quiet[name], 2) for name in quiet},
        "quiet_over_import_torch": {name: round(quiet[name] / quiet["import torch"], 2) for name in ("adaptive", "baseline")},
        "caption": outputs["adaptive"],
        "same_caption": outputs["adaptive"] == outputs["baseline"],
        "trained": {f"{name}, {when}": best_line(out[name]) for when, out in (("quiet", outputs), ("busy", busy_outputs)) for name in training},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({key: report[key] for key in ("quiet_s", "busy_s", "busy_over_quiet", "quiet_over_import_torch", "same_caption", "trained")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
