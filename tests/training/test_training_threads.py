"""Training and feature caching take the free cores step by step (captioner.threads), as captioning
does: on a machine whose cores are busy they run on fewer threads instead of waiting for preempted
ones, and PyTorch's own setting is back when they end."""

import pytest
import torch
from PIL import Image

from captioner import threads
from captioner.data.features import cached_features
from captioner.data.images import Preprocessing
from captioner.models.encoder import EncoderConfig, build_encoder
from captioner.training import loop
from captioner.training.loop import train
from tests.conftest import shapes_train_config


@pytest.fixture
def busy_machine(monkeypatch):
    """Every look at the load sees 50 other runnable tasks; the threads each phase ran on are recorded."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs PyTorch to use at least 2 threads here, to see it use fewer")
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "other_runnable_tasks", lambda: 50)
    return torch.get_num_threads()


def test_training_steps_and_validation_run_on_the_free_cores(shapes_prepared, tmp_path, monkeypatch, busy_machine):
    seen = []
    forward = loop.TrainingStep.forward

    def recording_forward(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(loop.TrainingStep, "forward", recording_forward)
    train(shapes_train_config(shapes_prepared, tmp_path / "run", epochs=1, val_max_images=8))
    assert len(seen) > 20 and set(seen) == {1}  # the epoch's 20 steps and the validation loss's batches
    assert torch.get_num_threads() == busy_machine


def test_a_feature_cache_is_built_on_the_free_cores(tmp_path, monkeypatch, busy_machine):
    encoder = build_encoder(EncoderConfig(feature_layer="last_stage"))
    seen = []
    monkeypatch.setattr(encoder, "forward", lambda images, forward=encoder.forward: seen.append(torch.get_num_threads()) or forward(images))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 30), (60 * i, 100, 50)).save(paths[-1])
    cached_features(encoder, Preprocessing(image_size=64), paths, tmp_path / "cache", "train", batch_size=2, workers=0, progress=False)
    assert seen[1:] == [1, 1]  # after the probe for the features' shape: both batches on one thread
    assert torch.get_num_threads() == busy_machine
