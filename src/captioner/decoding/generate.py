"""One batched ``generate`` for every decoding strategy: greedy, beam search, sampling.

All strategies run B images (x k beams, or x n samples) as one tensor batch per step. The encoder
runs once per image and the decoder's per-image work (the attention projection of the features) is
done once in ``init_state``; beams and samples share it by row selection.

Scores are the model's own log-probabilities: ``log_softmax`` of the logits over the whole
vocabulary. Tokens that may never be generated (<pad>, <start>, and <end> before ``min_length``) are
then set to -inf, which changes what is chosen but not the log-probability of what is chosen. So the
``log_prob`` of a returned caption is exactly what the model gives that caption under teacher
forcing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from captioner.errors import ConfigError
from captioner.models.decoder import select_state

if TYPE_CHECKING:
    from captioner.models.captioner import Captioner

STRATEGIES = ("greedy", "beam", "sample")


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode. Fields that a strategy does not use are ignored by it."""

    strategy: str = "beam"
    beam_size: int = 3
    num_return: int = 1  # n-best list length (beam) or samples per image (sample)
    max_length: int = 30  # most words per caption (<end> not counted)
    min_length: int = 1  # <end> is not allowed before this many words
    length_penalty: float = 0.0  # GNMT alpha: rank by log_prob / ((5 + n) / 6) ** alpha, n = scored tokens
    no_repeat_ngram_size: int = 0  # block any n-gram from appearing twice in a caption (0: off)
    allow_unk: bool = False  # <unk> is never generated unless this is True (it is not a word anyone wants to read)
    temperature: float = 1.0  # sample only
    top_k: int = 0  # sample only: keep the k most likely words (0: all)
    top_p: float = 1.0  # sample only: keep the smallest set of words with this much probability
    seed: int | None = None  # sample only: same seed, same samples
    return_attention: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.beam_size < 1:
            raise ConfigError(f"beam size must be at least 1, not {self.beam_size}")
        if self.num_return < 1:
            raise ConfigError(f"num_return must be at least 1, not {self.num_return}")
        if self.strategy == "beam" and self.num_return > self.beam_size:
            raise ConfigError(f"cannot return {self.num_return} captions from a beam of {self.beam_size}")
        if self.strategy == "greedy" and self.num_return != 1:
            raise ConfigError("greedy decoding returns one caption per image; use beam or sample for more")
        if self.max_length < 1:
            raise ConfigError(f"max_length must be at least 1, not {self.max_length}")
        if not 0 <= self.min_length <= self.max_length:
            raise ConfigError(f"min_length must be between 0 and max_length ({self.max_length}), not {self.min_length}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, not {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("top_k must be >= 0 and top_p in (0, 1]")
        if self.no_repeat_ngram_size < 0:
            raise ConfigError(f"no_repeat_ngram_size must be >= 0, not {self.no_repeat_ngram_size}")


@dataclass
class Caption:
    """One generated caption."""

    text: str
    tokens: list[int]  # word ids, without <start>/<end>
    log_prob: float  # sum of the model's log-probabilities of the words (and of <end> if finished)
    score: float  # what captions were ranked by (log_prob with the length penalty applied)
    finished: bool  # False: stopped at max_length without <end>
    attention: torch.Tensor | None = field(default=None, repr=False)  # (len(tokens), P): where each word looked

    @property
    def words(self) -> list[str]:
        return self.text.split()

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "log_prob": self.log_prob, "score": self.score, "finished": self.finished}


def length_penalty(scored_tokens: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al. 2016); 1 when alpha is 0."""
    return ((5.0 + scored_tokens) / 6.0) ** alpha


def generate(model: "Captioner", images_or_features: torch.Tensor, config: GenerationConfig | None = None, **overrides: Any) -> list[list[Caption]]:
    """Caption a batch: images (B, 3, H, W) or encoder features (B, P, D) -> B lists of captions, best first.

    For a model that reads V views of each image (an ensemble with a flipped view), features are
    its encoder's (B, V * P, D); attention maps are over one view's P regions.

    ``config`` fields can be overridden by keyword, e.g. ``generate(model, x, strategy="greedy")``.
    The model is run in eval mode under ``torch.inference_mode()`` and left in the mode it was in.
    """
    config = replace(config or GenerationConfig(), **overrides) if overrides else (config or GenerationConfig())
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            x = images_or_features.to(model.device)
            if x.dim() == 4:
                features = model.encode(x)  # (B, P, D)
            elif x.dim() == 3:
                features = x.float()
            else:
                raise ConfigError(f"expected images (B, 3, H, W) or features (B, P, D), got shape {tuple(x.shape)}")
            if features.shape[0] == 0:
                return []
            search = {"greedy": _greedy, "beam": _beam_search, "sample": _sample}[config.strategy]
            return search(model, features, config)
    finally:
        model.train(was_training)


# ----- shared pieces ------------------------------------------------------------------------


def _log_probs(model: "Captioner", logits: torch.Tensor, history: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Model log-probabilities (rows, V) with the tokens that may not come next set to -inf.

    Never generated: <pad>, <start>, <unk> (unless allowed), <end> before ``min_length``, a word
    that repeats an n-gram (``no_repeat_ngram_size``). Where these rules leave a row no token at
    all (a tiny vocabulary, a long ``min_length``), <end> is allowed there: decoding always ends.
    """
    vocab = model.vocab
    model_log_probs = torch.log_softmax(logits.float(), dim=-1)
    log_probs = model_log_probs.clone()
    log_probs[:, vocab.pad_id] = -math.inf
    log_probs[:, vocab.start_id] = -math.inf
    if not config.allow_unk:
        log_probs[:, vocab.unk_id] = -math.inf
    if history.shape[1] < config.min_length:
        log_probs[:, vocab.end_id] = -math.inf
    _block_repeated_ngrams(log_probs, history, config.no_repeat_ngram_size)
    stuck = ~torch.isfinite(log_probs).any(dim=1)  # (rows,)
    if bool(stuck.any()):
        log_probs[stuck, vocab.end_id] = model_log_probs[stuck, vocab.end_id]
    return log_probs


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


def _caption(model: "Captioner", tokens: list[int], log_prob: float, finished: bool, attention: torch.Tensor | None, alpha: float) -> Caption:
    scored = len(tokens) + (1 if finished else 0)
    return Caption(
        text=model.vocab.decode(tokens, strip_special=False) if tokens else "",
        tokens=tokens,
        log_prob=log_prob,
        score=log_prob / length_penalty(scored, alpha),
        finished=finished,
        attention=attention.float().cpu() if attention is not None else None,
    )


# ----- greedy ---------------------------------------------------------------------------------


def _greedy(model: "Captioner", features: torch.Tensor, config: GenerationConfig) -> list[list[Caption]]:
    decoder, vocab = model.decoder, model.vocab
    batch, regions = features.shape[0], features.shape[1] // len(model.views)  # attention is over one view's regions
    state = decoder.init_state(features)
    tokens = torch.full((batch,), vocab.start_id, dtype=torch.long, device=features.device)
    history = torch.zeros(batch, 0, dtype=torch.long, device=features.device)  # (B, t)
    attention = features.new_zeros(batch, 0, regions)  # (B, t, P)
    total = features.new_zeros(batch)  # (B,) log-probability so far
    finished = torch.zeros(batch, dtype=torch.bool, device=features.device)
    lengths = torch.full((batch,), config.max_length, dtype=torch.long, device=features.device)
    for t in range(config.max_length + 1):
        logits, state, alpha = decoder.step(tokens, state)
        log_probs = _log_probs(model, logits, history, config)  # (B, V)
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
            attention = torch.cat([attention, alpha.unsqueeze(1)], dim=1)
        if bool(finished.all()):
            break
        tokens = best
    results = []
    for row in range(batch):
        n = int(lengths[row])
        words = history[row, :n].tolist()
        row_attention = attention[row, :n] if (attention.shape[1] and config.return_attention) else None
        results.append([_caption(model, words, float(total[row]), bool(finished[row]), row_attention, config.length_penalty)])
    return results


# ----- beam search ----------------------------------------------------------------------------


def _beam_search(model: "Captioner", features: torch.Tensor, config: GenerationConfig) -> list[list[Caption]]:
    """Batched beam search over B images x k beams.

    At each step every live beam is extended by every word; per image the 2k best extensions are
    ranked. An extension by <end> ranked within the top k becomes a finished hypothesis (as in
    Hugging Face's implementation, so k=1 is exactly greedy); the k best other extensions become the
    next beams. An image is done when it has k finished hypotheses and no live beam can still beat
    the worst of them. Beams still alive at max_length give one hypothesis each: finished if <end> is
    their most likely next token, else unfinished; so a model that never says <end> still gets captions.
    """
    decoder, vocab = model.decoder, model.vocab
    k, alpha = config.beam_size, config.length_penalty
    batch, regions = features.shape[0], features.shape[1] // len(model.views)  # attention is over one view's regions
    device = features.device
    state = select_state(decoder.init_state(features), torch.arange(batch, device=device).repeat_interleave(k))  # (B*k, ...)
    scores = features.new_full((batch, k), -math.inf)  # (B, k) log-probability of each beam
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.full((batch * k,), vocab.start_id, dtype=torch.long, device=device)
    history = torch.zeros(batch * k, 0, dtype=torch.long, device=device)  # (B*k, t)
    attention = features.new_zeros(batch * k, 0, regions)  # (B*k, t, P)
    pools: list[list[tuple[float, float, list[int], torch.Tensor | None, bool]]] = [[] for _ in range(batch)]
    done = [False] * batch
    keep_attention = config.return_attention and decoder.has_attention

    def add(image: int, log_prob: float, words: list[int], row_attention: torch.Tensor | None, finished: bool) -> None:
        scored = len(words) + (1 if finished else 0)
        pool = pools[image]
        pool.append((log_prob / length_penalty(scored, alpha), log_prob, words, row_attention, finished))
        pool.sort(key=lambda item: -item[0])
        del pool[k:]

    for t in range(config.max_length + 1):
        logits, state, alpha_t = decoder.step(tokens, state)
        log_probs = _log_probs(model, logits, history, config)  # (B*k, V)
        vocab_size = log_probs.shape[1]
        candidates = (scores.view(-1, 1) + log_probs).view(batch, k * vocab_size)  # (B, k*V)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab_size), dim=1)  # (B, 2k), best first
        origin = top_index // vocab_size  # (B, 2k) which beam
        word = top_index % vocab_size  # (B, 2k) which word
        is_end = word == vocab.end_id
        if t == config.max_length:
            # No room for another word. Each live beam gives one hypothesis: finished if <end> is its
            # most likely next token (as greedy decides), otherwise unfinished at max_length.
            ends_here = (log_probs.argmax(dim=1) == vocab.end_id).tolist()  # (B*k,)
            end_log_probs = log_probs[:, vocab.end_id].tolist()
            beam_scores, words = scores.view(-1).tolist(), history.tolist()  # one copy from the device, not one per beam
            for row in range(batch * k):
                image = row // k
                if done[image] or not math.isfinite(beam_scores[row]):
                    continue
                row_attention = attention[row] if keep_attention else None
                if ends_here[row]:
                    add(image, beam_scores[row] + end_log_probs[row], words[row], row_attention, True)
                else:
                    add(image, beam_scores[row], words[row], row_attention, False)
            break
        # Extensions by <end> within the top k of their image finish a hypothesis.
        finishing = is_end & (torch.arange(top_scores.shape[1], device=device) < k) & torch.isfinite(top_scores)
        finished_at = finishing.nonzero().tolist()
        if finished_at:
            finished_scores, finished_origin = top_scores.tolist(), origin.tolist()
            for image, position in finished_at:
                if not done[image]:
                    row = image * k + finished_origin[image][position]
                    add(image, finished_scores[image][position], history[row].tolist(), attention[row] if keep_attention else None, True)
        # The k best extensions by a word become the next beams (there are always k among the 2k).
        live = ~is_end
        chosen = live & (live.cumsum(dim=1) <= k)  # (B, 2k), exactly k per image
        next_scores = top_scores[chosen].view(batch, k)
        next_origin = (origin[chosen].view(batch, k) + torch.arange(batch, device=device).unsqueeze(1) * k).view(-1)  # (B*k,)
        next_word = word[chosen].view(-1)  # (B*k,)
        state = select_state(state, next_origin, keep=decoder.image_constant_keys)  # beams never leave their image
        history = torch.cat([history[next_origin], next_word.unsqueeze(1)], dim=1)
        if keep_attention and alpha_t is not None:
            attention = torch.cat([attention[next_origin], alpha_t[next_origin].unsqueeze(1)], dim=1)
        scores = next_scores
        tokens = next_word
        # An image is done once its pool is full and no live beam can still beat the pool's worst.
        best_lives = scores.max(dim=1).values.tolist()  # (B,), one copy from the device per step
        for image in range(batch):
            if done[image] or len(pools[image]) < k:
                continue
            best_live = best_lives[image]
            # A live beam's log-probability only falls; its score is best divided by the largest
            # length penalty it can still get (lp is monotone in length, so an end decides).
            largest_penalty = max(length_penalty(t + 1, alpha), length_penalty(config.max_length + 1, alpha))
            bound = best_live / largest_penalty if best_live < 0 else best_live
            if not math.isfinite(best_live) or pools[image][-1][0] >= bound:
                done[image] = True
        if all(done):
            break
    results = []
    for pool in pools:
        results.append(
            [_caption(model, words, log_prob, finished, row_attention, alpha) for _, log_prob, words, row_attention, finished in pool[: config.num_return]]
        )
    return results


# ----- sampling -------------------------------------------------------------------------------


def _sample(model: "Captioner", features: torch.Tensor, config: GenerationConfig) -> list[list[Caption]]:
    """num_return independent samples per image, with temperature / top-k / top-p filtering."""
    decoder, vocab = model.decoder, model.vocab
    n = config.num_return
    batch, regions = features.shape[0], features.shape[1] // len(model.views)  # attention is over one view's regions
    device = features.device
    rows = batch * n
    generator = torch.Generator(device=device)
    if config.seed is not None:
        generator.manual_seed(config.seed)
    else:
        generator.seed()
    state = select_state(decoder.init_state(features), torch.arange(batch, device=device).repeat_interleave(n))
    tokens = torch.full((rows,), vocab.start_id, dtype=torch.long, device=device)
    history = torch.zeros(rows, 0, dtype=torch.long, device=device)
    attention = features.new_zeros(rows, 0, regions)
    total = features.new_zeros(rows)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), config.max_length, dtype=torch.long, device=device)
    for t in range(config.max_length + 1):
        logits, state, alpha = decoder.step(tokens, state)
        log_probs = _log_probs(model, logits, history, config)  # (rows, V) the model's own
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
            attention = torch.cat([attention, alpha.unsqueeze(1)], dim=1)
        if bool(finished.all()):
            break
        tokens = choice
    results: list[list[Caption]] = [[] for _ in range(batch)]
    for row in range(rows):
        length = int(lengths[row])
        row_attention = attention[row, :length] if (attention.shape[1] and config.return_attention) else None
        results[row // n].append(_caption(model, history[row, :length].tolist(), float(total[row]), bool(finished[row]), row_attention, config.length_penalty))
    for captions in results:
        captions.sort(key=lambda caption: -caption.score)
    return results


def _filtered_probs(log_probs: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Sampling distribution: temperature, then top-k, then top-p (nucleus)."""
    logits = log_probs / config.temperature  # -inf stays -inf
    if config.top_k > 0 and config.top_k < logits.shape[1]:
        kth = logits.topk(config.top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=1, descending=True)
        before = sorted_probs.cumsum(dim=1) - sorted_probs  # mass strictly before each word
        sorted_probs = sorted_probs.masked_fill(before >= config.top_p, 0.0)  # the most likely word always stays
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
        probs = probs / probs.sum(dim=1, keepdim=True)
    return probs

