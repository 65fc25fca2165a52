"""Attention pictures: smooth upsampling that keeps the mass in place, one titled panel per word."""

import numpy as np
import pytest
from PIL import Image

from captioner.data.images import Preprocessing
from captioner.visualize import attention_figure, encoder_view, figure_grid, save_attention_figure, upsample_attention


def peaked_grid(row, col, shape=(7, 7)):
    grid = np.zeros(shape, dtype=np.float32)
    grid[row, col] = 1.0
    return grid


def test_upsample_keeps_the_mass_where_it_was():
    width, height = 300, 200  # not square: catches (W, H) / (H, W) mix-ups
    heat = upsample_attention(peaked_grid(0, 0), (width, height))
    assert heat.shape == (height, width)
    assert heat.min() >= 0
    assert heat.sum() == pytest.approx(1.0, rel=1e-4)  # same total mass as the grid
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert row < height / 7 and col < width / 7  # the peak is in the top-left cell's region
    assert heat[: height // 4, : width // 4].sum() > 0.9  # and nearly all the mass is up there

    heat = upsample_attention(peaked_grid(6, 3), (width, height))
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert row > height * 6 / 7 - 1 and 3 / 7 * width <= col < 4 / 7 * width


def test_upsample_is_smooth_not_blocky():
    grid = np.random.default_rng(0).dirichlet(np.ones(49)).reshape(7, 7).astype(np.float32)
    heat = upsample_attention(grid, (224, 224))
    steps = np.abs(np.diff(heat, axis=1))
    # nearest-neighbour upsampling would put each cell's whole jump in one pixel step
    blocky = np.abs(np.diff(np.kron(grid, np.ones((32, 32))), axis=1)).max()
    assert steps.max() < 0.5 * blocky
    uniform = upsample_attention(np.full((7, 7), 1 / 49, dtype=np.float32), (70, 70))
    assert np.allclose(uniform, uniform.mean(), rtol=1e-3)


def test_upsample_rejects_bad_input():
    with pytest.raises(ValueError):
        upsample_attention(np.zeros((2, 3, 4)), (10, 10))
    with pytest.raises(ValueError):
        upsample_attention(np.ones((2, 2)), (0, 10))


def test_figure_has_the_image_then_one_panel_per_word():
    image = Image.new("RGB", (120, 90), "tan")
    words = ["a", "dog", "costs", "$5", "<unk>", "today"]  # '$' must not start matplotlib mathtext
    attention = np.random.default_rng(1).dirichlet(np.ones(12), size=len(words)).reshape(len(words), 3, 4)
    figure = attention_figure(image, words, attention, columns=4)
    axes = figure.axes
    assert len(axes) == len(words) + 1
    assert axes[0].get_title() == " ".join(words)
    assert [ax.get_title() for ax in axes[1:]] == words
    assert len(axes[0].get_images()) == 1  # the plain image
    assert all(len(ax.get_images()) == 2 for ax in axes[1:])  # image + heat map
    figure.canvas.draw()  # renders without a display

    figure = attention_figure(image, words[:2], attention[:2], caption="a dog")
    assert figure.axes[0].get_title() == "a dog"


def test_figure_checks_words_against_attention():
    with pytest.raises(ValueError, match="3 maps for 2 words"):
        attention_figure(Image.new("RGB", (20, 20)), ["a", "b"], np.ones((3, 2, 2)) / 4)


def test_save_writes_a_png_atomically(tmp_path):
    words = ["a", "b", "c", "d", "e", "f", "g"]
    attention = np.full((len(words), 7, 7), 1 / 49, dtype=np.float32)
    path = save_attention_figure(tmp_path / "out" / "fig.png", Image.new("RGB", (64, 64), "navy"), words, attention, columns=5)
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
    rows, columns = figure_grid(len(words) + 1, 5)
    assert (rows, columns) == (2, 5)
    assert width == pytest.approx(columns * 240, abs=2) and height > width / columns * rows
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["fig.png"]  # no temporary file left


def test_encoder_view_matches_the_preprocessing():
    image = Image.new("RGB", (400, 200))
    assert encoder_view(image, Preprocessing(resize="squash")) is image
    crop = encoder_view(image, Preprocessing(image_size=224, resize="crop", crop_padding=32))
    assert crop.size == (175, 175)  # 200 * 224 / 256, centred


def test_figure_grid():
    assert figure_grid(1, 5) == (1, 1)
    assert figure_grid(5, 5) == (1, 5)
    assert figure_grid(6, 5) == (2, 5)
    assert figure_grid(11, 5) == (3, 5)
