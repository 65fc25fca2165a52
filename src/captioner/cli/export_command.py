"""``captioner export``: write a model's encoder as ONNX, for onnxruntime to run (``pip install 'captioner[fast]'``)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"  # a source checkout's example photos


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from captioner.cli.main import path_name

    parser = subparsers.add_parser(
        "export",
        help="export a model's encoder as ONNX so onnxruntime encodes images (faster on a CPU)",
        description=(
            "Export the model's image encoder as ONNX into the cache (CAPTIONER_CACHE, else ~/.cache/captioner), "
            "after checking its features against PyTorch's on real photos. From then on, where onnxruntime is "
            "installed, every model with this encoder encodes through it on a CPU (--encoder-runtime torch opts out)."
        ),
        epilog=(
            "examples:\n  pip install 'captioner[fast]' && captioner export default\n  captioner export runs/f8k/best photos/*.jpg\n"
            "  captioner export default --int8 && captioner caption photos/ --encoder-runtime onnx-int8"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=path_name, help="checkpoint folder, or 'default' for the shipped model")
    parser.add_argument("photos", nargs="*", type=path_name, help="photos to check the export on (default: the examples/ of a source checkout); with --int8 "
                        "and an encoder whose int8 ranges do not ship, at least 32 photos to calibrate on")
    parser.add_argument(
        "--int8", action="store_true",
        help="write the int8 version instead, used by --encoder-runtime onnx-int8: about twice as fast as float32 ONNX, "
        "with features within 30%% (relative) of PyTorch's, so some captions change (the shipped model's dev-split scores: README)",
    )  # fmt: skip
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from captioner.cli.caption_command import expand_inputs
    from captioner.data.images import load_image
    from captioner.errors import ConfigError
    from captioner.models.captioner import Captioner
    from captioner.models.onnx_encoder import export_encoder

    photos, _ = expand_inputs(args.photos or ([str(EXAMPLES)] if EXAMPLES.is_dir() else []))
    missing = [path for path in photos if not path.is_file()]
    if args.photos and missing:
        raise ConfigError(f"{missing[0]} is not a photo file ({'no such file' if not missing[0].exists() else 'not a file'}): give photos to check the export on")
    photos = photos[: 256 if args.int8 else 8]
    if not photos:
        raise ConfigError("give a few photos to check the export on: captioner export MODEL PHOTO...")
    model = Captioner.load(args.model, encoder_runtime="torch")
    pixels = torch.stack([model.preprocessing(load_image(path, draft=model.preprocessing.draft_size)) for path in photos])
    path, difference = export_encoder(model, pixels, int8=args.int8)
    print(f"wrote {path}: features within {f'{difference:.0%} (relative)' if args.int8 else f'{difference:.1e}'} of PyTorch's on {len(photos)} photos")
    return 0
