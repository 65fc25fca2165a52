"""load_image on every kind of awkward file, and Preprocessing."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data.images import Preprocessing, list_images, load_image
from captioner.errors import ConfigError, ImageLoadError


def _jpeg_bytes(image, **save):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return buffer.getvalue()


def test_rgb_jpeg_loads(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert abs(int(image.getpixel((5, 5))[0]) - 200) < 8


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_zero_byte_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty.* the file is empty"):
        load_image(path)


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, format):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format)
    path = tmp_path / f"cut.{format.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=rf"cut\.{format.lower()}: truncated or corrupt"):
        load_image(path)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match=r"notes\.jpg: not an image"):
        load_image(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(path)  # 81 M pixels in a ~10 kB file
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageLoadError, match=r"too large \(9000x9000 exceeds"):
        load_image(path)
    assert load_image(path, max_pixels=100_000_000).size == (9000, 9000)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    red, green, blue = load_image(path).getpixel((10, 10))
    assert red > 200 and green < 60 and blue < 60


def test_16_bit_grayscale_png(tmp_path):
    path = tmp_path / "deep.png"
    values = np.full((10, 10), 65535, dtype=np.uint16)
    values[:, :5] = 32768
    Image.fromarray(values).save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((8, 5)) == (255, 255, 255)
    assert 125 <= image.getpixel((2, 5))[0] <= 130


def test_dark_16_bit_image_stays_dark(tmp_path):
    # the scale is the file's bit depth, not the brightest pixel: a 16-bit value of 200 is near black
    path = tmp_path / "dark.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    assert load_image(path).getpixel((3, 3)) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["F", "I;16"])
def test_deep_images_are_scaled_a_block_of_rows_at_a_time(tmp_path, mode):
    # a 32-bit float or 16-bit TIFF is scaled to 8 bits in 64-bit arithmetic; done on the whole image
    # that took 7 to 13 times the decoded pixels' size (a 64-megapixel float TIFF of 400 KB: 2.7 GB),
    # now a block of rows at a time (2 to 2.4 times); NaN reads as black, infinity as white, the
    # values as before
    import tracemalloc

    rng = np.random.default_rng(0)
    if mode == "F":
        values = (rng.random((3000, 3000)) * 300).astype(np.float32)
        values[0, :3] = [np.nan, np.inf, -5.0]
    else:
        values = (rng.random((3000, 3000)) * 65535).astype(np.uint16)
    path = tmp_path / "deep.tiff"
    Image.fromarray(values, mode="F" if mode == "F" else None).save(path)
    decoded = np.asarray(Image.open(path))
    tracemalloc.start()
    try:
        image = load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * decoded.nbytes, (peak, decoded.nbytes)  # the decoded pixels, their 8-bit and RGB copies, a block
    wide = decoded.astype(np.float64)
    if mode == "F":
        with np.errstate(over="ignore"):
            expected = np.clip(np.nan_to_num(wide) / 255.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        expected = np.clip(decoded.astype(np.int64) * 255 // 65535, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(image)[:, :, 0], expected)
    if mode == "F":
        assert np.asarray(image)[0, :3, 0].tolist() == [0, 255, 0]


def test_a_pipe_is_read_as_an_image_and_an_endless_stream_is_refused(tmp_path, monkeypatch):
    # a named pipe or <(cat photo.jpg) has no size until read: it used to be "the file is empty";
    # a stream is read up to MAX_STREAM_BYTES, so /dev/zero is one line instead of all the memory
    import os
    import threading

    from captioner.data import images as images_module

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photo)
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_bytes(photo.read_bytes()))
    writer.start()
    image = load_image(pipe)
    writer.join(timeout=30)
    assert image.size == (40, 30) and image.getpixel((5, 5))[0] > 150
    monkeypatch.setattr(images_module, "MAX_STREAM_BYTES", 1 << 20)
    with pytest.raises(ImageLoadError, match=r"cannot read image /dev/zero: more than 1 MB, more than any image this reads"):
        load_image("/dev/zero")
    with pytest.raises(ImageLoadError, match=r"<standard input>: more than 1 MB"):
        images_module.read_stream(io.BytesIO(b"\0" * (2 << 20)), "<standard input>")


def test_any_decoder_exception_is_a_load_error(tmp_path, monkeypatch):
    # Pillow's decoders raise more than OSError on damaged files (NotImplementedError for an unknown
    # DDS pixel format, struct.error, IndexError ...): each must name the file, never escape.
    path = tmp_path / "odd.png"
    Image.new("RGB", (4, 4)).save(path)

    def broken_load(self):
        raise NotImplementedError("Unimplemented pixel format 0")

    monkeypatch.setattr(Image.Image, "load", broken_load)
    with pytest.raises(ImageLoadError, match="odd.png.*truncated or corrupt.*Unimplemented pixel format"):
        load_image(path)


def test_palette_with_transparency_composited_on_white(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((5, 5), 1)
    image.info["transparency"] = 0
    image.save(path, transparency=0)
    loaded = load_image(path)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert loaded.getpixel((5, 5)) == (255, 0, 0)


def test_rgba_and_la(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    assert load_image(rgba).getpixel((1, 1)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert load_image(la).getpixel((1, 1)) == (0, 0, 0)


def test_exif_orientation_applied(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90-degree clockwise turn
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (20, 60)
    assert loaded.getpixel((10, 3))[0] > 200  # the strip is now along the top


def test_animated_gif_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    red, green, blue = load_image(path).getpixel((4, 4))
    assert red > 200 and blue < 50


def test_one_pixel_and_panorama(tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tiny)
    assert load_image(tiny).size == (1, 1)
    assert Preprocessing(image_size=64)(load_image(tiny)).shape == (3, 64, 64)
    wide = tmp_path / "wide.jpg"
    Image.new("RGB", (6000, 40), (0, 128, 0)).save(wide)
    for resize in ("squash", "crop"):
        assert Preprocessing(image_size=64, resize=resize)(load_image(wide)).shape == (3, 64, 64)


def test_bytes_arrays_and_streams():
    data = _jpeg_bytes(Image.new("RGB", (16, 16), (0, 255, 0)))
    assert load_image(data).size == (16, 16)
    assert load_image(io.BytesIO(data)).size == (16, 16)
    with pytest.raises(ImageLoadError, match=r"<uploaded image>: the file is empty"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="upload.png: not an image"):
        load_image(b"GIF89a nonsense", name="upload.png")
    assert load_image(np.zeros((5, 7), dtype=np.uint8)).size == (7, 5)
    assert load_image(np.ones((5, 7, 3), dtype=np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.zeros((5, 7, 4), dtype=np.uint8)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((5, 7, 2), dtype=np.uint8))


def test_draft_decoding_keeps_at_least_the_requested_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (9, 9, 9)).save(path)
    image = load_image(path, draft=224)
    assert min(image.size) >= 224 and image.size[0] < 1600


def test_preprocessing_values_and_modes():
    image = Image.new("RGB", (300, 200), (255, 0, 128))
    tensor = Preprocessing(image_size=224)(image)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 100, 100], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-5)
    # crop mode: short side to 224 + 32 then a centre crop keeps the middle of a striped image
    striped = Image.new("RGB", (400, 256), (0, 0, 0))
    striped.paste((255, 255, 255), (0, 0, 50, 256))  # white band on the far left is cropped away
    assert Preprocessing(image_size=224, resize="crop")(striped).max() < -0.9
    assert Preprocessing(image_size=224, resize="squash")(striped).max() > 0.9
    with pytest.raises(ConfigError, match="resize must be 'squash' or 'crop'"):
        Preprocessing(resize="stretch")
    assert Preprocessing.from_dict(Preprocessing(image_size=96, resize="crop").to_dict()) == Preprocessing(image_size=96, resize="crop")


def test_list_images(tmp_path):
    for name in ("b.jpg", "a.PNG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_images([tmp_path])] == ["a.PNG", "b.jpg"]
    assert [p.name for p in list_images([str(tmp_path / "*.jpg")])] == ["b.jpg"]
    assert [p.name for p in list_images([str(tmp_path / "*")])] == ["a.PNG", "b.jpg"]  # a glob picks images, as a folder does
    assert [p.name for p in list_images([tmp_path / "missing.jpg"])] == ["missing.jpg"]


def test_crop_of_an_extreme_panorama_never_makes_the_whole_resized_image():
    # "Short side to 256, then crop" of a 2000 x 1 image would first make a 512000 x 256 image
    # (500 MB); the crop resizes only the centre square. Peak memory of a fresh process proves it,
    # before a 100000 x 1 panorama (25 GB the old way) is tried.
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from PIL import Image\n"
        "from captioner.data.images import Preprocessing\n"
        "crop = Preprocessing(224, resize='crop')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for size in [(2000, 1), (1, 2000), (4000, 40)]:\n"
        "    assert crop.resize_image(Image.new('RGB', size, 'red')).size == (224, 224)\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "assert grown < 50_000, f'peak memory grew {grown} KiB'\n"
        "assert crop.resize_image(Image.new('RGB', (100000, 1), 'red')).size == (224, 224)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_crop_resizes_the_short_side_then_crops_the_centre():
    # the same pixels (to within one level in a few places) as resizing the whole image to a short
    # side of image_size + crop_padding and cropping the centre, which it never does
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8))
    resized = image.resize((385, 256), Image.BICUBIC)  # 451 * 256 / 300 = 384.9
    expected = np.asarray(resized.crop((80, 16, 304, 240)), dtype=np.int16)
    got = np.asarray(Preprocessing(224, resize="crop", crop_padding=32).resize_image(image), dtype=np.int16)
    assert np.abs(got - expected).max() <= 1 and np.abs(got - expected).mean() < 0.01
    assert Preprocessing(224, resize="crop").crop_box(451, 300) == pytest.approx((80 * 451 / 385, 16 * 300 / 256, 304 * 451 / 385, 240 * 300 / 256))
    assert Preprocessing(224, resize="squash").crop_box(451, 300) == (0, 0, 451, 300)


def test_torch_tensors_are_images_and_other_types_are_one_line_errors():
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    chw = torch.from_numpy(np.array(picture)).permute(2, 0, 1)  # (3, H, W) uint8, as torchvision gives
    assert np.array_equal(np.asarray(load_image(chw)), np.asarray(picture))
    as_float = np.asarray(load_image(chw.float() / 255))  # floats in [0, 1]
    assert np.abs(as_float.astype(int) - np.asarray(picture).astype(int)).max() <= 1
    assert load_image(chw[:1]).size == (30, 20) and load_image(chw[0]).mode == "RGB"  # one channel, or (H, W)
    with pytest.raises(ImageLoadError, match=r"shape \(2, 3, 20, 30\) is not an image"):
        load_image(chw.unsqueeze(0).repeat(2, 1, 1, 1))
    for wrong, shown in [(None, "<NoneType>"), (5, "<int>"), ([1, 2], "<list>")]:
        with pytest.raises(ImageLoadError, match=f"{shown}: not an image: give a file path, .* a torch tensor"):
            load_image(wrong)
    with pytest.raises(ImageLoadError, match="'': an empty path"):
        load_image("")
