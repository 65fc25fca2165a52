"""Property-based tests: the tokenizer, the vocabulary and every dataset reader on arbitrary input.

What they establish:

* ``tokenize`` takes any text (any script, punctuation, whitespace, control characters, lone
  surrogates from JSON escapes) without failing and gives clean words that tokenize to themselves.
* ``Vocabulary``: encode then decode gives the words back (rare words as ``<unk>``); save/load keeps
  it; loading any JSON as a vocabulary either works or raises ``DatasetError``.
* ``read_dataset`` on random bytes, random text and plausible-but-wrong JSON, JSONL and CSV, with
  the format detected or forced, either returns a well-formed dataset or raises a
  ``CaptionerError`` with a one-line message: never another exception.

The ``@example`` inputs are regression cases: most of them once escaped as other exceptions
(TypeError, AttributeError, RecursionError, ValueError, UnicodeEncodeError) before the readers were fixed.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

from captioner.data.formats import FORMATS, read_dataset
from captioner.data.records import SPLITS
from captioner.data.vocabulary import SPECIAL_TOKENS, UNK, Vocabulary, tokenize
from captioner.errors import CaptionerError, DatasetError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----- strategies ---------------------------------------------------------------------------------

#: Characters that have tripped up tokenizers: apostrophes, dashes, every kind of space and line
#: break, control characters, combining marks, characters whose case or compatibility form changes
#: length (İ, ß, ﬁ, ½), other scripts, and lone surrogates (which JSON escapes can produce).
TRICKY = list(
    "'’`-_.,;:!?\"()[]{}<>#|/\\ \t\n\r\x00\x07\x0b\x0c\x1b\x1c\x1f\x7f\u0085\u00a0\u1680\u2028\u2029\u200b\u202e\ufeff"
    "\u0301\u0307\u0327\u20dd İıIßẞﬁﬀ½①²ǅΣσςΩΩKÅ é e\u0301 ñ 日本語 한국어 مرحبا עברית ไทย Ⅻ ٣ ߀"
) + ["\ud800", "\udc80", "\udfff", "\U0001f600", "\U0001d400"]
WORDS = ["a", "dog", "dogs", "man's", "café", "CAFÉ", "o'clock", "it’s", "black-and-white", "3", "日本", "ß", "x"]

characters = st.characters() | st.sampled_from(TRICKY)
any_text = st.text(characters, max_size=60)
#: Captions built from repeated words and separators, so words recur (min-frequency matters).
word_soup = st.lists(st.sampled_from(WORDS) | st.text(characters, min_size=1, max_size=6), max_size=10).flatmap(
    lambda words: st.lists(st.sampled_from(TRICKY[:40] + ["  ", ", ", " - "]), min_size=len(words), max_size=len(words)).map(
        lambda separators: "".join(w + s for w, s in zip(words, separators))
    )
)
captions = word_soup | any_text

#: Any JSON value (with lone surrogates allowed in strings, as json.loads can produce them).
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(characters, max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(characters, max_size=8), children, max_size=4),
    max_leaves=20,
)


def mostly(right, wrong):
    """``right`` usually, else ``wrong``."""
    return st.one_of(right, right, right, right, wrong)


def _paths(value, path=()):
    """Every place in a JSON value, as a path of keys and indices (the root is ``()``)."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))


def _replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def _deleted(value, path):
    parent = path[:-1]
    container = value
    for key in parent:
        container = container[key]
    copy = dict(container) if isinstance(container, dict) else list(container)
    del copy[path[-1]]
    return _replaced(value, parent, copy)


@st.composite
def broken(draw, valid):
    """A valid value with up to three random edits: a value anywhere swapped for any JSON, or a key/item removed.

    Inputs like this get deep into a reader before anything is wrong, which random noise never does.
    """
    value = draw(valid)
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(list(_paths(value))))
        if path and draw(st.booleans()):
            value = _deleted(value, path)
        else:
            value = _replaced(value, path, draw(json_values))
    return value


names = mostly(
    st.sampled_from(["a.jpg", "b.png", "dir/c.jpg", "d.JPEG"]),
    st.sampled_from(["", " ", "../up.jpg", "/abs.jpg", "a.jpg\n", "\ud800.jpg"]) | st.text(characters, max_size=10),
)
split_names = mostly(
    st.sampled_from(["train", "val", "test", "restval", "dev", "VALIDATION", " Train "]), st.sampled_from(["", "other"]) | st.text(characters, max_size=6)
)
ids = st.integers(0, 5)
sentence = st.fixed_dictionaries({"raw": captions}, optional={"tokens": st.lists(any_text, max_size=3), "sentid": ids}) | captions

karpathy = broken(
    st.fixed_dictionaries(
        {
            "images": st.lists(
                st.fixed_dictionaries(
                    {"filename": names, "sentences": st.lists(sentence, min_size=1, max_size=3)},
                    optional={"filepath": names, "split": split_names, "cocoid": ids, "imgid": ids},
                ),
                min_size=1,
                max_size=4,
            )
        },
        optional={"dataset": st.just("flickr8k")},
    )
)
coco = broken(
    st.fixed_dictionaries(
        {
            "images": st.lists(st.fixed_dictionaries({"id": ids, "file_name": names}), min_size=1, max_size=4),
            "annotations": st.lists(st.fixed_dictionaries({"image_id": ids, "caption": captions}, optional={"id": ids}), min_size=1, max_size=6),
        },
        optional={"info": json_values},
    )
)
jsonl_object = broken(
    st.fixed_dictionaries({"image": names, "caption": captions}, optional={"split": split_names})
    | st.fixed_dictionaries({"file_name": names, "captions": st.lists(captions, min_size=1, max_size=3)}, optional={"set": split_names})
)
jsonl_lines = st.lists(
    jsonl_object.map(lambda value: json.dumps(value, ensure_ascii=False, allow_nan=True)) | st.just(""), min_size=1, max_size=6
)
noise_line = st.text(characters, max_size=30)
#: Mostly lines of JSON objects (and blank lines); sometimes with a line of noise somewhere.
jsonl_rows = mostly(
    jsonl_lines, st.tuples(jsonl_lines, noise_line, st.integers(0, 6)).map(lambda parts: [*parts[0][: parts[2]], parts[1], *parts[0][parts[2] :]])
).map("\n".join)

HEADERS = [["image", "caption"], ["image", "caption", "split"], ["image_name", "comment_number", "comment"], ["filename", "text", "set"]]
CSV_CELLS = {
    "image": names, "image_name": names, "filename": names,
    "caption": captions, "comment": captions, "text": captions,
    "split": split_names, "set": split_names,
}  # fmt: skip


@st.composite
def csv_texts(draw) -> str:
    """A table: mostly a known header and rows to match; sometimes noise, ragged rows, a cut-off end; any delimiter and quoting."""
    odd_header = st.lists(st.sampled_from(["image", "caption", "", "x", "Image "]) | st.text(characters, max_size=6), min_size=1, max_size=4)
    header = draw(mostly(st.sampled_from(HEADERS).flatmap(st.permutations), odd_header))
    row = st.tuples(*[CSV_CELLS.get(column, st.text(characters, max_size=6)) for column in header]).map(list)
    rows = draw(st.lists(mostly(row, st.lists(names | captions, max_size=len(header) + 1)), max_size=6))
    delimiter = draw(st.sampled_from([",", "|", "\t", ";"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONE]))
    buffer = io.StringIO()
    try:
        csv.writer(buffer, delimiter=delimiter, quoting=quoting, escapechar="\\").writerows([header, *rows])
    except csv.Error:  # QUOTE_NONE cannot write some cells: take the lines as plain text instead
        buffer = io.StringIO("\n".join(delimiter.join(row) for row in [header, *rows]))
    text = buffer.getvalue()
    if draw(st.integers(0, 4)) == 0:  # cut it anywhere, as a truncated download would be
        text = text[: draw(st.integers(0, len(text)))]
    return text


FILE_NAMES = [
    "dataset_flickr8k.json", "captions_train2014.json", "captions.json", "data.jsonl", "captions.csv",
    "captions.txt", "Flickr8k.token.txt", "results.csv", "annotations",
]  # fmt: skip


# ----- helpers ------------------------------------------------------------------------------------


def read_or_refuse(path: Path, format: str):
    """``read_dataset`` on one file: the dataset, or None when it refused with a CaptionerError.

    Any other exception escapes and fails the test, which is the point.
    """
    try:
        dataset = read_dataset([path], format=format)
    except CaptionerError as error:
        message = str(error)
        assert message.strip() and "\n" not in message and "\r" not in message, repr(message)  # one line
        note_event(f"{format}: refused")
        return None
    note_event(f"{format}: read")
    check_dataset(dataset)
    return dataset


def note_event(what: str) -> None:
    """For ``--hypothesis-show-statistics``: how often each format read the input or refused it."""
    if currently_in_test_context():
        event(what)


def check_dataset(dataset) -> None:
    """What every successfully read dataset promises, whatever the input looked like."""
    assert dataset.records, "read_dataset returned no records instead of refusing"
    assert dataset.format in FORMATS
    images = [record.image for record in dataset.records]
    assert len(images) == len(set(images)), "an image appears in two records"
    for record in dataset.records:
        assert isinstance(record.image, str) and isinstance(record.image_id, str)
        assert record.split in SPLITS
        assert record.captions, f"{record.image!r} kept with no caption"
        for caption in record.captions:
            assert isinstance(caption, str) and caption == " ".join(caption.split()) and caption, repr(caption)
        for text in (record.image, record.image_id, *record.captions):
            text.encode("utf-8")  # no lone surrogates: every name and caption can be printed and saved
    for reason, count in dataset.dropped.items():
        assert isinstance(reason, str) and count > 0
        reason.encode("utf-8")


def read_every_way(name: str, data: bytes) -> None:
    """Write ``data`` as ``name`` in a fresh folder and read it detected and as every format."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        for format in ("auto", *FORMATS):
            read_or_refuse(path, format)


#: JSON that the json module itself fails on with errors other than JSONDecodeError.
HOSTILE_JSON = {
    "deep": "[" * 100_000,  # RecursionError: nesting deeper than the interpreter's recursion limit
    "huge number": '{"words": ' + "9" * 5000 + "}",  # ValueError: over int's 4300-digit conversion limit
}


def encode_text(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8


# ----- tokenizer and vocabulary -------------------------------------------------------------------

def is_clean_word(token: str) -> bool:
    """Letters, digits and combining marks of any script, with at least one letter or digit; apostrophes only inside."""
    characters = token.replace("'", "")
    return all(token.split("'")) and all(unicodedata.category(ch)[0] in "LNM" for ch in characters) and any(unicodedata.category(ch)[0] in "LN" for ch in characters)


def has_latin_accent(token: str) -> bool:
    decomposed = unicodedata.normalize("NFKD", token)
    return any(unicodedata.combining(mark) and "LATIN" in unicodedata.name(base, "") for base, mark in zip(decomposed, decomposed[1:]))


@FUZZ
@given(text=any_text | captions)
@example(text="İSTANBUL ǅemal ẞ ﬁsh ½ ①")
@example(text="\ud800 lone \udfff surrogates")
@example(text="\U0001d56c \u09bc \u0928\u092e\u0938\u094d\u0924\u0947 \u304c\u3063\u3053\u3046 \ud559\uad50")  # NFKD makes this letter upper case; a lone mark; marks inside words
@example(text="'''a''b'' ' '")
def test_tokenize_gives_clean_words(text: str) -> None:
    tokens = tokenize(text)
    assert isinstance(tokens, list)
    for token in tokens:
        assert is_clean_word(token), repr(token)
        assert token not in SPECIAL_TOKENS
        assert token == token.lower(), repr(token)
        assert not has_latin_accent(token), repr(token)  # café -> cafe; other scripts keep their marks
        token.encode("utf-8")
    assert tokenize(" ".join(tokens)) == tokens  # words tokenize to themselves: decode then re-encode is stable


@FUZZ
@given(texts=st.lists(captions, max_size=8), min_word_freq=st.integers(1, 3))
@example(texts=["a dog", "a cat", "İ ı i"], min_word_freq=2)
@example(texts=["a':UNK'", "UNK"], min_word_freq=2)  # decodes to "<unk> unk": not text to tokenize again
@example(texts=["¼ ½", "1 4"], min_word_freq=1)  # NFKD splits a vulgar fraction into two words
def test_vocabulary_encode_decode_round_trip(texts: list[str], min_word_freq: int) -> None:
    counts = Counter(word for text in texts for word in tokenize(text))
    vocab = Vocabulary.build(texts, min_word_freq=min_word_freq)

    assert vocab.words[:4] == list(SPECIAL_TOKENS) and len(set(vocab.words)) == len(vocab.words)
    assert vocab.words[4:] == sorted((w for w, n in counts.items() if n >= min_word_freq), key=lambda w: (-counts[w], w))
    for text in texts:
        tokens = tokenize(text)
        ids = vocab.encode(text)
        assert ids == vocab.encode(tokens) and ids[0] == vocab.start_id and ids[-1] == vocab.end_id
        assert all(0 <= i < len(vocab) for i in ids)
        expected = [word if counts[word] >= min_word_freq else UNK for word in tokens]
        decoded = vocab.decode(ids)
        assert decoded.split(" ") == expected if expected else decoded == ""
        assert vocab.encode(decoded.split()) == ids  # the decoded words (<unk> included) map back to the same ids
        if min_word_freq == 1:
            assert tokenize(decoded) == tokens


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_vocab")


@FUZZ
@given(texts=st.lists(captions, max_size=6), min_word_freq=st.integers(1, 2), max_length=st.none() | st.integers(1, 100))
def test_vocabulary_save_load_round_trip(scratch: Path, texts: list[str], min_word_freq: int, max_length: int | None) -> None:
    vocab = Vocabulary.build(texts, min_word_freq=min_word_freq, max_length=max_length)
    vocab.save(scratch / "vocab.json")
    loaded = Vocabulary.load(scratch / "vocab.json")
    assert loaded.words == vocab.words
    assert (loaded.min_word_freq, loaded.max_length) == (min_word_freq, max_length)
    for text in texts:
        assert loaded.encode(text) == vocab.encode(text)
        assert loaded.decode(vocab.encode(text)) == vocab.decode(vocab.encode(text))


@FUZZ
@given(
    content=st.binary(max_size=200).map(lambda data: ("bytes", data))
    | broken(
        st.fixed_dictionaries(
            {"words": st.lists(any_text, max_size=6).map(lambda words: [*SPECIAL_TOKENS, *words])},
            optional={"format": st.just(1), "min_word_freq": st.integers(1, 5), "max_length": st.none() | st.integers(1, 60)},
        )
    ).map(lambda value: ("json", json.dumps(value, allow_nan=True)))
)
@example(content=("json", '{"words": ["<pad>", "<start>", "<end>", "<unk>"], "format": "1"}'))
@example(content=("json", '{"words": ["<pad>", "<start>", "<end>", "<unk>"], "min_word_freq": "many"}'))
@example(content=("json", '{"words": ["<pad>", "<start>", "<end>", "<unk>"], "max_length": [3]}'))
@example(content=("json", '{"words": ["<pad>", "<start>", "<end>", "<unk>"], "min_word_freq": 1e400}'))
@example(content=("hostile", "deep"))
@example(content=("hostile", "huge number"))
def test_loading_any_file_as_a_vocabulary_works_or_raises_dataset_error(scratch: Path, content) -> None:
    kind, data = content
    path = scratch / "any_vocab.json"
    path.write_bytes(data if kind == "bytes" else encode_text(HOSTILE_JSON[data] if kind == "hostile" else data))
    try:
        vocab = Vocabulary.load(path)
    except DatasetError as error:
        assert "\n" not in str(error)
        return
    assert vocab.words[:4] == list(SPECIAL_TOKENS)
    assert isinstance(vocab.min_word_freq, int) and vocab.min_word_freq >= 1
    assert vocab.max_length is None or (isinstance(vocab.max_length, int) and vocab.max_length >= 1)


# ----- dataset readers ----------------------------------------------------------------------------


@FUZZ
@given(name=st.sampled_from(FILE_NAMES), data=st.binary(max_size=300))
@example(name="captions.csv", data=b"\xef\xbb\xbf")  # a UTF-8 BOM and nothing else
@example(name="captions.csv", data=b"image,caption\n\x00a.jpg,\xff\xfe\n")
def test_random_bytes(name: str, data: bytes) -> None:
    read_every_way(name, data)


@FUZZ
@given(name=st.sampled_from(FILE_NAMES), text=st.text(characters, max_size=200))
def test_random_text(name: str, text: str) -> None:
    read_every_way(name, encode_text(text))


@FUZZ
@given(name=st.sampled_from(["dataset_flickr8k.json", "data.json", "captions_train2014.json", "data.jsonl"]), value=karpathy | coco | json_values)
@example(name="dataset_flickr8k.json", value={"images": [{"filename": ["a.jpg"], "sentences": ["a dog"]}]})
@example(name="dataset_flickr8k.json", value={"images": [{"filename": {"a": 1}, "sentences": ["a dog"], "split": "train"}]})
@example(name="dataset_flickr8k.json", value={"images": [{"filename": 7, "sentences": ["a dog"]}]})
@example(name="dataset_flickr8k.json", value={"images": [{"filename": "\ud800.jpg", "sentences": ["a \udfff dog"]}]})
@example(name="captions_train2014.json", value={"images": [{"id": [1], "file_name": "a.jpg"}], "annotations": []})
@example(name="captions_train2014.json", value={"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": {}, "caption": "x"}]})
def test_plausible_but_wrong_json(name: str, value) -> None:
    read_every_way(name, encode_text(json.dumps(value, ensure_ascii=False, allow_nan=True)))


@FUZZ
@given(text=jsonl_rows, name=st.sampled_from(["data.jsonl", "data.ndjson", "data.txt"]))
@example(text='{"image": "a.jpg", "caption": "a dog", "split": "\\ud800"}', name="data.jsonl")
@example(text='{"image": "\\udfff", "caption": "a dog"}', name="data.jsonl")
@example(text='{"image": null, "caption": "a dog"}', name="data.jsonl")
@example(text='{"image": "a.jpg", "split": ","}\n{}', name="data.jsonl")  # read as CSV: a header cell spanning lines
@example(text='{"image": ["a.jpg"], "caption": "a dog"}', name="data.jsonl")
def test_plausible_but_wrong_jsonl(text: str, name: str) -> None:
    read_every_way(name, encode_text(text))


@FUZZ
@given(text=csv_texts(), name=st.sampled_from(["captions.csv", "captions.txt", "results.csv"]))
@example(text='image,caption\na.jpg,"' + "x" * 200_000 + '"\n', name="captions.csv")  # a field over csv's limit
@example(text="\n\nimage,caption\na.jpg,a dog\n", name="captions.csv")
@example(text='"file\nname",caption\na.jpg,a dog\n', name="captions.csv")  # a header cell with a line break
@example(text='image,caption,split\n"a\n.jpg",a dog,train\n"a\n.jpg",a cat,"te\nst"\n', name="captions.csv")
@example(text="image,caption\ra.jpg,a dog\u2028b.jpg,a cat\n", name="captions.csv")
def test_plausible_but_wrong_csv(text: str, name: str) -> None:
    read_every_way(name, encode_text(text))


#: Files on which json.loads itself fails with something other than JSONDecodeError.
HOSTILE_FILES = {
    "deep.json": ("[" * 100_000, "nested too deeply"),  # RecursionError
    "deep.jsonl": ('{"image": "a.jpg", "caption": ' + "[" * 100_000 + "}\n", "nested too deeply"),
    "big.json": ('{"images": [{"filename": "a.jpg", "sentences": ["x"], "split": ' + "1" * 5000 + "}]}", "not valid JSON"),  # ValueError
    "big.jsonl": ('{"image": ' + "1" * 5000 + ', "caption": "x"}\n', "not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
def test_hostile_json_is_refused(tmp_path: Path, name: str) -> None:
    text, fragment = HOSTILE_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    for format in ("auto", *FORMATS):
        read_or_refuse(path, format)
    with pytest.raises(DatasetError, match=fragment):
        read_dataset([path])
