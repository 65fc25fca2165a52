"""The wheel carries everything captioner reads at run time: the shipped model and its data files."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Files the code opens beside itself (models, concept and object word lists, word vectors, the page).
DATA_FILES = [
    "captioner/pretrained/default/model.safetensors",
    "captioner/pretrained/default/config.json",
    "captioner/pretrained/default/vocab.json",
    "captioner/models/imagenet_concepts.json",
    "captioner/models/word_vectors.npz",
    "captioner/metrics/coco_objects.json",
    "captioner/serve/static/index.html",
    "captioner/serve/static/app.js",
]


def test_the_wheel_carries_the_model_and_every_data_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("captioner-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in DATA_FILES if name not in names]
    assert not missing, missing
    for name in DATA_FILES:  # each also exists in the source tree the tests run from
        assert (ROOT / "src" / name).is_file(), name
