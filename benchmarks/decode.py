"""Decoding speed: our batched generate() vs the tutorial's one-image-at-a-time loop, same model, same process.

    python benchmarks/decode.py [--model default|CHECKPOINT] [--images 64] [--out benchmarks/results/decode.json]

Two parts. **As shipped** (``"shipped"`` in the JSON): the default model as a user runs it, both
decoders on both views, int8 decoding, its own settings (beam 3, length penalty, no repeated
trigrams, sentence rules, visual concepts): ``model.caption_batch`` from encoder features and
``model.caption(paths)`` from the JPEG files, at batch 1 and 32, over the 3 example photos and the
first 29 of coco_dev (32 everyday photos). Beside it, in the same rounds, the tutorial's loop on the
same model: one image at a time, its beam search of 3 over the ensemble's float32 step (the
tutorial has no length penalty, rules or concepts, so its captions are shorter: both sides' mean
words are recorded), from the same features, and from the files (each one decoded, preprocessed
and encoded alone first). Each figure is the median of ``--rounds`` rounds.

**One decoder** (``"results"``, as before):

The model is the shipped default's first decoder (Show-Attend-Tell trained on Flickr8k: vocabulary
2,538 words, embedding/hidden/attention 512, EfficientNet-Lite2 features 81 x 1280) on the plain
view, unless --model names another (an ensemble is likewise reduced to its first decoder: the
baseline is a single model).
Its inputs are the encoder features of the photos in examples/, repeated to --images: real
features, so captions have real lengths. Decoding starts from those features, so the numbers
measure decoding alone (the encoder's own speed is in the README). Both sides decode with the same
beam size and length limit; greedy gives the same captions on both sides, beam search nearly the
same (the tutorial narrows its beam as hypotheses finish, ours keeps k): the JSON records each
side's mean caption length so the work compared is visible.

The baseline is sgrvinod's "PyTorch Tutorial to Image Captioning" beam search (caption.py): one
image at a time, its k beams as the batch; and per-image greedy decoding for beam 1.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from captioner.decoding import GenerationConfig
from captioner.models.captioner import Captioner, CaptionerConfig
from captioner.models.decoder import select_state


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COCO_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_dev" / "images"


def first_decoder(model: Captioner) -> Captioner:
    """A single model: an ensemble's first decoder on the plain view; any other model as it is."""
    if model.config.ensemble is None:
        return model
    config = CaptionerConfig(model.config.encoder, model.config.ensemble.decoders[0], model.preprocessing, model.config.max_length)
    single = Captioner(config, model.vocab)
    single.decoder.load_state_dict(model.decoder.members[0].state_dict())
    return single.eval()


def example_features(model: Captioner, count: int) -> torch.Tensor:
    """Encoder features (count, P, D) of the photos in examples/, repeated to ``count``."""
    from captioner.data.images import list_images, load_image

    photos = list_images([EXAMPLES])
    pixels = torch.stack([model.preprocessing(load_image(path, draft=model.preprocessing.draft_size)) for path in photos])
    with torch.inference_mode():
        features = model.encode(pixels)  # (photos, P, D)
    return features[torch.arange(count) % len(photos)].clone()


@torch.inference_mode()
def tutorial_beam_search(model: Captioner, features: torch.Tensor, k: int, max_length: int) -> list[int]:
    """sgrvinod's caption.py beam search for ONE image (features (1, P, D)); returns the best word ids."""
    decoder, vocab = model.decoder, model.vocab
    state = select_state(decoder.init_state(features), torch.zeros(k, dtype=torch.long))  # k copies of the image
    previous_words = torch.full((k,), vocab.start_id, dtype=torch.long)
    sequences = previous_words.unsqueeze(1)  # (k, 1)
    top_scores = torch.zeros(k)
    complete, complete_scores = [], []
    step = 1
    while True:
        logits, state, _ = decoder.step(previous_words, state)
        scores = top_scores.unsqueeze(1) + torch.log_softmax(logits, dim=1)  # (s, V)
        if step == 1:
            top_scores, top_words = scores[0].topk(k)
        else:
            top_scores, top_words = scores.view(-1).topk(k)
        previous_index = top_words // len(vocab)
        next_words = top_words % len(vocab)
        sequences = torch.cat([sequences[previous_index], next_words.unsqueeze(1)], dim=1)
        incomplete = [i for i, word in enumerate(next_words.tolist()) if word != vocab.end_id]
        finished = sorted(set(range(len(next_words))) - set(incomplete))
        if finished:
            complete.extend(sequences[finished].tolist())
            complete_scores.extend(top_scores[finished].tolist())
        k -= len(finished)
        if k == 0:
            break
        sequences = sequences[incomplete]
        state = select_state(state, previous_index[incomplete])
        top_scores = top_scores[incomplete]
        previous_words = next_words[incomplete]
        if step > max_length:
            break
        step += 1
    if not complete:  # the tutorial crashes here ("max() arg is an empty sequence"); we keep the live beams
        complete, complete_scores = sequences.tolist(), top_scores.tolist()
    best = complete[max(range(len(complete_scores)), key=complete_scores.__getitem__)]
    return [w for w in best[1:] if w != vocab.end_id]


@torch.inference_mode()
def tutorial_greedy(model: Captioner, features: torch.Tensor, max_length: int) -> list[int]:
    decoder, vocab = model.decoder, model.vocab
    state = decoder.init_state(features)
    word = torch.tensor([vocab.start_id])
    words = []
    for _ in range(max_length):
        logits, state, _ = decoder.step(word, state)
        word = logits.argmax(dim=1)
        if int(word) == vocab.end_id:
            break
        words.append(int(word))
    return words


def timed(function, repeats: int) -> tuple[float, list]:
    """(the best of ``repeats`` wall-clock times, what the function returned)."""
    best, result = math.inf, []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def shipped_photos() -> list[Path]:
    photos = sorted(EXAMPLES.glob("*.jpg"))
    return photos + sorted(COCO_DEV.glob("*.jpg"))[: 32 - len(photos)] if COCO_DEV.is_dir() else photos


def as_shipped(rounds: int) -> list[dict]:
    """The shipped model at its own settings vs the tutorial loop on it, from features and from files."""
    from captioner.data.images import load_image

    model = Captioner.load("default")  # int8 decoding, its decoding settings
    exact = Captioner.load("default", decoder_compute="float32")  # what the tutorial loop steps
    photos = shipped_photos()
    config = GenerationConfig.for_captions(3, 1, return_attention=False)
    pixels = torch.stack([model.preprocessing(load_image(path, draft=model.preprocessing.draft_size)) for path in photos])
    features = model.features(pixels)  # (N, V*P, D)
    max_length = model.config.max_length

    def ours_from_features(batch: int) -> list[list[str]]:
        return [r.words for start in range(0, len(photos), batch) for r in model.caption_batch(features[start : start + batch], config)]

    def ours_from_files(batch: int) -> list[list[str]]:
        return [r.words for r in model.caption(photos, batch_size=batch, return_attention=False)]

    def tutorial_from_features() -> list[list[int]]:
        return [tutorial_beam_search(exact, features[i : i + 1], 3, max_length) for i in range(len(photos))]

    def tutorial_from_files() -> list[list[int]]:
        one = lambda path: exact.features(exact.preprocessing(load_image(path, draft=exact.preprocessing.draft_size)).unsqueeze(0))  # noqa: E731
        return [tutorial_beam_search(exact, one(path), 3, max_length) for path in photos]

    sides = {
        ("features", 1): lambda: ours_from_features(1), ("features", 32): lambda: ours_from_features(32),
        ("files", 1): lambda: ours_from_files(1), ("files", 32): lambda: ours_from_files(32),
        ("features", "tutorial"): tutorial_from_features, ("files", "tutorial"): tutorial_from_files,
    }  # fmt: skip
    model.caption(photos[:2])  # warm-up: lazy loading (concept file, word vectors), first vocabulary extensions
    seconds: dict = {side: [] for side in sides}
    words: dict = {}
    for _ in range(rounds):
        for side, run in sides.items():
            start = time.perf_counter()
            words[side] = run()
            seconds[side].append(time.perf_counter() - start)
    median = {side: statistics.median(values) for side, values in seconds.items()}
    rows = []
    for source in ("features", "files"):
        for batch in (1, 32):
            ours, tutorial = (source, batch), (source, "tutorial")
            rows.append({
                "from": source, "batch": batch,
                "images_per_second": round(len(photos) / median[ours], 1),
                "tutorial_images_per_second": round(len(photos) / median[tutorial], 1),
                "speedup": round(median[tutorial] / median[ours], 2),
                "ms_per_image": round(1000 * median[ours] / len(photos), 1),
                "mean_words": round(sum(map(len, words[ours])) / len(photos), 2),
                "tutorial_mean_words": round(sum(map(len, words[tutorial])) / len(photos), 2),
            })  # fmt: skip
            print(f"shipped, from {source:8s} batch {batch:2d}: {rows[-1]['images_per_second']:6.1f} images/s "
                  f"(tutorial loop {rows[-1]['tutorial_images_per_second']:5.1f}/s, x{rows[-1]['speedup']})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a checkpoint folder, or default (the shipped model)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the as-shipped part (medians)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shipped = as_shipped(args.rounds) if args.model == "default" else []
    model = first_decoder(Captioner.load(args.model))
    features = example_features(model, args.images)  # (N, P, D)

    rows = []
    for beam in (1, 3, 5):
        config = GenerationConfig(strategy="greedy" if beam == 1 else "beam", beam_size=beam, max_length=args.max_length, return_attention=False)
        if beam == 1:
            baseline = lambda: [tutorial_greedy(model, features[i : i + 1], args.max_length) for i in range(args.images)]  # noqa: E731
        else:
            baseline = lambda: [tutorial_beam_search(model, features[i : i + 1], beam, args.max_length) for i in range(args.images)]  # noqa: E731
        baseline_seconds, baseline_words = timed(baseline, args.repeats)
        for batch in (1, 32):
            ours = lambda: [c[0].tokens for i in range(0, args.images, batch) for c in model.generate(features[i : i + batch], config)]  # noqa: E731
            seconds, words = timed(ours, args.repeats)
            rows.append(
                {
                    "strategy": "greedy" if beam == 1 else f"beam {beam}",
                    "batch": batch,
                    "captions_per_second": round(args.images / seconds, 1),
                    "tutorial_per_image_captions_per_second": round(args.images / baseline_seconds, 1),
                    "speedup": round(baseline_seconds / seconds, 2),
                    "mean_words": round(sum(map(len, words)) / len(words), 2),
                    "tutorial_mean_words": round(sum(map(len, baseline_words)) / len(baseline_words), 2),
                }
            )
            print(f"{rows[-1]['strategy']:>7}  batch {batch:2d}: {rows[-1]['captions_per_second']:7.1f} captions/s  "
                  f"(tutorial loop {rows[-1]['tutorial_per_image_captions_per_second']:6.1f}/s, x{rows[-1]['speedup']})")
    result = {
        "benchmark": "decode",
        "model": args.model,
        "decoder": model.config.decoder.to_dict(),
        "vocab_size": len(model.vocab),
        "features": "encoder features of examples/ (%d x %d per image), repeated" % tuple(features.shape[1:]),
        "images": args.images,
        "max_length": args.max_length,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "shipped": {"photos": len(shipped_photos()), "rounds": args.rounds, "rows": shipped},
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
