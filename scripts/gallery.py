"""The README's gallery: the first N images of a prepared split, captioned, in one picture and a table.

    python scripts/gallery.py default data/f8k --split test --count 10 --out docs/gallery.jpg

Images are taken by rule (the first ``--count`` of the split, in file order), not picked. Writes a
grid of the images with their generated captions under them, and prints a Markdown table with each
image's caption next to its first reference caption.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from captioner.data.images import load_image
from captioner.data.prepare import PreparedDataset
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint folder, or 'default'")
    parser.add_argument("data", type=Path, help="a prepared dataset folder")
    parser.add_argument("--images", type=Path, default=None, help="image folder, when not the one the data was prepared from")
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--columns", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/gallery.jpg"))
    args = parser.parse_args()
    try:
        model = Captioner.load(args.model)
        dataset = PreparedDataset(args.data, image_root=args.images)
        chosen = dataset.split_images(args.split)[: args.count]
        if not chosen:
            raise CaptionerError(f"{args.data} has no {args.split} images")
        images = [load_image(dataset.image_path(i)) for i in chosen]
    except CaptionerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    results = model.caption(images, beam_size=args.beam)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(images) // args.columns)
    figure, axes = plt.subplots(rows, args.columns, figsize=(2.6 * args.columns, 3.2 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, result in zip(axes.flat, images, results):
        axis.imshow(image)
        axis.set_title("\n".join(textwrap.wrap(result.text, 30)), fontsize=9, y=-0.03, va="top")
    figure.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.08, wspace=0.05, hspace=0.42)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=80, pil_kwargs={"quality": 85})
    plt.close(figure)

    print("| | Flickr8k image | generated (beam %d) | first reference |" % args.beam)
    print("|---|---|---|---|")
    for n, (index, result) in enumerate(zip(chosen, results), 1):
        reference = dataset.images[index]["captions"][0].strip()
        print(f"| {n} | `{dataset.images[index]['image']}` | {result.text} | {reference} |")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
