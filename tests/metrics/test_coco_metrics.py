"""Our wrapper of the COCO caption metrics, checked against numbers worked out independently."""

import math
from collections import Counter

import pytest

from captioner.metrics import METRIC_NAMES, MetricsError, ptb_tokenize, score_captions

CORPUS_REFS = {
    "a": ["a dog runs on the grass", "a brown dog is running on grass", "the dog plays outside"],
    "b": ["two people sit on a bench", "a couple is sitting on a park bench"],
    "c": ["a red car parked on the street", "a car on a road"],
    "d": ["a man rides a bike down the hill", "a cyclist goes downhill"],
}
CORPUS_GEN = {"a": "a dog is running on the grass", "b": "people sitting on a bench", "c": "a red car on the street", "d": "a man riding a bike"}


def bleu_by_hand(generated, references, max_n=4):
    """Corpus BLEU from its definition: clipped n-gram precisions summed over the corpus, geometric
    mean, brevity penalty with the reference length closest to each candidate (ties: shorter)."""
    matches, totals = [0] * max_n, [0] * max_n
    candidate_length = reference_length = 0
    for key, caption in generated.items():
        words = caption.split()
        refs = [r.split() for r in references[key]]
        candidate_length += len(words)
        reference_length += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
        for n in range(1, max_n + 1):
            grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            best = Counter()
            for r in refs:
                for gram, count in Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1)).items():
                    best[gram] = max(best[gram], count)
            matches[n - 1] += sum(min(count, best[gram]) for gram, count in grams.items())
            totals[n - 1] += max(len(words) - n + 1, 0)
    penalty = 1.0 if candidate_length > reference_length else math.exp(1 - reference_length / candidate_length)
    scores = []
    for n in range(1, max_n + 1):
        log_mean = sum(math.log(matches[k] / totals[k]) for k in range(n)) / n
        scores.append(100 * penalty * math.exp(log_mean))
    return scores


def test_bleu_equals_the_definition():
    ours = score_captions(CORPUS_GEN, CORPUS_REFS, metrics=["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"])
    expected = bleu_by_hand(CORPUS_GEN, CORPUS_REFS)
    for n in range(4):
        assert ours[f"BLEU-{n + 1}"] == pytest.approx(expected[n], abs=1e-4)
    assert 20 < ours["BLEU-4"] < ours["BLEU-1"] < 100


def test_short_candidates_get_the_brevity_penalty():
    generated = {"a": "a dog", "b": "people on a bench", "c": "a red car", "d": "a man"}
    ours = score_captions(generated, CORPUS_REFS, metrics=["BLEU-1"])
    assert ours["BLEU-1"] == pytest.approx(bleu_by_hand(generated, CORPUS_REFS, max_n=1)[0], abs=1e-4)
    assert ours["BLEU-1"] < 50  # every word matches, the penalty does the rest


@pytest.mark.slow
def test_a_perfect_caption_set_scores_the_maximum():
    captions = {i: c for i, c in enumerate(["a dog runs on the grass", "two people sit on a park bench", "a red car parked in the street"])}
    scores = score_captions(captions, {i: [c] * 5 for i, c in captions.items()})
    assert set(scores) == set(METRIC_NAMES)
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"):
        assert scores[name] == pytest.approx(100.0, abs=1e-5), name
    # CIDEr-D: each n-gram vector equals its references' (cosine 1, no length penalty), averaged over
    # n = 1..4 and scaled by 10 -> 10 per image, 1000 on our 0-100 scale.
    assert scores["CIDEr-D"] == pytest.approx(1000.0, abs=1e-6)


@pytest.mark.slow
def test_better_captions_score_higher_on_every_metric():
    bad = {"a": "a bench on the street", "b": "a car", "c": "the man runs", "d": "grass"}
    good, poor = score_captions(CORPUS_GEN, CORPUS_REFS), score_captions(bad, CORPUS_REFS)
    for name in METRIC_NAMES:
        assert good[name] > poor[name], name


def test_ptb_tokenizer_lowercases_and_drops_punctuation():
    assert ptb_tokenize(["A dog, running!", "", "The cat's mat... (big)", "line\nbreak\tand tab"]) == [
        "a dog running",
        "",
        "the cat 's mat -lrb- big -rrb-",  # pycocoevalcap's own quirk: it lists -LRB- but lower-cases first
        "line break and tab",
    ]


@pytest.mark.slow
def test_empty_and_odd_captions_do_not_crash_any_scorer():
    generated = {"a": "", "b": "a ||| bench", "c": "two\nlines", "d": "émoji 🙂 caption"}
    scores = score_captions(generated, CORPUS_REFS)
    assert all(math.isfinite(value) and value >= 0 for value in scores.values())


def test_errors_are_one_line_captioner_errors():
    with pytest.raises(MetricsError, match="different images"):
        score_captions({"a": "x"}, {"b": ["x"]})
    with pytest.raises(MetricsError, match="no reference captions"):
        score_captions({"a": "x"}, {"a": []})
    with pytest.raises(MetricsError, match="no generated captions"):
        score_captions({}, {})
    with pytest.raises(MetricsError, match="unknown metric"):
        score_captions({"a": "x"}, {"a": ["x"]}, metrics=["SPICE"])


def test_missing_java_is_a_clear_error(monkeypatch):
    import captioner.metrics.coco as coco

    monkeypatch.setattr(coco.shutil, "which", lambda name: None)
    with pytest.raises(MetricsError, match="need Java"):
        score_captions({"a": "x"}, {"a": ["x"]})
    # pre-tokenised text without METEOR needs no Java at all
    assert score_captions({"a": "a dog"}, {"a": ["a dog"]}, metrics=["CIDEr-D"], tokenize=False)["CIDEr-D"] >= 0
