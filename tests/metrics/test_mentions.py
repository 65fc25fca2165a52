"""Object mentions (COCO's 80 classes with synonyms) and the sentence checks evaluation reports."""

from captioner.metrics.mentions import coco_classes, mention_scores, objects_named, objects_present, sentence_checks


def test_the_80_coco_classes_are_named_by_their_words_longest_phrase_first():
    assert len(coco_classes()) == 80
    assert objects_named("a hot dog on a plate") == {"hot dog"}
    assert objects_named("two dogs chase a kitten past a man") == {"dog", "cat", "person"}
    assert objects_named("a teddy bear and a brown bear") == {"teddy bear", "bear"}
    assert objects_named("a sunny day") == set()


def test_an_object_is_present_when_two_references_name_it():
    references = ["a cat on a laptop", "a kitten sleeps on a computer", "a cat near a cup"]
    assert objects_present(references) == {"cat", "laptop"}


def test_precision_recall_and_f1_count_each_image():
    references = {1: ["a cat on a laptop", "a kitten on a laptop"], 2: ["a man rides a horse", "a person on a horse"]}
    generated = {1: "a dog on a laptop", 2: "a man on a horse"}
    scores = mention_scores(generated, references)
    # image 1: laptop right, dog wrong, cat missed; image 2: person and horse right
    assert scores["object precision"] == 75.0 and scores["object recall"] == 75.0
    assert round(scores["object precision (no person)"], 2) == 66.67 and round(scores["object recall (no person)"], 2) == 66.67


def test_dangling_endings_and_doubled_words_are_counted():
    captions = {1: "a man in a red", 2: "two people are are playing", 3: "a dog runs on the grass", 4: "", 5: "a red and red ball", 6: "a black and white dog"}
    assert sentence_checks(captions) == {"dangling endings": 1, "doubled words": 1, "doubled around and/or": 1}
