"""The feature cache: built once, keyed by encoder + preprocessing + images, written atomically."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data.images import Preprocessing
from captioner.errors import CaptionerError
from captioner.models.encoder import EncoderConfig, build_encoder
from captioner.data.features import cached_features


@pytest.fixture(scope="module")
def encoder():
    return build_encoder(EncoderConfig(feature_layer="last_stage"))


def images(folder, count=5):
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.new("RGB", (40, 30), (40 * i, 100, 200 - 30 * i)).save(path)
        paths.append(path)
    return paths


def test_cache_is_built_once_and_matches_the_encoder(encoder, tmp_path):
    paths = images(tmp_path / "img")
    preprocessing = Preprocessing(image_size=64)
    features = cached_features(encoder, preprocessing, paths, tmp_path / "cache", "train", workers=0, progress=False)
    assert features.dtype == np.float16 and features.shape == (5, 4, 320)
    with torch.no_grad():
        direct = encoder(torch.stack([preprocessing(Image.open(p).convert("RGB")) for p in paths]))
    assert np.allclose(features, direct.numpy(), atol=2e-2, rtol=1e-2)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")  # no temp files left
    mtime = (tmp_path / "cache" / files[1]).stat().st_mtime_ns
    again = cached_features(encoder, preprocessing, paths, tmp_path / "cache", "train", workers=0, progress=False)
    assert (tmp_path / "cache" / files[1]).stat().st_mtime_ns == mtime and np.array_equal(again, features)


def test_a_flipped_view_has_its_own_cache_of_the_mirrored_images(encoder, tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):  # not left-right symmetric: the mirrored features differ
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    preprocessing = Preprocessing(image_size=64)
    plain = cached_features(encoder, preprocessing, paths, tmp_path / "cache", "val", workers=0, progress=False)
    flipped = cached_features(encoder, preprocessing, paths, tmp_path / "cache", "val", workers=0, progress=False, view="flip")
    with torch.no_grad():
        direct = encoder(torch.stack([preprocessing(Image.open(p).convert("RGB")).flip(-1) for p in paths]))
    assert np.allclose(flipped, direct.numpy(), atol=2e-2, rtol=1e-2) and not np.allclose(flipped, plain, atol=2e-2)
    names = sorted(p.name for p in (tmp_path / "cache").glob("*.npy"))
    assert len(names) == 2 and sum(name.startswith("val-flip-") for name in names) == 1


def test_a_damaged_cache_is_one_line_that_says_how_to_rebuild_it(encoder, tmp_path):
    from captioner.data.features import ViewFeatures

    paths = images(tmp_path / "img")
    preprocessing = Preprocessing(image_size=64)
    good = np.array(cached_features(encoder, preprocessing, paths, tmp_path / "cache", "train", workers=0, progress=False))  # a copy: the file is damaged below
    array_path = next((tmp_path / "cache").glob("*.npy"))
    whole = array_path.read_bytes()
    for damage, message in [
        (lambda: array_path.write_bytes(whole[:-100]), "is damaged"),  # truncated
        (lambda: array_path.write_bytes(b""), "is damaged"),
        (lambda: array_path.write_bytes(b"garbage" * 100), "is damaged"),
        (lambda: np.save(array_path, np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True), "is damaged"),
        (lambda: np.save(array_path, np.zeros((5, 4, 320), np.float64)), r"holds float64 \(5, 4, 320\), not float16 features of 5 images x 320"),
        (lambda: np.save(array_path, np.zeros((4, 4, 320), np.float16)), r"holds float16 \(4, 4, 320\)"),
        (lambda: np.save(array_path, np.zeros((5, 4, 100), np.float16)), r"holds float16 \(5, 4, 100\)"),
    ]:
        damage()
        with pytest.raises(CaptionerError, match=f"the feature cache {array_path.name} " + message + f".*: delete {array_path}"):
            cached_features(encoder, preprocessing, paths, tmp_path / "cache", "train", workers=0, progress=False)
    array_path.unlink()
    assert np.array_equal(cached_features(encoder, preprocessing, paths, tmp_path / "cache", "train", workers=0, progress=False), good)  # built again
    with pytest.raises(CaptionerError, match=r"the feature caches of the model's views do not match \(\(5, 4, 320\), \(5, 3, 320\)\)"):
        ViewFeatures([good, good[:, :3]])


def test_changes_build_a_new_cache(encoder, tmp_path):
    paths = images(tmp_path / "img")
    cache = tmp_path / "cache"
    cached_features(encoder, Preprocessing(image_size=64), paths, cache, "train", workers=0, progress=False)
    cached_features(encoder, Preprocessing(image_size=96), paths, cache, "train", workers=0, progress=False)  # preprocessing
    assert len(list(cache.glob("*.npy"))) == 2
    Image.new("RGB", (40, 30), (0, 0, 0)).save(paths[2])  # an image changed
    os.utime(paths[2], ns=(1, 1))
    fresh = cached_features(encoder, Preprocessing(image_size=64), paths, cache, "train", workers=0, progress=False)
    assert len(list(cache.glob("*.npy"))) == 3 and fresh.shape == (5, 4, 320)


def test_unreadable_image_is_a_clear_error_and_leaves_no_file(encoder, tmp_path):
    paths = images(tmp_path / "img")
    paths[3].write_bytes(b"not an image")
    with pytest.raises(CaptionerError, match=r"3\.png: not an image.*captioner prepare"):
        cached_features(encoder, Preprocessing(image_size=64), paths, tmp_path / "cache", "train", workers=0, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.slow
def test_epochs_before_fine_tuning_train_from_the_cache(shapes_prepared, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from captioner.training import data as training_data
    from captioner.training import loop
    from conftest import shapes_train_config

    settings = dict(epochs=1, fine_tune_encoder=1, fine_tune_from_epoch=1, val_max_images=8, decoder={"hidden_dim": 64})
    with monkeypatch.context() as patch:  # epoch 1 of a run that fine-tunes from epoch 2 never reads an image
        patch.setattr(training_data, "ImageFiles", lambda *args, **kwargs: pytest.fail("an image was loaded before fine-tuning"))
        train_config = shapes_train_config(shapes_prepared, tmp_path / "run", **settings)
        loop.train(train_config)
    assert not any(name.startswith("encoder.") for name in load_file(str(tmp_path / "run" / "last" / "model.safetensors")))
    loop.train(shapes_train_config(shapes_prepared, tmp_path / "run", **{**settings, "epochs": 2}), resume=True)
    assert any(name.startswith("encoder.") for name in load_file(str(tmp_path / "run" / "last" / "model.safetensors")))
