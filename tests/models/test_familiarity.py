"""Familiar photos: how far a photo is from a model's training photos, and concepts steering only the
unfamiliar ones; on small made-up features, tiny checkpoints and the shipped model."""

from pathlib import Path

import pytest
import torch
from conftest import make_model
from PIL import Image

from captioner import ranges
from captioner.decoding import GenerationConfig
from captioner.errors import CheckpointError, ConfigError
from captioner.models import familiarity as familiarity_module
from captioner.models.captioner import Captioner, CaptionerConfig
from captioner.models.familiarity import FAMILIARITY_FILE, Familiarity, pooled

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def two_kinds_of_photo(count: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Pooled features (count, dim) of photos around two directions: the first two axes."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:2]
    points = centres[torch.arange(count) % 2] + 0.1 * torch.randn(count, dim, generator=generator)
    return torch.nn.functional.normalize(points, dim=1)


def test_a_training_photo_is_familiar_and_a_photo_of_another_kind_is_not():
    familiarity = Familiarity.build(two_kinds_of_photo(200), two_kinds_of_photo(50, seed=1), clusters=8)
    assert familiarity.centroids.shape == (8, 16)
    assert torch.equal(familiarity.dev_distances, familiarity.dev_distances.sort().values)
    seen = two_kinds_of_photo(4, seed=2).unsqueeze(1).repeat(1, 3, 1)  # (B, P, D): three regions each
    other = torch.eye(16)[5].expand(2, 3, 16)  # a third direction, unlike any training photo
    assert familiarity.familiar(seen, 100.0) == [True] * 4
    assert familiarity.familiar(other, 100.0) == [False, False]
    assert familiarity.familiar(seen, 0.0) == [False] * 4  # 0: none is familiar, every photo may be steered
    assert bool((familiarity.distances(other) > familiarity.dev_distances.max()).all())


def test_the_distance_is_one_minus_the_cosine_to_the_nearest_centroid():
    familiarity = Familiarity(torch.eye(4)[:2], torch.tensor([0.1, 0.2, 0.3]))
    features = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 0.0]], [[1.0, 1.0, 0.0, 0.0]]])  # (3, 1, 4)
    torch.testing.assert_close(familiarity.distances(features), torch.tensor([0.0, 1.0, 1 - 2**-0.5]))
    # the regions (and views) of a photo pool into one vector before anything is measured
    torch.testing.assert_close(pooled(torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])), torch.tensor([[2**-0.5, 2**-0.5]]))
    assert familiarity.familiar(features, 50.0) == [True, False, False]  # the median dev distance is 0.2


def test_building_is_seeded_and_an_empty_cluster_keeps_its_centroid():
    training, dev = two_kinds_of_photo(60), two_kinds_of_photo(20, seed=1)
    first, again = Familiarity.build(training, dev, clusters=6), Familiarity.build(training, dev, clusters=6)
    assert torch.equal(first.centroids, again.centroids) and torch.equal(first.dev_distances, again.dev_distances)
    repeated = torch.nn.functional.normalize(torch.ones(5, 4), dim=1)  # five copies of one photo: clusters collapse
    assert bool(torch.isfinite(Familiarity.build(repeated, repeated, clusters=3).centroids).all())
    assert Familiarity.build(repeated, repeated, clusters=50).centroids.shape[0] == 5  # at most one per photo


def test_the_file_round_trips_and_a_bad_one_is_one_line(tmp_path, monkeypatch):
    familiarity = Familiarity.build(two_kinds_of_photo(40), two_kinds_of_photo(10, seed=1), clusters=4)
    path = tmp_path / FAMILIARITY_FILE
    path.write_bytes(familiarity.to_bytes())
    read = Familiarity.read(path, 16)
    torch.testing.assert_close(read.centroids, familiarity.centroids, atol=2e-3, rtol=0)  # stored in float16
    assert torch.equal(read.dev_distances, familiarity.dev_distances)
    with pytest.raises(CheckpointError, match=r"\(K, 32\)"):
        Familiarity.read(path, 32)  # another encoder's width
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Familiarity.read(path, 16)
    path.write_bytes(Familiarity(torch.eye(16)[:2], torch.tensor([float("nan")])).to_bytes())
    with pytest.raises(CheckpointError, match="not finite"):
        Familiarity.read(path, 16)
    path.write_bytes(Familiarity(torch.eye(16)[:2], torch.tensor([-0.5, 0.1, 3.0])).to_bytes())
    with pytest.raises(CheckpointError, match=r"dev_distances must lie from 0 to 2 \(one minus a cosine\), not -0.5 to 3"):
        Familiarity.read(path, 16)
    path.write_bytes(familiarity.to_bytes())
    monkeypatch.setattr(familiarity_module, "MAX_FAMILIARITY_BYTES", 100)
    with pytest.raises(CheckpointError, match="more than familiar photos ever need"):
        Familiarity.read(path, 16)


def test_the_percentile_has_a_checked_range_wherever_it_comes_from():
    for bad in (-1, 100.5, float("nan"), True, "80"):
        with pytest.raises(ranges.SettingError, match="concept_familiar_percentile"):
            GenerationConfig(concept_familiar_percentile=bad)
        with pytest.raises(ConfigError, match="concept_familiar_percentile"):
            CaptionerConfig.from_dict({"concept_familiar_percentile": bad})
    assert GenerationConfig(concept_familiar_percentile=100).concept_familiar_percentile == 100


def test_a_checkpoint_keeps_its_familiar_photos_and_one_that_asks_for_them_without_the_file_is_refused(tmp_path):
    model = make_model(pretrained=True)
    width = model.encoder.feature_dim
    generator = torch.Generator().manual_seed(0)
    model.familiarity = Familiarity(torch.randn(3, width, generator=generator), torch.tensor([0.2, 0.4]))
    model.save(tmp_path / "with")
    loaded = Captioner.load(tmp_path / "with")
    torch.testing.assert_close(loaded.familiarity.centroids, model.familiarity.centroids, atol=2e-3, rtol=0)
    assert torch.equal(loaded.familiarity.dev_distances, model.familiarity.dev_distances)
    model.familiarity = None
    model.config.concept_familiar_percentile = 80.0
    model.save(tmp_path / "without")
    with pytest.raises(CheckpointError, match=f"no {FAMILIARITY_FILE}"):
        Captioner.load(tmp_path / "without")
    with pytest.raises(ConfigError, match="scripts/familiar_photos.py"):
        model.caption(Image.new("RGB", (64, 64)), concept_familiar_percentile=50, concept_constraints=1)


@pytest.fixture(scope="module")
def shipped():
    return Captioner.load("default")


def test_the_shipped_model_knows_its_training_photos_and_steers_only_the_others(shipped):
    assert shipped.familiarity is not None and shipped.familiarity.centroids.shape == (512, shipped.encoder.feature_dim)
    assert shipped.config.concept_familiar_percentile > 0
    assert shipped.caption(EXAMPLES / "dog.jpg").to_dict()["familiar"] is True  # a dog on grass: Flickr8k's own world
    # "dog" (p 0.65) would be required were it not among the model's most frequent words; it is not
    # required of this familiar photo, and is again once familiar photos are steered too (percentile 0)
    dog = shipped.caption(EXAMPLES / "dog.jpg", concept_known_words=0, concept_threshold=0.3)
    assert dog.familiar is True and dog.constraints == [] and dog.constraints_met is None
    steered = shipped.caption(EXAMPLES / "dog.jpg", concept_familiar_percentile=0, concept_known_words=0, concept_threshold=0.3)
    assert steered.familiar is None and steered.constraints and "dog" in steered.constraints[0], steered.constraints
    assert shipped.caption(EXAMPLES / "dog.jpg", concept_constraints=0).familiar is None  # no concepts: nothing asked
    # a photo like none of Flickr8k's: a flat grey card is unfamiliar at any percentile
    card = shipped.caption(Image.new("RGB", (300, 300), (128, 128, 128)), concept_familiar_percentile=100)
    assert card.familiar is False


def test_the_script_builds_the_file_a_trained_model_then_reads(trained_shapes, tmp_path):
    # a model trained on generated shapes: its own kind of picture is familiar, a photo of a dog is not
    import shutil
    import subprocess
    import sys

    best, held_out = trained_shapes
    model_dir = shutil.copytree(best, tmp_path / "model")
    prepared = best.parents[1] / "prepared"
    script = Path(__file__).resolve().parents[2] / "scripts" / "familiar_photos.py"
    done = subprocess.run([sys.executable, str(script), str(model_dir), str(prepared), "--clusters", "16"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "16 centroids" in done.stdout and (model_dir / FAMILIARITY_FILE).is_file()
    model = Captioner.load(model_dir)
    assert model.familiarity is not None and model.familiarity.dev_distances.numel() == 80  # the shapes set's 80 dev images
    pixels = torch.stack([model.preprocessing(Image.open(path).convert("RGB")) for path in [held_out[0]["path"], EXAMPLES / "dog.jpg"]])
    assert model.familiarity.familiar(model.features(pixels), 100.0) == [True, False]
    bad = subprocess.run([sys.executable, str(script), str(model_dir), str(prepared), "--clusters", "0"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --clusters must be from 1 to 65536, not 0"
