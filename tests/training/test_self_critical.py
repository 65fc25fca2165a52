"""Self-critical training: sampled log-probabilities, rewards, baseline, and the phase switch in a real run."""

import json
import math

import pytest
import torch
from conftest import make_model, shapes_train_config

from captioner.training.loop import train
from captioner.training.self_critical import CaptionRewards, sample_with_log_probs, self_critical_loss

WORDS = ("a", "red", "blue", "circle", "square", "and")


def teacher_forced_log_probs(model, features, tokens, finished):
    """The model's teacher-forced log-probabilities of a caption, over the words that may be sampled."""
    vocab = model.vocab
    ids = [vocab.start_id, *tokens] + ([vocab.end_id] if finished else [])
    with torch.no_grad():
        logits = model.decoder(features.unsqueeze(0), torch.tensor([ids]), torch.tensor([len(ids)])).logits
    logits[0][:, [vocab.pad_id, vocab.start_id, vocab.unk_id]] = -math.inf  # never sampled: not in the policy
    log_probs = torch.log_softmax(logits[0], dim=-1)
    return [float(log_probs[t, ids[t + 1]]) for t in range(len(ids) - 1)]


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_sampled_log_probs_are_the_models_teacher_forced_ones(kind):
    model = make_model(kind, words=WORDS, seed=4, scale=2.0)
    vocab = model.vocab
    features = torch.randn(3, 5, model.decoder.feature_dim, generator=torch.Generator().manual_seed(0)).abs()
    torch.manual_seed(0)
    max_length = 6
    captions, log_probs, mask = sample_with_log_probs(
        model.decoder, features, 4, max_length, vocab.start_id, vocab.end_id, [vocab.pad_id, vocab.start_id, vocab.unk_id]
    )
    assert len(captions) == 12 and log_probs.shape == mask.shape and log_probs.requires_grad
    lengths_seen = set()
    for row, words in enumerate(captions):
        assert len(words) <= max_length and vocab.unk_id not in words and vocab.end_id not in words
        scored = int(mask[row].sum())
        finished = scored == len(words) + 1  # every sampled word is scored, and <end> when it was sampled
        assert scored in (len(words), len(words) + 1)
        assert finished or len(words) == max_length  # only captions that ran out of room have no <end>
        expected = teacher_forced_log_probs(model, features[row // 4], words, finished)
        assert log_probs[row][mask[row]].tolist() == pytest.approx(expected, abs=1e-5)
        assert float(log_probs[row][~mask[row]].detach().abs().sum()) == 0
        lengths_seen.add(len(words))
    assert len(lengths_seen) > 1  # rows stop at different times


def test_loss_uses_the_mean_of_the_other_samples_as_baseline():
    model = make_model("attention", words=WORDS, seed=1, scale=2.0)
    vocab = model.vocab
    ids = {w: vocab.index[w] for w in WORDS}
    references = [[[ids["a"], ids["red"], ids["circle"]]], [[ids["a"], ids["blue"], ids["square"]], [ids["a"], ids["blue"], ids["square"], ids["and"], ids["a"], ids["circle"]]]]
    rewards = CaptionRewards(references)
    scores = rewards([0, 1, 1], [[ids["a"], ids["red"], ids["circle"]], [ids["blue"], ids["square"]], [ids["red"]]], 1)
    assert scores[0] > 0 and scores[1] > 0 and scores[2] == 0  # right words earn, a wrong one earns nothing

    features = torch.randn(2, 5, model.decoder.feature_dim, generator=torch.Generator().manual_seed(2)).abs()
    torch.manual_seed(3)
    loss, mean_reward = self_critical_loss(model.decoder, features, [0, 1], rewards, vocab, samples=3, max_length=5)
    torch.manual_seed(3)  # the same samples again, scored by hand
    blocked = [vocab.pad_id, vocab.start_id, vocab.unk_id]
    captions, log_probs, mask = sample_with_log_probs(model.decoder, features, 3, 5, vocab.start_id, vocab.end_id, blocked)
    reward = [float(r) for r in rewards([0, 1], captions, 3)]
    expected = 0.0
    for row, r in enumerate(reward):
        image = row // 3
        others = [reward[image * 3 + j] for j in range(3) if image * 3 + j != row]
        expected -= (r - sum(others) / 2) * float(log_probs[row][mask[row]].detach().sum())
    assert float(loss.detach()) == pytest.approx(expected / int(mask.sum()), abs=1e-6)
    assert float(mean_reward) == pytest.approx(sum(reward) / 6)
    loss.backward()
    assert model.decoder.classifier.weight.grad is not None
    with pytest.raises(ValueError, match="at least 2 samples"):
        self_critical_loss(model.decoder, features, [0, 1], rewards, vocab, samples=1, max_length=5)


@pytest.mark.slow
def test_self_critical_phase_raises_the_reward_and_resumes_exactly(shapes_prepared, tmp_path):
    settings = dict(epochs=5, self_critical_start=3, self_critical_lr=5e-4, decoder={"dropout": 0.0})
    state = train(shapes_train_config(shapes_prepared, tmp_path / "straight", **settings))
    assert state.self_critical
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert ["train_reward" in r for r in records] == [False, False, False, True, True]
    assert records[4]["train_reward"] > records[3]["train_reward"]  # the sampled captions' CIDEr-D goes up
    assert records[3]["learning_rates"] == [5e-4]
    # interrupted inside the self-critical phase (20 batches per epoch), then resumed: the same weights
    train(shapes_train_config(shapes_prepared, tmp_path / "broken", max_steps=70, **settings))
    train(shapes_train_config(shapes_prepared, tmp_path / "broken", **settings), resume=True)
    from safetensors.torch import load_file

    straight = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "broken" / "last" / "model.safetensors"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_non_finite_scores_give_a_non_finite_loss_for_the_nan_policy_not_a_sampling_crash():
    model = make_model("attention", words=WORDS, seed=1, scale=2.0)
    vocab = model.vocab
    rewards = CaptionRewards([[[vocab.index["a"], vocab.index["red"]]]])
    features = torch.randn(1, 5, model.decoder.feature_dim, generator=torch.Generator().manual_seed(2)).abs()
    with torch.no_grad():
        model.decoder.classifier.bias[vocab.index["red"]] = float("nan")  # what a diverged model does
    loss, reward = self_critical_loss(model.decoder, features, [0], rewards, vocab, samples=3, max_length=5)
    assert not torch.isfinite(loss) and not torch.isfinite(reward)  # the loop skips or stops on this


def test_sampling_follows_the_sentence_rules_and_scores_the_policy_it_samples():
    # self-critical sampling may not end on a bad ending or double a word, as decoding may not;
    # the log-probabilities are those of that restricted (renormalised) policy
    from captioner.data.vocabulary import SPECIAL_TOKENS, Vocabulary
    from captioner.training.self_critical import SentenceRules

    model = make_model("show_tell", words=WORDS, seed=4, scale=0.3)
    vocab = Vocabulary(list(SPECIAL_TOKENS) + list(WORDS), bad_endings=("a", "and", "red", "blue"))
    features = torch.randn(4, 5, model.decoder.feature_dim, generator=torch.Generator().manual_seed(1)).abs()
    blocked = [vocab.pad_id, vocab.start_id, vocab.unk_id]
    rules = SentenceRules(vocab, bad_endings=True, doubled_words=True)
    torch.manual_seed(0)
    captions, log_probs, mask = sample_with_log_probs(model.decoder, features, 8, 12, vocab.start_id, vocab.end_id, blocked, rules)
    ended = 0
    bad = {vocab.index[word] for word in ("a", "and", "red", "blue")}
    for row, words in enumerate(captions):
        assert all(a != b for a, b in zip(words, words[1:])), words
        assert all(not (a == c and b == vocab.index["and"]) for a, b, c in zip(words, words[1:], words[2:])), words
        finished = int(mask[row].sum()) == len(words) + 1
        if finished and words:
            ended += 1
            assert words[-1] not in bad, words
        # the policy: the model's distribution without the blocked words and what the rules forbid at each step
        ids = [vocab.start_id, *words] + ([vocab.end_id] if finished else [])
        with torch.no_grad():
            logits = model.decoder(features[row // 8].unsqueeze(0), torch.tensor([ids]), torch.tensor([len(ids)])).logits
        expected = []
        for t in range(len(ids) - 1):
            step = logits[0, t].clone()
            step[blocked] = -math.inf
            if t > 0:
                step[ids[t]] = -math.inf  # no word twice in a row
                if t > 1 and ids[t] == vocab.index["and"]:
                    step[ids[t - 1]] = -math.inf  # nor twice around "and"
                if ids[t] in bad:
                    step[vocab.end_id] = -math.inf
            expected.append(float(torch.log_softmax(step, dim=-1)[ids[t + 1]]))
        assert log_probs[row][mask[row]].tolist() == pytest.approx(expected, abs=1e-5)
    assert ended > 5
    torch.manual_seed(0)
    free, _, _ = sample_with_log_probs(model.decoder, features, 8, 12, vocab.start_id, vocab.end_id, blocked)
    assert free != captions  # the rules changed what was sampled
    assert torch.isfinite(log_probs[mask]).all()
