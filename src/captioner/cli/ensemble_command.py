"""``captioner ensemble``: join trained models (and a mirrored view of each image) into one model."""

from __future__ import annotations

import argparse

MEMBERS_FILE = "ensemble_members.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from captioner.cli.main import path_name

    parser = subparsers.add_parser(
        "ensemble",
        help="join trained models into one that averages their word distributions",
        description=(
            "Write one checkpoint that decodes with several models at once: at every step the word distributions of\n"
            "all of them are averaged (Vinyals et al. 2015). --flip adds each image mirrored left to right as a second\n"
            "view (test-time augmentation: better captions, no extra weights). The models must share the vocabulary\n"
            "and the pretrained encoder (train them on one prepared folder). The result loads, captions, evaluates\n"
            "and serves like any checkpoint; decoding costs one decoder pass per model and view."
        ),
        epilog=(
            "examples:\n"
            "  captioner ensemble runs/a/best runs/b/best --out runs/ensemble\n"
            "  captioner ensemble runs/a/best --flip --out runs/a-flip --length-penalty 1.0 --no-repeat-ngram 3\n"
            "  captioner evaluate runs/ensemble --split test --beam 3"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("models", nargs="+", type=path_name, metavar="MODEL", help="checkpoint folders (or 'default')")
    parser.add_argument("--out", required=True, type=path_name, metavar="DIR", help="the checkpoint folder to write")
    parser.add_argument("--flip", action="store_true", help="also read each image mirrored left to right (a model that does, such as 'default', keeps that view anyway)")
    parser.add_argument(
        "--precision", choices=("float32", "float16", "int8"), default="float32", help="weights as stored: float16 halves the size, int8 quarters it (default float32)"
    )
    parser.add_argument(
        "--length-penalty", type=float, metavar="ALPHA", help="the GNMT length penalty it decodes with unless told otherwise (default: the first model's)"
    )
    parser.add_argument("--no-repeat-ngram", type=int, metavar="N", help="no N-gram twice in its captions unless told otherwise, 0: off (default: the first model's)")
    parser.add_argument("--early-stopping", choices=("exact", "heuristic"), help="when its beam search stops unless told otherwise (default: the first model's)")
    parser.add_argument("--block-bad-endings", action=argparse.BooleanOptionalAction, help="never end a caption on what the training captions never end on (\"a\", \"in a blue\"); its own default unless told otherwise (default: the first model's)")
    parser.add_argument("--block-doubled-words", action=argparse.BooleanOptionalAction, help="never write a word twice in a row nor twice around and/or; its own default unless told otherwise (default: the first model's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from captioner.decoding import GenerationConfig
    from captioner.errors import ConfigError
    from captioner.limits import MAX_ENSEMBLE_DECODERS
    from captioner.locking import exclusive_writer
    from captioner.ranges import SettingError

    if len(args.models) == 1 and not args.flip:
        raise ConfigError("an ensemble needs two models, or --flip")
    if len(args.models) > MAX_ENSEMBLE_DECODERS:  # before loading any: each is its weights in memory
        raise ConfigError(f"an ensemble has at most {MAX_ENSEMBLE_DECODERS} decoders: {len(args.models)} models are too many")
    try:  # the decoding settings it will carry, checked as any decoding settings are
        GenerationConfig(length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram)
    except SettingError as error:
        raise error.named({"length_penalty": "--length-penalty", "no_repeat_ngram_size": "--no-repeat-ngram"}) from None
    with exclusive_writer(args.out):
        return write_ensemble(args)


def member_views(models: list, flip: bool) -> tuple[str, ...]:
    """The views an ensemble reads: the plain image, every view a member reads (a member made with
    --flip keeps its mirrored view), and the mirrored one with ``flip``."""
    from captioner.models.ensemble import VIEWS

    return tuple(view for view in VIEWS if view == "plain" or (view == "flip" and flip) or any(view in model.views for model in models))


def write_ensemble(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from captioner.atomic import check_replaceable
    from captioner.evaluation import trained_on
    from captioner.models.captioner import Captioner, resolve_model_path

    check_replaceable(args.out, overwrite=args.overwrite, marker="model.safetensors", what="a checkpoint")
    folders = [resolve_model_path(model) for model in args.models]
    models = [Captioner.load(folder) for folder in folders]
    views = member_views(models, args.flip)
    ensemble = Captioner.ensemble(models, views=views)
    if args.length_penalty is not None:
        ensemble.config.length_penalty = args.length_penalty
    if args.no_repeat_ngram is not None:
        ensemble.config.no_repeat_ngram_size = args.no_repeat_ngram
    for name in ("early_stopping", "block_bad_endings", "block_doubled_words"):
        if getattr(args, name) is not None:
            setattr(ensemble.config, name, getattr(args, name))
    members = [{"model": str(model), "trained_on": trained_on(folder)} for model, folder in zip(args.models, folders)]
    ensemble.save(args.out, precision=args.precision, extra_files={MEMBERS_FILE: (json.dumps(members, indent=2) + "\n").encode()})
    size = sum(path.stat().st_size for path in Path(args.out).iterdir()) / 1e6
    decoders = len(ensemble.config.ensemble.decoders) if ensemble.config.ensemble else 1
    print(f"wrote {args.out}: {decoders} decoder(s) x {len(views)} view(s) ({', '.join(views)}), {size:.1f} MB")
    return 0
