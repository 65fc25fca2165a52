"""``captioner shapes``: write the generated shapes captioning set (for demos and tests)."""

from __future__ import annotations

import argparse

from captioner.data.formats import FORMATS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from captioner.cli.main import path_name

    parser = subparsers.add_parser(
        "shapes",
        help="generate the synthetic 'shapes' captioning set",
        description="Write images of one to three coloured shapes with true sentences about them, in any input format.",
        epilog=(
            "examples:\n"
            "  captioner shapes demo/shapes --num-images 400\n"
            "  captioner shapes demo/shapes-csv --format csv --image-size 224 --seed 1\n"
            "  captioner prepare demo/shapes/dataset_shapes.json --out demo/prepared --min-word-freq 1"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=path_name, help="folder to write (images/ and the caption file)")
    parser.add_argument("--num-images", type=int, default=300, help="images to draw (default 300)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--format", choices=FORMATS, default="karpathy", help="caption file format (default karpathy)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same set)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from captioner import ranges
    from captioner.atomic import atomic_directory
    from captioner.data.synthetic import write_shapes_dataset

    ranges.whole_number("--num-images", args.num_images, 3, 1_000_000)  # at least one image per split
    ranges.whole_number("--image-size", args.image_size, 32, 1024)
    ranges.whole_number("--seed", args.seed, 0, 2**32 - 1)
    # built beside OUT and swapped in whole: an earlier shapes set is replaced, any other non-empty folder refused
    with atomic_directory(args.out, overwrite=True, marker="shapes.json", what="a shapes set (captioner shapes writes shapes.json)") as building:
        paths = write_shapes_dataset(building, num_images=args.num_images, seed=args.seed, format=args.format, image_size=args.image_size)
    print(f"wrote {args.num_images} images and {' '.join(str(Path(args.out) / path.relative_to(building)) for path in paths)}")
    return 0
