"""A generated "shapes" captioning set, for tests and the quick start.

Each image holds one to three coloured shapes in distinct columns (left, middle, right) on a light
background; each has three or four true sentences ("a red circle to the left of a blue square").
The set is deterministic from its seed and small enough to learn on a CPU in a minute, so a test can
prove that training really learns. It is written in any of the real input formats, so ``captioner
prepare`` is exercised the same way as on real data.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from captioner.data.formats import FORMATS

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (230, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
COLUMNS = ("left", "middle", "right")


@dataclass
class Shape:
    colour: str
    shape: str
    column: int  # 0 left, 1 middle, 2 right
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in pixels

    @property
    def words(self) -> str:
        return f"{self.colour} {self.shape}"


def sample_shapes(rng: random.Random, image_size: int) -> list[Shape]:
    """One to three shapes, each (colour, shape) pair distinct, each in its own column."""
    count = rng.choice((1, 2, 3))
    columns = sorted(rng.sample(range(3), count))
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    column_width = image_size / 3
    shapes = []
    for column, (colour, kind) in zip(columns, pairs):
        half = int(rng.uniform(0.28, 0.38) * column_width)
        centre_x = int((column + 0.5) * column_width + rng.uniform(-0.08, 0.08) * column_width)
        centre_y = int(rng.uniform(half + 2, image_size - half - 2))
        box = (centre_x - half, centre_y - half, centre_x + half, centre_y + half)
        shapes.append(Shape(colour, kind, column, box))
    return shapes


def render(shapes: list[Shape], image_size: int, rng: random.Random) -> Image.Image:
    tone = rng.randint(225, 255)
    image = Image.new("RGB", (image_size, image_size), (tone, tone, rng.randint(225, 255)))
    draw = ImageDraw.Draw(image)
    for item in shapes:
        fill = COLOURS[item.colour]
        left, top, right, bottom = item.box
        if item.shape == "circle":
            draw.ellipse(item.box, fill=fill)
        elif item.shape == "square":
            draw.rectangle(item.box, fill=fill)
        else:
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image


def describe(shapes: list[Shape]) -> list[str]:
    """True sentences for a left-to-right list of shapes."""
    a = [f"a {item.words}" for item in shapes]
    if len(shapes) == 1:
        place = {0: "on the left", 1: "in the middle", 2: "on the right"}[shapes[0].column]
        return [a[0], f"{a[0]} {place}", f"a single {shapes[0].words} {place}"]
    if len(shapes) == 2:
        return [
            f"{a[0]} to the left of {a[1]}",
            f"{a[1]} to the right of {a[0]}",
            f"{a[0]} and {a[1]}",
            f"two shapes : {a[0]} and {a[1]}",
        ]
    return [
        f"{a[0]} , {a[1]} and {a[2]}",
        f"three shapes : {a[0]} , {a[1]} and {a[2]}",
        f"{a[1]} between {a[0]} and {a[2]}",
    ]


def write_shapes_dataset(
    out: str | Path,
    *,
    num_images: int = 300,
    seed: int = 0,
    format: str = "karpathy",
    image_size: int = 128,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> list[Path]:
    """Write images to ``out/images/`` and captions in ``format``; return the caption files to prepare
    (one file; three for ``coco``, one per split).

    Also writes ``out/shapes.json``: each image's shapes with their boxes, for tests that check
    where a model looks.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if num_images < 3:
        raise ValueError("num_images must be at least 3 (one per split)")
    out = Path(out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # every split gets at least one image, whatever the fractions and however few the images
    train_count = min(max(1, round(num_images * split_fractions[0])), num_images - 2)
    val_count = min(max(1, round(num_images * split_fractions[1])), num_images - train_count - 1)
    items = []
    for number in range(num_images):
        shapes = sample_shapes(rng, image_size)
        name = f"shapes_{seed}_{number:05d}.png"
        render(shapes, image_size, rng).save(image_dir / name)
        split = "train" if number < train_count else "val" if number < train_count + val_count else "test"
        items.append({"image": name, "split": split, "captions": describe(shapes), "shapes": [asdict(s) for s in shapes]})
    (out / "shapes.json").write_text(json.dumps(items, indent=1))
    return _write_format(out, items, format)


def _write_format(out: Path, items: list[dict], format: str) -> list[Path]:
    if format == "karpathy":
        path = out / "dataset_shapes.json"
        images = [
            {
                "filepath": "images",
                "filename": item["image"],
                "imgid": number,
                "split": item["split"],
                "sentences": [{"raw": caption, "tokens": caption.split()} for caption in item["captions"]],
            }
            for number, item in enumerate(items)
        ]
        path.write_text(json.dumps({"dataset": "shapes", "images": images}))
        return [path]
    if format == "coco":
        paths = []
        for split in ("train", "val", "test"):
            subset = [(number, item) for number, item in enumerate(items) if item["split"] == split]
            images = [{"id": number, "file_name": f"images/{item['image']}"} for number, item in subset]
            annotations = [
                {"id": number * 10 + k, "image_id": number, "caption": caption}
                for number, item in subset
                for k, caption in enumerate(item["captions"])
            ]
            path = out / f"captions_{split}.json"
            path.write_text(json.dumps({"images": images, "annotations": annotations}))
            paths.append(path)
        return paths
    if format == "flickr8k":
        path = out / "Shapes.token.txt"
        lines = [f"images/{item['image']}#{k}\t{caption}" for item in items for k, caption in enumerate(item["captions"])]
        path.write_text("\n".join(lines) + "\n")
        for split, file_split in (("train", "train"), ("val", "dev"), ("test", "test")):
            names = [f"images/{item['image']}" for item in items if item["split"] == split]
            (out / f"Shapes.{file_split}Images.txt").write_text("\n".join(names) + "\n")
        return [path]
    if format == "csv":
        path = out / "captions.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "caption", "split"])
            for item in items:
                for caption in item["captions"]:
                    writer.writerow([f"images/{item['image']}", caption, item["split"]])
        return [path]
    path = out / "captions.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps({"image": f"images/{item['image']}", "captions": item["captions"], "split": item["split"]}) + "\n")
    return [path]
