"""Decoders: shapes, attention, masking of padding, step/forward agreement, word vectors."""

import pytest
import torch

from captioner.errors import ConfigError
from captioner.models.captioner import Captioner
from captioner.models.decoder import DecoderConfig, take_rows
from captioner.models.embeddings import load_word_vectors
from conftest import caption_batch, make_model, make_vocab

WORDS = ("a", "red", "blue", "circle", "square", "and")


@pytest.mark.parametrize("kind, image_input", [("attention", "init_state"), ("show_tell", "init_state"), ("show_tell", "first_step")])
def test_forward_shapes_and_zero_padding(kind, image_input):
    model = make_model(kind, words=WORDS, image_input=image_input)
    features, captions, lengths = caption_batch(model)
    logits, alphas, _ = model.decoder(features, captions, lengths)
    assert logits.shape == (6, int(lengths.max()) - 1, len(model.vocab))
    for row, length in enumerate(lengths.tolist()):
        assert logits[row, length - 1 :].abs().sum() == 0  # never computed
        assert logits[row, : length - 1].abs().sum(dim=-1).min() > 0
    if kind == "attention":
        assert alphas.shape == (6, int(lengths.max()) - 1, 7)
        for row, length in enumerate(lengths.tolist()):
            assert torch.allclose(alphas[row, : length - 1].sum(dim=-1), torch.ones(length - 1), atol=1e-5)
            assert alphas[row, length - 1 :].abs().sum() == 0
    else:
        assert alphas is None


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_padded_positions_do_not_change_the_loss(kind):
    model = make_model(kind, words=WORDS)
    features, captions, lengths = caption_batch(model)
    garbage = captions.clone()
    for row, length in enumerate(lengths.tolist()):
        garbage[row, length:] = torch.randint(1, len(model.vocab), (garbage.shape[1] - length,))
    targets = captions[:, 1:]
    mask = targets != model.vocab.pad_id

    def loss(inputs):
        logits = model.decoder(features, inputs, lengths).logits
        return torch.nn.functional.cross_entropy(logits[mask], targets[mask])

    assert torch.equal(loss(captions), loss(garbage))


@pytest.mark.parametrize("kind, image_input", [("attention", "init_state"), ("show_tell", "init_state"), ("show_tell", "first_step")])
def test_step_by_step_equals_teacher_forcing(kind, image_input):
    model = make_model(kind, words=WORDS, image_input=image_input)
    features, captions, lengths = caption_batch(model, seq_per_img=1)
    logits, alphas, _ = model.decoder(features, captions, lengths)
    state = model.decoder.init_state(features)
    for t in range(int(lengths.max()) - 1):
        step_logits, state, alpha = model.decoder.step(captions[:, t], state)
        for row, length in enumerate(lengths.tolist()):
            if t < length - 1:
                assert torch.allclose(step_logits[row], logits[row, t], atol=1e-5)
                if alpha is not None:
                    assert torch.allclose(alpha[row], alphas[row, t], atol=1e-6)


def test_seq_per_img_equals_repeating_the_features():
    model = make_model("attention", words=WORDS)
    features, captions, lengths = caption_batch(model, images=2, seq_per_img=3)
    shared = model.decoder(features, captions, lengths).logits
    repeated = model.decoder(features.repeat_interleave(3, dim=0), captions, lengths).logits
    assert torch.allclose(shared, repeated, atol=1e-6)


def test_the_attention_is_the_papers_tanh_formula_and_reads_one_copy_of_each_image():
    model = make_model("attention", words=WORDS)
    attention = model.decoder.attention
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 7, model.decoder.feature_dim, generator=generator)  # 2 images
    hidden = torch.randn(6, model.config.decoder.hidden_dim, generator=generator)  # 3 looks at each
    with torch.no_grad():
        context, alpha = attention(features, attention.project(features), hidden)
        repeated = features.repeat_interleave(3, dim=0)  # the same, each image copied per look
        energy = attention.score(torch.tanh(attention.feature_proj(repeated) + attention.hidden_proj(hidden).unsqueeze(1))).squeeze(2)  # Xu et al. eq. 4
    assert torch.allclose(alpha, torch.softmax(energy, dim=1), atol=1e-6)
    assert torch.allclose(context, (alpha.unsqueeze(2) * repeated).sum(dim=1), atol=1e-5)
    again, _ = attention(repeated, attention.project(repeated), hidden)
    assert torch.allclose(again, context, atol=1e-6)
    with pytest.raises(ConfigError, match="7 rows cannot be shared evenly by 2 images"):
        attention(features, attention.project(features), hidden[:1].repeat(7, 1))


def test_deep_output_and_dropout_train_mode():
    model = make_model("attention", words=WORDS, deep_output=True, dropout=0.5)
    features, captions, lengths = caption_batch(model)
    logits = model.decoder(features, captions, lengths).logits
    assert logits.shape[-1] == len(model.vocab)
    model.train()
    first = model.decoder(features, captions, lengths).logits
    second = model.decoder(features, captions, lengths).logits
    assert not torch.equal(first, second)  # dropout is active in training
    first.sum().backward()
    assert model.decoder.embedding.weight.grad is not None


def test_decoder_config_validation():
    with pytest.raises(ConfigError, match="kind"):
        DecoderConfig(kind="transformer")
    with pytest.raises(ConfigError, match="dropout"):
        DecoderConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="unknown decoder setting"):
        DecoderConfig.from_dict({"kind": "attention", "layers": 3})


def test_glove_vectors_load_into_the_embedding(tmp_path):
    vocab = make_vocab(WORDS)
    path = tmp_path / "glove.txt"
    path.write_text("red 1 2 3 4\nblue 5 6 7 8\nzebra 0 0 0 1\nRed 9 9 9 9\n")
    vectors, found = load_word_vectors(path, vocab, 4)
    assert found.tolist() == [w in ("red", "blue") for w in vocab.words]
    assert vectors[vocab.index["red"]].tolist() == [1, 2, 3, 4]  # first occurrence wins
    model = make_model("attention", words=WORDS, embed_dim=4, freeze_embeddings=True)
    before = model.decoder.embedding.weight.detach().clone()
    model.decoder.load_embeddings(vectors, found)
    weight = model.decoder.embedding.weight
    assert weight[vocab.index["blue"]].tolist() == [5, 6, 7, 8]
    assert torch.equal(weight[vocab.index["a"]], before[vocab.index["a"]])
    assert not weight.requires_grad
    model.save(tmp_path / "frozen")  # a loaded model keeps its embedding frozen, as its config says
    assert not Captioner.load(tmp_path / "frozen").decoder.embedding.weight.requires_grad
    word2vec = tmp_path / "w2v.txt"
    word2vec.write_text("2 3\nred 1 2 3\nblue 4 5 6\n")
    with pytest.raises(ConfigError, match="3-dimensional vectors, but embed_dim is 4"):
        load_word_vectors(word2vec, vocab, 4)
    with pytest.raises(ConfigError, match="does not exist"):
        load_word_vectors(tmp_path / "none.txt", vocab, 4)


@pytest.mark.parametrize("shape", [(7,), (7, 5), (7, 2, 3, 4)])
def test_take_rows_is_index_select_on_the_first_axis(shape):
    value = torch.randn(shape)
    index = torch.tensor([6, 0, 0, 3])  # reordered, repeated, some rows dropped
    taken = take_rows(value, index)
    assert taken.shape == (4, *shape[1:])
    assert torch.equal(taken, value.index_select(0, index))
