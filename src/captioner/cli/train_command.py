"""``captioner train``: train a captioner on a prepared dataset (resumable, early-stopping, DDP-ready)."""

from __future__ import annotations

import argparse

ENCODER_SHORT_NAMES = {"lite0": "efficientnet_lite0", "lite1": "efficientnet_lite1", "lite2": "efficientnet_lite2"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from captioner.cli.main import path_name

    parser = subparsers.add_parser(
        "train",
        help="train a model on a prepared dataset",
        description=(
            "Train a Show-and-Tell or Show-Attend-and-Tell captioner. With a frozen encoder, image features are "
            "computed once and cached; validation decodes the val split for real each epoch and the best epoch by "
            "CIDEr-D (or --set early_stopping_metric=BLEU-4) is kept in OUT/best. Ctrl-C saves OUT/last; --resume continues."
        ),
        epilog=(
            "examples:\n"
            "  captioner train --data data/f8k --model attention --epochs 20 --out runs/f8k\n"
            "  captioner train --config configs/flickr8k-attention.toml\n"
            "  captioner train --out runs/f8k --resume\n"
            "  captioner train --data data/f8k --out runs/x --set decoder.hidden_dim=1024 --set schedule=step\n"
            "  captioner train --config configs/flickr8k-attention.toml --set decoder.attention=hard --out runs/f8k-hard\n"
            "  torchrun --nproc-per-node 4 -m captioner train --data data/coco --out runs/coco\n"
            "\nevery setting of captioner.training.config.TrainConfig can be given in the config file or with --set"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=path_name, metavar="FILE", help="TOML (or YAML) file of settings")
    parser.add_argument("--data", type=path_name, metavar="DIR", help="prepared folder (from 'captioner prepare')")
    parser.add_argument("--out", type=path_name, metavar="DIR", help="run folder (default runs/captioner)")
    parser.add_argument("--model", choices=("attention", "show_tell"), help="decoder: Show, Attend and Tell (default) or Show and Tell")
    parser.add_argument("--encoder", help="backbone: lite0 (default), lite1, lite2, or torchvision:NAME / timm:NAME if installed")
    parser.add_argument("--epochs", type=int, help="epochs to train at most (default 20; early stopping may end sooner); raise it with --resume to train longer")
    parser.add_argument("--batch-size", type=int, help="images per batch (each with seq_per_img captions)")
    parser.add_argument("--lr", type=float, help="decoder learning rate")
    parser.add_argument("--fine-tune-encoder", type=int, metavar="STAGES", help="train the encoder's last STAGES stages (0: frozen)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, help="random seed: initial weights, batch order, dropout (default 0; the same seed on the same machine gives the same run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="any setting, e.g. decoder.hidden_dim=1024")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run in --out and start again")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def resolve_config(args: argparse.Namespace):
    from captioner.training.config import TrainConfig, apply_overrides, load_config_file

    values = load_config_file(args.config) if args.config else {}
    named = {
        "data": args.data,
        "out": args.out,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "decoder_lr": args.lr,
        "fine_tune_encoder": args.fine_tune_encoder,
        "device": args.device,
        "seed": args.seed,
    }
    values.update({key: value for key, value in named.items() if value is not None})
    if args.model:
        values.setdefault("decoder", {})["kind"] = args.model
    if args.encoder:
        values.setdefault("encoder", {})["backbone"] = ENCODER_SHORT_NAMES.get(args.encoder, args.encoder)
    if args.quiet:
        values["progress"] = False
    values = apply_overrides(values, args.overrides)
    return TrainConfig.from_dict(values, source=args.config or "settings"), set(values)


def run(args: argparse.Namespace) -> int:
    from captioner.training.loop import train

    config, given = resolve_config(args)
    if args.resume and not args.out and not args.config:
        from captioner.errors import ConfigError

        raise ConfigError("--resume needs --out (the run folder to continue)")
    train(config, resume=args.resume, overwrite=args.overwrite, given=given)
    return 0
