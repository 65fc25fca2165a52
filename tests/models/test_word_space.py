"""Decoders whose words live in the shipped GloVe space (``word_space = "glove-50d"``): fixed vectors
in and out, so a word no training caption had can be added with its own vector."""

import pytest
import torch

from captioner.errors import ConfigError
from captioner.models.captioner import Captioner
from captioner.models.concepts import noun_words
from captioner.models.decoder import DecoderConfig
from captioner.models.word_vectors import word_vectors
from captioner.training.config import TrainConfig
from conftest import make_model

WORDS = ("a", "dog", "runs", "on", "the", "grass", "horse", "red", "ball")


def glove(word):
    vectors = word_vectors()
    return torch.from_numpy(vectors.vectors[vectors.index[word]])


def glove_model(kind="attention", **settings):
    return make_model(kind, words=WORDS, embed_dim=50, word_space="glove-50d", scale=3.0, seed=4, **settings)


def features_for(model, batch=2, seed=1):
    return torch.randn(batch, 9, model.decoder.feature_dim, generator=torch.Generator().manual_seed(seed)).abs()


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_the_embedding_is_the_shipped_vectors_fixed_and_the_logits_go_through_them(kind):
    model = glove_model(kind)
    decoder, vocab = model.decoder, model.vocab
    embedding = decoder.embedding.weight
    assert torch.equal(embedding[vocab.index["dog"]], glove("dog")) and torch.equal(embedding[vocab.index["grass"]], glove("grass"))
    assert not embedding.requires_grad and decoder.classifier.weight.shape == (50, decoder.config.hidden_dim)
    h = torch.randn(3, decoder.config.hidden_dim)
    by_hand = (h @ decoder.classifier.weight.T) @ embedding.T + decoder.word_bias  # g_w . U h + b_w, for every word
    torch.testing.assert_close(decoder.word_logits(h), by_hand)
    # training moves the projection and the biases, never the vectors
    features = features_for(model)
    captions = torch.tensor([[vocab.start_id, vocab.index["dog"], vocab.index["runs"], vocab.end_id]] * 2)
    model.train()
    logits = decoder(features, captions, torch.tensor([4, 4])).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), captions[:, 1:].flatten()).backward()
    assert embedding.grad is None and decoder.classifier.weight.grad is not None and decoder.word_bias.grad is not None


def test_a_word_added_to_a_glove_decoder_gets_its_own_vector_and_its_nearest_nouns_bias():
    model = glove_model()
    with torch.no_grad():
        model.decoder.word_bias.normal_(generator=torch.Generator().manual_seed(0))  # (trained biases differ)
    features = features_for(model)
    before = model.generate(features, strategy="beam", beam_size=3, num_return=3, max_length=6)
    known = len(model.vocab)
    nearest = word_vectors().nearest("zebra", [word for word in WORDS if word in noun_words()])
    model.extend_vocabulary(["zebra"])
    decoder, zebra = model.decoder, model.vocab.index["zebra"]
    assert zebra == known and torch.equal(decoder.embedding.weight[zebra], glove("zebra"))
    assert not decoder.embedding.weight.requires_grad
    assert decoder.word_bias[zebra] == decoder.word_bias[model.vocab.index[nearest]]  # the nearest known noun: a bias, not a vector
    h = torch.randn(2, decoder.config.hidden_dim)
    torch.testing.assert_close(decoder.word_logits(h)[:, zebra], h @ decoder.classifier.weight.T @ glove("zebra") + decoder.word_bias[zebra])
    # the words it knew score as before, so captions that need no new word are unchanged
    after = model.generate(features, strategy="beam", beam_size=3, num_return=3, max_length=6)
    for old, new in zip(before, after):
        assert [c.tokens for c in old] == [c.tokens for c in new]
        assert [c.log_prob for c in old] == pytest.approx([c.log_prob for c in new], abs=1e-3)  # the new word takes its share of the probability
    forced = model.generate(features, strategy="beam", beam_size=3, max_length=6, constraints=[[[zebra]], [[zebra]]])
    assert all(zebra in captions[0].tokens for captions in forced)


def test_a_learned_decoder_copies_its_analog_and_needs_no_vectors():
    model = make_model("attention", words=WORDS, seed=4)
    model.extend_vocabulary(["zebra"])
    decoder, zebra, analog = model.decoder, model.vocab.index["zebra"], model.vocab.index[word_vectors().nearest("zebra", [word for word in WORDS if word in noun_words()])]
    assert torch.equal(decoder.embedding.weight[zebra], decoder.embedding.weight[analog])
    assert torch.equal(decoder.classifier.weight[zebra], decoder.classifier.weight[analog])
    with pytest.raises(ConfigError, match="needs their vectors"):
        glove_model().decoder.extend_vocabulary([1])


def test_a_glove_decoder_round_trips_through_a_checkpoint_and_decodes_in_int8(tmp_path):
    model = glove_model()
    features = features_for(model)
    model.save(tmp_path / "glove")
    loaded = Captioner.load(tmp_path / "glove")
    assert loaded.decoder.config.word_space == "glove-50d" and not loaded.decoder.embedding.weight.requires_grad
    settings = dict(strategy="beam", beam_size=3, num_return=2, max_length=6)
    expected = model.generate(features, **settings)
    assert [[c.tokens for c in captions] for captions in loaded.generate(features, **settings)] == [[c.tokens for c in captions] for captions in expected]
    model.save(tmp_path / "int8", precision="int8")
    small = Captioner.load(tmp_path / "int8")
    assert small.decoder_compute == "int8"
    got = small.generate(features, **settings)
    assert [c.log_prob for c in got[0]] == pytest.approx([c.log_prob for c in expected[0]], rel=0.03)  # int8 weights (the vectors too) and int8 steps


def test_glove_word_space_settings_are_checked():
    with pytest.raises(ConfigError, match="embed_dim.*must be 50"):
        DecoderConfig(word_space="glove-50d", embed_dim=512)
    with pytest.raises(ConfigError, match="word_space must be one of"):
        DecoderConfig(word_space="word2vec")
    with pytest.raises(ConfigError, match="brings its own vectors"):
        TrainConfig.from_dict({"word_vectors": "glove.txt", "decoder": {"word_space": "glove-50d", "embed_dim": 50}})


def test_training_in_glove_space_moves_the_projection_and_leaves_the_vectors(shapes_prepared, tmp_path):
    import json

    from captioner.training.loop import train
    from conftest import shapes_train_config

    out = tmp_path / "glove"
    train(shapes_train_config(shapes_prepared, out, epochs=2, decoder={"embed_dim": 50, "word_space": "glove-50d"}))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_CIDEr-D"] > 50, record  # it learnt the shapes set through the fixed vectors
    model = Captioner.load(out / "best")
    words = model.vocab.words
    assert model.decoder.config.word_space == "glove-50d"
    torch.testing.assert_close(model.decoder.embedding.weight, word_vectors().rows(words), rtol=0, atol=0)  # exactly the shipped vectors, after training
    assert "red" in words and torch.equal(model.decoder.embedding.weight[model.vocab.index["red"]], glove("red"))
