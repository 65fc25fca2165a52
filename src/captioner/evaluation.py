"""Evaluating a model: decode a split for real (no teacher forcing) and score it with the COCO caption metrics.

:func:`decode_split` and :func:`score_split` serve validation during training and ``captioner
evaluate``; :func:`evaluate_model` is the command: a checkpoint scored at several beam sizes, with
``results.json`` and ``captions.jsonl`` written. Features come from the cache when the encoder is the
installed pretrained one (frozen); a fine-tuned encoder encodes the images itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner import ranges
from captioner.atomic import write_text_atomic
from captioner.data.features import ImageFiles, raise_image_errors, split_features
from captioner.data.prepare import PreparedDataset
from captioner.decoding import GenerationConfig
from captioner.device import resolve_device
from captioner.errors import ConfigError
from captioner.locking import exclusive_writer
from captioner.models.captioner import Captioner, resolve_model_path

if TYPE_CHECKING:
    from captioner.models.captioner import CaptionResult

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def decode_split(
    model: Captioner,
    dataset: PreparedDataset,
    split: str,
    config: GenerationConfig,
    *,
    features: np.ndarray | None = None,
    limit: int = 0,
    batch_size: int = 50,
    workers: int = 2,
    progress: bool = True,
) -> dict[int, CaptionResult]:
    """{image index: its caption} for the split's images (the first ``limit`` of them if limit > 0),
    from cached ``features`` (N, P, D) when given, else from the image files."""
    indices = dataset.split_images(split)
    if limit:
        indices = indices[:limit]
    results: dict[int, CaptionResult] = {}
    bar = tqdm(total=len(indices), desc=f"decoding {split}", unit="img", disable=not progress or None, leave=False)
    if features is not None:
        batches = (
            (indices[start:end], torch.from_numpy(np.asarray(features[start:end], dtype=np.float32)))  # (b, P, D)
            for start, end in ((start, min(start + batch_size, len(indices))) for start in range(0, len(indices), batch_size))
        )
    else:
        loader = DataLoader(ImageFiles([dataset.image_path(i) for i in indices], model.preprocessing), batch_size=batch_size, num_workers=workers)
        batches = ((indices[start : start + batch_size], _checked(images, errors)) for start, (images, errors) in zip(range(0, len(indices), batch_size), loader))
    for chunk, inputs in batches:
        sources = [dataset.images[index]["image"] for index in chunk]
        results.update(zip(chunk, model.caption_batch(inputs, config, sources)))
        bar.update(len(chunk))
    bar.close()
    return results


def _checked(images: torch.Tensor, errors: Sequence[str]) -> torch.Tensor:
    raise_image_errors(errors)
    return images


def score_split(dataset: PreparedDataset, captions: dict[int, CaptionResult], *, metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Corpus-level COCO metrics (0-100) of each image's caption against all its references."""
    from captioner.metrics import score_captions

    generated = {index: result.text for index, result in captions.items()}
    references = {index: dataset.images[index]["captions"] for index in captions}
    return score_captions(generated, references, metrics=metrics)


def caption_checks(dataset: PreparedDataset, captions: dict[int, CaptionResult], *, resamples: int = 1000) -> dict[str, float]:
    """What the captions name and how they end (:mod:`captioner.metrics.mentions`), with 95%
    intervals of CIDEr-D and of the non-person object F1 from ``resamples`` bootstrap resamples of
    the images (CIDEr-D's document frequencies fixed to the whole split, as its corpus score uses)."""
    from captioner.metrics.coco import cider_per_image
    from captioner.metrics.mentions import f1_from_counts, mention_counts, mention_scores, sentence_checks

    generated = {index: result.text for index, result in captions.items()}
    references = {index: dataset.images[index]["captions"] for index in captions}
    checks: dict[str, float] = {**mention_scores(generated, references), **sentence_checks(generated)}
    checks["steered by concepts"] = sum(1 for result in captions.values() if any(result.constraints))  # type: ignore[assignment]
    checks["familiar photos"] = sum(1 for result in captions.values() if result.familiar)  # type: ignore[assignment]
    keys = list(generated)
    per_image = cider_per_image(generated, references)  # once for the split: it tokenizes and scores every image
    cider = np.array([per_image[key] for key in keys])  # (N,)
    counts = np.array([mention_counts(generated[key], references[key], exclude=frozenset({"person"})) for key in keys])  # (N, 3)
    draws = np.random.default_rng(0).integers(0, len(keys), size=(resamples, len(keys)))  # (R, N)
    cider_means = cider[draws].mean(axis=1)
    f1s = np.array([f1_from_counts(*counts[rows].sum(axis=0).tolist())["F1"] for rows in draws])
    for name, values in (("CIDEr-D", cider_means), ("object F1 (no person)", f1s)):
        low, high = np.percentile(values, [2.5, 97.5])
        checks[f"{name} 95% interval"] = [round(float(low), 2), round(float(high), 2)]  # type: ignore[assignment]
    return checks


# ----- captioner evaluate ---------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    out: Path
    split: str
    images: int
    scores: dict[int, dict[str, float]]  # beam size -> metric -> value
    seconds: dict[int, float]
    checks: dict[int, dict[str, Any]]  # beam size -> caption_checks
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
        lines.append(
            "beam  objects named: precision / recall / F1, all classes and without person; captions ending on a dangling word; with a doubled word ('are are' + 'red and red');"
            " captions that had to name a concept (photos familiar to the model)"
        )
        for beam, checks in self.checks.items():
            mentions = " / ".join(f"{checks[f'object {name}']:.1f}" for name in ("precision", "recall", "F1"))
            without = " / ".join(f"{checks[f'object {name} (no person)']:.1f}" for name in ("precision", "recall", "F1"))
            low, high = checks["CIDEr-D 95% interval"]
            lines.append(
                f"{beam:>4}  {mentions};  {without};  {checks['dangling endings']} dangling;  {checks['doubled words']} + {checks['doubled around and/or']} doubled;  {checks['steered by concepts']} steered ({checks['familiar photos']} familiar);  CIDEr-D 95% interval {low:.1f}-{high:.1f}"
            )
        return lines


def evaluate_model(
    model_path: str,
    *,
    data: str | None = None,
    images: str | None = None,
    split: str = "test",
    beams: Sequence[int] = (3,),
    max_length: int | None = None,
    length_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    early_stopping: str | None = None,
    block_bad_endings: bool | None = None,
    block_doubled_words: bool | None = None,
    concept_constraints: int | None = None,
    concept_threshold: float | None = None,
    concept_familiar_percentile: float | None = None,
    limit: int = 0,
    meteor: bool = True,
    out: str | None = None,
    batch_size: int = 50,
    device: str = "auto",
    decoder_compute: str = "auto",
    hard_decoding: str | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Score ``model_path`` on ``split`` at each beam size in ``beams``; write results.json and captions.jsonl."""
    ranges.whole_number("limit", limit, 0, 10**9)
    ranges.whole_number("batch_size", batch_size, 1, 4096)
    settings = {"max_length": max_length, "length_penalty": length_penalty, "no_repeat_ngram_size": no_repeat_ngram_size,
                "early_stopping": early_stopping, "block_bad_endings": block_bad_endings, "block_doubled_words": block_doubled_words,
                "concept_constraints": concept_constraints, "concept_threshold": concept_threshold,
                "concept_familiar_percentile": concept_familiar_percentile, "return_attention": False}
    configs = {beam: GenerationConfig.for_captions(beam, **settings) for beam in dict.fromkeys(beams)}  # unique, in the order given
    folder = resolve_model_path(model_path)
    out_dir = Path(out) if out else (Path(f"eval-default-{split}") if str(model_path) == "default" else folder.parent / f"eval-{folder.name}-{split}")
    with exclusive_writer(out_dir):
        return _evaluate(
            folder, model_path, out_dir, configs, data=data, images=images, split=split, limit=limit, meteor=meteor, batch_size=batch_size, device=device,
            decoder_compute=decoder_compute, hard_decoding=hard_decoding, progress=progress,
        )


def _evaluate(
    folder: Path, model_path: str, out_dir: Path, configs: dict[int, GenerationConfig], *,
    data: str | None, images: str | None, split: str, limit: int, meteor: bool, batch_size: int, device: str, decoder_compute: str,
    hard_decoding: str | None, progress: bool,
) -> EvaluationReport:  # fmt: skip
    torch_device = resolve_device(device)
    model = Captioner.load(folder, device=torch_device, decoder_compute=decoder_compute, encoder_runtime="torch")  # features come from the cache PyTorch fills
    if hard_decoding is not None:
        model.read_hard_attention_as(hard_decoding)
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
    checks: dict[int, dict[str, Any]] = {}
    generated: dict[int, dict[int, CaptionResult]] = {}
    for beam, config in configs.items():
        start = time.perf_counter()
        captions = decode_split(model, dataset, split, config, features=features, limit=limit, batch_size=batch_size, progress=progress)
        seconds[beam] = time.perf_counter() - start
        scores[beam] = score_split(dataset, captions, metrics=metrics)
        checks[beam] = caption_checks(dataset, captions)
        generated[beam] = captions
    used = model.settings_for(next(iter(configs.values())))  # what the model decoded with
    out_dir.mkdir(parents=True, exist_ok=True)
    count = len(next(iter(generated.values())))
    results = {
        "model": str(model_path),
        "data": str(data),
        "split": split,
        "images": count,
        "metrics": "COCO caption evaluation (pycocoevalcap: PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr-D), corpus-level, 0-100",
        "decoder_compute": model.decoder_compute,
        **({"hard_decoding": hard_decoding} if hard_decoding is not None else {}),
        "max_length": used.max_length,
        "length_penalty": used.length_penalty,
        "no_repeat_ngram_size": used.no_repeat_ngram_size,
        "early_stopping": used.early_stopping,
        "block_bad_endings": used.block_bad_endings,
        "block_doubled_words": used.block_doubled_words,
        "concept_constraints": used.concept_constraints,
        "concept_threshold": used.concept_threshold,
        "concept_familiar_percentile": used.concept_familiar_percentile,
        "beams": {str(beam): {name: round(value, 2) for name, value in s.items()} for beam, s in scores.items()},
        "images_per_second": {str(beam): round(count / max(seconds[beam], 1e-9), 1) for beam in scores},
        "checks": {str(beam): {name: round(value, 2) if isinstance(value, float) else value for name, value in c.items()} for beam, c in checks.items()},
        "checks_described": "object mentions: COCO's 80 classes with synonyms, an object present when 2 references name it, micro-averaged, 0-100; "
        "dangling endings: captions ending on a determiner, preposition, conjunction, auxiliary or colour; doubled words: a word twice in a row; "
        "doubled around and/or: a word twice around 'and' or 'or' ('a red and red'); steered by concepts: captions that had to name a visual concept; "
        "familiar photos: nearer the model's training photos than concept_familiar_percentile % of its dev photos (no concept steers them); "
        "intervals: 95%, 1000 bootstrap resamples of the images",
    }
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    lines = []
    for index in next(iter(generated.values())):
        entry = dataset.images[index]
        lines.append(
            json.dumps(
                {
                    "image": entry["image"],
                    "image_id": entry["image_id"],
                    "generated": {f"beam{beam}": generated[beam][index].text for beam in generated},
                    "references": entry["captions"],
                }
            )
        )
    write_text_atomic(out_dir / "captions.jsonl", "\n".join(lines) + "\n")
    return EvaluationReport(out_dir, split, count, scores, seconds, checks, float(used.length_penalty or 0.0), int(used.no_repeat_ngram_size or 0))


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
