"""One matrix of awkward image files, through all three places images enter captioner.

* ``captioner prepare`` (a subprocess) keeps the good ones and drops each bad one, counting it under
  its reason in ``prepared.json``;
* ``captioner caption`` (one subprocess over a folder of every case) captions the good ones, reports
  each bad one on one stderr line and exits 1;
* the web API (``POST /api/caption`` on a real server) captions the good ones and answers each bad one
  with a 4xx JSON error, and keeps serving.

Bad: an empty file, a truncated JPEG and PNG, text named ``.jpg``, and two decompression bombs (tiny
PNG files whose headers claim 100000x100000 and 10000x10000 pixels). Good but unusual: CMYK JPEG,
16-bit greyscale PNG, palette PNG with transparency, EXIF-rotated JPEG, animated GIF, 1x1 pixel, and
a 4000x40 panorama.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from conftest import make_model
from PIL import Image

# ----- the cases ----------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(size=(64, 64), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header claims ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")


def truncated(fmt: str) -> bytes:
    data = _encode(_noise(), fmt)
    return data[: len(data) // 2]


def cmyk_jpeg() -> bytes:
    return _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")


def grey16_png() -> bytes:
    values = (np.arange(48 * 32, dtype=np.uint32).reshape(32, 48) * 40).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    return _encode(image, "PNG")


def palette_png() -> bytes:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (8, 8, 24, 24))
    return _encode(image, "PNG", transparency=0)


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 60x20 stored, 20x60 shown
    return _encode(_noise((60, 20), seed=1), "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


@dataclass(frozen=True)
class Case:
    file: str
    make: Callable[[], bytes]
    #: For bad files: what load_image says (the reason category in prepare's counts); None for good ones.
    reason: str | None = None
    #: The HTTP status the API answers a bad file with.
    status: int = 200
    #: For good files: the size the API reports (EXIF rotation applied).
    shown: tuple[int, int] | None = None


CASES = [
    Case("empty.jpg", lambda: b"", "the file is empty", 422),
    Case("truncated.jpg", lambda: truncated("JPEG"), "truncated or corrupt", 422),
    Case("truncated.png", lambda: truncated("PNG"), "truncated or corrupt", 422),
    Case("notes.jpg", lambda: b"This is a text file with a .jpg name.\n", "not an image, or a format Pillow cannot decode", 415),
    Case("bomb.png", lambda: png_claiming(100_000, 100_000), "too large", 422),  # over Pillow's own limit too
    Case("bomb-small.png", lambda: png_claiming(10_000, 10_000), "too large", 422),  # under Pillow's, over ours
    Case("cmyk.jpg", cmyk_jpeg, shown=(40, 30)),
    Case("grey16.png", grey16_png, shown=(48, 32)),
    Case("palette.png", palette_png, shown=(32, 32)),
    Case("rotated.jpg", rotated_jpeg, shown=(20, 60)),
    Case("animated.gif", animated_gif, shown=(16, 16)),
    Case("one-pixel.png", lambda: _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), shown=(1, 1)),
    Case("panorama.jpg", lambda: _encode(_noise((4000, 40), seed=2), "JPEG"), shown=(4000, 40)),
]
BAD = [case for case in CASES if case.reason]
GOOD = [case for case in CASES if not case.reason]
MIME = {".jpg": "image/jpeg", ".png": "image/png", ".gif": "image/gif"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder holding every case."""
    folder = tmp_path_factory.mktemp("bad_images") / "images"
    folder.mkdir()
    for case in CASES:
        (folder / case.file).write_bytes(case.make())
    assert (folder / "bomb.png").stat().st_size < 200 and (folder / "bomb-small.png").stat().st_size < 200
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small random decoder on the installed EfficientNet-Lite0 weights."""
    return make_model(pretrained=True).save(tmp_path_factory.mktemp("bad_images_model") / "ckpt")


def captioner(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], capture_output=True, text=True, timeout=300)


# ----- captioner prepare ----------------------------------------------------------------------------


def test_prepare_keeps_the_good_and_counts_each_bad_one_under_its_reason(images, tmp_path):
    rows = "".join(f"{case.file},a picture number {number},train\n" for number, case in enumerate(CASES))
    (tmp_path / "captions.csv").write_text("image,caption,split\n" + rows)
    out = tmp_path / "prepared"
    result = captioner("prepare", tmp_path / "captions.csv", "--images", images, "--out", out, "--min-word-freq", 1, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    meta = json.loads((out / "prepared.json").read_text())
    expected = Counter(f"unreadable image: {case.reason}" for case in BAD)
    assert meta["dropped"] == dict(expected)
    for case in BAD:
        assert case.file in meta["dropped_examples"][f"unreadable image: {case.reason}"]
    kept = [entry["image"] for entry in json.loads((out / "images.json").read_text())]
    assert sorted(kept) == sorted(case.file for case in GOOD)
    assert meta["counts"]["train"] == {"images": len(GOOD), "captions": len(GOOD), "encoded": len(GOOD)}

    # the report printed names every reason with its count and the files as examples
    for reason, count in expected.items():
        line = next(line for line in result.stdout.splitlines() if reason in line)
        assert line.split()[0] == str(count)
        assert all(case.file in line for case in BAD if f"unreadable image: {case.reason}" == reason)


# ----- captioner caption ----------------------------------------------------------------------------


def test_caption_captions_the_good_and_reports_each_bad_one_once(images, checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    result = captioner("caption", images, "--model", checkpoint, "--beam", 1, "--max-length", 5, "--json", out, "--quiet")
    assert result.returncode == 1, result.stderr  # some images failed
    assert "Traceback" not in result.stderr

    errors = result.stderr.strip().splitlines()
    assert all(line.startswith("captioner caption: ") for line in errors), errors  # nothing else on stderr (no warnings)
    for case in BAD:
        lines = [line for line in errors if f"{images / case.file}:" in line]
        assert len(lines) == 1, (case.file, errors)
        assert case.reason in lines[0] and lines[0].endswith("(skipped)"), lines[0]
    assert errors[-1] == f"captioner caption: {len(BAD)} of {len(CASES)} inputs could not be captioned"
    assert len(errors) == len(BAD) + 1

    captions = dict(line.split("\t") for line in result.stdout.splitlines())
    assert sorted(captions) == sorted(str(images / case.file) for case in GOOD)
    assert all(set(caption.split()) <= {"a", "b", "c"} for caption in captions.values())
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(record["source"] for record in records) == sorted(captions)


# ----- the web API ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(checkpoint):
    pytest.importorskip("fastapi")
    import httpx

    from captioner.models.captioner import Captioner
    from captioner.serve import BackgroundServer, ServeConfig, create_app

    app = create_app(Captioner.load(checkpoint), ServeConfig(beam_size=1, n_best=1, batch_wait_ms=0, max_upload_mb=1))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


def post(client, case: Case, images: Path):
    data = (images / case.file).read_bytes()
    return client.post("/api/caption", files={"image": (case.file, data, MIME[Path(case.file).suffix])})


@pytest.mark.parametrize("case", BAD, ids=lambda case: case.file)
def test_the_api_refuses_each_bad_image_with_a_json_4xx_and_keeps_serving(client, images, case):
    response = post(client, case, images)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert case.file in body["error"] and case.reason in body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]

    assert client.get("/healthz").json()["status"] == "ok"
    assert post(client, GOOD[0], images).status_code == 200  # the next upload is captioned as usual


@pytest.mark.parametrize("case", GOOD, ids=lambda case: case.file)
def test_the_api_captions_each_unusual_but_good_image(client, images, case):
    response = post(client, case, images)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["caption"], str) and set(body["words"]) <= {"a", "b", "c"}
    assert (body["width"], body["height"]) == case.shown
