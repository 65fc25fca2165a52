"""generate(): greedy, beam search and sampling, checked against brute force and teacher forcing."""

import itertools
import math

import pytest
import torch
from conftest import make_model

from captioner.decoding import GenerationConfig, length_penalty
from captioner.errors import ConfigError


def features_for(model, batch=4, regions=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, regions, model.decoder.feature_dim, generator=generator).abs()


def teacher_forced(model, features, tokens, finished):
    """Sum of log-probabilities (and attention (T, P)) the model gives one caption under teacher forcing."""
    vocab = model.vocab
    ids = [vocab.start_id, *tokens] + ([vocab.end_id] if finished else [])
    captions = torch.tensor([ids])
    lengths = torch.tensor([len(ids)])
    with torch.no_grad():
        logits, alphas, _ = model.decoder(features.unsqueeze(0), captions, lengths)
    log_probs = torch.log_softmax(logits[0], dim=-1)
    total = sum(float(log_probs[t, ids[t + 1]]) for t in range(len(ids) - 1))
    return total, None if alphas is None else alphas[0, : len(tokens)]


def brute_force(model, features, max_length, min_length=1, alpha=0.0):
    """Every caption of the 4 generatable words up to max_length, ranked as beam search ranks them.

    A caption shorter than max_length is finished (it ends with <end>). One of exactly max_length
    words is finished if <end> is then the model's most likely token, else unfinished (no <end>).
    """
    vocab = model.vocab
    words = [vocab.unk_id] + [vocab.index[w] for w in ("a", "b", "c")]
    scored = []
    for n in range(min_length, max_length + 1):
        for tokens in itertools.product(words, repeat=n):
            log_prob, _ = teacher_forced(model, features, list(tokens), True)
            finished = n < max_length or final_token_is_end(model, features, list(tokens))
            if not finished:
                log_prob, _ = teacher_forced(model, features, list(tokens), False)
            scored.append((log_prob / length_penalty(n + finished, alpha), list(tokens), finished, log_prob))
    scored.sort(key=lambda item: -item[0])
    return scored


def final_token_is_end(model, features, tokens):
    vocab = model.vocab
    ids = [vocab.start_id, *tokens, vocab.end_id]
    with torch.no_grad():
        logits = model.decoder(features.unsqueeze(0), torch.tensor([ids]), torch.tensor([len(ids)])).logits
    log_probs = torch.log_softmax(logits[0, -1], dim=-1)
    log_probs[[vocab.pad_id, vocab.start_id]] = -math.inf
    return int(log_probs.argmax()) == vocab.end_id


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_equals_exhaustive_search(kind, alpha):
    model = make_model(kind, seed=3, scale=4.0)
    features = features_for(model, batch=2)
    results = model.generate(features, strategy="beam", beam_size=64, num_return=5, max_length=3, length_penalty=alpha, allow_unk=True)
    for image in range(2):
        best = brute_force(model, features[image], max_length=3, alpha=alpha)
        got = [(c.tokens, c.finished) for c in results[image]]
        assert got == [(tokens, finished) for _, tokens, finished, _ in best[:5]]
        for caption, (score, _, _, log_prob) in zip(results[image], best):
            assert caption.log_prob == pytest.approx(log_prob, abs=1e-4)
            assert caption.score == pytest.approx(score, abs=1e-4)


def next_log_probs(model, features, tokens, words_so_far_min_length=1):
    """The model's log-probabilities of the next token after <start> + tokens, with generate's masking."""
    vocab = model.vocab
    ids = [vocab.start_id, *tokens, vocab.pad_id]  # the last position's input is never read
    with torch.no_grad():
        logits = model.decoder(features.unsqueeze(0), torch.tensor([ids]), torch.tensor([len(ids)])).logits
    log_probs = torch.log_softmax(logits[0, -1], dim=-1)
    log_probs[[vocab.pad_id, vocab.start_id, vocab.unk_id]] = -math.inf
    if len(tokens) < words_so_far_min_length:
        log_probs[vocab.end_id] = -math.inf
    return log_probs.tolist()


def reference_beam_search(model, features, k, max_length, alpha, num_return):
    """The documented algorithm, one image at a time in plain Python, with no early stopping: at each
    step the 2k best extensions; <end> among the first k finishes a hypothesis; the k best others go on;
    at max_length each beam finishes if <end> is its likeliest next token, else stays unfinished."""
    end = model.vocab.end_id
    pool, beams = [], [(0.0, [])]
    for t in range(max_length + 1):
        candidates = []
        for log_prob, tokens in beams:
            next_scores = next_log_probs(model, features, tokens)
            if t == max_length:
                finished = max(range(len(next_scores)), key=next_scores.__getitem__) == end
                pool.append((log_prob + (next_scores[end] if finished else 0.0), tokens, finished))
                continue
            candidates += [(log_prob + score, tokens, word) for word, score in enumerate(next_scores) if math.isfinite(score)]
        if t == max_length:
            break
        top = sorted(candidates, key=lambda item: -item[0])[: 2 * k]
        pool += [(score, tokens, True) for position, (score, tokens, word) in enumerate(top) if word == end and position < k]
        beams = [(score, tokens + [word]) for score, tokens, word in top if word != end][:k]
    ranked = sorted(pool, key=lambda item: -item[0] / length_penalty(len(item[1]) + item[2], alpha))
    return [(tokens, finished, log_prob) for log_prob, tokens, finished in ranked[:num_return]]


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
@pytest.mark.parametrize("k, alpha", [(2, 0.0), (3, 0.0), (3, 1.0), (4, 2.0)])
def test_beam_search_equals_the_reference_algorithm_with_pruning(kind, k, alpha):
    # beams much smaller than the search space: pruning and early stopping must not change the result
    model = make_model(kind, seed=13, words=("a", "b", "c", "d", "e", "f"), scale=2.0)
    features = features_for(model, batch=3, seed=4)
    results = model.generate(features, strategy="beam", beam_size=k, num_return=k, max_length=5, length_penalty=alpha)
    for image in range(3):
        expected = reference_beam_search(model, features[image], k, 5, alpha, k)
        assert [(c.tokens, c.finished) for c in results[image]] == [(tokens, finished) for tokens, finished, _ in expected]
        assert [c.log_prob for c in results[image]] == pytest.approx([log_prob for _, _, log_prob in expected], abs=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_decoding_ends_when_the_rules_leave_no_word(strategy):
    # three words, none may repeat, and <end> is not allowed before five: the rules leave nothing
    # after three words, so <end> is allowed there; never an empty result or a crash
    model = make_model("attention", seed=2)
    features = features_for(model, batch=2)
    results = model.generate(features, strategy=strategy, beam_size=3, num_return=2 if strategy != "greedy" else 1, min_length=5, no_repeat_ngram_size=1, max_length=8, seed=0)
    for captions in results:
        assert captions
        for caption in captions:
            assert sorted(caption.tokens) == [model.vocab.index[w] for w in ("a", "b", "c")] and caption.finished
            assert math.isfinite(caption.log_prob)
            expected, _ = teacher_forced(model, features[0 if captions is results[0] else 1], caption.tokens, True)
            assert caption.log_prob == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_of_one_is_greedy(kind, seed):
    model = make_model(kind, seed=seed, scale=3.0)
    features = features_for(model, batch=6, seed=seed)
    greedy = model.generate(features, strategy="greedy", max_length=8)
    beam = model.generate(features, strategy="beam", beam_size=1, max_length=8)
    for g, b in zip(greedy, beam):
        assert (g[0].tokens, g[0].finished) == (b[0].tokens, b[0].finished)
        assert g[0].log_prob == pytest.approx(b[0].log_prob, abs=1e-5)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batched_equals_one_at_a_time(strategy):
    model = make_model("attention", seed=5, scale=3.0)
    features = features_for(model, batch=5)
    batched = model.generate(features, strategy=strategy, beam_size=3, num_return=1, max_length=10)
    for image in range(5):
        alone = model.generate(features[image : image + 1], strategy=strategy, beam_size=3, max_length=10)[0]
        assert [c.tokens for c in alone] == [c.tokens for c in batched[image]]
        assert alone[0].log_prob == pytest.approx(batched[image][0].log_prob, abs=1e-5)
        assert torch.allclose(alone[0].attention, batched[image][0].attention, atol=1e-6)


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_log_prob_equals_teacher_forced_log_prob(kind, strategy):
    model = make_model(kind, seed=7, scale=2.0)
    features = features_for(model, batch=3)
    results = model.generate(features, strategy=strategy, beam_size=4, num_return=2 if strategy != "greedy" else 1, max_length=6, seed=0)
    for image, captions in enumerate(results):
        for caption in captions:
            expected, _ = teacher_forced(model, features[image], caption.tokens, caption.finished)
            assert caption.log_prob == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_no_end_ever_returns_max_length_captions(strategy):
    model = make_model("attention", seed=2)
    with torch.no_grad():
        model.decoder.classifier.bias[model.vocab.end_id] = -math.inf
    features = features_for(model, batch=3)
    results = model.generate(features, strategy=strategy, beam_size=3, num_return=2 if strategy != "greedy" else 1, max_length=7, seed=1)
    assert len(results) == 3
    for captions in results:
        assert captions
        for caption in captions:
            assert len(caption.tokens) == 7 and not caption.finished
            assert math.isfinite(caption.log_prob)


def _repeating_model():
    model = make_model("show_tell", seed=4)
    with torch.no_grad():
        model.decoder.classifier.bias[model.vocab.index["a"]] = 8.0  # "a" is always the likeliest word
        model.decoder.classifier.bias[model.vocab.end_id] = -8.0
    return model


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_no_repeat_ngram_blocking(strategy):
    model = _repeating_model()
    features = features_for(model, batch=2)
    plain = model.generate(features, strategy=strategy, max_length=6)
    assert plain[0][0].text.split().count("a") >= 4
    for n in (1, 2, 3):
        for captions in model.generate(features, strategy=strategy, max_length=6, no_repeat_ngram_size=n, beam_size=3):
            words = captions[0].tokens
            ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
            assert len(ngrams) == len(set(ngrams)), (n, captions[0].text)


def test_length_penalty_changes_ranking_as_documented():
    model = make_model("attention", seed=11, scale=1.5)
    features = features_for(model, batch=8)
    short = model.generate(features, strategy="beam", beam_size=5, max_length=12, length_penalty=0.0)
    long = model.generate(features, strategy="beam", beam_size=5, max_length=12, length_penalty=2.0)
    assert sum(len(c[0].tokens) for c in long) > sum(len(c[0].tokens) for c in short)
    for captions in long:
        for caption in captions:
            scored = len(caption.tokens) + caption.finished
            assert caption.score == pytest.approx(caption.log_prob / ((5 + scored) / 6) ** 2.0, rel=1e-6)


def test_n_best_is_sorted_distinct_and_min_length_holds():
    model = make_model("attention", seed=12, scale=2.0)
    results = model.generate(features_for(model), strategy="beam", beam_size=5, num_return=5, max_length=8, min_length=3)
    for captions in results:
        assert len(captions) == 5
        assert [c.score for c in captions] == sorted((c.score for c in captions), reverse=True)
        assert len({(tuple(c.tokens), c.finished) for c in captions}) == 5
        assert all(len(c.tokens) >= 3 for c in captions)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_attention_maps_follow_the_returned_caption(strategy):
    model = make_model("attention", seed=13, scale=2.0)
    features = features_for(model, batch=3, regions=6)
    results = model.generate(features, strategy=strategy, beam_size=4, num_return=2 if strategy != "greedy" else 1, max_length=7, seed=3)
    for image, captions in enumerate(results):
        for caption in captions:
            assert caption.attention.shape == (len(caption.tokens), 6)
            assert torch.allclose(caption.attention.sum(dim=1), torch.ones(len(caption.tokens)), atol=1e-5)
            _, expected = teacher_forced(model, features[image], caption.tokens, caption.finished)
            assert torch.allclose(caption.attention, expected, atol=1e-5)


def test_show_tell_has_no_attention_and_unk_is_blocked_unless_allowed():
    model = make_model("show_tell", seed=1)
    with torch.no_grad():
        model.decoder.classifier.bias[model.vocab.unk_id] = 10.0
    features = features_for(model, batch=2)
    assert "<unk>" in model.generate(features, strategy="greedy", allow_unk=True)[0][0].text
    for captions in model.generate(features, strategy="beam"):  # <unk> is blocked by default
        assert captions[0].attention is None and "<unk>" not in captions[0].text


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = make_model("attention", seed=14, scale=1.0)
    features = features_for(model, batch=3)
    first = model.generate(features, strategy="sample", num_return=4, seed=123, max_length=8)
    second = model.generate(features, strategy="sample", num_return=4, seed=123, max_length=8)
    assert [[c.tokens for c in cs] for cs in first] == [[c.tokens for c in cs] for cs in second]
    assert all(len(cs) == 4 for cs in first)
    assert len({tuple(c.tokens) for cs in first for c in cs}) > 3  # not all the same
    greedy = model.generate(features, strategy="greedy", max_length=8)
    top1 = model.generate(features, strategy="sample", top_k=1, seed=5, max_length=8)
    assert [g[0].tokens for g in greedy] == [t[0].tokens for t in top1]
    nucleus = model.generate(features, strategy="sample", top_p=1e-6, seed=5, max_length=8)
    assert [g[0].tokens for g in greedy] == [t[0].tokens for t in nucleus]
    # the smallest settings their ranges allow are greedy too, not a distribution of NaNs: a
    # temperature that divides every log-probability to -inf, a top_p that float32 reads as 0
    for extreme in ({"temperature": 1e-300}, {"temperature": 1e-45}, {"top_p": 1e-300}):
        sampled = model.generate(features, strategy="sample", seed=5, max_length=8, **extreme)
        assert [g[0].tokens for g in greedy] == [t[0].tokens for t in sampled], extreme


def test_model_mode_is_restored_and_images_are_encoded():
    model = make_model("attention")
    model.train()
    images = torch.randn(2, 3, 64, 64)
    results = model.generate(images, strategy="greedy", max_length=4)
    assert len(results) == 2 and model.training
    assert results[0][0].attention.shape[1] == 4  # a 64x64 image gives a 2x2 stride-32 grid
    assert model.generate(torch.zeros(0, 4, model.decoder.feature_dim)) == []


def test_config_errors():
    with pytest.raises(ConfigError, match="strategy"):
        GenerationConfig(strategy="nucleus")
    with pytest.raises(ConfigError, match="cannot return 4"):
        GenerationConfig(beam_size=3, num_return=4)
    with pytest.raises(ConfigError, match="min_length"):
        GenerationConfig(min_length=40, max_length=30)
    with pytest.raises(ConfigError, match="greedy"):
        GenerationConfig(strategy="greedy", num_return=2)
    model = make_model()
    with pytest.raises(ConfigError, match="expected images"):
        model.generate(torch.zeros(3, 4))


def ending_model(seed=5):
    """A model whose captions end after a few words (<end> is likely at every step)."""
    model = make_model("attention", seed=seed, scale=3.0)
    with torch.no_grad():
        model.decoder.classifier.bias[model.vocab.end_id] = 2.0
    return model


def count_steps(model):
    """Wrap the decoder's step to count how many steps decoding runs."""
    calls = {"steps": 0}
    step = model.decoder.step

    def counted(tokens, state, attention=True):
        calls["steps"] += 1
        return step(tokens, state, attention)

    model.decoder.step = counted
    return calls


@pytest.mark.parametrize("alpha, early_stopping", [(0.0, "exact"), (1.0, "heuristic"), (2.0, "heuristic")])
def test_the_search_stops_when_every_image_is_done_however_long_max_length_is(alpha, early_stopping):
    # the reported fault: the same captions took 12 / 22 / 82 s at max_length 100 / 300 / 1000
    model = ending_model()
    features = features_for(model, batch=4)
    calls = count_steps(model)
    found = {}
    for max_length in (20, 100):
        calls["steps"] = 0
        results = model.generate(features, strategy="beam", beam_size=3, num_return=3, max_length=max_length, length_penalty=alpha, early_stopping=early_stopping)
        found[max_length] = ([[c.tokens for c in captions] for captions in results], calls["steps"])
        assert all(c.finished for captions in results for c in captions)
    assert found[20] == found[100] and found[20][1] < 20


def test_a_finished_images_rows_leave_the_batch_and_the_others_captions_do_not_change():
    model = make_model("attention", seed=2, scale=3.0)
    features = features_for(model, batch=5) * torch.tensor([0.1, 1, 3, 10, 30]).view(5, 1, 1)
    rows = []
    step = model.decoder.step
    model.decoder.step = lambda tokens, state, attention=True: (rows.append(tokens.shape[0]), step(tokens, state, attention))[1]
    settings = dict(strategy="beam", beam_size=3, num_return=2, max_length=10)
    batched = model.generate(features, **settings)
    lengths = {len(captions[0].tokens) for captions in batched}
    assert len(lengths) > 1  # the images finish at different steps
    assert rows[0] == 5 * 3 and rows == sorted(rows, reverse=True) and rows[-1] < rows[0]
    assert all(r % 3 == 0 for r in rows)  # whole images leave, with all their beams
    for image in range(5):
        alone = model.generate(features[image : image + 1], **settings)[0]
        assert [c.tokens for c in alone] == [c.tokens for c in batched[image]]
        assert [c.log_prob for c in alone] == pytest.approx([c.log_prob for c in batched[image]], abs=1e-5)


def test_images_with_fewer_constraints_search_fewer_beams():
    from captioner.decoding import generate

    model = make_model("attention", seed=13, words=("a", "b", "c", "d", "e", "f"), scale=2.0)
    features = features_for(model, batch=3, seed=4)
    index = model.vocab.index
    rows = []
    step = model.decoder.step
    model.decoder.step = lambda tokens, state, attention=True: (rows.append(tokens.shape[0]), step(tokens, state, attention))[1]
    config = GenerationConfig(strategy="beam", beam_size=2, num_return=1, max_length=6)
    generate(model.decoder, features, model.vocab, config, constraints=[[[index["f"]], [index["a"]]], [], []])
    # two searches: the image with 2 constraints (4 states x 2 beams), then the two with none (2 beams each)
    assert 1 * 4 * 2 in rows and 2 * 2 in rows and max(rows) == 8


def test_the_heuristic_stops_sooner_than_the_exact_search_and_finds_what_it_found_first():
    model = ending_model()
    features = features_for(model, batch=8)
    calls = count_steps(model)
    steps, captions = {}, {}
    for early_stopping in ("exact", "heuristic"):
        calls["steps"] = 0
        results = model.generate(features, strategy="beam", beam_size=3, max_length=30, length_penalty=1.0, early_stopping=early_stopping)
        steps[early_stopping], captions[early_stopping] = calls["steps"], [r[0] for r in results]
    assert steps["heuristic"] < steps["exact"]
    for exact, heuristic in zip(captions["exact"], captions["heuristic"]):
        assert exact.score >= heuristic.score - 1e-6  # the exact search never finds worse
    with pytest.raises(ConfigError, match="early_stopping must be one of exact, heuristic"):
        GenerationConfig(early_stopping="never")


def _careless_model():
    """A model that likes to end right after "a" and to say "b b"."""
    from captioner.data.vocabulary import SPECIAL_TOKENS, Vocabulary

    model = make_model("show_tell", seed=6, words=("a", "b", "c", "d", "and"), scale=0.5)
    model.vocab = Vocabulary(list(SPECIAL_TOKENS) + ["a", "b", "c", "d", "and"], bad_endings=("a", "c d"))
    with torch.no_grad():
        model.decoder.classifier.bias[model.vocab.end_id] = 1.5
        model.decoder.classifier.bias[model.vocab.index["a"]] = 1.3
        model.decoder.classifier.bias[model.vocab.index["b"]] = 1.0
        model.decoder.classifier.bias[model.vocab.index["and"]] = 1.0
    return model


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_the_sentence_rules_hold_for_every_strategy(strategy):
    model = _careless_model()
    features = features_for(model, batch=6)
    vocab = model.vocab
    settings = dict(strategy=strategy, beam_size=4, num_return=1 if strategy == "greedy" else 4, max_length=8, seed=0, allow_unk=True)
    plain = [c for captions in model.generate(features, **settings) for c in captions]
    ruled = [c for captions in model.generate(features, block_bad_endings=True, block_doubled_words=True, **settings) for c in captions]

    def ends_badly(words):
        return bool(words) and (words[-1] == "a" or words[-2:] == ["c", "d"])

    def doubled(words):  # "b b", or "b and b"
        return any(x == y for x, y in zip(words, words[1:])) or any(x == z and y == "and" for x, y, z in zip(words, words[1:], words[2:]))

    assert any(ends_badly(c.words) or doubled(c.words) for c in plain)  # the model does it unless told not to
    for caption in ruled:
        assert not doubled(caption.words), caption.text
        assert not (caption.finished and ends_badly(caption.words)), caption.text
    assert vocab.bad_endings == ("a", "c d")


def test_a_word_may_not_follow_itself_nor_itself_and_a_joiner():
    from captioner.data.vocabulary import SPECIAL_TOKENS, Vocabulary
    from captioner.decoding.generate import block_doubled_words

    vocab = Vocabulary(list(SPECIAL_TOKENS) + ["red", "blue", "and", "or", "a"])
    red, blue, and_, or_, a = (vocab.index[word] for word in ("red", "blue", "and", "or", "a"))
    scores = torch.zeros(4, len(vocab))
    last, before = torch.tensor([and_, or_, a, red]), torch.tensor([red, blue, red, blue])  # "red and", "blue or", "red a", "blue red"
    block_doubled_words(vocab, scores, last, before)
    blocked = {(row, word) for row, word in (scores == -math.inf).nonzero().tolist()}
    assert blocked == {(0, and_), (0, red), (1, or_), (1, blue), (2, a), (3, red)}  # "red and red", "blue or blue" too
    first = torch.zeros(1, len(vocab))
    block_doubled_words(vocab, first, torch.tensor([and_]), None)  # one word so far: only itself
    assert (first == -math.inf).nonzero().tolist() == [[0, and_]]


# ----- constrained beam search ------------------------------------------------------------------


def constrained_brute_force(model, features, max_length, constraints, alpha=0.0):
    """brute_force's ranking, keeping the captions that name one word of every constraint."""
    vocab = model.vocab
    ranked = brute_force(model, features, max_length, alpha=alpha)
    ids = [{vocab.index[w] for w in words} for words in constraints]
    return [entry for entry in ranked if all(set(entry[1]) & words for words in ids)]


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("constraints", [[["b"]], [["b", "c"]], [["b"], ["c"]]])
def test_constrained_beam_search_equals_exhaustive_search_over_the_captions_that_meet_the_constraints(kind, alpha, constraints):
    model = make_model(kind, seed=3, scale=4.0)
    features = features_for(model, batch=2)
    ids = [[model.vocab.index[w] for w in words] for words in constraints]
    from captioner.decoding import generate

    config = GenerationConfig(strategy="beam", beam_size=64, num_return=5, max_length=3, length_penalty=alpha, allow_unk=True)
    results = generate(model.decoder, features, model.vocab, config, constraints=[ids, ids])
    for image in range(2):
        best = constrained_brute_force(model, features[image], 3, constraints, alpha=alpha)
        assert [(c.tokens, c.finished) for c in results[image]] == [(tokens, finished) for _, tokens, finished, _ in best[:5]]
        for caption, (score, _, _, log_prob) in zip(results[image], best):
            assert caption.log_prob == pytest.approx(log_prob, abs=1e-4) and caption.score == pytest.approx(score, abs=1e-4)
            assert caption.constraints_met is True


def test_with_a_narrow_beam_every_caption_meets_its_images_constraints_batched_as_alone():
    from captioner.decoding import generate

    model = make_model("attention", seed=13, words=("a", "b", "c", "d", "e", "f"), scale=2.0)
    features = features_for(model, batch=3, seed=4)
    index = model.vocab.index
    per_image = [[[index["f"]]], [[index["d"], index["e"]], [index["a"]]], []]  # the third image has none
    config = GenerationConfig(strategy="beam", beam_size=3, num_return=3, max_length=6, length_penalty=1.0)
    batched = generate(model.decoder, features, model.vocab, config, constraints=per_image)
    for image, constraints in enumerate(per_image):
        alone = generate(model.decoder, features[image : image + 1], model.vocab, config, constraints=[constraints])[0]
        assert [c.tokens for c in alone] == [c.tokens for c in batched[image]]
        for caption in batched[image]:
            assert all(set(caption.tokens) & set(words) for words in constraints), caption.text
            assert caption.constraints_met is (True if constraints else None)
    plain = generate(model.decoder, features[2:], model.vocab, config)[0]
    assert [c.tokens for c in plain] == [c.tokens for c in batched[2]]  # no constraints: plain beam search


def test_unsatisfiable_constraints_give_the_best_caption_found_and_say_so():
    from captioner.decoding import generate

    model = make_model("attention", seed=13, words=("a", "b", "c", "d", "e", "f"), scale=2.0)
    features = features_for(model, batch=1)
    index = model.vocab.index
    three = [[[index["a"]], [index["b"]], [index["c"]]]]  # three words needed, two allowed
    config = GenerationConfig(strategy="beam", beam_size=3, num_return=2, max_length=2)
    [captions] = generate(model.decoder, features, model.vocab, config, constraints=three)
    assert captions and all(c.constraints_met is False for c in captions)
    with pytest.raises(ConfigError, match="at most 3 constraints"):
        generate(model.decoder, features, model.vocab, config, constraints=[[[index["a"]]] * 4])
    with pytest.raises(ConfigError, match="constraints need beam search"):
        generate(model.decoder, features, model.vocab, GenerationConfig(strategy="greedy"), constraints=three)
