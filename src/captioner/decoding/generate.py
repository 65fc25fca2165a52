"""One batched ``generate`` for every decoding strategy: greedy, beam search, sampling.

``generate(decoder, features, vocab, config)`` works on a decoder and the image features it reads;
:meth:`captioner.models.captioner.Captioner.generate` encodes images and calls it. All strategies
run B images (x k beams, or x n samples) as one tensor batch per step. The decoder's per-image work
(the attention projection of the features) is done once in ``init_state``; beams and samples share
it without copies (those state entries keep one row per image, see
:attr:`~captioner.models.decoder.Decoder.image_constant_keys`). Attention maps are over the
regions the decoder reports (their count comes from the maps' shape).

Scores are the model's own log-probabilities: ``log_softmax`` of the logits over the whole
vocabulary. Tokens that may never be generated (<pad>, <start>, and <end> before ``min_length``) are
then set to -inf, which changes what is chosen but not the log-probability of what is chosen. So the
``log_prob`` of a returned caption is exactly what the model gives that caption under teacher
forcing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch

from captioner import ranges
from captioner.errors import ConfigError
from captioner.limits import DEFAULT_BEAM_SIZE, MAX_BEAM_SIZE, MAX_CONSTRAINTS, MAX_LENGTH, MAX_LENGTH_PENALTY, MAX_NO_REPEAT_NGRAM, MAX_NUM_RETURN, MAX_VOCABULARY
from captioner.models.decoder import select_state, take_rows

if TYPE_CHECKING:
    from captioner.data.vocabulary import Vocabulary
    from captioner.models.decoder import Decoder

STRATEGIES = ("greedy", "beam", "sample")
EARLY_STOPPING = ("exact", "heuristic")
#: Used where neither the call nor a model says otherwise.
NEUTRAL_DEFAULTS = {
    "max_length": 30,
    "length_penalty": 0.0,
    "no_repeat_ngram_size": 0,
    "early_stopping": "exact",
    "block_bad_endings": False,
    "block_doubled_words": False,
    "concept_constraints": 0,
    "concept_threshold": 0.5,
    "concept_exclusion": 0.0,
    "concept_known_words": 0,
    "concept_familiar_percentile": 0.0,
}


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode. Fields that a strategy does not use are ignored by it.

    ``max_length``, ``length_penalty``, ``no_repeat_ngram_size``, ``early_stopping`` and the two
    ``block_...`` rules left as None mean "the model's own" (:meth:`with_defaults`; a checkpoint may carry its own decoding settings). Every field is
    checked here, whichever way it came in: a :class:`~captioner.ranges.SettingError` names the field.
    """

    strategy: str = "beam"
    beam_size: int = DEFAULT_BEAM_SIZE
    num_return: int = 1  # n-best list length (beam) or samples per image (sample)
    max_length: int | None = None  # most words per caption (<end> not counted)
    min_length: int = 1  # <end> is not allowed before this many words
    length_penalty: float | None = None  # GNMT alpha: rank by log_prob / ((5 + n) / 6) ** alpha, n = scored tokens
    no_repeat_ngram_size: int | None = None  # block any n-gram from appearing twice in a caption (0: off)
    block_bad_endings: bool | None = None  # no <end> right after a word the training captions never end on ("a", "in", ...)
    block_doubled_words: bool | None = None  # no word right after itself ("are are") or after itself and "and" / "or" ("red and red")
    constraints: tuple[tuple[str, ...], ...] = ()  # words every caption must name: one of each tuple ("cat", "cats", "kitten")
    concept_constraints: int | None = None  # up to this many constraints in all from each image's visual concepts (0: none)
    concept_threshold: float | None = None  # ... the concepts at least this likely
    concept_exclusion: float | None = None  # with concept constraints on, no word for an animal the image's concepts give less than this (0: off)
    concept_known_words: int | None = None  # a concept the model says among its N most frequent words is left to it (0: none is)
    concept_familiar_percentile: float | None = None  # concepts steer only photos farther from the training photos than this % of dev photos (0: every photo)
    allow_unk: bool = False  # <unk> is never generated unless this is True (it is not a word anyone wants to read)
    temperature: float = 1.0  # sample only
    top_k: int = 0  # sample only: keep the k most likely words (0: all)
    top_p: float = 1.0  # sample only: keep the smallest set of words with this much probability
    seed: int | None = None  # sample only: same seed, same samples
    early_stopping: str | None = None  # beam only: "exact" or "heuristic", when an image's search ends (see _beam_search)
    return_attention: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ranges.SettingError("strategy", f"must be one of {', '.join(STRATEGIES)}, not {ranges.shown(self.strategy)}")
        ranges.whole_number("beam_size", self.beam_size, 1, MAX_BEAM_SIZE)
        ranges.whole_number("num_return", self.num_return, 1, MAX_NUM_RETURN)
        if self.early_stopping is not None and self.early_stopping not in EARLY_STOPPING:
            raise ranges.SettingError("early_stopping", f"must be one of {', '.join(EARLY_STOPPING)}, not {ranges.shown(self.early_stopping)}")
        if self.strategy == "beam" and self.num_return > self.beam_size:
            raise ConfigError(f"cannot return {self.num_return} captions from a beam of {self.beam_size}")
        if self.strategy == "greedy" and self.num_return != 1:
            raise ConfigError("greedy decoding returns one caption per image; use beam or sample for more")
        ranges.optional_whole_number("max_length", self.max_length, 1, MAX_LENGTH)
        ranges.whole_number("min_length", self.min_length, 0, self.max_length if self.max_length is not None else MAX_LENGTH)
        ranges.optional_number("length_penalty", self.length_penalty, 0.0, MAX_LENGTH_PENALTY)
        ranges.optional_whole_number("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, MAX_NO_REPEAT_NGRAM)
        ranges.number("temperature", self.temperature, 0.0, 100.0, low_open=True)
        ranges.whole_number("top_k", self.top_k, 0, 1_000_000)
        ranges.number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        ranges.optional_whole_number("seed", self.seed, 0, 2**63 - 1)
        object.__setattr__(self, "constraints", _checked_constraints(self.constraints))
        ranges.optional_whole_number("concept_constraints", self.concept_constraints, 0, MAX_CONSTRAINTS)
        if self.concept_threshold is not None:  # the same range as a model's own (CaptionerConfig)
            ranges.number("concept_threshold", self.concept_threshold, 0.0, 1.0, low_open=True)
        ranges.optional_number("concept_exclusion", self.concept_exclusion, 0.0, 1.0)
        ranges.optional_whole_number("concept_known_words", self.concept_known_words, 0, MAX_VOCABULARY)
        ranges.optional_number("concept_familiar_percentile", self.concept_familiar_percentile, 0.0, 100.0)
        for name in ("allow_unk", "return_attention", "block_bad_endings", "block_doubled_words"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ranges.SettingError(name, f"must be true or false, not {ranges.shown(getattr(self, name))}")

    @classmethod
    def for_captions(cls, beam_size: int = DEFAULT_BEAM_SIZE, n_best: int = 1, **settings: Any) -> GenerationConfig:
        """What a caption request means: greedy for ``beam_size=1`` (unless ``n_best`` asks for more),
        beam search otherwise, the beam widened to ``n_best`` (a beam of k holds k captions); other
        fields pass through. Every front end (Python, command line, web) asks this way."""
        ranges.whole_number("beam_size", beam_size, 1, MAX_BEAM_SIZE)
        ranges.whole_number("n_best", n_best, 1, MAX_NUM_RETURN)
        strategy = settings.pop("strategy", "beam" if beam_size > 1 or n_best > 1 else "greedy")
        return cls(strategy=strategy, beam_size=max(beam_size, n_best) if strategy == "beam" else beam_size, num_return=n_best, **settings)

    def with_defaults(self, **defaults: Any) -> GenerationConfig:
        """This config with its None fields (the "model's own" ones) taken from ``defaults``."""
        missing = {name: value for name, value in defaults.items() if getattr(self, name) is None}
        return replace(self, **missing) if missing else self

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


MAX_WORD_CHARACTERS = 50  # a required word: English's longest are about 30


def _checked_constraints(constraints: Any) -> tuple[tuple[str, ...], ...]:
    """Constraints as tuples of single lower-case words (each tuple: the words of which one must appear)."""
    from captioner.data.vocabulary import tokenize

    if isinstance(constraints, str) or not isinstance(constraints, (list, tuple)):
        raise ranges.SettingError("constraints", f"must be a list of word lists (one of each must appear), not {ranges.shown(constraints)}")
    checked = []
    for words in constraints:
        words = [words] if isinstance(words, str) else words
        if not isinstance(words, (list, tuple)) or not words or not all(isinstance(word, str) and len(tokenize(word)) == 1 for word in words):
            raise ranges.SettingError("constraints", f"must each be one or more single words (\"cat\" or [\"cat\", \"kitten\"]), not {ranges.shown(' '.join(map(str, words)) if isinstance(words, (list, tuple)) else words)}")
        long = [word for word in words if len(word) > MAX_WORD_CHARACTERS]
        if long:
            raise ranges.SettingError("constraints", f"words are at most {MAX_WORD_CHARACTERS} characters, not {len(long[0]):,} ({ranges.shown(long[0])})")
        checked.append(tuple(dict.fromkeys(tokenize(word)[0] for word in words)))
    if len(checked) > MAX_CONSTRAINTS:
        raise ranges.SettingError("constraints", f"can be at most {MAX_CONSTRAINTS} (the search keeps 2^n beams), not {len(checked)}")
    return tuple(checked)


@dataclass
class Caption:
    """One generated caption."""

    text: str
    tokens: list[int]  # word ids, without <start>/<end>
    log_prob: float  # sum of the model's log-probabilities of the words (and of <end> if finished)
    score: float  # what captions were ranked by (log_prob with the length penalty applied)
    finished: bool  # False: stopped at max_length without <end>
    attention: torch.Tensor | None = field(default=None, repr=False)  # (len(tokens), P): where each word looked
    constraints_met: bool | None = None  # under constraints: whether this caption meets them all

    @property
    def words(self) -> list[str]:
        return self.text.split()

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "log_prob": self.log_prob, "score": self.score, "finished": self.finished}




@dataclass
class Constraints:
    """Per image, the disjunctive constraints its caption must meet: each a set of word ids, one of
    which must appear ("one of cat, cats, kitten"); and the words it may not write (``banned``).
    Words at or past ``vocab.extension_start`` (added to the vocabulary for constraints) may only be
    written where a constraint of the image names them: without constraints, the model decodes
    exactly as it did before its vocabulary grew."""

    per_image: list[list[frozenset[int]]]
    banned: list[frozenset[int]] = field(default_factory=list)  # per image (empty: none)

    def __post_init__(self) -> None:
        for constraints in self.per_image:
            if len(constraints) > MAX_CONSTRAINTS:
                raise ConfigError(f"at most {MAX_CONSTRAINTS} constraints per image (the search keeps 2^n beams), not {len(constraints)}")
        if self.banned and len(self.banned) != len(self.per_image):
            raise ConfigError(f"banned words for {len(self.banned)} images, constraints for {len(self.per_image)}")

    @property
    def count(self) -> int:
        return max((len(c) for c in self.per_image), default=0)

    @property
    def states(self) -> int:
        return 2**self.count

    def initial_states(self) -> list[int]:
        """Each image's first state: the constraints it does not have count as met."""
        return [(2**self.count - 1) & ~(2 ** len(c) - 1) for c in self.per_image]

    def word_states(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """(B, V) int: bit i set where the word meets the image's constraint i."""
        bits = torch.zeros(len(self.per_image), vocab_size, dtype=torch.long)
        for image, constraints in enumerate(self.per_image):
            for i, words in enumerate(constraints):
                bits[image, sorted(words)] |= 1 << i
        return bits.to(device)

    def blocked_words(self, vocab: Vocabulary, device: torch.device) -> torch.Tensor | None:
        """(B, V) bool, True for each image's banned words and for the added words except where the
        image's constraints name them; None when nothing is blocked."""
        size = len(vocab)
        start = vocab.extension_start if vocab.extension_start is not None else size
        if start >= size and not any(self.banned):
            return None
        blocked = torch.zeros(len(self.per_image), size, dtype=torch.bool)
        blocked[:, start:] = True
        for image, constraints in enumerate(self.per_image):
            for words in constraints:
                blocked[image, sorted(words)] = False
            if self.banned and self.banned[image]:
                blocked[image, sorted(self.banned[image])] = True
        return blocked.to(device)

    def of_images(self, images: list[int]) -> Constraints:
        """The constraints of these images only, in this order."""
        return Constraints([self.per_image[i] for i in images], [self.banned[i] for i in images] if self.banned else [])


def _masked(logits: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
    """Logits (B * r, V), r rows per image, with each image's blocked words (B, V) at -inf."""
    if blocked is None:
        return logits
    rows, size = logits.shape
    return logits.view(blocked.shape[0], -1, size).masked_fill(blocked.unsqueeze(1), -math.inf).view(rows, size)


def length_penalty(scored_tokens: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al. 2016); 1 when alpha is 0."""
    return ((5.0 + scored_tokens) / 6.0) ** alpha


def generate(
    decoder: Decoder,
    features: torch.Tensor,
    vocab: Vocabulary,
    config: GenerationConfig | None = None,
    constraints: Sequence[Sequence[Iterable[int]]] | None = None,
    banned: Sequence[Iterable[int]] | None = None,
) -> list[list[Caption]]:
    """Caption a batch: features (B, P, D) -> B lists of captions, best first.

    ``features`` are what the decoder reads (an ensemble with V views reads (B, V * P, D)). Fields of
    ``config`` left as None take :data:`NEUTRAL_DEFAULTS`. ``constraints``: per image, word-id sets
    of which one each must appear (beam search only; see :func:`_beam_search`); ``banned``: per
    image, word ids it may not write (every strategy). The decoder is run
    in eval mode under ``torch.inference_mode()`` and left in the mode it was in.
    """
    config = (config or GenerationConfig()).with_defaults(**NEUTRAL_DEFAULTS)
    if features.dim() != 3:
        raise ConfigError(f"expected features (B, P, D), got shape {tuple(features.shape)}")
    if features.shape[0] == 0:
        return []
    required = Constraints(
        [[frozenset(words) for words in image] for image in constraints] if constraints is not None else [[] for _ in range(features.shape[0])],
        [frozenset(words) for words in banned] if banned is not None else [],
    )
    if len(required.per_image) != features.shape[0]:
        raise ConfigError(f"constraints for {len(required.per_image)} images, features for {features.shape[0]}")
    if required.count and config.strategy != "beam":
        raise ConfigError(f"constraints need beam search (a beam of at least 1), not {config.strategy}")
    was_training = decoder.training
    decoder.eval()
    try:
        with torch.inference_mode():
            if config.strategy == "beam":
                return _by_constraint_count(features.float(), required, lambda part, rules: _beam_search(decoder, vocab, part, config, rules))
            search = {"greedy": _greedy, "sample": _sample}[config.strategy]
            return search(decoder, vocab, features.float(), config, required)
    finally:
        decoder.train(was_training)


def _by_constraint_count(
    features: torch.Tensor, constraints: Constraints, search: Callable[[torch.Tensor, Constraints], list[list[Caption]]]
) -> list[list[Caption]]:
    """One search per number of constraints, results in the images' order: an image with m
    constraints searches 2^m beams of k, so an image with none beside one with some would otherwise
    carry k dead beams per state it can never be in."""
    groups: dict[int, list[int]] = {}
    for image, image_constraints in enumerate(constraints.per_image):
        groups.setdefault(len(image_constraints), []).append(image)
    if len(groups) == 1:
        return search(features, constraints)
    results: list[list[Caption]] = [[] for _ in constraints.per_image]
    for images in groups.values():
        for image, found in zip(images, search(features[images], constraints.of_images(images))):
            results[image] = found
    return results


# ----- shared pieces ------------------------------------------------------------------------


def _log_probs(vocab: Vocabulary, logits: torch.Tensor, history: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Model log-probabilities (rows, V) with the tokens that may not come next set to -inf.

    Never generated: <pad>, <start>, <unk> (unless allowed), <end> before ``min_length``, a word
    that repeats an n-gram (``no_repeat_ngram_size``), <end> right after a bad ending
    (``block_bad_endings``: a word the training captions never end on), a word right after itself
    or after itself and "and" / "or" (``block_doubled_words``). Where these rules leave a row no
    token at all (a tiny vocabulary, a long ``min_length``), <end> is allowed there: decoding always ends.
    """
    model_log_probs = torch.log_softmax(logits.float(), dim=-1)
    log_probs = model_log_probs.clone()
    log_probs[:, vocab.pad_id] = -math.inf
    log_probs[:, vocab.start_id] = -math.inf
    if not config.allow_unk:
        log_probs[:, vocab.unk_id] = -math.inf
    if history.shape[1] < config.min_length:
        log_probs[:, vocab.end_id] = -math.inf
    _block_repeated_ngrams(log_probs, history, config.no_repeat_ngram_size)
    if config.block_bad_endings and vocab.bad_endings and history.shape[1]:
        log_probs[ends_badly(vocab, history[:, -4:].tolist()), vocab.end_id] = -math.inf
    if config.block_doubled_words and history.shape[1]:
        block_doubled_words(vocab, log_probs, history[:, -1], history[:, -2] if history.shape[1] > 1 else None)
    stuck = ~(log_probs.amax(dim=1) > -math.inf)  # (rows,) nothing left (all -inf, or NaN): one reduction
    if bool(stuck.any()):
        log_probs[stuck, vocab.end_id] = model_log_probs[stuck, vocab.end_id]
    return log_probs


#: Words that join two of a kind: the word before one may not come right after it ("a red and red").
JOINERS = ("and", "or")


def block_doubled_words(vocab: Vocabulary, scores: torch.Tensor, last: torch.Tensor, before_last: torch.Tensor | None) -> None:
    """Set -inf in ``scores`` (rows, V), in place, for each row's last word (``last`` (rows,): no "are
    are") and, where that word is "and" or "or", for the word before it (``before_last`` (rows,), None
    after one word: no "a red and red"; 4 of Flickr8k's 30,000 training captions have one). The one
    rule for decoding and self-critical sampling; no host sync."""
    scores.scatter_(1, last.unsqueeze(1), -math.inf)
    joiners = [vocab.index[word] for word in JOINERS if word in vocab.index]
    if before_last is None or not joiners:
        return
    joined = torch.isin(last, torch.tensor(joiners, device=last.device)).unsqueeze(1)  # (rows, 1)
    penalty = torch.zeros(joined.shape, dtype=scores.dtype, device=scores.device).masked_fill_(joined, -math.inf)  # (rows, 1): 0 or -inf
    scores.scatter_add_(1, before_last.unsqueeze(1), penalty)  # reads nothing of scores: sampling differentiates through it


def ends_badly(vocab: Vocabulary, recent: list[list[int]]) -> list[int]:
    """The rows whose words so far (their last few are enough) end on a bad ending: a word or phrase
    of up to four words the training captions never end on. <end> may not come next there."""
    bad = vocab.bad_ending_ids
    if not bad:
        return []
    return [row for row, words in enumerate(recent) if any(tuple(words[-n:]) in bad for n in range(1, len(words) + 1))]


def _block_repeated_ngrams(log_probs: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Set -inf for every word that would complete an n-gram already present in that row's history."""
    if n <= 0 or history.shape[1] < n - 1:
        return
    rows = history.tolist()
    for row, words in enumerate(rows):
        if len(words) < n - 1:
            continue
        prefix = tuple(words[len(words) - (n - 1) :]) if n > 1 else ()
        banned = [words[i + n - 1] for i in range(len(words) - n + 1) if tuple(words[i : i + n - 1]) == prefix]
        if banned:
            log_probs[row, banned] = -math.inf


def _caption(vocab: Vocabulary, tokens: list[int], log_prob: float, finished: bool, attention: torch.Tensor | None, alpha: float) -> Caption:
    scored = len(tokens) + (1 if finished else 0)
    return Caption(
        text=vocab.decode(tokens, strip_special=False) if tokens else "",
        tokens=tokens,
        log_prob=log_prob,
        score=log_prob / length_penalty(scored, alpha),
        finished=finished,
        attention=attention.float().cpu() if attention is not None else None,
    )


def _stack_attention(steps: list[torch.Tensor]) -> torch.Tensor | None:
    """Per-step attention (rows, P) -> (rows, T, P); None when the decoder gave none."""
    return torch.stack(steps, dim=1) if steps else None


# ----- greedy ---------------------------------------------------------------------------------


def _greedy(decoder: Decoder, vocab: Vocabulary, features: torch.Tensor, config: GenerationConfig, rules: Constraints) -> list[list[Caption]]:
    batch, device = features.shape[0], features.device
    state = decoder.init_state(features)
    blocked = rules.blocked_words(vocab, device)  # (B, V) or None
    tokens = torch.full((batch,), vocab.start_id, dtype=torch.long, device=device)
    history = torch.zeros(batch, 0, dtype=torch.long, device=device)  # (B, t)
    alphas: list[torch.Tensor] = []  # per step (B, P)
    total = features.new_zeros(batch)  # (B,) log-probability so far
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), config.max_length, dtype=torch.long, device=device)
    for t in range(config.max_length + 1):
        logits, state, alpha = decoder.step(tokens, state, config.return_attention)
        log_probs = _log_probs(vocab, _masked(logits, blocked), history, config)  # (B, V)
        if t == config.max_length:  # no room for another word: only <end> can still finish a caption
            ends = ~finished & (log_probs.argmax(dim=1) == vocab.end_id)
            total = torch.where(ends, total + log_probs[:, vocab.end_id], total)
            finished |= ends
            break
        best_log_prob, best = log_probs.max(dim=1)  # (B,)
        live = ~finished
        total = torch.where(live, total + best_log_prob, total)
        ends = live & (best == vocab.end_id)
        lengths = torch.where(ends, torch.full_like(lengths, t), lengths)
        finished |= ends
        history = torch.cat([history, torch.where(live, best, torch.full_like(best, vocab.pad_id)).unsqueeze(1)], dim=1)
        if alpha is not None and config.return_attention:
            alphas.append(alpha)
        if bool(finished.all()):
            break
        tokens = best
    attention = _stack_attention(alphas)  # (B, T, P) or None
    results = []
    for row in range(batch):
        n = int(lengths[row])
        row_attention = attention[row, :n] if attention is not None else None
        results.append([_caption(vocab, history[row, :n].tolist(), float(total[row]), bool(finished[row]), row_attention, config.length_penalty)])
    return results


# ----- beam search ----------------------------------------------------------------------------


def _beam_search(decoder: Decoder, vocab: Vocabulary, features: torch.Tensor, config: GenerationConfig, constraints: Constraints) -> list[list[Caption]]:
    """Batched (constrained) beam search over B images x S constraint states x k beams.

    Without constraints (S = 1): at each step every live beam is extended by every word; per image
    the 2k best extensions are ranked. An extension by <end> ranked within the top k becomes a
    finished hypothesis (as in Hugging Face's implementation, so k=1 is exactly greedy); the k best
    other extensions become the next beams.

    With m disjunctive constraints ("one of cat, cats, kitten"), each image keeps a beam of k for
    each of the S = 2^m sets of constraints met so far, a finite-state automaton over them (Anderson
    et al. 2017): an extension by a word that meets constraints moves into the state of the larger
    set, and each state keeps the k best extensions that land in it. Captions are taken from the
    state where every constraint is met; when none finished there, from all states (the best caption
    the search found), and ``constraints_met`` says so.

    An image is done when its final state has k finished hypotheses and no live beam can still beat
    the worst of them: with ``early_stopping="exact"`` by any caption up to max_length (the search
    then returns exactly what running to max_length would; under a length penalty a longer caption
    may always score better, so the bound depends on max_length), with ``"heuristic"`` by ending
    now (Hugging Face's default: the steps no longer grow with max_length). Without a length penalty
    both are exact. Beams still alive at max_length give one hypothesis each: finished if <end> is
    their most likely next token, else unfinished; so a model that never says <end> still gets captions.
    A done image's rows leave the batch: the steps after it work only for the images still searching.
    """
    k, alpha = config.beam_size, config.length_penalty
    batch, device = features.shape[0], features.device
    states = constraints.states  # S
    final = states - 1  # every constraint met
    groups = batch * states  # (image, state) pairs, each with k beams
    rows = groups * k
    state_of_row = torch.arange(states, device=device).repeat_interleave(k)  # (S*k,) within an image
    word_states = constraints.word_states(len(vocab), device)  # (B, V) the constraints each word meets, as bits
    blocked = constraints.blocked_words(vocab, device)  # (B, V) or None
    state = select_state(decoder.init_state(features), torch.arange(batch, device=device).repeat_interleave(states * k), keep=decoder.image_constant_keys)  # (B*S*k, ...)
    scores = features.new_full((batch, states, k), -math.inf)  # (B, S, k) log-probability of each beam
    scores[torch.arange(batch), torch.tensor(constraints.initial_states()), 0] = 0.0  # one beam starts, the others are copies of it
    tokens = torch.full((rows,), vocab.start_id, dtype=torch.long, device=device)
    history = torch.zeros(rows, 0, dtype=torch.long, device=device)  # (B*S*k, t)
    attention: torch.Tensor | None = None  # (B*S*k, t, P) once the decoder has given a map
    pools: list[list[list[tuple[float, float, list[int], torch.Tensor | None, bool]]]] = [[[] for _ in range(states)] for _ in range(batch)]
    done = [False] * batch
    searching = list(range(batch))  # the images still searched, in row order: the tensors hold only theirs
    keep_attention = config.return_attention and decoder.has_attention

    def add(image: int, into: int, log_prob: float, words: list[int], row_attention: torch.Tensor | None, finished: bool) -> None:
        scored = len(words) + (1 if finished else 0)
        pool = pools[image][into]
        pool.append((log_prob / length_penalty(scored, alpha), log_prob, words, row_attention, finished))
        pool.sort(key=lambda item: -item[0])
        del pool[k:]

    def row_attention(row: int) -> torch.Tensor | None:
        return attention[row] if keep_attention and attention is not None else None

    for t in range(config.max_length + 1):
        logits, state, alpha_t = decoder.step(tokens, state, keep_attention)
        log_probs = _log_probs(vocab, _masked(logits, blocked), history, config)  # (B*S*k, V)
        vocab_size = log_probs.shape[1]
        if t == config.max_length:
            # No room for another word. Each live beam gives one hypothesis in its state's pool:
            # finished if <end> is its most likely next token (as greedy decides), else unfinished.
            ends_here = (log_probs.argmax(dim=1) == vocab.end_id).tolist()  # (B*S*k,)
            end_log_probs = log_probs[:, vocab.end_id].tolist()
            beam_scores, words = scores.view(-1).tolist(), history.tolist()  # one copy from the device, not one per beam
            for row in range(len(beam_scores)):
                image, into = searching[row // (states * k)], (row // k) % states
                if done[image] or not math.isfinite(beam_scores[row]):
                    continue
                if ends_here[row]:
                    add(image, into, beam_scores[row] + end_log_probs[row], words[row], row_attention(row), True)
                else:
                    add(image, into, beam_scores[row], words[row], row_attention(row), False)
            break
        candidates = (scores.view(-1, 1) + log_probs).view(batch, states * k, vocab_size)  # (B, S*k, V)
        if states > 1:
            landing = state_of_row.view(1, -1, 1) | word_states.unsqueeze(1)  # (B, S*k, V) the state each extension lands in
        next_scores, next_origin, next_word = [], [], []
        for into in range(states):
            ranked = (candidates if states == 1 else candidates.masked_fill(landing != into, -math.inf)).view(batch, -1)  # (B, S*k*V)
            top_scores, top_index = ranked.topk(min(2 * k, ranked.shape[1]), dim=1)  # (B, 2k), best first
            origin = top_index // vocab_size  # (B, 2k) which beam of the image
            word = top_index % vocab_size  # (B, 2k) which word
            is_end = word == vocab.end_id
            # Extensions by <end> within the top k of their state finish a hypothesis there.
            finishing = is_end & (torch.arange(top_scores.shape[1], device=device) < k) & torch.isfinite(top_scores)
            finished_at = finishing.nonzero().tolist()
            if finished_at:
                finished_scores, finished_origin = top_scores.tolist(), origin.tolist()
                for i, position in finished_at:
                    if not done[searching[i]]:
                        row = i * states * k + finished_origin[i][position]
                        add(searching[i], into, finished_scores[i][position], history[row].tolist(), row_attention(row), True)
            # The k best extensions by a word become the state's next beams (at most k of the 2k are
            # ends: only its own k beams can end into a state).
            live = ~is_end
            chosen = live & (live.cumsum(dim=1) <= k)  # (B, 2k), exactly k per image
            next_scores.append(top_scores[chosen].view(batch, k))
            next_origin.append(origin[chosen].view(batch, k))
            next_word.append(word[chosen].view(batch, k))
        scores = torch.stack(next_scores, dim=1)  # (B, S, k)
        origins = (torch.stack(next_origin, dim=1) + (torch.arange(batch, device=device) * states * k).view(-1, 1, 1)).view(-1)  # (B*S*k,)
        tokens = torch.stack(next_word, dim=1).view(-1)  # (B*S*k,)
        state = select_state(state, origins, keep=decoder.image_constant_keys)  # beams never leave their image
        history = torch.cat([history[origins], tokens.unsqueeze(1)], dim=1)
        if keep_attention and alpha_t is not None:
            previous = take_rows(attention, origins) if attention is not None else alpha_t.new_zeros(origins.shape[0], 0, alpha_t.shape[1])
            attention = torch.cat([previous, alpha_t[origins].unsqueeze(1)], dim=1)
        # An image is done once its final pool is full and no live beam, in any state, can still beat its worst.
        best_lives = scores.view(batch, -1).max(dim=1).values.tolist()  # (B,), one copy from the device per step
        for image, best_live in zip(searching, best_lives):
            pool = pools[image][final]
            if done[image] or len(pool) < k:
                continue
            # A live beam's log-probability only falls; its score is at best divided by the largest
            # length penalty it can still get (lp is monotone in length, so an end decides).
            longest = config.max_length + 1 if config.early_stopping == "exact" else t + 1
            largest_penalty = max(length_penalty(t + 1, alpha), length_penalty(longest, alpha))
            bound = best_live / largest_penalty if best_live < 0 else best_live
            if not math.isfinite(best_live) or pool[-1][0] >= bound:
                done[image] = True
        if all(done):
            break
        if any(done[image] for image in searching):  # the finished images' rows leave: each step works only for the images still searching
            still = [i for i, image in enumerate(searching) if not done[image]]
            kept = torch.tensor(still, device=device)
            kept_rows = (kept.view(-1, 1) * (states * k) + torch.arange(states * k, device=device)).view(-1)
            state = {key: take_rows(value, kept if key in decoder.image_constant_keys else kept_rows) for key, value in state.items()}
            tokens, history, scores, word_states = tokens[kept_rows], history[kept_rows], scores[kept], word_states[kept]
            attention = take_rows(attention, kept_rows) if attention is not None else None
            blocked = blocked[kept] if blocked is not None else None
            searching, batch = [searching[i] for i in still], len(still)
    results = []
    for image_pools, image_constraints in zip(pools, constraints.per_image):
        met = bool(image_pools[final])
        pool = image_pools[final] if met else sorted((item for p in image_pools for item in p), key=lambda item: -item[0])
        found = [_caption(vocab, words, log_prob, finished, kept_attention, alpha) for _, log_prob, words, kept_attention, finished in pool[: config.num_return]]
        for caption in found:
            caption.constraints_met = met if image_constraints else None
        results.append(found)
    return results


# ----- sampling -------------------------------------------------------------------------------


def _sample(decoder: Decoder, vocab: Vocabulary, features: torch.Tensor, config: GenerationConfig, rules: Constraints) -> list[list[Caption]]:
    """num_return independent samples per image, with temperature / top-k / top-p filtering."""
    n = config.num_return
    batch, device = features.shape[0], features.device
    rows = batch * n
    generator = torch.Generator(device=device)
    if config.seed is not None:
        generator.manual_seed(config.seed)
    else:
        generator.seed()
    state = select_state(decoder.init_state(features), torch.arange(batch, device=device).repeat_interleave(n), keep=decoder.image_constant_keys)  # (B*n, ...)
    blocked = rules.blocked_words(vocab, device)  # (B, V) or None
    tokens = torch.full((rows,), vocab.start_id, dtype=torch.long, device=device)
    history = torch.zeros(rows, 0, dtype=torch.long, device=device)
    alphas: list[torch.Tensor] = []  # per step (rows, P)
    total = features.new_zeros(rows)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), config.max_length, dtype=torch.long, device=device)
    for t in range(config.max_length + 1):
        logits, state, alpha = decoder.step(tokens, state, config.return_attention)
        log_probs = _log_probs(vocab, _masked(logits, blocked), history, config)  # (rows, V) the model's own
        if t == config.max_length:  # only <end> is still possible: sample whether to stop here
            end_probability = _filtered_probs(log_probs, config)[:, vocab.end_id]
            ends = ~finished & (torch.rand(rows, generator=generator, device=device) < end_probability)
            total = torch.where(ends, total + log_probs[:, vocab.end_id], total)
            finished |= ends
            break
        choice = torch.multinomial(_filtered_probs(log_probs, config), 1, generator=generator).squeeze(1)  # (rows,)
        live = ~finished
        total = torch.where(live, total + log_probs.gather(1, choice.unsqueeze(1)).squeeze(1), total)
        ends = live & (choice == vocab.end_id)
        lengths = torch.where(ends, torch.full_like(lengths, t), lengths)
        finished |= ends
        history = torch.cat([history, torch.where(live, choice, torch.full_like(choice, vocab.pad_id)).unsqueeze(1)], dim=1)
        if alpha is not None and config.return_attention:
            alphas.append(alpha)
        if bool(finished.all()):
            break
        tokens = choice
    attention = _stack_attention(alphas)
    results: list[list[Caption]] = [[] for _ in range(batch)]
    for row in range(rows):
        length = int(lengths[row])
        row_attention = attention[row, :length] if attention is not None else None
        results[row // n].append(_caption(vocab, history[row, :length].tolist(), float(total[row]), bool(finished[row]), row_attention, config.length_penalty))
    for captions in results:
        captions.sort(key=lambda caption: -caption.score)
    return results


def _filtered_probs(log_probs: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Sampling distribution: temperature, then top-k, then top-p (nucleus)."""
    # from the row's best word, so a tiny temperature sends the others to -inf, not every word; one
    # below the dtype's range would read as 0 (-inf stays -inf)
    temperature = max(config.temperature, torch.finfo(log_probs.dtype).tiny)
    logits = (log_probs - log_probs.max(dim=1, keepdim=True).values) / temperature
    if config.top_k > 0 and config.top_k < logits.shape[1]:
        kth = logits.topk(config.top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=1, descending=True)
        before = sorted_probs.cumsum(dim=1) - sorted_probs  # mass strictly before each word
        dropped = before >= config.top_p
        dropped[:, 0] = False  # the most likely word always stays (a top_p below float32's range reads as 0)
        sorted_probs = sorted_probs.masked_fill(dropped, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
        probs = probs / probs.sum(dim=1, keepdim=True)
    return probs
