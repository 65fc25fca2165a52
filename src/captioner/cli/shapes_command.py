"""``captioner shapes``: write the generated shapes captioning set (for demos and tests)."""

from __future__ import annotations

import argparse

from captioner.data.formats import FORMATS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shapes",
        help="generate the synthetic 'shapes' captioning set",
        description="Write images of one to three coloured shapes with true sentences about them, in any input format.",
    )
    parser.add_argument("out", help="folder to write (images/ and the caption file)")
    parser.add_argument("--num-images", type=int, default=300, help="images to draw (default 300)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--format", choices=FORMATS, default="karpathy", help="caption file format (default karpathy)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same set)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from captioner.data.synthetic import write_shapes_dataset
    from captioner.errors import CaptionerError

    if args.num_images < 3:
        raise CaptionerError("--num-images must be at least 3 (one image per split)")
    if args.image_size < 32:
        raise CaptionerError("--image-size must be at least 32")
    paths = write_shapes_dataset(args.out, num_images=args.num_images, seed=args.seed, format=args.format, image_size=args.image_size)
    print(f"wrote {args.num_images} images and {' '.join(str(path) for path in paths)}")
    return 0
