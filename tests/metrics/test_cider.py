"""Our fixed-frequency CIDEr-D (the self-critical reward) against pycocoevalcap's CIDEr-D."""

import random

import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.metrics.cider import CiderD

WORDS = "a the dog cat man woman runs sits on in grass street red blue bike ball with two".split()


def random_corpus(seed, images=12):
    rng = random.Random(seed)
    sentence = lambda: [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]  # noqa: E731
    references = {i: [sentence() for _ in range(rng.randint(1, 5))] for i in range(images)}
    candidates = {i: sentence() if i % 3 else references[i][0] for i in range(images)}  # some copy a reference
    return references, candidates


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_pycocoevalcap_when_frequencies_come_from_the_scored_set(seed):
    references, candidates = random_corpus(seed)
    mean, per_image = Cider().compute_score(
        {i: [" ".join(r) for r in refs] for i, refs in references.items()}, {i: [" ".join(c)] for i, c in candidates.items()}
    )
    scorer = CiderD(references.values())
    ours = [scorer.score(candidates[i], scorer.reference_vectors(references[i])) for i in references]
    assert ours == pytest.approx(list(per_image), rel=1e-9, abs=1e-12)
    assert sum(ours) / len(ours) == pytest.approx(mean)


def test_frequencies_are_the_corpus_not_the_batch():
    references, candidates = random_corpus(3, images=30)
    corpus = CiderD(references.values())
    batch = CiderD([references[0], references[1]])
    # The same caption scores differently when n-gram rarity is judged over 30 images instead of 2.
    vectors = corpus.reference_vectors(references[1])
    assert corpus.score(candidates[1], vectors) != pytest.approx(batch.score(candidates[1], batch.reference_vectors(references[1])))


def test_ranks_captions_sensibly_and_handles_edge_cases():
    references = [[["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog", "running"]], [["a", "man", "on", "a", "bike"]]]
    scorer = CiderD(references)
    vectors = scorer.reference_vectors(references[0])
    good, poor, wrong = ["a", "dog", "runs", "on", "grass"], ["a", "dog"], ["a", "man", "on", "a", "bike"]
    assert scorer.score(good, vectors) > scorer.score(poor, vectors) > scorer.score(wrong, vectors) >= 0
    assert scorer.score([], vectors) == 0.0
    assert scorer.score(good, []) == 0.0
    ids = CiderD([[[7, 8, 9]], [[5, 6]]])
    assert ids.score([7, 8], ids.reference_vectors([[7, 8, 9]])) > 0  # word ids work as well as words
    single = CiderD([[[7, 8, 9]]])
    assert single.score([7, 8, 9], single.reference_vectors([[7, 8, 9]])) == 0.0  # one image: every idf is log(1) = 0
    with pytest.raises(ValueError):
        CiderD([])
