"""Hard attention in the Show-Attend-Tell decoder: its settings, what it reads, and decoding with it."""

import pytest
import torch

from captioner.decoding import GenerationConfig, generate
from captioner.errors import ConfigError
from captioner.models.decoder import DecoderConfig
from conftest import caption_batch, make_model

WORDS = ("a", "red", "blue", "circle", "square", "and")


def test_settings_are_checked():
    assert DecoderConfig(attention="hard").hard_decoding == "expected"
    with pytest.raises(ConfigError, match="attention must be one of soft, hard"):
        DecoderConfig(attention="stochastic")
    with pytest.raises(ConfigError, match="hard_decoding must be one of expected, argmax"):
        DecoderConfig(attention="hard", hard_decoding="sample")
    with pytest.raises(ConfigError, match="hard attention needs the attention decoder"):
        DecoderConfig(kind="show_tell", attention="hard")
    # a checkpoint from before hard attention (no such keys) still loads as soft attention
    assert DecoderConfig.from_dict({"kind": "attention"}).attention == "soft"


def test_with_one_hot_attention_hard_and_soft_give_the_same_logits():
    hard = make_model("attention", words=WORDS, attention="hard", dropout=0.0)
    with torch.no_grad():
        hard.decoder.attention.score.weight.mul_(1e5)  # energies far apart: softmax is exactly one-hot
    soft = make_model("attention", words=WORDS, dropout=0.0)
    soft.decoder.load_state_dict(hard.decoder.state_dict())
    features, captions, lengths = caption_batch(hard, images=2, seq_per_img=3, regions=5, longest=7)
    sampled = hard.decoder(features, captions, lengths, hard_attention="sample")
    assert sampled.attention.amax(dim=2)[sampled.locations >= 0].min() == 1.0  # every real step is one-hot
    assert torch.equal(sampled.locations[sampled.locations >= 0], sampled.attention.argmax(dim=2)[sampled.locations >= 0])
    expected = hard.decoder(features, captions, lengths, hard_attention="expected")
    argmax = hard.decoder(features, captions, lengths)  # no request: the decoding rule ...
    hard.read_hard_attention_as("argmax")
    argmax_rule = hard.decoder(features, captions, lengths)
    reference = soft.decoder(features, captions, lengths)
    assert expected.locations is None and argmax.locations is None
    for output in (sampled, expected, argmax, argmax_rule):
        torch.testing.assert_close(output.logits, reference.logits, rtol=0, atol=1e-5)


def test_without_one_hot_attention_they_differ_and_sampling_follows_the_weights():
    model = make_model("attention", words=WORDS, attention="hard", dropout=0.0)
    features, captions, lengths = caption_batch(model, images=2, seq_per_img=3, regions=5, longest=7)
    torch.manual_seed(1)
    sampled = model.decoder(features, captions, lengths, hard_attention="sample")
    expected = model.decoder(features, captions, lengths, hard_attention="expected")
    assert not torch.allclose(sampled.logits, expected.logits)
    real = sampled.locations >= 0
    assert (sampled.locations[~real] == -1).all() and real.sum(dim=1).tolist() == (lengths - 1).tolist()
    # the regions read are drawn from the weights: over many draws, their frequencies match
    one = features[:1]
    rows = 20000
    many = model.decoder(one, captions[:1].repeat(rows, 1), lengths[:1].repeat(rows), hard_attention="sample")
    first_step = many.locations[:, 0]
    frequencies = torch.bincount(first_step, minlength=one.shape[1]).float() / rows
    torch.testing.assert_close(frequencies, many.attention[0, 0], atol=0.015, rtol=0)  # (all rows share the first step's weights)
    with pytest.raises(ValueError, match="hard_attention must be one of"):
        model.decoder(features, captions, lengths, hard_attention="argmax")


@pytest.mark.parametrize("strategy, beam", [("greedy", 1), ("beam", 3), ("sample", 1)])
def test_decoding_at_the_argmax_reads_one_region_per_word_with_every_strategy(strategy, beam):
    model = make_model("attention", words=WORDS, attention="hard", hard_decoding="argmax", scale=4.0)
    features = torch.randn(3, 6, model.decoder.feature_dim, generator=torch.Generator().manual_seed(2))
    config = GenerationConfig(strategy=strategy, beam_size=beam, max_length=8, seed=0 if strategy == "sample" else None)
    results = generate(model.decoder, features, model.vocab, config)
    for captions in results:
        attention = captions[0].attention
        assert attention.shape == (len(captions[0].tokens), 6)
        assert torch.equal(attention.sum(dim=1), torch.ones(len(attention))) and set(attention.unique().tolist()) <= {0.0, 1.0}
    # the step agrees with teacher forcing at the argmax, word for word
    tokens = [model.vocab.start_id] + results[0][0].tokens
    forced = model.decoder(features[:1], torch.tensor([tokens]), torch.tensor([len(tokens)]))
    assert torch.equal(forced.attention[0].argmax(dim=1)[: len(results[0][0].tokens)], results[0][0].attention.argmax(dim=1))


def test_the_reading_is_a_choice_only_for_hard_attention():
    soft = make_model("attention", words=WORDS)
    with pytest.raises(ConfigError, match="no hard-attention decoder"):
        soft.read_hard_attention_as("argmax")
    hard = make_model("attention", words=WORDS, attention="hard")
    with pytest.raises(ConfigError, match="one of expected, argmax"):
        hard.read_hard_attention_as("sample")
    hard.read_hard_attention_as("argmax")
    assert hard.decoder.config.hard_decoding == "argmax"
