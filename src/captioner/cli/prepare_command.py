"""``captioner prepare``: read a caption dataset in any supported format into a prepared folder."""

from __future__ import annotations

import argparse

from captioner.data.formats import FORMATS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from captioner.cli.main import path_name

    parser = subparsers.add_parser(
        "prepare",
        help="turn a caption dataset into a prepared folder (vocabulary, encoded captions, image index)",
        description=(
            "Read captions (Karpathy split JSON, COCO annotation JSON, Flickr8k token file, CSV or JSONL), "
            "check every image, build the vocabulary on the training split and write a prepared folder."
        ),
        epilog=(
            "examples:\n"
            "  captioner prepare dataset_flickr8k.json --images Flicker8k_Dataset/ --out data/f8k\n"
            "  captioner prepare Flickr8k.token.txt --images Flicker8k_Dataset/ --out data/f8k\n"
            "  captioner prepare captions_train2014.json captions_val2014.json --images coco/ --out data/coco\n"
            "  captioner prepare products.csv --images photos/ --out data/products --split-fractions 0.8 0.1 0.1"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("captions", nargs="+", type=path_name, help="caption file(s); Flickr split lists may follow the token file")
    parser.add_argument("--images", type=path_name, metavar="DIR", help="folder the image names are relative to (default: the caption file's folder)")
    parser.add_argument("--out", required=True, type=path_name, metavar="DIR", help="prepared folder to write")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto", help="input format (default: detect)")
    parser.add_argument("--min-word-freq", type=int, default=5, help="words seen fewer times in train become <unk> (default 5)")
    parser.add_argument("--max-length", type=int, default=50, help="captions with more words are not trained on (default 50)")
    parser.add_argument("--restval", choices=("train", "val", "test", "drop"), default="train", help="where Karpathy's COCO 'restval' images go (default train)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="put every image of a file without splits in this split")
    parser.add_argument(
        "--split-fractions", type=float, nargs=3, default=(0.9, 0.05, 0.05), metavar=("TRAIN", "VAL", "TEST"),
        help="deterministic split for files without one (default 0.9 0.05 0.05)",
    )
    parser.add_argument("--no-verify-images", action="store_true", help="only check that image files exist (faster; bad images then fail later)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from captioner.data.formats import ReadOptions, read_dataset
    from captioner.data.prepare import PrepareOptions, prepare
    from captioner.ranges import SettingError

    try:  # checked before any file is read
        prepare_options = PrepareOptions(
            min_word_freq=args.min_word_freq,
            max_length=args.max_length,
            verify_images=not args.no_verify_images,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except SettingError as error:
        raise error.named({"min_word_freq": "--min-word-freq", "max_length": "--max-length"}) from None
    options = ReadOptions(restval=args.restval, split_fractions=tuple(args.split_fractions), split=args.split)
    dataset = read_dataset(args.captions, args.images, format=args.format, options=options)
    report = prepare(dataset, args.out, prepare_options)
    print("\n".join(report.lines()))
    return 0
