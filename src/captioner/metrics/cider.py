"""CIDEr-D with fixed document frequencies: the reward of self-critical training.

The COCO caption code (``pycocoevalcap.cider``) computes CIDEr-D's document frequencies from the
references of the captions it is scoring. Self-critical training scores a few hundred sampled
captions per step and needs the frequencies of the whole training corpus instead (as Rennie et al.
and ruotianluo's self-critical.pytorch do), computed once; its references' n-gram vectors are computed
once too. Everything else is exactly ``pycocoevalcap``'s CIDEr-D: n = 1..4, tf-idf vectors, candidate
counts clipped by the reference's, the Gaussian length penalty (sigma 6) measured as that code
measures it, the mean over references, times 10. With the frequencies taken from the scored set it
gives the same numbers (a test checks this).

Captions are sequences of hashable tokens (word ids or words): tokenise them the same way on both sides.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Iterable, Sequence

Caption = Sequence[Hashable]
NgramVector = list[dict[tuple, float]]  # one {n-gram: tf-idf weight} per n

N = 4
SIGMA = 6.0


def ngram_counts(words: Caption, n: int = N) -> Counter:
    """Counts of every 1..n-gram of ``words``."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D scorer whose document frequencies come from ``corpus`` (each image's references).

    >>> scorer = CiderD([[["a", "dog"], ["a", "brown", "dog"]], [["a", "cat"]]])
    >>> round(scorer.score(["a", "dog"], scorer.reference_vectors([["a", "dog"], ["a", "brown", "dog"]])), 3)
    3.372
    """

    def __init__(self, corpus: Iterable[Sequence[Caption]]) -> None:
        document_frequency: Counter = Counter()
        images = 0
        for references in corpus:
            images += 1
            seen = set()
            for reference in references:
                seen.update(ngram_counts(reference))
            document_frequency.update(seen)
        if images == 0:
            raise ValueError("CIDEr-D needs a corpus of at least one image's references")
        self.document_frequency = document_frequency
        self.log_images = math.log(float(images))

    def vector(self, words: Caption) -> tuple[NgramVector, list[float], int]:
        """(tf-idf vector per n, its norm per n, the length the length penalty uses)."""
        vector: NgramVector = [{} for _ in range(N)]
        norms = [0.0] * N
        length = 0
        for ngram, count in ngram_counts(words).items():
            n = len(ngram) - 1
            weight = float(count) * (self.log_images - math.log(max(1.0, float(self.document_frequency.get(ngram, 0.0)))))
            vector[n][ngram] = weight
            norms[n] += weight * weight
            if n == 1:  # as pycocoevalcap: the length is counted on bigrams (len(words) - 1)
                length += count
        return vector, [math.sqrt(value) for value in norms], length

    def reference_vectors(self, references: Sequence[Caption]) -> list[tuple[NgramVector, list[float], int]]:
        """Precompute an image's reference vectors once; pass them to :meth:`score`."""
        return [self.vector(reference) for reference in references]

    def score(self, candidate: Caption, references: list[tuple[NgramVector, list[float], int]]) -> float:
        """CIDEr-D of one candidate against one image's (precomputed) references, pycocoevalcap's scale."""
        if not references:
            return 0.0
        vector, norms, length = self.vector(candidate)
        total = 0.0
        for ref_vector, ref_norms, ref_length in references:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * SIGMA**2))
            per_n = 0.0
            for n in range(N):
                ref_n = ref_vector[n]
                value = 0.0
                for ngram, weight in vector[n].items():
                    ref_weight = ref_n.get(ngram)
                    if ref_weight is not None:
                        value += min(weight, ref_weight) * ref_weight
                if norms[n] != 0 and ref_norms[n] != 0:
                    value /= norms[n] * ref_norms[n]
                per_n += value * penalty
            total += per_n / N
        return total / len(references) * 10.0
