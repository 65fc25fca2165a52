"""``captioner evaluate``: score a checkpoint on a split with BLEU-1..4, METEOR, ROUGE-L and CIDEr-D."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from captioner.cli.main import add_runtime_arguments, path_name
    from captioner.limits import DEFAULT_BEAM_SIZE

    parser = subparsers.add_parser(
        "evaluate",
        help="score a model on a dataset split with the COCO caption metrics",
        description=(
            "Decode every image of a split (no teacher forcing) and score the captions against all references with "
            "the COCO caption evaluation code: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, corpus-level, 0-100. "
            "Writes results.json and captions.jsonl and prints a table."
        ),
        epilog="examples:\n  captioner evaluate runs/f8k/best --split test --beam 1 3 5\n  captioner evaluate default --data data/f8k --split test",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=path_name, help="checkpoint folder, or 'default' for the shipped model")
    parser.add_argument("--data", type=path_name, metavar="DIR", help="prepared folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--images", type=path_name, metavar="DIR", help="image folder, if it moved since prepare")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to score (default test)")
    parser.add_argument("--beam", type=int, nargs="+", default=[DEFAULT_BEAM_SIZE], metavar="K", help=f"beam sizes to score, e.g. 1 3 5 (1 is greedy; default {DEFAULT_BEAM_SIZE}, as everywhere)")
    parser.add_argument("--max-length", type=int, help="longest caption in words (default: the model's)")
    parser.add_argument("--length-penalty", type=float, help="GNMT length penalty alpha (default: the model's own, 0 unless it says otherwise)")
    parser.add_argument("--no-repeat-ngram", type=int, metavar="N", help="no N-gram twice in a caption, 0: off (default: the model's own, off unless it says otherwise)")
    parser.add_argument("--early-stopping", choices=("exact", "heuristic"), help="when beam search stops (default: the model's own)")
    parser.add_argument("--block-bad-endings", action=argparse.BooleanOptionalAction, help="never end a caption on what the training captions never end on (\"a\", \"in a blue\"); default: the model's own")
    parser.add_argument("--block-doubled-words", action=argparse.BooleanOptionalAction, help="never write a word twice in a row (\"are are\") nor twice around and/or (\"a red and red\"); default: the model's own")
    parser.add_argument("--concepts", type=int, metavar="N", help="each caption must name up to N of its image's likeliest visual concepts, 0: none (default: the model's own)")
    parser.add_argument("--concept-threshold", type=float, metavar="P", help="... those at least this likely (default: the model's own)")
    parser.add_argument("--familiar-percentile", type=float, metavar="Q", help="... only on photos farther from the model's training photos than Q%% of its dev photos are; 0: every photo (default: the model's own)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N images of the split")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves a JVM start per beam size)")
    parser.add_argument("--out", type=path_name, metavar="DIR", help="where results.json and captions.jsonl go (default: beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=50, help="images decoded together (default 50)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    add_runtime_arguments(parser, encoder=False)  # evaluate encodes through the feature cache, always with PyTorch
    parser.add_argument(
        "--hard-decoding", choices=("expected", "argmax"),
        help="a hard-attention model: read the expected feature under the attention weights, or the one at their likeliest region (default: the checkpoint's own)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


#: The settings this command's flags give, by their names elsewhere.
FLAGS = {
    "beam_size": "--beam",
    "max_length": "--max-length",
    "length_penalty": "--length-penalty",
    "no_repeat_ngram_size": "--no-repeat-ngram",
    "limit": "--limit",
    "batch_size": "--batch-size",
    "concept_constraints": "--concepts",
    "concept_threshold": "--concept-threshold",
    "concept_familiar_percentile": "--familiar-percentile",
}


def run(args: argparse.Namespace) -> int:
    from captioner.evaluation import evaluate_model
    from captioner.ranges import SettingError

    try:
        report = evaluate_model(
            args.model,
            data=args.data,
            images=args.images,
            split=args.split,
            beams=args.beam,
            max_length=args.max_length,
            length_penalty=args.length_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram,
            early_stopping=args.early_stopping,
            block_bad_endings=args.block_bad_endings,
            block_doubled_words=args.block_doubled_words,
            concept_constraints=args.concepts,
            concept_threshold=args.concept_threshold,
            concept_familiar_percentile=args.familiar_percentile,
            limit=args.limit,
            meteor=not args.no_meteor,
            out=args.out,
            batch_size=args.batch_size,
            device=args.device,
            decoder_compute=args.decoder_compute,
            hard_decoding=args.hard_decoding,
            progress=not args.quiet,
        )
    except SettingError as error:
        raise error.named(FLAGS) from None
    print("\n".join(report.table()))
    print(f"wrote {report.out / 'results.json'} and {report.out / 'captions.jsonl'}")
    return 0
