import json

import pytest

from captioner.data.vocabulary import SPECIAL_TOKENS, Vocabulary, tokenize
from captioner.errors import DatasetError


@pytest.mark.parametrize(
    "text, words",
    [
        ("A man's dog, running!  Fast.", ["a", "man's", "dog", "running", "fast"]),
        ("TWO   dogs\tplay\nin the  SNOW", ["two", "dogs", "play", "in", "the", "snow"]),
        ("a café — naïve", ["a", "cafe", "naive"]),
        ("it’s 3 o'clock", ["it's", "3", "o'clock"]),
        ("'quoted' words", ["quoted", "words"]),
        ("", []),
        ("   !!! ... ", []),
        ("black-and-white dog", ["black", "and", "white", "dog"]),
    ],
)
def test_tokenize(text, words):
    assert tokenize(text) == words


def test_build_counts_min_frequency_and_is_deterministic():
    captions = ["a dog runs", "a dog sits", "a cat sits", "the zebra"]
    vocab = Vocabulary.build(captions, min_word_freq=2)
    assert vocab.words[:4] == list(SPECIAL_TOKENS)
    assert vocab.words[4:] == ["a", "dog", "sits"]  # by count, then alphabetically
    assert Vocabulary.build(list(reversed(captions)), min_word_freq=2).words == vocab.words
    assert "zebra" not in vocab
    assert vocab.encode("a zebra sits") == [vocab.start_id, vocab.index["a"], vocab.unk_id, vocab.index["sits"], vocab.end_id]


def test_encode_decode_round_trip():
    vocab = Vocabulary.build(["A red circle to the left of a blue square."], min_word_freq=1)
    ids = vocab.encode("a blue square to the left of a red circle")
    assert vocab.decode(ids) == "a blue square to the left of a red circle"
    assert vocab.decode(ids + [vocab.pad_id, vocab.pad_id]) == "a blue square to the left of a red circle"
    assert vocab.decode([vocab.start_id, vocab.index["red"], vocab.end_id, vocab.index["blue"]]) == "red"
    assert vocab.decode(ids, strip_special=False).split()[0] == "<start>"
    assert vocab.encode("red", add_special=False) == [vocab.index["red"]]
    assert vocab.decode([999]) == "<unk>"


def test_save_load(tmp_path):
    vocab = Vocabulary.build(["a b c", "a b", "a"], min_word_freq=1, max_length=20)
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.words == vocab.words and loaded.max_length == 20
    assert loaded.encode("c b a") == vocab.encode("c b a")


def test_load_refuses_bad_files(tmp_path):
    bad = tmp_path / "vocab.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        Vocabulary.load(bad)
    bad.write_text(json.dumps({"words": ["a", "b"]}))
    with pytest.raises(DatasetError, match="must start with"):
        Vocabulary.load(bad)
    bad.write_text(json.dumps({"format": 99, "words": list(SPECIAL_TOKENS)}))
    with pytest.raises(DatasetError, match="newer"):
        Vocabulary.load(bad)
    with pytest.raises(DatasetError, match="no vocabulary"):
        Vocabulary.load(tmp_path / "missing.json")


def test_coverage():
    vocab = Vocabulary.build(["a dog", "a dog"], min_word_freq=2)
    assert vocab.coverage(["a dog", "a cat"]) == 0.75


def test_tokenize_keeps_other_scripts():
    assert tokenize("Ein Hund läuft über die Straße") == ["ein", "hund", "lauft", "uber", "die", "straße"]
    assert tokenize("собака бежит") == ["собака", "бежит"]
    assert tokenize("snake_case") == ["snake", "case"]


def test_words_of_other_scripts_keep_their_marks():
    # Devanagari vowel signs and virama, Japanese voicing marks, Hangul syllables stay whole; only
    # Latin letters lose their accents
    assert tokenize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]
    assert tokenize("がっこう、ごはん。") == ["がっこう", "ごはん"]
    assert tokenize("학교에 가요") == ["학교에", "가요"]
    assert tokenize("Ελληνικά: άλογο") == ["ελληνικά", "άλογο"]
    assert tokenize("Café À ZÜRICH, naïve") == ["cafe", "a", "zurich", "naive"]


def test_bad_endings_are_the_words_and_phrases_training_captions_never_end_on():
    # "a" and "on a" never end a caption; "red" ends some; "in a red" never does
    captions = ["a dog sits on a red mat", "a cat on a mat", "a red car", "the car is red"] * 10 + ["a dog in a red box"] * 20
    vocab = Vocabulary.build(captions, min_word_freq=1)
    assert "a" in vocab.bad_endings and "red" not in vocab.bad_endings and "mat" not in vocab.bad_endings
    assert "a red" in vocab.bad_endings  # 40 times, never at the end ("is red" is)
    assert "on a" not in vocab.bad_endings  # already blocked by its last word "a": only the shortest is kept
    assert all(len(ending.split()) <= 4 for ending in vocab.bad_endings)
    rare = Vocabulary.build(["a dog", "the cat sat"], min_word_freq=1)  # seen under 20 times: nothing is known to be bad
    assert rare.bad_endings == ()
    again = Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again.bad_endings == vocab.bad_endings and again.bad_ending_ids == vocab.bad_ending_ids
    assert Vocabulary.from_dict({"words": list(SPECIAL_TOKENS) + ["a"]}).bad_endings == ()  # older vocabularies have none
    with pytest.raises(DatasetError, match="bad ending 'zebra' is not made of its words"):
        Vocabulary.from_dict({"words": list(SPECIAL_TOKENS) + ["a"], "bad_endings": ["zebra"]})
    with pytest.raises(DatasetError, match="bad_endings must be a list of words"):
        Vocabulary.from_dict({"words": list(SPECIAL_TOKENS) + ["a"], "bad_endings": "a"})
