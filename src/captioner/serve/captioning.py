"""The model side of the server: uploads -> encoder input, batches -> captions, captions -> JSON.

:func:`prepare_upload` runs in a request's thread (decoding and resizing photos in parallel);
:class:`ModelRunner` is what the batcher's single worker thread calls with a whole batch: one
:func:`~captioner.decoding.generate` call over all its images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from captioner.serve.config import DecodeSettings

if TYPE_CHECKING:
    import torch

    from captioner.data.images import Preprocessing
    from captioner.models.captioner import Captioner, CaptionResult

#: Decimal places of the attention weights sent to the page (a 7 x 7 grid per word).
ATTENTION_DECIMALS = 4
#: EXIF orientations that swap width and height (rotations by 90 or 270 degrees).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class Region:
    """The part of the image the encoder saw (and its attention grid covers), as fractions of its size."""

    left: float = 0.0
    top: float = 0.0
    right: float = 1.0
    bottom: float = 1.0

    def to_dict(self) -> dict[str, float]:
        return {"left": round(self.left, 6), "top": round(self.top, 6), "right": round(self.right, 6), "bottom": round(self.bottom, 6)}


@dataclass(frozen=True)
class PreparedImage:
    """An upload, decoded and preprocessed: ready to be stacked into a batch."""

    pixels: torch.Tensor  # (3, S, S), the encoder's input
    width: int  # of the image as shown (EXIF orientation applied)
    height: int
    region: Region


def encoder_region(width: int, height: int, preprocessing: Preprocessing) -> Region:
    """Where the encoder's square input lies in a ``width`` x ``height`` image.

    ``resize="squash"`` stretches the whole image, so the grid covers all of it; ``resize="crop"``
    keeps a centred square whose side is ``image_size / (image_size + crop_padding)`` of the short side.
    """
    left, top, right, bottom = preprocessing.crop_box(width, height)
    return Region(left / width, top / height, right / width, bottom / height)


def prepare_upload(data: bytes, name: str, preprocessing: Preprocessing, max_pixels: int | None = None) -> PreparedImage:
    """Decode an uploaded file (raises :class:`~captioner.errors.ImageLoadError`, also for an image of
    more than ``max_pixels`` decoded pixels) into encoder input."""
    from captioner.data.images import load_image

    # JPEG: decoded at reduced size, much faster for photos (and what max_pixels counts)
    image = load_image(data, name=name, draft=preprocessing.draft_size, max_decoded_pixels=max_pixels)
    width, height = shown_size(data, fallback=image.size)
    return PreparedImage(preprocessing(image), width, height, encoder_region(width, height, preprocessing))


def shown_size(data: bytes, *, fallback: tuple[int, int]) -> tuple[int, int]:
    """The full size of an (already validated) image, as shown: EXIF rotation applied.

    ``load_image`` may decode a JPEG at a fraction of its size; the page wants the real one. Only
    the header is read here.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            orientation = probe.getexif().get(0x0112)
    except Exception:  # the image loaded before, so this is unexpected; the decoded size is close
        return fallback
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


class ModelRunner:
    """Captions a batch of prepared images with one ``generate`` call; used by one thread only."""

    def __init__(self, model: Captioner) -> None:
        self.model = model

    def __call__(self, settings: DecodeSettings, images: list[PreparedImage]) -> list[CaptionResult]:
        import torch

        pixels = torch.stack([image.pixels for image in images])  # (B, 3, S, S)
        return self.model.caption_batch(pixels, settings.generation, ["<upload>"] * len(images))


def attention_grids(attention: np.ndarray | None) -> list[list[list[float]]] | None:
    """(T, h, w) weights -> nested lists, rounded; None stays None (a model without attention)."""
    if attention is None:
        return None
    return np.round(np.asarray(attention, dtype=np.float64), ATTENTION_DECIMALS).tolist()


def caption_json(result: CaptionResult, image: PreparedImage, settings: DecodeSettings, *, has_attention: bool) -> dict[str, Any]:
    """The ``POST /api/caption`` answer for one image (timings are added by the caller).

    ``attention`` is one (h, w) grid per word (``attention_shape`` = [h, w]), or None for a model
    without attention; an attention model's empty caption has an empty list.
    """
    attention = result.attention
    grids = attention_grids(attention)
    if grids is None and has_attention:
        grids = []
    return {
        "caption": result.text,
        "words": result.words,
        "score": round(result.score, 4),
        "log_prob": round(result.log_prob, 4),
        "n_best": [
            {"caption": r.text, "words": r.words, "score": round(r.score, 4), "log_prob": round(r.log_prob, 4)}
            for r in result.n_best or [result]
        ],
        "tags": [{"word": word, "probability": round(probability, 4)} for word, probability in result.tags],
        "constraints": result.constraints,
        "constraints_met": result.constraints_met,
        "familiar": result.familiar,
        "width": image.width,
        "height": image.height,
        "attention": grids,
        "attention_shape": list(attention.shape[1:]) if attention is not None else None,
        "attention_region": image.region.to_dict(),
        "settings": settings.to_dict(),
    }
