"""Decoding speed: our batched generate() vs the tutorial's one-image-at-a-time loop, same model, same process.

    python benchmarks/decode.py [--model default|CHECKPOINT] [--images 64] [--out benchmarks/results/decode.json]

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
import time
from pathlib import Path

import torch

from captioner.decoding import GenerationConfig
from captioner.models.captioner import Captioner, CaptionerConfig
from captioner.models.decoder import select_state


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a checkpoint folder, or default (the shipped model)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
