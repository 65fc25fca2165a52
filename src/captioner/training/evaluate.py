"""Evaluate a checkpoint on a split at several beam sizes; write results.json and captions.jsonl."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.atomic import write_text_atomic
from captioner.data.prepare import PreparedDataset
from captioner.device import resolve_device
from captioner.errors import ConfigError
from captioner.models.captioner import Captioner, resolve_model_path
from captioner.training.evaluation import decode_split, score_split, split_features

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


@dataclass
class EvaluationReport:
    out: Path
    split: str
    images: int
    scores: dict[int, dict[str, float]]  # beam size -> metric -> value
    seconds: dict[int, float]
    length_penalty: float = 0.0
    no_repeat_ngram_size: int = 0

    def table(self) -> list[str]:
        names = [name for name in METRICS if any(name in s for s in self.scores.values())]
        header = f"{'beam':>4}  " + "  ".join(f"{name:>7}" for name in names) + f"  {'img/s':>6}"
        settings = f", length penalty {self.length_penalty:g}" if self.length_penalty else ""
        settings += f", no repeated {self.no_repeat_ngram_size}-grams" if self.no_repeat_ngram_size else ""
        lines = [f"{self.split} split, {self.images} images (corpus-level, 0-100{settings})", header]
        for beam, scores in self.scores.items():
            speed = self.images / max(self.seconds[beam], 1e-9)
            lines.append(f"{beam:>4}  " + "  ".join(f"{scores[name]:7.2f}" for name in names) + f"  {speed:6.1f}")
        return lines


def evaluate_model(
    model_path: str,
    *,
    data: str | None = None,
    images: str | None = None,
    split: str = "test",
    beams: list[int] = [3],
    max_length: int | None = None,
    length_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    limit: int = 0,
    meteor: bool = True,
    out: str | None = None,
    batch_size: int = 50,
    device: str = "auto",
    progress: bool = True,
) -> EvaluationReport:
    if any(beam < 1 for beam in beams):
        raise ConfigError("beam sizes must be at least 1")
    folder = resolve_model_path(model_path)
    torch_device = resolve_device(device)
    model = Captioner.load(folder, device=torch_device)
    data = data or trained_on(folder)
    if not data:
        raise ConfigError(f"which data? {model_path} does not say what it was trained on; pass --data PREPARED_FOLDER")
    dataset = PreparedDataset(data, image_root=images)
    if not dataset.split_images(split):
        raise ConfigError(f"{data} has no {split} images")
    if len(model.vocab) != len(dataset.vocab) or model.vocab.words != dataset.vocab.words:
        print(f"note: {model_path} has its own vocabulary ({len(model.vocab)} words); references are raw text, so scores are unaffected")
    features = split_features(model, dataset, split, device=torch_device, progress=progress)
    metrics = [name for name in METRICS if meteor or name != "METEOR"]
    scores: dict[int, dict[str, float]] = {}
    seconds: dict[int, float] = {}
    generated: dict[int, dict[int, Any]] = {}
    for beam in dict.fromkeys(beams):  # unique, in the order given
        config = model.generation_config(
            beam_size=beam, max_length=max_length, length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size, return_attention=False
        )
        start = time.perf_counter()
        captions = decode_split(model, dataset, split, config, features=features, limit=limit, batch_size=batch_size, progress=progress)
        seconds[beam] = time.perf_counter() - start
        scores[beam] = score_split(dataset, captions, metrics=metrics)
        generated[beam] = captions
    out_dir = Path(out) if out else (Path(f"eval-default-{split}") if str(model_path) == "default" else folder.parent / f"eval-{folder.name}-{split}")
    out_dir.mkdir(parents=True, exist_ok=True)
    count = len(next(iter(generated.values())))
    results = {
        "model": str(model_path),
        "data": str(data),
        "split": split,
        "images": count,
        "metrics": "COCO caption evaluation (pycocoevalcap: PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr-D), corpus-level, 0-100",
        "max_length": config.max_length,
        "length_penalty": config.length_penalty,
        "no_repeat_ngram_size": config.no_repeat_ngram_size,
        "beams": {str(beam): {name: round(value, 2) for name, value in s.items()} for beam, s in scores.items()},
        "images_per_second": {str(beam): round(count / max(seconds[beam], 1e-9), 1) for beam in scores},
    }
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    lines = []
    first = next(iter(generated.values()))
    for index in first:
        entry = dataset.images[index]
        lines.append(
            json.dumps(
                {
                    "image": entry["image"],
                    "image_id": entry["image_id"],
                    "generated": {f"beam{beam}": generated[beam][index][0].text for beam in generated},
                    "references": entry["captions"],
                }
            )
        )
    write_text_atomic(out_dir / "captions.jsonl", "\n".join(lines) + "\n")
    return EvaluationReport(out_dir, split, count, scores, seconds, config.length_penalty, config.no_repeat_ngram_size)


def trained_on(folder: Path) -> str | None:
    """The prepared folder a checkpoint was trained on (an ensemble's: its first model's), if it says."""
    try:
        if (folder / "train_config.json").is_file():
            data = json.loads((folder / "train_config.json").read_text(encoding="utf-8")).get("data")
        elif (folder / "ensemble_members.json").is_file():
            data = json.loads((folder / "ensemble_members.json").read_text(encoding="utf-8"))[0].get("trained_on")
        else:
            return None
    except (ValueError, RecursionError, OSError, AttributeError, IndexError, KeyError, TypeError):
        return None
    return data if isinstance(data, str) and data else None
