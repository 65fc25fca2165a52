"""Tokenizer and vocabulary.

Captions are lower-cased, accents removed from Latin letters ("café" -> "cafe"), and split into
words of letters, digits and combining marks of any script (Devanagari vowel signs, Japanese voicing
marks and Hangul stay inside their words); punctuation is dropped except apostrophes inside words
("man's", "don't"), which is what Karpathy's preprocessed ``tokens`` look like for English. Words seen
fewer than ``min_word_freq`` times in the *training* split become ``<unk>``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from captioner.errors import DatasetError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
VOCAB_FORMAT = 1
#: A run of up to BAD_ENDING_WORDS words seen at least BAD_ENDING_MIN_COUNT times in the training
#: captions that ends at most BAD_ENDING_SHARE of them (never, but for the odd typo) is a bad ending.
#: Chosen on the Flickr8k dev split: such endings are 9 of 12 dangling captions of the shipped
#: model, and only 47 of the 5,000 dev references (0.9%) end on one.
BAD_ENDING_WORDS, BAD_ENDING_MIN_COUNT, BAD_ENDING_SHARE = 4, 20, 0.001

_WORD = re.compile(r"[^\s']+(?:'[^\s']+)*")  # runs of word characters, inner apostrophes


def _is_word_character(character: str) -> bool:
    return unicodedata.category(character)[0] in "LNM"  # letters, numbers, marks (not "_" or punctuation)


def _without_latin_accents(text: str) -> str:
    """Drop the combining marks on Latin letters only; other scripts' marks are part of their words."""
    kept, after_latin = [], False
    for character in unicodedata.normalize("NFKD", text):
        if unicodedata.combining(character):
            if after_latin:
                continue
        else:
            after_latin = character.isascii() or "LATIN" in unicodedata.name(character, "")
        kept.append(character)
    return unicodedata.normalize("NFC", "".join(kept))  # recompose what stays (Hangul, kana with voicing marks)


def tokenize(text: str) -> list[str]:
    """Lower-case words of a caption, punctuation removed.

    >>> tokenize("A man's dog, running!  Fast.")
    ['a', "man's", 'dog', 'running', 'fast']
    >>> tokenize("Un café à Zürich; नमस्ते दुनिया")
    ['un', 'cafe', 'a', 'zurich', 'नमस्ते', 'दुनिया']
    """
    text = _without_latin_accents(text.replace("\u2019", "'").replace("`", "'").lower()).lower()  # again: NFKD turns some letters upper case
    words = _WORD.findall("".join(ch if ch == "'" or _is_word_character(ch) else " " for ch in text))
    return [word for word in words if any(unicodedata.category(ch)[0] in "LN" for ch in word)]  # not a lone combining mark


@dataclass
class Vocabulary:
    """Word <-> id mapping with the four special tokens first: <pad>=0, <start>=1, <end>=2, <unk>=3."""

    words: list[str]
    min_word_freq: int = 1
    max_length: int | None = None
    counts: dict[str, int] = field(default_factory=dict, repr=False)
    #: Endings the training captions (almost) never have: words ("a", "in", "the") and phrases of up
    #: to four words ("a blue", "in front of", "a red and white"). Decoding can refuse to end a
    #: caption on one (``GenerationConfig.block_bad_endings``).
    bad_endings: tuple[str, ...] = ()
    #: Words from this index on were added for constraints (:meth:`extended`): decoding writes them
    #: only where a constraint names them. None: the vocabulary the model was trained with.
    extension_start: int | None = None

    def __post_init__(self) -> None:
        if tuple(self.words[:4]) != SPECIAL_TOKENS:
            raise DatasetError(f"vocabulary must start with {' '.join(SPECIAL_TOKENS)}, found {self.words[:4]!r}")
        if len(set(self.words)) != len(self.words):
            raise DatasetError("vocabulary has duplicate words")
        self.index = {word: i for i, word in enumerate(self.words)}
        self.bad_endings = tuple(self.bad_endings)
        unknown = [ending for ending in self.bad_endings if not ending.split() or any(word not in self.index for word in ending.split())]
        if unknown:
            raise DatasetError(f"vocabulary: bad ending {unknown[0]!r} is not made of its words")

    pad_id = 0
    start_id = 1
    end_id = 2
    unk_id = 3

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def extended(self, words: Iterable[str]) -> Vocabulary:
        """This vocabulary with ``words`` it lacks appended (their ids from ``len(self)`` on)."""
        new = [word for word in dict.fromkeys(words) if word not in self.index]
        start = self.extension_start if self.extension_start is not None else len(self.words)
        return Vocabulary(
            self.words + new, min_word_freq=self.min_word_freq, max_length=self.max_length, counts=self.counts,
            bad_endings=self.bad_endings, extension_start=start if new or self.extension_start is not None else None,
        )  # fmt: skip

    @property
    def bad_ending_ids(self) -> frozenset[tuple[int, ...]]:
        """The bad endings as word-id tuples (computed once)."""
        ids = self.__dict__.get("_bad_ending_ids")
        if ids is None:
            ids = frozenset(tuple(self.index[word] for word in ending.split()) for ending in self.bad_endings)
            self.__dict__["_bad_ending_ids"] = ids
        return ids

    @classmethod
    def build(cls, captions: Iterable[str], *, min_word_freq: int = 5, max_length: int | None = None) -> Vocabulary:
        """Count words over ``captions`` (pass the training split only) and keep the frequent ones.

        Words are ordered by descending count, ties alphabetically, so the same captions always
        give the same ids. The bad endings are what :func:`_bad_endings` finds in the same captions.
        """
        if min_word_freq < 1:
            raise DatasetError(f"min_word_freq must be at least 1, not {min_word_freq}")
        counts: Counter[str] = Counter()
        grams: Counter[tuple[str, ...]] = Counter()  # every run of 1 to BAD_ENDING_WORDS words
        endings: Counter[tuple[str, ...]] = Counter()  # ... and how often each ends a caption
        for caption in captions:
            words = tokenize(caption)
            counts.update(words)
            for n in range(1, BAD_ENDING_WORDS + 1):
                grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
                if len(words) >= n:
                    endings[tuple(words[-n:])] += 1
        kept = sorted((w for w, n in counts.items() if n >= min_word_freq), key=lambda w: (-counts[w], w))
        return cls(
            list(SPECIAL_TOKENS) + kept, min_word_freq=min_word_freq, max_length=max_length, counts=dict(counts), bad_endings=_bad_endings(grams, endings, set(kept))
        )

    def encode(self, caption: str | Sequence[str], *, add_special: bool = True) -> list[int]:
        """Caption text (or its tokens) -> ids, with <start>/<end> around it unless add_special=False."""
        words = tokenize(caption) if isinstance(caption, str) else caption
        ids = [self.index.get(word, self.unk_id) for word in words]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def decode(self, ids: Iterable[int], *, strip_special: bool = True) -> str:
        """Ids -> text. Stops at <end>; drops <start>/<pad> unless strip_special=False."""
        words = []
        for token in ids:
            token = int(token)
            if strip_special:
                if token == self.end_id:
                    break
                if token in (self.pad_id, self.start_id):
                    continue
            words.append(self.words[token] if 0 <= token < len(self.words) else UNK)
        return " ".join(words)

    def coverage(self, captions: Iterable[str]) -> float:
        """Fraction of word occurrences in ``captions`` that are in the vocabulary (not <unk>)."""
        total = known = 0
        for caption in captions:
            for word in tokenize(caption):
                total += 1
                known += word in self.index
        return known / total if total else 1.0

    # ----- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": VOCAB_FORMAT,
            "min_word_freq": self.min_word_freq,
            "max_length": self.max_length,
            "words": self.words,
            "bad_endings": list(self.bad_endings),
        }

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "vocabulary") -> Vocabulary:
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise DatasetError(f"{source}: not a captioner vocabulary (no 'words' list)")
        version = data.get("format", VOCAB_FORMAT)
        if not _is_count(version):
            raise DatasetError(f"{source}: vocabulary format must be a whole number of at least 1, not {_shown(version)}")
        if version > VOCAB_FORMAT:
            raise DatasetError(
                f"{source}: vocabulary format {version} is newer than this captioner understands ({VOCAB_FORMAT}); upgrade captioner"
            )
        if not all(isinstance(word, str) for word in data["words"]):
            raise DatasetError(f"{source}: vocabulary words must all be strings")
        min_word_freq, max_length = data.get("min_word_freq", 1), data.get("max_length")
        if not _is_count(min_word_freq):
            raise DatasetError(f"{source}: min_word_freq must be a whole number of at least 1, not {_shown(min_word_freq)}")
        if max_length is not None and not _is_count(max_length):
            raise DatasetError(f"{source}: max_length must be null or a whole number of at least 1, not {_shown(max_length)}")
        bad_endings = data.get("bad_endings", [])  # older vocabularies have none
        if not isinstance(bad_endings, list) or not all(isinstance(word, str) for word in bad_endings):
            raise DatasetError(f"{source}: bad_endings must be a list of words")
        return cls(list(data["words"]), min_word_freq=min_word_freq, max_length=max_length, bad_endings=tuple(bad_endings))

    def save(self, path: str | Path) -> None:
        from captioner.atomic import write_text_atomic

        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetError(f"no vocabulary at {path}") from None
        except OSError as error:  # a folder, no permission, ...
            raise DatasetError(f"cannot read vocabulary {path}: {error.strerror or error}") from None
        except RecursionError:
            raise DatasetError(f"{path} is not usable JSON: nested too deeply") from None
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, a number over int's 4300-digit limit
            raise DatasetError(f"{path} is not valid JSON: {str(error).split(';')[0]}") from None
        return cls.from_dict(data, source=str(path))


def _bad_endings(grams: Counter, endings: Counter, words: set[str]) -> tuple[str, ...]:
    """The endings the captions counted in ``grams`` (runs of words) and ``endings`` (how often each
    ends a caption) (almost) never have, made of ``words`` only, each without a shorter bad ending
    at its end (which would block it already); most frequent first."""
    bad = {gram for gram, count in grams.items() if count >= BAD_ENDING_MIN_COUNT and endings[gram] <= BAD_ENDING_SHARE * count and set(gram) <= words}
    minimal = [gram for gram in bad if not any(gram[i:] in bad for i in range(1, len(gram)))]
    return tuple(" ".join(gram) for gram in sorted(minimal, key=lambda gram: (-grams[gram], gram)))


def _is_count(value: object) -> bool:
    """A whole number of at least 1 (JSON true is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _shown(value: object) -> str:
    """A JSON value in a message: short, on one line."""
    if isinstance(value, (str, int, float)) or value is None:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return "a list" if isinstance(value, list) else "an object"
