"""The encoder through onnxruntime: exported once, checked, then used wherever it is installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.errors import ConfigError
from captioner.models import onnx_encoder
from captioner.models.captioner import Captioner
from captioner.models.onnx_encoder import OnnxEncoder, encoder_key, export_encoder, find_encoder_runtime, onnx_path

pytest.importorskip("onnxruntime")  # the [fast] extra; the test extra installs it
pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache of this module's own, holding the shipped model's exported encoder."""
    folder, before = tmp_path_factory.mktemp("cache"), os.environ["CAPTIONER_CACHE"]
    os.environ["CAPTIONER_CACHE"] = str(folder)
    try:
        model = Captioner.load("default", encoder_runtime="torch")
        path, difference = export_encoder(model, pixels(model))
        yield folder, path, difference
    finally:
        os.environ["CAPTIONER_CACHE"] = before


def pixels(model):
    from captioner.data.images import load_image

    return torch.stack([model.preprocessing(load_image(path, draft=model.preprocessing.draft_size)) for path in sorted(EXAMPLES.glob("*.jpg"))])


def test_an_exported_encoder_gives_pytorch_s_features_and_captions(cache):
    _, path, difference = cache
    assert path.is_file() and difference < 1e-3
    fast, plain = Captioner.load("default", decoder_compute="float32"), Captioner.load("default", encoder_runtime="torch", decoder_compute="float32")
    assert isinstance(fast.encoder_runtime, OnnxEncoder) and plain.encoder_runtime is None
    images = pixels(plain)
    assert torch.allclose(fast.features(images), plain.features(images), atol=1e-3)  # both views, in one call
    for photo in sorted(EXAMPLES.glob("*.jpg")):  # float32 decoding: the whole 3-best list, and its scores
        ours, theirs = fast.caption(photo, n_best=3).n_best, plain.caption(photo, n_best=3).n_best
        assert [r.text for r in ours] == [r.text for r in theirs] and all(abs(a.score - b.score) < 1e-3 for a, b in zip(ours, theirs))
    # int8 decoding rounds each step's inputs with a scale set by the largest: the best caption stays,
    # the runners-up of a beam of 3 can change with a difference of 1e-5 in the features
    fast_int8, plain_int8 = Captioner.load("default"), Captioner.load("default", encoder_runtime="torch")
    assert [fast_int8.caption(photo).text for photo in sorted(EXAMPLES.glob("*.jpg"))] == [plain_int8.caption(photo).text for photo in sorted(EXAMPLES.glob("*.jpg"))]


def test_the_runtime_s_threads_sleep_between_runs(cache):
    # spinning onnxruntime workers kept the cores from the decoding after each encoder call
    session = Captioner.load("default").encoder_runtime.session(2)
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_without_an_export_pytorch_encodes_and_insisting_on_onnx_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path))
    assert Captioner.load("default").encoder_runtime is None
    with pytest.raises(ConfigError, match=r"its encoder was not exported yet \(run 'captioner export"):
        Captioner.load("default", encoder_runtime="onnx")
    with pytest.raises(ConfigError, match=r"cannot encode with onnxruntime in int8: its encoder was not exported in int8 yet \(run 'captioner export MODEL --int8'\)"):
        Captioner.load("default", encoder_runtime="onnx-int8")
    with pytest.raises(ConfigError, match="encoder runtime must be one of auto, torch, onnx, onnx-int8"):
        Captioner.load("default", encoder_runtime="tensorrt")


def test_a_damaged_export_is_one_line(cache, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(cache[1].read_bytes()[:1000])
    import onnxruntime

    with pytest.raises(ConfigError, match="cannot load the exported encoder .* export it again"):
        OnnxEncoder(broken, onnxruntime)(torch.zeros(1, 3, 260, 260))


def test_fine_tuning_and_other_encoders_never_use_an_export(cache):
    model = Captioner.load("default")
    assert model.encoder_runtime is not None
    key = encoder_key(model)
    model.fine_tune_encoder(1)
    assert model.encoder_runtime is None and encoder_key(model) is None and onnx_path(model) is None  # its weights are its own now
    assert find_encoder_runtime(model, "auto") is None
    with pytest.raises(ConfigError, match="comes with its checkpoint"):
        find_encoder_runtime(model, "onnx")
    from conftest import make_model

    other = make_model("attention", pretrained=True)  # EfficientNet-Lite0: a different encoder, a different file
    assert encoder_key(other) != key and not onnx_path(other).exists()


def test_the_export_command_and_the_caption_flag(tmp_path):
    env = {**os.environ, "CAPTIONER_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "captioner"]
    refused = subprocess.run([*command, "caption", "examples/dog.jpg", "--encoder-runtime", "onnx"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        "captioner caption: error: cannot encode with onnxruntime: its encoder was not exported yet (run 'captioner export MODEL')"
    ]
    missing = subprocess.run([*command, "export", "default", str(tmp_path / "missing.jpg")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"captioner export: error: {tmp_path / 'missing.jpg'} is not a photo file (no such file): give photos to check the export on"
    ]
    exported = subprocess.run([*command, "export", "default"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert exported.returncode == 0 and "features within" in exported.stdout, exported.stderr
    fast = subprocess.run([*command, "caption", "examples/dog.jpg", "--encoder-runtime", "onnx"], cwd=ROOT, env=env, capture_output=True, text=True)
    plain = subprocess.run([*command, "caption", "examples/dog.jpg", "--encoder-runtime", "torch"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert fast.returncode == plain.returncode == 0 and fast.stdout == plain.stdout


# ----- the int8 export -----------------------------------------------------------------------------


def fixed_input():
    return torch.rand(2, 3, 260, 260, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_the_int8_export_rounds_with_the_shipped_ranges_whatever_photos_check_it(cache):
    model = Captioner.load("default", encoder_runtime="torch")
    images = pixels(model)
    path, difference = export_encoder(model, images, int8=True)
    assert path == onnx_path(model, int8=True) and path.name.endswith("-int8.onnx") and path.stat().st_size < cache[1].stat().st_size / 3
    assert 0.01 < difference <= onnx_encoder.INT8_TOLERANCE  # int8: close, not equal (0.21 on the examples)
    import onnxruntime

    first = OnnxEncoder(path, onnxruntime)(fixed_input())
    export_encoder(model, images.flip(-1), int8=True)  # other photos to check on: the same ranges, the same file
    assert torch.equal(OnnxEncoder(path, onnxruntime)(fixed_input()), first)
    fast = Captioner.load("default", encoder_runtime="onnx-int8")
    assert fast.encoder_runtime.name == "onnx-int8" and Captioner.load("default").encoder_runtime.name == "onnx"  # auto keeps float32
    dog = fast.caption(EXAMPLES / "dog.jpg")
    assert "dog" in dog.words and dog.tags[0][0] == "dog"


def test_an_encoder_without_shipped_ranges_is_calibrated_on_the_photos_given(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_encoder, "INT8_RANGES_FILE", tmp_path / "none.json")
    model = Captioner.load("default", encoder_runtime="torch")
    few = pixels(model)
    with pytest.raises(ConfigError, match=r"no int8 ranges ship for this encoder \(efficientnet_lite2-head-260\): give at least 32 photos"):
        export_encoder(model, few, int8=True)
    noise = torch.Generator().manual_seed(1)
    photos = torch.cat([few, few.flip(-1)] * 6)[:32]
    photos = (photos + 0.05 * torch.randn(photos.shape, generator=noise)).clamp(-1, 1)  # 32 photos near the examples
    path, difference = export_encoder(model, photos, int8=True)
    assert difference <= onnx_encoder.INT8_TOLERANCE


def test_an_int8_export_is_named_for_the_ranges_it_was_rounded_with(cache, tmp_path, monkeypatch):
    # an upgrade that ships other ranges must not meet a stale int8 file: its name changes with them,
    # and the float32 export's does not; with no ranges shipped (calibrated on your photos) it has none
    model = Captioner.load("default", encoder_runtime="torch")
    shipped, float32 = onnx_path(model, int8=True), onnx_path(model)
    ranges = json.loads(onnx_encoder.INT8_RANGES_FILE.read_text())
    entry = ranges["encoders"]["efficientnet_lite2-head-260"]["ranges"]
    first = sorted(entry)[0]
    entry[first] = [entry[first][0], entry[first][1] * 1.01]
    monkeypatch.setattr(onnx_encoder, "INT8_RANGES_FILE", tmp_path / "ranges.json")
    onnx_encoder.INT8_RANGES_FILE.write_text(json.dumps(ranges))
    assert onnx_path(model, int8=True) != shipped and onnx_path(model, int8=True).name.endswith("-int8.onnx")
    assert onnx_path(model) == float32
    monkeypatch.setattr(onnx_encoder, "INT8_RANGES_FILE", tmp_path / "none.json")
    assert onnx_path(model, int8=True).name == float32.name.replace(".onnx", "-int8.onnx")


def test_shipped_ranges_that_do_not_fit_the_graph_are_refused(cache, tmp_path, monkeypatch):
    shipped = json.loads(onnx_encoder.INT8_RANGES_FILE.read_text())
    ranges = shipped["encoders"]["efficientnet_lite2-head-260"]["ranges"]
    ranges.pop(sorted(ranges)[0])  # as if the graph had a tensor the ranges were not measured on
    monkeypatch.setattr(onnx_encoder, "INT8_RANGES_FILE", tmp_path / "ranges.json")
    onnx_encoder.INT8_RANGES_FILE.write_text(json.dumps(shipped))
    model = Captioner.load("default", encoder_runtime="torch")
    before = onnx_path(model, int8=True).read_bytes() if onnx_path(model, int8=True).exists() else None
    with pytest.raises(ConfigError, match=r"the shipped int8 ranges do not fit this encoder's graph \(1 tensors differ"):
        export_encoder(model, pixels(model), int8=True)
    assert (onnx_path(model, int8=True).read_bytes() if onnx_path(model, int8=True).exists() else None) == before  # an earlier export is kept
