"""Training speed: our cached-feature steps vs the tutorial's encode-inside-the-loop steps, same model, one process.

    python benchmarks/train.py [--data PREPARED] [--steps 15] [--out benchmarks/results/train.json]

Both sides train the same Show-Attend-Tell decoder (embed/hidden/attention 512 over frozen
EfficientNet-Lite0 features, 49 x 1280) with Adam, cross-entropy + the attention term and gradient
clipping, on the same captions:

- ``cached``: ours. Each image is encoded once, into the feature cache (its one-off cost is reported
  separately); a step reads features from the memory-mapped cache and carries ``seq_per_img`` = 5
  captions per image, so the attention projection is computed once per image.
- ``tutorial``: sgrvinod's "PyTorch Tutorial to Image Captioning" (train.py): one caption per sample,
  each sample's image decoded from disk, resized and pushed through the (frozen) encoder inside the
  loop, batch of 32 captions, DataLoader with the same number of workers.

Each side runs ``--steps`` optimiser steps after one warm-up step; the figure is captions per second
of those steps, and an epoch estimate for the split's captions. Without ``--data`` a generated
shapes set (224 px images) is used, so the script runs anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from captioner.data.images import load_image
from captioner.data.prepare import PreparedDataset, PrepareOptions, prepare
from captioner.training.batching import CaptionBatches
from captioner.training.config import TrainConfig
from captioner.data.features import split_features
from captioner.training.loop import TrainingStep, build_model


class TutorialCaptions(Dataset):
    """One (image tensor, caption, length) per caption, the image decoded each time (the tutorial's dataset)."""

    def __init__(self, dataset: PreparedDataset, preprocessing, rows: np.ndarray) -> None:
        captions = dataset.captions("train")
        self.tokens, self.lengths, self.image_index = captions["tokens"], captions["lengths"], captions["image_index"]
        self.dataset, self.preprocessing, self.rows = dataset, preprocessing, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        image = load_image(self.dataset.image_path(int(self.image_index[row])))
        return self.preprocessing(image), torch.from_numpy(self.tokens[row].astype(np.int64)), int(self.lengths[row])


def make_shapes(root: Path) -> Path:
    from captioner.data.formats import read_dataset
    from captioner.data.synthetic import write_shapes_dataset

    caption_files = write_shapes_dataset(root / "raw", num_images=400, seed=0, image_size=224)
    prepare(read_dataset(caption_files), root / "prepared", PrepareOptions(min_word_freq=1, progress=False))
    return root / "prepared"


def optimiser_step(step_module, optimizer, inputs, captions, lengths) -> None:
    loss = step_module(inputs, captions, lengths)["loss"]  # captions per image come from the shapes
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(step_module.parameters(), 5.0)
    optimizer.step()


def run_cached(model, config, dataset, features, steps: int) -> dict:
    plan = CaptionBatches.for_split(dataset, "train", batch_size=config.batch_size, seq_per_img=config.seq_per_img, seed=0)
    step_module = TrainingStep(model, config).train()
    optimizer = torch.optim.Adam([p for p in model.decoder.parameters() if p.requires_grad], lr=4e-4)
    batches = plan.epoch(0)[: steps + 1]
    done = 0
    for number, batch in enumerate(batches):
        if number == 1:  # the first step is a warm-up
            start, done = time.perf_counter(), 0
        inputs = torch.from_numpy(np.asarray(features[batch.positions], dtype=np.float32))  # (N, P, D)
        optimiser_step(step_module, optimizer, inputs, batch.captions, batch.lengths)
        done += len(batch.captions)
    seconds = time.perf_counter() - start
    return {"captions_per_step": config.batch_size * config.seq_per_img, "steps": len(batches) - 1, "captions_per_second": done / seconds}


def run_tutorial(model, config, dataset, steps: int, batch_size: int, workers: int) -> dict:
    rows = np.random.default_rng(0).permutation(len(dataset.captions("train")["lengths"]))[: (steps + 1) * batch_size]
    loader = DataLoader(TutorialCaptions(dataset, model.preprocessing, rows), batch_size=batch_size, num_workers=workers)
    step_module = TrainingStep(model, config).train()
    optimizer = torch.optim.Adam([p for p in model.decoder.parameters() if p.requires_grad], lr=4e-4)
    done = 0
    for number, (images, captions, lengths) in enumerate(loader):
        if number == 1:
            start, done = time.perf_counter(), 0
        width = int(lengths.max())
        with torch.no_grad():
            features = model.encoder(images)  # (32, P, D): every caption's image, every step
        optimiser_step(step_module, optimizer, features, captions[:, :width], lengths)
        done += len(captions)
    seconds = time.perf_counter() - start
    return {"captions_per_step": batch_size, "steps": steps, "captions_per_second": done / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared folder (default: a generated shapes set)")
    parser.add_argument("--steps", type=int, default=15, help="timed optimiser steps per side (default 15)")
    parser.add_argument("--workers", type=int, default=2, help="image-loading processes for the tutorial side (default 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmarks/results/train.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as temp:
        data = Path(args.data) if args.data else make_shapes(Path(temp))
        dataset = PreparedDataset(data)
        config = TrainConfig(data=str(data), batch_size=32, seq_per_img=5, progress=False)  # decoder: 512 dims, dropout 0.5
        torch.manual_seed(0)
        model = build_model(config, dataset)
        # The cache of the prepared folder (built here if missing): its sidecar says how fast it was built.
        features = split_features(model, dataset, "train", workers=args.workers, progress=False)
        sidecar = json.loads(Path(features.filename).with_suffix(".json").read_text())
        cached = run_cached(model, config, dataset, features, args.steps)
        cached_small = run_cached(model, dataclasses.replace(config, seq_per_img=1), dataset, features, args.steps)
        tutorial = run_tutorial(model, config, dataset, args.steps, 32, args.workers)
    epoch_captions = len(dataset.captions("train")["lengths"])
    rows = [
        {"method": "cached features, 32 images x 5 captions per step (ours, default)", **cached},
        {"method": "cached features, 32 images x 1 caption per step (ours)", **cached_small},
        {"method": "tutorial: encode each caption's image in the loop, 32 captions per step", **tutorial},
    ]
    for row in rows:
        row["captions_per_second"] = round(row["captions_per_second"], 1)
        row["epoch_minutes"] = round(epoch_captions / row["captions_per_second"] / 60, 2)
        print(f"{row['captions_per_second']:8.1f} captions/s  ({row['epoch_minutes']:6.2f} min/epoch)  {row['method']}")
    speedup = round(cached["captions_per_second"] / tutorial["captions_per_second"], 1)
    print(f"cache built once: {sidecar['images']} images in {sidecar['seconds']} s ({sidecar['images_per_second']} img/s); speed-up per epoch x{speedup}")
    result = {
        "benchmark": "train",
        "data": str(args.data or "generated shapes set (320 train images, 224 px)"),
        "train_images": len(dataset.split_images("train")),
        "train_captions": epoch_captions,
        "model": "Show-Attend-Tell, embed/hidden/attention 512, EfficientNet-Lite0 head features 49x1280 (frozen)",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cache_build": {key: sidecar[key] for key in ("images", "seconds", "images_per_second")},
        "speedup_default_vs_tutorial": speedup,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
