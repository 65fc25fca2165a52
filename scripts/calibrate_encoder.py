"""The int8 encoder's activation ranges, measured on training photos and shipped with the package.

    python scripts/calibrate_encoder.py default data/f8k --count 256

Runs the model's encoder (as the ONNX graph int8 rounding starts from) over the first ``--count``
photos of the prepared data's training split, in file order, and records each activation's lowest
and highest value into ``src/captioner/models/encoder_int8_ranges.json``, filed under the encoder
(backbone, feature layer, input size). ``captioner export MODEL --int8`` rounds with these ranges,
so a user needs no photos of their own. Calibrate on training photos only: never a dev or test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from captioner.atomic import write_text_atomic
from captioner.data.images import load_image
from captioner.data.prepare import PreparedDataset
from captioner.errors import CaptionerError
from captioner.models.captioner import Captioner
from captioner.models.onnx_encoder import INT8_RANGES_FILE, calibrate_int8_ranges, ranges_key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint folder, or 'default'")
    parser.add_argument("data", type=Path, help="a prepared dataset folder (its training split is read)")
    parser.add_argument("--images", type=Path, default=None, help="image folder, when not the one the data was prepared from")
    parser.add_argument("--count", type=int, default=256, help="training photos to calibrate on (default 256)")
    args = parser.parse_args()
    try:
        model = Captioner.load(args.model, encoder_runtime="torch")
        dataset = PreparedDataset(args.data, image_root=args.images)
        chosen = dataset.split_images("train")[: args.count]
        if len(chosen) < args.count:
            raise CaptionerError(f"{args.data} has {len(chosen)} training images, fewer than --count {args.count}")
        photos = torch.stack([model.preprocessing(load_image(dataset.image_path(i), draft=model.preprocessing.draft_size)) for i in chosen])
        ranges = calibrate_int8_ranges(model, photos)
        shipped = json.loads(INT8_RANGES_FILE.read_text()) if INT8_RANGES_FILE.is_file() else {"encoders": {}}
        shipped["encoders"][ranges_key(model)] = {
            "photos": f"the first {len(chosen)} training photos of {dataset.root.name} (scripts/calibrate_encoder.py)",
            "torch": torch.__version__,
            "ranges": ranges,
        }
        write_text_atomic(INT8_RANGES_FILE, json.dumps(shipped, indent=1, sort_keys=True) + "\n")
    except CaptionerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {len(ranges)} ranges for {ranges_key(model)} into {INT8_RANGES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
