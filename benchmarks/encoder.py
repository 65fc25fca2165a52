"""The image encoder through onnxruntime vs PyTorch: speed, and what it costs on the Flickr8k dev split.

    captioner export default && captioner export default --int8
    python benchmarks/encoder.py [--rounds 5] [--dev data/f8k] [--out benchmarks/results/encoder.json]

Runtimes: PyTorch, onnxruntime in float32 and, where ``captioner export default --int8`` wrote it,
onnxruntime in int8 (``"onnx-int8"``).

Speed: the shipped model's encoder (EfficientNet-Lite2, 260 px) on the example photos and the
first coco_dev ones, at batch 1 and 16, each runtime in turn within every round (medians over
rounds), against this machine's float32 matrix-multiply rate (2048 x 2048 sgemm, same threads,
measured in the same run) and the encoder's FLOPs (PyTorch's FLOP counter): "share of sgemm".

Accuracy (``--dev``, a prepared Flickr8k folder): every dev image encoded by each runtime (both
views), then captioned by the shipped model at its own settings from those features, scored with
the COCO caption code (no METEOR), and how many captions differ.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from captioner.data.images import load_image
from captioner.models.captioner import Captioner

ROOT = Path(__file__).resolve().parents[1]
COCO_DEV = ROOT.parent / "shared" / "data" / "coco_dev" / "images"


def sgemm_gflops(rounds: int = 5) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def encoder_gflops(model: Captioner, pixels: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encoder(pixels[:1])
    return counter.get_total_flops() / 1e9


def runtimes() -> list[str]:
    """torch, onnx, and onnx-int8 where it was exported."""
    from captioner.models.onnx_encoder import onnx_path

    return ["torch", "onnx"] + (["onnx-int8"] if onnx_path(Captioner.load("default", encoder_runtime="torch"), int8=True).is_file() else [])


def speed(rounds: int) -> dict:
    models = {runtime: Captioner.load("default", encoder_runtime=runtime) for runtime in runtimes()}
    plain = models["torch"]
    photos = sorted((ROOT / "examples").glob("*.jpg")) + sorted(COCO_DEV.glob("*.jpg"))[:13]
    pixels = torch.stack([plain.preprocessing(load_image(path, draft=plain.preprocessing.draft_size)) for path in photos])  # (16, 3, S, S)
    runs = {runtime: model.encoder_runtime or model.encoder for runtime, model in models.items()}  # one view: the encoder alone
    rows = {}
    flops = encoder_gflops(plain, pixels)
    for batch in (1, 16):
        x = pixels[:batch]
        with torch.inference_mode():
            for run in runs.values():
                run(x)  # warm-up
            seconds: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(x)
                    seconds[name].append(time.perf_counter() - start)
        rows[batch] = {name: round(1000 * statistics.median(values) / batch, 1) for name, values in seconds.items()}
    rate = sgemm_gflops()
    return {
        "photos": len(photos),
        "encoder_gflop_per_image": round(flops, 2),
        "sgemm_gflops": round(rate, 1),
        "ms_per_image": {str(batch): row for batch, row in rows.items()},
        "speedup_over_torch": {str(batch): {name: round(row["torch"] / ms, 2) for name, ms in row.items() if name != "torch"} for batch, row in rows.items()},
        "share_of_sgemm": {str(batch): {name: round(flops / (ms / 1000) / rate, 2) for name, ms in row.items()} for batch, row in rows.items()},
    }


def dev_split(prepared: str) -> dict:
    from captioner.data.prepare import PreparedDataset
    from captioner.decoding import GenerationConfig
    from captioner.evaluation import caption_checks, decode_split, score_split

    dataset = PreparedDataset(prepared)
    paths = [dataset.image_path(index) for index in dataset.split_images("val")]
    config = GenerationConfig.for_captions(3, 1, return_attention=False)
    report, texts = {}, {}
    for runtime in runtimes():
        model = Captioner.load("default", encoder_runtime=runtime)
        features = np.concatenate([
            model.features(torch.stack([model.preprocessing(load_image(path, draft=model.preprocessing.draft_size)) for path in paths[start : start + 16]])).numpy()
            for start in range(0, len(paths), 16)
        ])  # (N, V*P, D)  # fmt: skip
        captions = decode_split(model, dataset, "val", config, features=features, batch_size=50, progress=False)
        scores = score_split(dataset, captions, metrics=["BLEU-4", "CIDEr-D"])
        checks = caption_checks(dataset, captions)
        report[runtime] = {"BLEU-4": round(scores["BLEU-4"], 2), "CIDEr-D": round(scores["CIDEr-D"], 2), "CIDEr-D 95% interval": checks["CIDEr-D 95% interval"]}
        texts[runtime] = [captions[index].text for index in sorted(captions)]
    report["captions_differing_from_torch"] = {runtime: sum(a != b for a, b in zip(texts["torch"], texts[runtime])) for runtime in texts if runtime != "torch"}
    report["images"] = len(paths)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dev", metavar="PREPARED", help="a prepared Flickr8k folder: also score the dev split with each runtime")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "encoder.json")
    args = parser.parse_args()
    report = {
        "what": "the shipped model's encoder, PyTorch vs onnxruntime in float32 and int8 (after 'captioner export default [--int8]'), ms per image (median over rounds)",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "speed": speed(args.rounds),
    }
    if args.dev:
        report["flickr8k_dev"] = dev_split(args.dev)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
