"""Which photos a model knows: build its familiar_photos.safetensors from its training and dev photos.

    python scripts/familiar_photos.py default data/f8k

Encodes every photo of the prepared data's training split (both views of an ensemble, as decoding
reads them), pools each into one unit-length vector, summarises them as ``--clusters`` spherical
k-means centroids (seeded), and stores them with the dev split's distances to them into the model's
folder (the shipped model's is ``src/captioner/pretrained/default``). With the model's
``concept_familiar_percentile`` above 0, visual concepts then steer only the photos farther from the
training photos than that percentage of the dev photos (:mod:`captioner.models.familiarity`). Use the
data the model was trained on; the dev split only places the threshold, the test split is never read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.atomic import write_bytes_atomic
from captioner.data.features import ImageFiles, raise_image_errors
from captioner.data.prepare import PreparedDataset
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner, resolve_model_path
from captioner.models.familiarity import FAMILIARITY_FILE, Familiarity, pooled


def pooled_split(model: Captioner, dataset: PreparedDataset, split: str, batch_size: int = 32) -> torch.Tensor:
    """(N, D) unit-length pooled features of a split's photos, in split order."""
    paths = [dataset.image_path(i) for i in dataset.split_images(split)]
    if not paths:
        raise CaptionerError(f"{dataset.root} has no {split} images")
    loader = DataLoader(ImageFiles(paths, model.preprocessing), batch_size=batch_size, num_workers=1)
    rows = []
    for pixels, errors in tqdm(loader, desc=f"{split} photos", unit="batch"):
        raise_image_errors(errors)
        rows.append(pooled(model.features(pixels)))
    return torch.cat(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint folder, or 'default'")
    parser.add_argument("data", type=Path, help="the prepared dataset the model was trained on (its train and val splits are read)")
    parser.add_argument("--images", type=Path, default=None, help="image folder, when not the one the data was prepared from")
    parser.add_argument("--clusters", type=int, default=512, help="centroids kept of the training photos (default 512)")
    args = parser.parse_args()
    try:
        if not 1 <= args.clusters <= 65_536:
            raise CaptionerError(f"--clusters must be from 1 to 65536, not {args.clusters}")
        model = Captioner.load(args.model, encoder_runtime="torch")
        dataset = PreparedDataset(args.data, image_root=args.images)
        familiarity = Familiarity.build(pooled_split(model, dataset, "train"), pooled_split(model, dataset, "val"), clusters=args.clusters)
        target = resolve_model_path(args.model) / FAMILIARITY_FILE
        write_bytes_atomic(target, familiarity.to_bytes())
    except CaptionerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    quartiles = torch.quantile(familiarity.dev_distances, torch.tensor([0.5, 0.8, 0.9])).tolist()
    print(f"wrote {target}: {familiarity.centroids.shape[0]} centroids; dev distances at the 50th/80th/90th percentiles {quartiles[0]:.3f} / {quartiles[1]:.3f} / {quartiles[2]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
