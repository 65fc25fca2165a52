"""Image loading and preprocessing: the one place every part of captioner reads pictures.

:func:`load_image` turns a path, bytes, file object, PIL image or numpy array into an RGB
``PIL.Image`` (EXIF orientation applied, any mode converted, size limited) or raises
:class:`~captioner.errors.ImageLoadError` with a one-line message naming the file.
:class:`Preprocessing` turns that image into the normalised tensor an encoder expects.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner import ranges
from captioner.errors import ImageLoadError

if TYPE_CHECKING:  # torch is imported when a tensor is made, so reading data stays light
    import torch

#: Largest image (width x height) we decode: 8,000 x 8,000. A small file that claims more is a
#: decompression bomb; a real photo this large is pointless for a 224-pixel encoder anyway.
MAX_IMAGE_PIXELS = 64_000_000
#: Most bytes read from a stream that is not a file: an uncompressed 64-megapixel RGB TIFF is 192 MB.
MAX_STREAM_BYTES = 256 * 2**20

#: Largest encoder input side (1024 px: 32 x 32 regions of a stride-32 encoder, far past what helps captions).
MAX_INPUT_SIZE = 1024

#: Suffixes that ``captioner caption DIR`` and friends treat as images.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]


def load_image(
    source: ImageSource, *, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS, draft: int | None = None, max_decoded_pixels: int | None = None
) -> Image.Image:
    """Read an image as RGB, whatever it was stored as.

    ``source`` may be a path, raw bytes, a binary file object, a ``PIL.Image``, a numpy array
    (H, W), (H, W, 3) or (H, W, 4), or a torch tensor (C, H, W) (or (H, W)): uint8, or float in
    [0, 1] (pixels, not normalised ones). ``name`` is used in error messages
    when the source is not a path. The first frame of an animation is used. Transparent images are
    composited on white. ``draft`` lets JPEG decoding skip detail below that size (much faster
    for large photos that will be shrunk anyway); the result is at least ``draft`` on its short side.
    ``max_decoded_pixels`` refuses, before decoding, an image that would decode to more pixels than
    that (a server's memory budget: a JPEG counts at its reduced decoding size).
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source, name or "<PIL image>")
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "<array>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<uploaded image>"
        if len(source) == 0:
            raise ImageLoadError(label, "the file is empty")
        return _open(io.BytesIO(bytes(source)), label, max_pixels, draft, max_decoded_pixels)
    if hasattr(source, "read"):
        return _open(source, name or getattr(source, "name", "<stream>"), max_pixels, draft, max_decoded_pixels)  # type: ignore[arg-type]
    if _is_tensor(source):
        return _from_array(_tensor_pixels(source, name or "<tensor>"), name or "<tensor>")
    if not isinstance(source, (str, os.PathLike)):
        raise ImageLoadError(f"<{type(source).__name__}>", f"not an image: give {ACCEPTED}")
    if not str(source).strip():
        raise ImageLoadError(repr(str(source)), f"an empty path: give {ACCEPTED}")
    path = Path(source)
    label = name or str(path)
    if not path.exists():
        raise ImageLoadError(label, "no such file")
    if path.is_dir():
        raise ImageLoadError(label, "it is a directory")
    regular = path.is_file()  # not a pipe, <(...) or a device, whose size reads as 0 until read
    if regular and path.stat().st_size == 0:
        raise ImageLoadError(label, "the file is empty")
    try:
        with open(path, "rb") as handle:
            if not regular:
                return load_image(read_stream(handle, label), name=label, max_pixels=max_pixels, draft=draft, max_decoded_pixels=max_decoded_pixels)
            return _open(handle, label, max_pixels, draft, max_decoded_pixels)
    except PermissionError:
        raise ImageLoadError(label, "permission denied") from None


def read_stream(stream: BinaryIO, label: str) -> bytes:
    """All of a stream that is not a file (standard input, a pipe), refused in one line past
    :data:`MAX_STREAM_BYTES`: /dev/zero would otherwise fill the memory."""
    data = stream.read(MAX_STREAM_BYTES + 1)
    if len(data) > MAX_STREAM_BYTES:
        raise ImageLoadError(label, f"more than {MAX_STREAM_BYTES >> 20} MB, more than any image this reads")
    return data


#: What load_image accepts, for messages.
ACCEPTED = "a file path, bytes, a binary file object, a PIL image, a numpy array (H, W[, C]) or a torch tensor (C, H, W)"


def _is_tensor(source: object) -> bool:
    return type(source).__module__.split(".")[0] == "torch" and hasattr(source, "detach")


def _tensor_pixels(tensor: Any, label: str) -> np.ndarray:
    """A torch image tensor (C, H, W) with C in 1, 3, 4 (or (H, W)), as a numpy array (H, W[, C])."""
    pixels = tensor.detach().cpu()
    if pixels.dim() == 3 and pixels.shape[0] in (1, 3, 4):
        pixels = pixels.permute(1, 2, 0)
    elif pixels.dim() != 2:
        raise ImageLoadError(label, f"a tensor of shape {tuple(pixels.shape)} is not an image (C, H, W) with 1, 3 or 4 channels, or (H, W)")
    if pixels.is_floating_point():
        pixels = pixels.float()
    return pixels.numpy()


def _open(stream: BinaryIO, label: str, max_pixels: int, draft: int | None = None, max_decoded_pixels: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # We apply our own, lower pixel limit below, before decoding anything; Pillow's remarks on
            # damaged metadata ("Tag data larger than file") are not errors a user can act on.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            image = Image.open(stream)
    except Image.DecompressionBombError:
        raise ImageLoadError(label, f"too large (its dimensions exceed the {max_pixels:,}-pixel limit)") from None
    except UnidentifiedImageError:
        raise ImageLoadError(label, "not an image, or a format Pillow cannot decode") from None
    except MemoryError:
        raise
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, ValueError, NotImplementedError, struct.error ...
        raise ImageLoadError(label, f"not readable ({_reason(error)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(label, f"too large ({width}x{height} exceeds the {max_pixels:,}-pixel limit; decompression bomb?)")
    if width == 0 or height == 0:
        raise ImageLoadError(label, "it has zero width or height")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            image.seek(0)  # first frame of an animated GIF/PNG/WebP
            if draft is not None and image.format == "JPEG":
                image.draft("RGB", (draft, draft))
            decoded_width, decoded_height = image.size  # what decoding will make (after a JPEG's draft)
            if max_decoded_pixels is not None and decoded_width * decoded_height > max_decoded_pixels:
                raise ImageLoadError(
                    label, f"too large to decode here ({decoded_width}x{decoded_height} pixels; the limit is {max_decoded_pixels:,} pixels)"
                )
            image.load()
    except (MemoryError, ImageLoadError):
        raise
    except Exception as error:  # whatever a damaged file makes a decoder raise, it is this file's fault
        raise ImageLoadError(label, f"truncated or corrupt ({_reason(error)})") from None
    return _to_rgb(image, label)


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: keep the pixels as stored rather than fail
        pass
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):  # 16 bits per pixel: 65535 is white, however dark the picture
        return _from_array(np.asarray(image), label, integer_full_scale=65535)
    if mode in ("I", "F"):
        return _from_array(np.asarray(image), label)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    except (OSError, ValueError) as error:
        raise ImageLoadError(label, f"cannot convert mode {mode} to RGB ({_reason(error)})") from None


def _from_array(array: np.ndarray, label: str, integer_full_scale: int | None = None) -> Image.Image:
    """Numpy (H, W) / (H, W, 1|3|4) of any numeric dtype -> RGB image.

    Integer data is scaled by ``integer_full_scale`` where the bit depth is known (16-bit image
    files), else by the smallest of 255, 65535 or the maximum that holds every value.
    """
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageLoadError(label, f"array of shape {tuple(array.shape)} is not (H, W), (H, W, 3) or (H, W, 4)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(label, "it has zero width or height")
    if array.dtype == np.uint8:
        scaled = array
    elif array.dtype == np.bool_:
        scaled = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        peak = max((float(np.nan_to_num(rows.astype(np.float64)).max(initial=0.0)) for rows in _row_blocks(array)), default=0.0)
        top = 1.0 if peak <= 1.0 else 255.0
        with np.errstate(over="ignore"):  # inf reads as the largest float, which saturates to 255
            scaled = _scaled_by_rows(array, lambda rows: np.clip(np.nan_to_num(rows.astype(np.float64)) / top * 255.0 + 0.5, 0, 255))
    elif np.issubdtype(array.dtype, np.integer):
        top = int(array.max(initial=0))
        # 16-bit data (the common case for integer images that are not uint8) maps 65535 -> 255.
        full_scale = integer_full_scale or (255 if top <= 255 else 65535 if top <= 65535 else top)
        scaled = _scaled_by_rows(array, lambda rows: np.clip(rows.astype(np.int64) * 255 // max(full_scale, 1), 0, 255))
    else:
        raise ImageLoadError(label, f"unsupported array dtype {array.dtype}")
    image = Image.fromarray(np.ascontiguousarray(scaled))
    return _to_rgb(image, label) if image.mode != "RGB" else image


def _row_blocks(array: np.ndarray) -> Iterator[np.ndarray]:
    """The array's rows in blocks of about a million values: 64-bit arithmetic on a 64-megapixel
    image, whole, took several copies of 512 MB each."""
    step = max(1, (1 << 20) // max(1, array[0].size))
    return (array[start : start + step] for start in range(0, array.shape[0], step))


def _scaled_by_rows(array: np.ndarray, scale: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``scale`` (rows -> values 0 to 255) of every block of rows, as uint8, written into one array."""
    out = np.empty(array.shape, dtype=np.uint8)
    start = 0
    for rows in _row_blocks(array):
        out[start : start + len(rows)] = scale(rows)
        start += len(rows)
    return out


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the encoder's input tensor.

    ``resize="squash"`` resizes to ``image_size`` x ``image_size`` ignoring the aspect ratio (the
    whole picture is seen: what a captioner wants). ``resize="crop"`` is TensorFlow's EfficientNet
    evaluation transform as timm runs it: bicubic resize of the short side to ``image_size +
    crop_padding``, then a centre crop (what ImageNet classification was measured with). Pixels are scaled to [0, 1] and
    normalised with ``mean``/``std`` (EfficientNet-Lite: 0.5/0.5, i.e. [-1, 1]).
    """

    image_size: int = 224
    resize: str = "squash"
    crop_padding: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.resize not in ("squash", "crop"):
            raise ranges.SettingError("resize", f"must be 'squash' or 'crop', not {ranges.shown(self.resize)}")
        ranges.whole_number("image_size", self.image_size, 16, MAX_INPUT_SIZE)
        ranges.whole_number("crop_padding", self.crop_padding, 0, MAX_INPUT_SIZE)
        if not all(isinstance(values, (list, tuple)) and len(values) == 3 for values in (self.mean, self.std)):
            raise ranges.SettingError("mean and std", f"need one value per RGB channel, not {ranges.shown(self.mean)} and {ranges.shown(self.std)}")
        # Pixels are scaled to [0, 1] before normalising: a mean outside it, or a std near 0 (every
        # pixel a huge number), makes features no encoder was trained on.
        object.__setattr__(self, "mean", tuple(ranges.number("mean", v, 0.0, 1.0) for v in self.mean))
        object.__setattr__(self, "std", tuple(ranges.number("std", v, 0.01, 10.0) for v in self.std))

    def resize_image(self, image: Image.Image) -> Image.Image:
        size = self.image_size
        if self.resize == "squash":
            if image.size != (size, size):
                image = image.resize((size, size), Image.BICUBIC)
            return image
        # Resampling only the box gives the pixels of "resize the whole image, then crop" exactly,
        # without ever making the whole resized image (a 100000 x 1 panorama at a short side of 256
        # would be 25.6 million pixels wide).
        return image.resize((size, size), Image.BICUBIC, box=self.crop_box(*image.size))

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in pixels: the part of a ``width`` x ``height`` image the encoder sees.

        ``squash``: all of it. ``crop``: the square that resizing the short side to ``image_size +
        crop_padding`` (each side rounded to whole pixels) and cropping ``image_size`` from the
        centre keeps, mapped back to this image.
        """
        if self.resize == "squash":
            return 0.0, 0.0, float(width), float(height)
        size = self.image_size
        scale = (size + self.crop_padding) / min(width, height)
        resized_width, resized_height = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (resized_width - size) // 2, (resized_height - size) // 2
        x_scale, y_scale = resized_width / width, resized_height / height
        return left / x_scale, top / y_scale, (left + size) / x_scale, (top + size) / y_scale

    @property
    def draft_size(self) -> int:
        """The least size a JPEG is decoded at (``load_image(..., draft=)``): every way in (training,
        evaluation, the command line, the server, the Python API) decodes the same way."""
        return self.image_size + (self.crop_padding if self.resize == "crop" else 0)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> float tensor (3, image_size, image_size)."""
        import torch

        pixels = np.asarray(self.resize_image(image), dtype=np.float32) / 255.0  # (H, W, 3)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        pixels = (pixels - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, H, W)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Preprocessing":
        known = {key: values[key] for key in ("image_size", "resize", "crop_padding", "mean", "std") if key in values}
        return cls(**known)


def list_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files, directories (their image files, sorted) and glob patterns into image paths.

    Paths that do not exist are kept, so the caller reports them as unreadable images.
    """
    import glob

    found: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif not path.exists() and any(ch in str(entry) for ch in "*?["):  # a glob picks image files, as a folder does
            found.extend(sorted(p for p in map(Path, glob.glob(str(entry), recursive=True)) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        else:
            found.append(path)
    return found
