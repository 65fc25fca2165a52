"""Warm one-photo captioning with the shipped model as it ships (int8 decoding, visual concepts on)
vs the same model decoding in float32 (the baseline: how it decoded before int8 compute) and with
``concept_constraints=0`` (what the concepts cost), interleaved in one process.

    python benchmarks/caption.py [--rounds 7] [--coco ../shared/data/coco_dev/images] [--out benchmarks/results/caption.json]

Every side encodes with onnxruntime when the fast extra is installed and ``captioner export default``
was run (the JSON says which), with PyTorch otherwise; with onnxruntime a fourth side, the shipped
settings encoding through PyTorch, measures what the export gives a single photo, in the same rounds;
after ``captioner export default --int8`` a fifth, the shipped settings encoding through the int8 export.

Each round captions every photo once per side, one photo per call (``model.caption(path)``: file
decoding, preprocessing, both views through the encoder, ImageNet concepts, constrained beam search
of 3): what a user waits for after the model is loaded. Photos: the three in ``examples/`` and the
first 9 of coco_dev when it is there (everyday scenes, where concepts fire). Sides alternate within
every round, so a noisy machine slows both; medians over rounds are reported, per photo and overall.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from captioner.models.captioner import Captioner
from captioner.models.onnx_encoder import onnx_path

ROOT = Path(__file__).resolve().parents[1]
#: side -> (decoder compute, encoder runtime, caption keywords)
SIDES = {
    "shipped (int8, concepts on)": ("auto", "auto", {}),
    "baseline (float32 decoding)": ("float32", "auto", {}),
    "int8, concepts off": ("auto", "auto", {"concept_constraints": 0}),
}
PYTORCH_ENCODER = {"shipped, PyTorch encoder": ("auto", "torch", {})}  # a side only where the others use onnxruntime
INT8_ENCODER = {"shipped, int8 encoder": ("auto", "onnx-int8", {})}  # a side only after 'captioner export default --int8'


def load_sides(sides: dict[str, tuple[str, str, dict]]) -> dict[str, Captioner]:
    """The default model loaded once per side, with that side's decoder compute and encoder runtime."""
    return {side: Captioner.load("default", decoder_compute=compute, encoder_runtime=runtime) for side, (compute, runtime, _) in sides.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--coco", type=Path, default=ROOT.parent / "shared" / "data" / "coco_dev" / "images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "caption.json")
    args = parser.parse_args()

    photos = sorted((ROOT / "examples").glob("*.jpg")) + (sorted(args.coco.glob("*.jpg"))[:9] if args.coco.is_dir() else [])
    sides = dict(SIDES)
    models = load_sides(sides)
    if models["shipped (int8, concepts on)"].encoder_runtime is not None:
        sides.update(PYTORCH_ENCODER)
        models.update(load_sides(PYTORCH_ENCODER))
    int8_export = onnx_path(models["shipped (int8, concepts on)"], int8=True)
    if int8_export is not None and int8_export.is_file():
        sides.update(INT8_ENCODER)
        models.update(load_sides(INT8_ENCODER))
    for side, (_, _, settings) in sides.items():  # warm-up: first calls pay for lazy loading (concept file, word vectors)
        models[side].caption(photos[0], **settings)
    seconds: dict[str, list[list[float]]] = {side: [[] for _ in photos] for side in sides}
    captions: dict[str, list[str]] = {side: [""] * len(photos) for side in sides}
    for _ in range(args.rounds):
        for index, photo in enumerate(photos):
            for side, (_, _, settings) in sides.items():
                start = time.perf_counter()
                result = models[side].caption(photo, **settings)
                seconds[side][index].append(time.perf_counter() - start)
                captions[side][index] = result.text
    per_photo = {side: [statistics.median(times) for times in seconds[side]] for side in sides}
    overall = {side: statistics.median(values) for side, values in per_photo.items()}
    report = {
        "what": "warm model.caption(path) of one photo, shipped default model, beam 3; median over rounds per photo, then over photos",
        "decoder_compute": {side: models[side].decoder_compute for side in sides},
        "encoder_runtime": {side: models[side].encoder_runtime.name if models[side].encoder_runtime is not None else "torch" for side in sides},  # onnx after 'captioner export default', with the fast extra
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "rounds": args.rounds,
        "photos": [str(photo.relative_to(ROOT) if photo.is_relative_to(ROOT) else photo.name) for photo in photos],
        "median_ms": {side: round(value * 1000, 1) for side, value in overall.items()},
        "slowest_photo_ms": {side: round(max(values) * 1000, 1) for side, values in per_photo.items()},
        "speedup_over_baseline": round(overall["baseline (float32 decoding)"] / overall["shipped (int8, concepts on)"], 2),
        "captions_differing_from_baseline": sum(a != b for a, b in zip(captions["shipped (int8, concepts on)"], captions["baseline (float32 decoding)"])),
        "per_photo_ms": {side: [round(value * 1000, 1) for value in values] for side, values in per_photo.items()},
        "captions": captions,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({key: report[key] for key in ("median_ms", "slowest_photo_ms", "speedup_over_baseline", "captions_differing_from_baseline")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
