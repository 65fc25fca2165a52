"""Decoding speed: our batched generate() vs the tutorial's one-image-at-a-time loop, same model, same process.

    python benchmarks/decode.py [--model CHECKPOINT] [--images 64] [--out benchmarks/results/decode.json]

Without --model it builds a Show-Attend-Tell model with Flickr8k-like sizes (vocabulary 2,538 words,
embedding/hidden/attention 512, lite0 head features 49 x 1280) and random weights: speed does not
depend on the weights, only on sizes and caption lengths (captions run to --max-length words, or end
earlier where the model says <end>; both sides decode the same captions). Decoding starts from
encoder features, so the numbers measure decoding alone (the encoder's own speed is in the README).

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

from captioner.data.vocabulary import SPECIAL_TOKENS, Vocabulary
from captioner.decoding import GenerationConfig, generate
from captioner.models.captioner import Captioner, CaptionerConfig
from captioner.models.decoder import DecoderConfig, select_state
from captioner.models.encoder import EncoderConfig


def flickr_sized_model() -> Captioner:
    torch.manual_seed(0)
    vocab = Vocabulary(list(SPECIAL_TOKENS) + [f"w{i}" for i in range(2534)])
    config = CaptionerConfig(encoder=EncoderConfig(pretrained=False), decoder=DecoderConfig(kind="attention", embed_dim=512, hidden_dim=512, attention_dim=512))
    return Captioner(config, vocab).eval()


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


def timed(function, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint folder (default: Flickr8k-sized random model)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Captioner.load(args.model) if args.model else flickr_sized_model()
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(args.images, 49, model.decoder.feature_dim, generator=generator) * 2  # (N, P, D), lite0-like range

    rows = []
    for beam in (1, 3, 5):
        config = GenerationConfig(strategy="greedy" if beam == 1 else "beam", beam_size=beam, max_length=args.max_length, return_attention=False)
        if beam == 1:
            baseline = lambda: [tutorial_greedy(model, features[i : i + 1], args.max_length) for i in range(args.images)]  # noqa: E731
        else:
            baseline = lambda: [tutorial_beam_search(model, features[i : i + 1], beam, args.max_length) for i in range(args.images)]  # noqa: E731
        baseline_seconds = timed(baseline, args.repeats)
        for batch in (1, 32):
            ours = lambda: [generate(model, features[i : i + batch], config) for i in range(0, args.images, batch)]  # noqa: E731
            seconds = timed(ours, args.repeats)
            rows.append(
                {
                    "strategy": "greedy" if beam == 1 else f"beam {beam}",
                    "batch": batch,
                    "captions_per_second": round(args.images / seconds, 1),
                    "tutorial_per_image_captions_per_second": round(args.images / baseline_seconds, 1),
                    "speedup": round(baseline_seconds / seconds, 2),
                }
            )
            print(f"{rows[-1]['strategy']:>7}  batch {batch:2d}: {rows[-1]['captions_per_second']:7.1f} captions/s  "
                  f"(tutorial loop {rows[-1]['tutorial_per_image_captions_per_second']:6.1f}/s, x{rows[-1]['speedup']})")
    result = {
        "benchmark": "decode",
        "model": args.model or "Show-Attend-Tell, vocab 2538, embed/hidden/attention 512, features 49x1280, random weights",
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
