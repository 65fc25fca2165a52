"""Shared fixtures: small generated data, made once per test session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
# PyTorch's own thread count in every phase, however busy the machine: a call's numbers then compare
# exactly with another call's (int8 decoding rounds each call's inputs, and sums in another order
# can tip that rounding). Choosing threads by the load is tested in test_threads.py.
os.environ.setdefault("CAPTIONER_THREADS", "torch")
# An empty cache of our own (exported encoders): what a user exported never changes what tests see.
os.environ["CAPTIONER_CACHE"] = tempfile.mkdtemp(prefix="captioner-test-cache-")


@pytest.fixture(scope="module")
def one_thread_per_process() -> Iterator[None]:
    """For modules whose tests start several processes at once (``pytestmark =
    pytest.mark.usefixtures("one_thread_per_process")``): their child processes get one OpenMP
    thread each, as torchrun gives its ranks when OMP_NUM_THREADS is unset. This file sets it to the
    core count for the tests' own process, which children inherit: two ranks of 2 threads on 2 cores
    spin against each other (a 2-process training took 149 s that way, 50 s with a thread each)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="session")
def shapes_karpathy(tmp_path_factory) -> Path:
    """The shapes set (60 images) in Karpathy format; returns the caption file."""
    from captioner.data.synthetic import write_shapes_dataset

    [caption_file] = write_shapes_dataset(tmp_path_factory.mktemp("shapes_karpathy"), num_images=60, seed=3, format="karpathy")
    return caption_file


def make_vocab(words=("a", "b", "c")):
    from captioner.data.vocabulary import SPECIAL_TOKENS, Vocabulary

    return Vocabulary(list(SPECIAL_TOKENS) + list(words))


def caption_batch(model, images=3, seq_per_img=2, regions=7, seed=0, longest=8):
    """Random teacher-forcing input for ``model``: features (images, regions, D) and
    images * seq_per_img captions of 3 to ``longest`` tokens (<start> random words <end>, padded), with their lengths."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(images, regions, model.decoder.feature_dim, generator=generator)
    lengths = torch.randint(3, longest + 1, (images * seq_per_img,), generator=generator)
    captions = torch.zeros(images * seq_per_img, int(lengths.max()), dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        captions[row, 0] = model.vocab.start_id
        captions[row, 1 : length - 1] = torch.randint(4, len(model.vocab), (length - 2,), generator=generator)
        captions[row, length - 1] = model.vocab.end_id
    return features, captions, lengths


def make_model(kind="attention", words=("a", "b", "c"), seed=0, scale=1.0, pretrained=False, **decoder):
    """A small Captioner; its encoder is randomly initialised unless ``pretrained`` (installed weights).

    ``scale`` multiplies the classifier weights so the word distributions are peaky enough to make
    decoding choices matter. Tests feed features of width ``model.decoder.feature_dim`` directly.
    """
    import torch

    from captioner.models.captioner import Captioner, CaptionerConfig
    from captioner.models.decoder import DecoderConfig
    from captioner.models.encoder import EncoderConfig

    torch.manual_seed(seed)
    settings = {"kind": kind, "embed_dim": 16, "hidden_dim": 24, "attention_dim": 12, "dropout": 0.3, **decoder}
    config = CaptionerConfig(encoder=EncoderConfig(feature_layer="last_stage", pretrained=pretrained), decoder=DecoderConfig(**settings))
    model = Captioner(config, make_vocab(words))
    with torch.no_grad():
        model.decoder.classifier.weight.mul_(scale)
    return model.eval()


@pytest.fixture(scope="session")
def shapes_prepared(tmp_path_factory) -> Path:
    """A prepared shapes set (400 images: 320 train / 40 val / 40 test) with a shared feature cache."""
    from captioner.data.formats import read_dataset
    from captioner.data.prepare import PrepareOptions, prepare
    from captioner.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes_prepared")
    caption_files = write_shapes_dataset(root / "raw", num_images=400, seed=0, format="karpathy")
    prepare(read_dataset(caption_files), root / "prepared", PrepareOptions(min_word_freq=1, progress=False))
    return root / "prepared"


def shapes_train_config(prepared: Path, out: Path, **overrides):
    """A small, fast training setup for the shapes set (frozen lite0 features at 224)."""
    from captioner.training.config import TrainConfig

    values = {
        "data": str(prepared),
        "out": str(out),
        "epochs": 8,
        "batch_size": 16,
        "seq_per_img": 3,
        "decoder": {"kind": "attention", "embed_dim": 64, "hidden_dim": 128, "attention_dim": 64, "dropout": 0.2},
        "decoder_lr": 3e-3,
        "schedule": "constant",
        "patience": 0,
        "val_beam_size": 1,
        "max_length": 16,
        "progress": False,
        "workers": 0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    return TrainConfig.from_dict(values)


@pytest.fixture(scope="session")
def trained_shapes(tmp_path_factory):
    """A Show-Attend-Tell model trained on 800 generated images (about a minute on 2 cores), and the
    held-out images with their true shapes: for tests that a trained model captions and attends correctly.

    Trained without the doubly stochastic attention term: with captions shorter than the 49 regions,
    that term pushes every word's attention towards uniform, and these tests check where it looks.
    """
    return train_on_shapes(tmp_path_factory.mktemp("trained_shapes"))


@pytest.fixture(scope="session")
def trained_hard_shapes(tmp_path_factory):
    """The same, with hard attention (one sampled region per word in training)."""
    return train_on_shapes(tmp_path_factory.mktemp("trained_hard_shapes"), decoder={"attention": "hard"})


def train_on_shapes(root: Path, **overrides):
    """800 generated images trained on for 12 epochs: (the best checkpoint, the held-out images with their shapes)."""
    import json

    from captioner.data.formats import read_dataset
    from captioner.data.prepare import PrepareOptions, prepare
    from captioner.data.synthetic import write_shapes_dataset
    from captioner.training.loop import train

    caption_files = write_shapes_dataset(root / "raw", num_images=800, seed=5, format="karpathy")
    prepare(read_dataset(caption_files), root / "prepared", PrepareOptions(min_word_freq=1, progress=False))
    train(shapes_train_config(root / "prepared", root / "run", epochs=12, attention_regularization=0.0, **overrides))
    items = json.loads((root / "raw" / "shapes.json").read_text())
    held_out = [dict(item, path=root / "raw" / "images" / item["image"]) for item in items if item["split"] == "test"]
    return root / "run" / "best", held_out


def names_the_shapes(words, shapes) -> bool:
    """Whether a caption names exactly the image's shapes, each once, each colour with its right shape."""
    from captioner.data.synthetic import COLOURS

    named = [(word, words[i + 1] if i + 1 < len(words) else None) for i, word in enumerate(words) if word in COLOURS]
    return len(named) == len(shapes) and set(named) == {(shape["colour"], shape["shape"]) for shape in shapes}
