"""Decoding speed: our batched generate() vs the tutorial's one-image-at-a-time loop, same model, same process.

    python benchmarks/decode.py [--model default|CHECKPOINT] [--images 64] [--out benchmarks/results/decode.json]

Two parts. **As shipped** (``"shipped"`` in the JSON): the default model as a user runs it, both
decoders on both views, int8 decoding, its own settings (beam 3, length penalty, no repeated
trigrams, sentence rules, visual concepts): ``model.caption_batch`` from encoder features and
``model.caption(paths)`` from the JPEG files, at batch 1 and 32, over the 3 example photos and the
first 29 of coco_dev (32 everyday photos). Beside it, in the same rounds, two baselines on the same
model, one image at a time, each the tutorial's beam search of 3 (it has no length penalty, rules
or concepts, so its captions are shorter: both sides' mean words are recorded), from the same
features and from the files (each one decoded, preprocessed and encoded alone first). Where
``captioner export default --int8`` wrote the int8 encoder, the files are also captioned through it
(``"files, int8 encoder"`` rows, with how many captions differ from the float32 encoder's), against
the same baselines:

- **the tutorial loop**: the ensemble stepped with the tutorial's arithmetic (:class:`TutorialStep`:
  float32, each decoder and view in turn, the attention's feature projection recomputed for every
  beam at every step as its ``Attention`` module does), checked to give our step's
  log-probabilities within 1e-4 before it is timed;
- **our step, one image at a time**: the same search over this release's float32 ensemble step
  (the projection once per image, the tanh as a sigmoid): what batching alone adds.

Each figure is the median of ``--rounds`` rounds.

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
image at a time, its k beams as the batch, stepped with the tutorial's arithmetic (as above); and
per-image greedy decoding for beam 1. The JSON also has our step one image at a time.
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
from captioner.errors import ConfigError
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


class TutorialStep:
    """The same model stepped as the tutorial's ``DecoderWithAttention`` steps (models.py, caption.py):
    each of the model's decoders on each view in turn, in float32, the attention computed whole at
    every step (``encoder_att(encoder_out)`` over every beam's copy of the regions, then tanh), the
    context as a weighted sum; an ensemble's word distributions averaged as ours are. Same weights,
    same function (``check`` compares it with our step), the tutorial's arithmetic."""

    def __init__(self, model: Captioner) -> None:
        decoder = model.decoder
        self.members = list(decoder.members) if hasattr(decoder, "members") else [decoder]
        self.views = model.views
        if any(m.config.deep_output or m.config.attention != "soft" or not m.has_attention for m in self.members):
            raise SystemExit("the tutorial loop steps soft-attention decoders without deep output (as the shipped model's)")

    def init_state(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """features (B, V*P, D) -> per view its regions, per decoder and view its h and c."""
        views = features.view(features.shape[0], len(self.views), -1, features.shape[-1])
        state = {f"features {v}": views[:, v] for v in range(len(self.views))}
        for d, member in enumerate(self.members):
            for v in range(len(self.views)):
                mean = views[:, v].mean(dim=1)
                state[f"h {d} {v}"], state[f"c {d} {v}"] = member.init_h(mean), member.init_c(mean)
        return state

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor], attention: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor], None]:
        """One step of every decoder on every view; no attention returned (the search keeps none)."""
        new, log_probs = dict(state), []
        for d, member in enumerate(self.members):
            embeddings = member.embedding(tokens)  # (k, E)
            for v in range(len(self.views)):
                encoder_out, h, c = state[f"features {v}"], state[f"h {d} {v}"], state[f"c {d} {v}"]
                attention = member.attention
                att1 = attention.feature_proj(encoder_out)  # (k, P, A): every step, every beam
                att2 = attention.hidden_proj(h)  # (k, A)
                alpha = torch.softmax(attention.score(torch.tanh(att1 + att2.unsqueeze(1))).squeeze(2), dim=1)  # (k, P)
                context = (encoder_out * alpha.unsqueeze(2)).sum(dim=1)  # (k, D)
                context = torch.sigmoid(member.gate(h)) * context
                h, c = member.lstm(torch.cat([embeddings, context], dim=1), (h, c))
                new[f"h {d} {v}"], new[f"c {d} {v}"] = h, c
                log_probs.append(torch.log_softmax(member.classifier(h), dim=1))
        mean = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
        return mean, new, None

    @torch.inference_mode()
    def check(self, model: Captioner, features: torch.Tensor, steps: int = 4) -> float:
        """The largest difference between this stepping's log-probabilities and our step's, a few
        greedy steps from ``features`` (1, V*P, D)."""
        ours, theirs = model.decoder.init_state(features), self.init_state(features)
        tokens, worst = torch.tensor([model.vocab.start_id]), 0.0
        for _ in range(steps):
            a, ours, _ = model.decoder.step(tokens, ours)
            b, theirs, _ = self.step(tokens, theirs)
            worst = max(worst, float((torch.log_softmax(a, 1) - b).abs().max()))
            tokens = a.argmax(dim=1)
        return worst


@torch.inference_mode()
def tutorial_beam_search(model: Captioner, features: torch.Tensor, k: int, max_length: int, decoder=None) -> list[int]:
    """sgrvinod's caption.py beam search for ONE image (features (1, P, D)); returns the best word ids.
    ``decoder``: what it steps (:class:`TutorialStep` for the tutorial's arithmetic); the model's own
    decoder by default (our step, one image at a time)."""
    decoder, vocab = decoder or model.decoder, model.vocab
    state = select_state(decoder.init_state(features), torch.zeros(k, dtype=torch.long))  # k copies of the image
    previous_words = torch.full((k,), vocab.start_id, dtype=torch.long)
    sequences = previous_words.unsqueeze(1)  # (k, 1)
    top_scores = torch.zeros(k)
    complete, complete_scores = [], []
    step = 1
    while True:
        logits, state, _ = decoder.step(previous_words, state, False)  # no attention kept, on either side
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
def tutorial_greedy(model: Captioner, features: torch.Tensor, max_length: int, decoder=None) -> list[int]:
    decoder, vocab = decoder or model.decoder, model.vocab
    state = decoder.init_state(features)
    word = torch.tensor([vocab.start_id])
    words = []
    for _ in range(max_length):
        logits, state, _ = decoder.step(word, state, False)
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

    def ours_from_files(batch: int, captioner: Captioner = model) -> list[list[str]]:
        return [r.words for r in captioner.caption(photos, batch_size=batch, return_attention=False)]

    try:  # the int8 encoder, where 'captioner export default --int8' wrote it: its own rows
        int8_encoder: Captioner | None = Captioner.load("default", encoder_runtime="onnx-int8")
    except ConfigError:
        int8_encoder = None

    tutorial = TutorialStep(exact)
    difference = tutorial.check(exact, features[:1])
    if not difference < 1e-4:
        raise SystemExit(f"the tutorial's stepping differs from the model's by {difference:.2g}: not the same model")

    def tutorial_from_features(decoder) -> list[list[int]]:
        return [tutorial_beam_search(exact, features[i : i + 1], 3, max_length, decoder) for i in range(len(photos))]

    def tutorial_from_files(decoder) -> list[list[int]]:
        one = lambda path: exact.features(exact.preprocessing(load_image(path, draft=exact.preprocessing.draft_size)).unsqueeze(0))  # noqa: E731
        return [tutorial_beam_search(exact, one(path), 3, max_length, decoder) for path in photos]

    sides = {
        ("features", 1): lambda: ours_from_features(1), ("features", 32): lambda: ours_from_features(32),
        ("files", 1): lambda: ours_from_files(1), ("files", 32): lambda: ours_from_files(32),
        ("features", "tutorial"): lambda: tutorial_from_features(tutorial), ("files", "tutorial"): lambda: tutorial_from_files(tutorial),
        ("features", "our step"): lambda: tutorial_from_features(None), ("files", "our step"): lambda: tutorial_from_files(None),
    }  # fmt: skip
    if int8_encoder is not None:
        sides.update({("files, int8 encoder", batch): (lambda batch=batch: ours_from_files(batch, int8_encoder)) for batch in (1, 32)})
        int8_encoder.caption(photos[:2])
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
    for source in ("features", "files") + (("files, int8 encoder",) if int8_encoder is not None else ()):
        for batch in (1, 32):
            ours = (source, batch)
            baseline, our_step = (source.split(",")[0], "tutorial"), (source.split(",")[0], "our step")
            rows.append({
                "from": source, "batch": batch,
                "images_per_second": round(len(photos) / median[ours], 1),
                "tutorial_images_per_second": round(len(photos) / median[baseline], 1),
                "speedup": round(median[baseline] / median[ours], 2),
                "our_step_one_at_a_time_images_per_second": round(len(photos) / median[our_step], 1),
                "speedup_over_our_step_one_at_a_time": round(median[our_step] / median[ours], 2),
                "ms_per_image": round(1000 * median[ours] / len(photos), 1),
                "mean_words": round(sum(map(len, words[ours])) / len(photos), 2),
                "tutorial_mean_words": round(sum(map(len, words[baseline])) / len(photos), 2),
                **({"captions_unlike_the_float32_encoders": sum(a != b for a, b in zip(words[ours], words[("files", batch)]))} if "int8" in source else {}),
            })  # fmt: skip
            print(f"shipped, from {source:19s} batch {batch:2d}: {rows[-1]['images_per_second']:6.1f} images/s "
                  f"(tutorial loop {rows[-1]['tutorial_images_per_second']:5.1f}/s, x{rows[-1]['speedup']}; "
                  f"our step one at a time {rows[-1]['our_step_one_at_a_time_images_per_second']:5.1f}/s, x{rows[-1]['speedup_over_our_step_one_at_a_time']})")
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

    tutorial = TutorialStep(model)
    rows = []
    for beam in (1, 3, 5):
        config = GenerationConfig(strategy="greedy" if beam == 1 else "beam", beam_size=beam, max_length=args.max_length, return_attention=False)

        def one_at_a_time(decoder) -> list[list[int]]:
            if beam == 1:
                return [tutorial_greedy(model, features[i : i + 1], args.max_length, decoder) for i in range(args.images)]
            return [tutorial_beam_search(model, features[i : i + 1], beam, args.max_length, decoder) for i in range(args.images)]

        baseline_seconds, baseline_words = timed(lambda: one_at_a_time(tutorial), args.repeats)
        our_step_seconds, _ = timed(lambda: one_at_a_time(None), args.repeats)
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
                    "our_step_one_at_a_time_captions_per_second": round(args.images / our_step_seconds, 1),
                    "speedup_over_our_step_one_at_a_time": round(our_step_seconds / seconds, 2),
                    "mean_words": round(sum(map(len, words)) / len(words), 2),
                    "tutorial_mean_words": round(sum(map(len, baseline_words)) / len(baseline_words), 2),
                }
            )
            print(f"{rows[-1]['strategy']:>7}  batch {batch:2d}: {rows[-1]['captions_per_second']:7.1f} captions/s  "
                  f"(tutorial loop {rows[-1]['tutorial_per_image_captions_per_second']:6.1f}/s, x{rows[-1]['speedup']}; "
                  f"our step one at a time x{rows[-1]['speedup_over_our_step_one_at_a_time']})")
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
