"""Attention pictures: where a Show, Attend and Tell model looked for each word it wrote.

:func:`attention_figure` draws the figure from the paper (Xu et al. 2015, figure 3): the image with
the whole caption first, then one panel per generated word with that word's attention map smoothly
upsampled to the image and blended over it with a colour map. :func:`save_attention_figure` writes
it as a PNG, atomically. :func:`upsample_attention` is the reusable smoothing step.

Figures are built on matplotlib's Agg canvas directly (no ``pyplot``, no global state, no display),
so this module is safe to call from a server thread. matplotlib is imported only when a figure is
drawn, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from captioner.atomic import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from captioner.data.images import Preprocessing

#: Longest side, in pixels, an image is shrunk to before it is drawn (each panel is ~240 px wide).
DISPLAY_SIDE = 320
#: Width of one panel in inches; at the default 100 dpi a panel is 240 pixels wide.
PANEL_INCHES = 2.4
#: Extra height per row for the panel title, in inches.
TITLE_INCHES = 0.4
#: Characters per line of the wrapped caption above the first panel.
CAPTION_WRAP = 34


def upsample_attention(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Smoothly upsample an attention grid (h, w) to an image's ``size`` = (W, H); returns (H, W).

    Bicubic interpolation of the grid (each cell covers its share of the image, as the encoder's
    regions do), clipped at zero (bicubic overshoots a little next to sharp peaks) and rescaled so
    the map holds the same total mass as the grid. So the peak stays where the grid's mass is, and a
    map of weights that sum to 1 still sums to 1.
    """
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim != 2 or grid.shape[0] == 0 or grid.shape[1] == 0:
        raise ValueError(f"attention grid must be a non-empty (h, w) array, not shape {grid.shape}")
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive (width, height), not {size}")
    grid = np.nan_to_num(np.clip(grid, 0.0, None))
    smooth = np.asarray(Image.fromarray(np.ascontiguousarray(grid)).resize((width, height), Image.BICUBIC), dtype=np.float32)
    smooth = np.clip(smooth, 0.0, None)
    total = float(smooth.sum())
    mass = float(grid.sum())
    if total > 0.0:
        smooth *= mass / total
    return smooth


def encoder_view(image: Image.Image, preprocessing: "Preprocessing") -> Image.Image:
    """The part of ``image`` the encoder saw, so attention grids line up with the picture.

    ``resize="squash"`` shows the encoder the whole image (stretched to a square): the grid covers
    all of it. ``resize="crop"`` shows only a centred square; this returns that square.
    """
    if preprocessing.resize != "crop":
        return image
    left, top, right, bottom = preprocessing.crop_box(*image.size)
    width, height = round(right - left), round(bottom - top)
    return image.crop((round(left), round(top), round(left) + width, round(top) + height))


def figure_grid(panels: int, columns: int = 5) -> tuple[int, int]:
    """(rows, columns) of the panel grid for ``panels`` panels, at most ``columns`` per row."""
    if columns < 1:
        raise ValueError(f"columns must be at least 1, not {columns}")
    columns = max(1, min(columns, panels))
    return math.ceil(panels / columns), columns


def _display_image(image: Image.Image) -> Image.Image:
    image = image.convert("RGB") if image.mode != "RGB" else image
    if max(image.size) > DISPLAY_SIDE:
        scale = DISPLAY_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    return image


def _check_inputs(words: Sequence[str], attention: np.ndarray) -> np.ndarray:
    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim != 3:
        raise ValueError(f"attention must be (words, h, w), not shape {attention.shape}")
    if attention.shape[0] != len(words):
        raise ValueError(f"attention has {attention.shape[0]} maps for {len(words)} words")
    return attention


def attention_figure(
    image: Image.Image,
    words: Sequence[str],
    attention: np.ndarray,
    *,
    columns: int = 5,
    caption: str | None = None,
    cmap: str = "jet",
    alpha: float = 0.55,
) -> "Figure":
    """The image with the caption, then one panel per word with its attention map overlaid.

    ``attention`` is (len(words), h, w) as in :attr:`CaptionResult.attention`. The first panel's title
    is ``caption`` (default: the words joined), each other panel's title is its word. The figure has
    exactly ``len(words) + 1`` axes, ``columns`` to a row.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    attention = _check_inputs(words, attention)
    shown = _display_image(image)
    pixels = np.asarray(shown)
    width, height = shown.size
    rows, cols = figure_grid(len(words) + 1, columns)
    aspect = min(max(height / width, 0.5), 2.0)
    figure = Figure(figsize=(cols * PANEL_INCHES, rows * (PANEL_INCHES * aspect + TITLE_INCHES)), layout="constrained")
    FigureCanvasAgg(figure)

    first = figure.add_subplot(rows, cols, 1)
    first.imshow(pixels)
    text = caption if caption is not None else " ".join(words)
    first.set_title(textwrap.fill(text, CAPTION_WRAP) if text else "(empty caption)", fontsize=9, parse_math=False)
    first.set_axis_off()

    for index, (word, grid) in enumerate(zip(words, attention)):
        axes = figure.add_subplot(rows, cols, index + 2)
        heat = upsample_attention(grid, (width, height))
        axes.imshow(pixels)
        axes.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=float(heat.max()) or 1.0, interpolation="bilinear")
        axes.set_title(word, fontsize=11, parse_math=False)
        axes.set_axis_off()
    return figure


def save_attention_figure(
    path: str | os.PathLike,
    image: Image.Image,
    words: Sequence[str],
    attention: np.ndarray,
    *,
    columns: int = 5,
    caption: str | None = None,
    dpi: int = 100,
) -> Path:
    """Draw :func:`attention_figure` and write it to ``path`` as a PNG, atomically; returns the path."""
    path = Path(path)
    figure = attention_figure(image, words, attention, columns=columns, caption=caption)
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=dpi))
    return path
