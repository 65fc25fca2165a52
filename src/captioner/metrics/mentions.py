"""Does a caption name what is in the picture? Object mentions, and two checks of whole sentences.

**Object mentions** (as the novel-object and hallucination literature measures them: Hendricks et al.
2016, Rohrbach et al. 2018's CHAIR, Lu et al. 2018): COCO's 80 object classes, each with the words a
caption names it by (``coco_objects.json``: singular and plural, synonyms; phrases matched before the
words inside them, so a "hot dog" is not a dog). An object is in an image when at least two of its
references name it; a caption's objects are the classes it names. Precision, recall and F1 are
micro-averaged over the images, on the 0-100 scale, over all classes and without "person" (which
every captioner names).

**Sentence checks**: captions that end on a word a sentence does not end on (a determiner, a
preposition, a conjunction, an auxiliary or a colour: "a man in a blue shirt is in a yellow") and
captions that say a word twice in a row ("two people are are playing").
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from captioner.data.vocabulary import tokenize

OBJECTS_FILE = Path(__file__).resolve().parent / "coco_objects.json"
#: Words no caption should end on; what the sentence checks count (fixed, not learnt from any data).
DANGLING_WORDS = frozenset(
    ["a", "an", "the", "this", "that", "these", "those", "his", "her", "its", "their", "our", "my", "your", "some", "each", "every", "in", "on", "at", "of", "with", "to", "from", "by", "for", "into", "onto", "over", "under", "near", "behind", "beside", "between", "through", "across", "along", "around", "and", "or", "but", "while", "as", "than", "is", "are", "was", "were", "be", "being", "has", "have", "had", "does", "do", "can", "will", "red", "blue", "green", "yellow", "white", "black", "brown", "pink", "orange", "purple", "grey", "gray"]
)


@lru_cache(maxsize=1)
def _phrases() -> tuple[dict[tuple[str, ...], str], int]:
    """(word tuple -> COCO class, the longest phrase's length)."""
    classes = json.loads(OBJECTS_FILE.read_text(encoding="utf-8"))["classes"]
    phrases = {tuple(tokenize(name)): category for category, names in classes.items() for name in names}
    return phrases, max(len(words) for words in phrases)


def coco_classes() -> list[str]:
    return list(json.loads(OBJECTS_FILE.read_text(encoding="utf-8"))["classes"])


def objects_named(text: str) -> set[str]:
    """The COCO classes a caption names, longest phrase first ("a hot dog on a plate" -> {"hot dog"})."""
    phrases, longest = _phrases()
    words = tokenize(text)
    found: set[str] = set()
    position = 0
    while position < len(words):
        for length in range(min(longest, len(words) - position), 0, -1):
            category = phrases.get(tuple(words[position : position + length]))
            if category is not None:
                found.add(category)
                position += length
                break
        else:
            position += 1
    return found


def objects_present(references: Sequence[str], agreement: int = 2) -> set[str]:
    """The classes at least ``agreement`` of an image's references name."""
    counts: dict[str, int] = {}
    for reference in references:
        for category in objects_named(reference):
            counts[category] = counts.get(category, 0) + 1
    return {category for category, count in counts.items() if count >= agreement}


def mention_counts(caption: str, references: Sequence[str], *, exclude: frozenset[str] = frozenset()) -> tuple[int, int, int]:
    """(true positives, named, present) of one caption, leaving out the ``exclude`` classes."""
    named = objects_named(caption) - exclude
    present = objects_present(references) - exclude
    return len(named & present), len(named), len(present)


def f1_from_counts(hits: int, named: int, present: int) -> dict[str, float]:
    precision = 100.0 * hits / named if named else 0.0
    recall = 100.0 * hits / present if present else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "F1": f1}


def mention_scores(generated: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
    """Micro-averaged object-mention precision, recall and F1 (0-100), all classes and without person."""
    scores: dict[str, float] = {}
    for suffix, exclude in (("", frozenset()), (" (no person)", frozenset({"person"}))):
        totals = [0, 0, 0]
        for key, caption in generated.items():
            for i, count in enumerate(mention_counts(caption, references[key], exclude=exclude)):
                totals[i] += count
        scores.update({f"object {name}{suffix}": value for name, value in f1_from_counts(*totals).items()})
    return scores


def sentence_checks(generated: Mapping[Hashable, str]) -> dict[str, int]:
    """How many captions end on a dangling word, how many say a word twice in a row ("are are"), and
    how many say one twice around "and" or "or" ("a red and red")."""
    dangling = doubled = joined = 0
    for caption in generated.values():
        words = caption.split()
        dangling += bool(words) and words[-1] in DANGLING_WORDS
        doubled += any(a == b for a, b in zip(words, words[1:]))
        joined += any(a == c and b in ("and", "or") for a, b, c in zip(words, words[1:], words[2:]))
    return {"dangling endings": dangling, "doubled words": doubled, "doubled around and/or": joined}
