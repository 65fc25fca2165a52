"""Ensembles of decoders and views: exact against the single model where they must be, and by hand."""

import json
import math

import pytest
import torch

from captioner.errors import ConfigError
from captioner.models.captioner import Captioner
from captioner.models.ensemble import EnsembleConfig, mirror
from conftest import make_model


def grid_features(model, batch=3, side=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, side * side, model.decoder.feature_dim, generator=generator).abs()  # (B, P, D), a 3x3 grid


def mirrored(features, side=3):
    """The features of the mirrored image, as an ideal encoder would give them: the grid flipped left-right."""
    batch, regions, dim = features.shape
    return features.view(batch, side, side, dim).flip(2).reshape(batch, regions, dim)


def assert_same_captions(expected, got, attention=True):
    for mine, theirs in zip(expected, got):
        assert [c.tokens for c in mine] == [c.tokens for c in theirs]
        assert [c.log_prob for c in mine] == pytest.approx([c.log_prob for c in theirs], abs=1e-5)
        if attention:
            for a, b in zip(mine, theirs):
                assert torch.allclose(a.attention, b.attention, atol=1e-6)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_an_ensemble_of_one_model_twice_is_that_model(strategy):
    model = make_model("attention", seed=3, scale=3.0)
    features = grid_features(model)
    twice = Captioner.ensemble([model, model])
    settings = dict(strategy=strategy, beam_size=3, num_return=2 if strategy == "beam" else 1, max_length=8)
    assert_same_captions(model.generate(features, **settings), twice.generate(features, **settings))


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_a_flipped_view_of_mirrored_features_is_the_model_itself(strategy):
    # the flipped view reads the mirrored grid: its word distributions are the plain view's, and its
    # attention, mirrored back, is the plain view's too; so the average is exactly the single model
    model = make_model("attention", seed=5, scale=3.0)
    features = grid_features(model)
    flipped = Captioner.ensemble([model], views=("plain", "flip"))
    settings = dict(strategy=strategy, beam_size=3, num_return=2 if strategy == "beam" else 1, max_length=8)
    expected = model.generate(features, **settings)
    assert_same_captions(expected, flipped.generate(torch.cat([features, mirrored(features)], dim=1), **settings))
    # without mirroring the attention back, the maps would differ (the test can fail)
    assert not torch.allclose(expected[0][0].attention, mirror(expected[0][0].attention), atol=1e-3)


def test_an_ensembles_image_state_kept_once_per_image_steps_as_if_copied_per_beam():
    from captioner.models.decoder import select_state

    first, second = make_model("attention", seed=1, scale=2.0, pretrained=True), make_model("attention", seed=2, scale=2.0, pretrained=True, hidden_dim=16)
    ensemble = Captioner.ensemble([first, second], views=("plain", "flip")).decoder
    features = grid_features(first, batch=2)
    beams = torch.tensor([0, 0, 0, 1, 1, 1])  # 3 beams on each of 2 images
    state = ensemble.init_state(torch.cat([features, mirrored(features)], dim=1))
    shared = select_state(state, beams, keep=ensemble.image_constant_keys)
    copied = select_state(state, beams)
    assert shared["0.features"].shape[0] == 2 and copied["0.features"].shape[0] == 6
    tokens = torch.tensor([1, 4, 5, 1, 6, 4])
    with torch.no_grad():
        for _ in range(3):
            (log_probs, shared, alpha), (expected, copied, expected_alpha) = ensemble.step(tokens, shared), ensemble.step(tokens, copied)
            assert torch.allclose(log_probs, expected, atol=1e-5) and torch.allclose(alpha, expected_alpha, atol=1e-6)
            tokens = log_probs.argmax(dim=1)
    assert shared["1.h"].shape == copied["1.h"].shape == (6, 2, 16) and shared["1.projected"].shape[0] == 2


def test_an_ensemble_told_its_attention_is_not_read_skips_averaging_it_and_steps_the_same():
    first, second = make_model("attention", seed=1, scale=2.0, pretrained=True), make_model("attention", seed=2, scale=2.0, pretrained=True, hidden_dim=16)
    ensemble = Captioner.ensemble([first, second], views=("plain", "flip")).decoder
    features = grid_features(first, batch=2)
    state = ensemble.init_state(torch.cat([features, mirrored(features)], dim=1))
    tokens = torch.tensor([1, 4])
    with torch.no_grad():
        (log_probs, after, alpha), (unread_log_probs, unread_after, unread) = ensemble.step(tokens, state), ensemble.step(tokens, state, attention=False)
    assert alpha.shape == (2, 9) and unread is None
    assert torch.equal(log_probs, unread_log_probs) and all(torch.equal(after[key], unread_after[key]) for key in after)


@pytest.mark.parametrize("second_attention", [{}, {"attention": "hard", "hard_decoding": "argmax"}])
def test_two_models_average_their_probabilities_at_every_step(second_attention):
    # (a hard-attention member decodes at its argmax region, in the ensemble's steps as in its own teacher forcing)
    first, second = make_model("attention", seed=1, scale=2.0, pretrained=True), make_model("attention", seed=2, scale=2.0, pretrained=True, hidden_dim=16, **second_attention)
    features = grid_features(first, batch=2)
    both = Captioner.ensemble([first, second])
    vocab = first.vocab
    for image, captions in enumerate(both.generate(features, strategy="beam", beam_size=3, num_return=3, max_length=6)):
        for caption in captions:
            ids = [vocab.start_id, *caption.tokens] + ([vocab.end_id] if caption.finished else [])
            captions_tensor, lengths = torch.tensor([ids]), torch.tensor([len(ids)])
            with torch.no_grad():
                probabilities = [torch.softmax(m.decoder(features[image : image + 1], captions_tensor, lengths)[0][0], -1) for m in (first, second)]
            expected = sum(math.log((probabilities[0][t, ids[t + 1]] + probabilities[1][t, ids[t + 1]]) / 2) for t in range(len(ids) - 1))
            assert caption.log_prob == pytest.approx(expected, abs=1e-4)


def test_an_ensemble_checkpoint_round_trips_and_names_its_format(tmp_path):
    first, second = make_model("attention", seed=1, pretrained=True), make_model("attention", seed=2, pretrained=True)
    both = Captioner.ensemble([first, second], views=("plain", "flip"))
    both.save(tmp_path / "ensemble")
    config = json.loads((tmp_path / "ensemble" / "config.json").read_text())
    assert config["format"] == 2 and len(config["ensemble"]["decoders"]) == 2 and config["ensemble"]["views"] == ["plain", "flip"]
    loaded = Captioner.load(tmp_path / "ensemble")
    features = torch.cat([grid_features(first), grid_features(first, seed=2)], dim=1)
    assert_same_captions(both.generate(features, beam_size=3, max_length=6), loaded.generate(features, beam_size=3, max_length=6))
    assert json.loads((tmp_path / "ensemble" / "config.json").read_text())["format"] == 2
    first.save(tmp_path / "single")
    assert json.loads((tmp_path / "single" / "config.json").read_text())["format"] == 1  # older readers still read single models
    again = Captioner.ensemble([loaded, first])  # ensembles flatten into their decoders
    assert len(again.config.ensemble.decoders) == 3


def test_images_are_encoded_once_per_view():
    model = make_model("attention", seed=1, pretrained=False)
    images = torch.rand(2, 3, 64, 64)
    flipped = Captioner.ensemble([model], views=("plain", "flip"))
    with torch.no_grad():
        features = flipped.encode(images)
        plain, mirror_image = model.encode(images), model.encode(images.flip(-1))
    assert torch.equal(features, torch.cat([plain, mirror_image], dim=1))


def test_a_big_batch_is_encoded_in_pieces_on_a_cpu_and_whole_in_training():
    from captioner.models import captioner as captioner_module

    model = Captioner.ensemble([make_model("attention", seed=1, pretrained=False)], views=("plain", "flip"))
    images = torch.rand(7, 3, 64, 64)  # 14 views: pieces of 8 and 6
    calls = []
    encoder_forward = model.encoder.forward
    model.encoder.forward = lambda x: (calls.append(x.shape[0]), encoder_forward(x))[1]
    with torch.no_grad():
        together = model.encode(images)
        alone = torch.cat([model.encode(images[i : i + 1]) for i in range(7)])
    assert calls[:2] == [captioner_module.CPU_ENCODER_PIECE, 14 - captioner_module.CPU_ENCODER_PIECE] and calls[2:] == [2] * 7
    assert torch.allclose(together, alone, atol=1e-5)
    calls.clear()
    model.encoder.train()
    model.encode(images)
    assert calls == [14]  # batch norm in training mode sees the whole batch


def test_what_cannot_be_an_ensemble_is_refused():
    model = make_model("attention", seed=1, pretrained=True)
    with pytest.raises(ConfigError, match="two decoders or a second view"):
        Captioner.ensemble([model])
    with pytest.raises(ConfigError, match="share one vocabulary"):
        Captioner.ensemble([model, make_model("attention", words=("x", "y", "z"), pretrained=True)])
    with pytest.raises(ConfigError, match="of one kind"):
        Captioner.ensemble([model, make_model("show_tell", pretrained=True)])
    tuned = make_model("attention", seed=2, pretrained=True)
    tuned.fine_tune_encoder(1)
    with torch.no_grad():
        next(p for p in tuned.encoder.parameters() if p.requires_grad).add_(0.01)  # as if fine-tuned
    with pytest.raises(ConfigError, match="share one encoder"):
        Captioner.ensemble([model, tuned])
    assert Captioner.ensemble([tuned, tuned]).encoder_in_checkpoint  # the same fine-tuned encoder is shared, and saved
    with pytest.raises(ConfigError, match="views must be distinct"):
        EnsembleConfig([model.config.decoder], ("plain", "sideways"))


def test_an_ensemble_has_a_bounded_number_of_decoders_and_keeps_its_members_views(tmp_path):
    # 30 copies of the shipped model reached 8.4 GB before anything refused them; and a member that
    # reads each image mirrored (the shipped model does) lost that view in the ensemble, unsaid
    import subprocess
    import sys

    from captioner.cli.ensemble_command import member_views
    from captioner.limits import MAX_ENSEMBLE_DECODERS

    model = make_model("attention", seed=1, pretrained=True)
    with pytest.raises(ConfigError, match=f"an ensemble has at most {MAX_ENSEMBLE_DECODERS} decoders, not {MAX_ENSEMBLE_DECODERS + 1}"):
        EnsembleConfig([model.config.decoder] * (MAX_ENSEMBLE_DECODERS + 1))
    result = subprocess.run(
        [sys.executable, "-m", "captioner", "ensemble", *["default"] * (MAX_ENSEMBLE_DECODERS + 1), "--out", str(tmp_path / "e")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr.strip() == f"captioner ensemble: error: an ensemble has at most {MAX_ENSEMBLE_DECODERS} decoders: {MAX_ENSEMBLE_DECODERS + 1} models are too many"
    mirrored = Captioner.ensemble([model], views=("plain", "flip"))
    assert member_views([model, model], flip=False) == ("plain",)
    assert member_views([model, mirrored], flip=False) == ("plain", "flip")  # kept, without --flip
    assert member_views([model, model], flip=True) == ("plain", "flip")
