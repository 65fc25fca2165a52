"""Visual concepts from the encoder's ImageNet classifier, words added to a trained model's
vocabulary, and captions constrained to name them: on the shipped model and real photos."""

import json
from pathlib import Path

import pytest
import torch

from captioner.data.vocabulary import tokenize
from captioner.errors import ConfigError
from captioner.models.captioner import Captioner
from captioner.models.concepts import CONCEPTS_FILE, concept_vocabulary, noun_words
from captioner.models.word_vectors import word_vectors

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def model():
    return Captioner.load("default")


def test_the_concept_file_maps_all_1000_imagenet_classes_in_order():
    classes = json.loads(CONCEPTS_FILE.read_text(encoding="utf-8"))["classes"]
    assert [entry["index"] for entry in classes] == list(range(1000))
    by_label = {entry["label"].split(",")[0]: entry["word"] for entry in classes}
    assert by_label["tabby"] == "cat" and by_label["golden retriever"] == "dog" and by_label["zebra"] == "zebra"
    assert by_label["pizza"] == "pizza" and by_label["streetcar"] == "train" and by_label["velvet"] is None
    mapped = [entry for entry in classes if entry["word"]]
    assert len(mapped) > 900
    assert all(len(tokenize(entry["word"])) >= 1 and entry["word"] == entry["word"].lower() for entry in mapped)


def test_a_concepts_probability_is_its_classes_summed():
    vocabulary = concept_vocabulary()
    classes = torch.softmax(torch.randn(2, 1000), dim=1)
    concepts = vocabulary.probabilities(classes)  # (2, concepts)
    dog = [c.word for c in vocabulary.concepts].index("dog")
    dog_classes = (vocabulary.class_concept == dog).nonzero().flatten()
    assert len(dog_classes) >= 100  # every breed says "dog"
    torch.testing.assert_close(concepts[:, dog], classes[:, dog_classes].sum(dim=1))
    assert bool((concepts.sum(dim=1) <= 1 + 1e-5).all())
    assert vocabulary.animal[dog] and not vocabulary.animal[[c.word for c in vocabulary.concepts].index("pizza")]


def test_the_dog_photo_is_tagged_dog_from_the_same_encoder_pass(model):
    result = model.caption(EXAMPLES / "dog.jpg")
    assert result.tags and result.tags[0][0] == "dog" and result.tags[0][1] > 0.3, result.tags
    assert [p for _, p in result.tags] == sorted((p for _, p in result.tags), reverse=True)
    assert result.to_dict()["tags"][0]["word"] == "dog"


def test_a_new_word_starts_as_its_nearest_known_noun():
    vectors = word_vectors()
    assert "zebra" in vectors and "xqzzy" not in vectors
    assert vectors.nearest("zebra", ["horse", "pizza", "car"]) == "horse"
    assert vectors.nearest("pizza", ["horse", "sandwich", "car"]) == "sandwich"
    assert vectors.nearest("xqzzy", ["horse"]) is None
    assert {"dog", "cat", "pizza", "train"} <= noun_words()


def test_extending_the_vocabulary_changes_no_unconstrained_caption_and_lets_a_constraint_use_the_word():
    model = Captioner.load("default")
    photos = [EXAMPLES / name for name in ("dog.jpg", "bed.jpg")]
    before = model.caption(photos, n_best=2)
    known = len(model.vocab)
    assert "zebra" not in model.vocab
    model.extend_vocabulary(["zebra", "dog"])  # dog is known: only zebra is added
    assert len(model.vocab) == known + 1 and model.vocab.extension_start == known
    after = model.caption(photos, n_best=2)
    for old, new in zip(before, after):
        assert [r.text for r in old.n_best] == [r.text for r in new.n_best]
        assert [r.score for r in old.n_best] == pytest.approx([r.score for r in new.n_best], abs=1e-4)
    zebra = model.caption(EXAMPLES / "dog.jpg", constraints=[["zebra", "zebras"]])
    assert "zebra" in zebra.words and zebra.constraints_met is True, zebra.text
    with pytest.raises(ConfigError, match="extended"):
        model.save("/tmp/never-written")
    with pytest.raises(ConfigError, match="word vectors"):
        model.extend_vocabulary(["xqzzy"])


def test_concepts_become_constraints_above_the_threshold(model):
    # the dog photo's top concept is dog (p > 0.3): with concept constraints on (on every photo, familiar
    # or not), the caption names it, and the result says what it had to name; a threshold above every
    # concept leaves it free
    constrained = model.caption(EXAMPLES / "dog.jpg", concept_constraints=1, concept_threshold=0.3, concept_known_words=0, concept_familiar_percentile=0)
    assert constrained.constraints and "dog" in constrained.constraints[0] and constrained.constraints_met is True
    free = model.caption(EXAMPLES / "dog.jpg", concept_constraints=1, concept_threshold=1.0, concept_known_words=0, concept_familiar_percentile=0)
    assert free.constraints == [] and free.constraints_met is None
    # "dog" is among the shipped model's most frequent words: as shipped, it is left to the model
    shipped = model.caption(EXAMPLES / "dog.jpg")
    assert shipped.constraints == [] and "dog" in shipped.words, shipped.text
    with pytest.raises(ConfigError):
        model.caption(EXAMPLES / "dog.jpg", concept_threshold=0.0)
