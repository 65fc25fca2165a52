"""Write Flickr30k's English captions as plain text, one per line, for language pretraining
(``language_text`` in a training config).

    captioner's fetch tool (or git clone https://github.com/multi30k/dataset) -> MULTI30K
    python scripts/flickr30k_text.py MULTI30K --out data/flickr30k.txt \\
        --exclude ../shared/data/flickr8k/Flickr_8k.devImages.txt ../shared/data/flickr8k/Flickr_8k.testImages.txt

MULTI30K is a checkout of multi30k/dataset or its bare git directory: its ``data/task2`` holds the
five English captions of each of Flickr30k's 31,014 photos (train, val and test_2016: 155,070
sentences; Young et al. 2014) and the photos' names. Flickr8k's photos are Flickr30k photos too (the
same Flickr ids, the same captions), so the captions of every photo in an ``--exclude`` list are left
out: with Flickr8k's dev and test lists, 9,315 sentences, and no evaluation caption reaches training.
The text is written atomically.
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from captioner.atomic import write_text_atomic  # noqa: E402

SPLITS = (("train", "train_images.txt"), ("val", "val_images.txt"), ("test_2016", "test_2016_images.txt"))


def flickr_id(name: str) -> str:
    """'1000268201_693b08cb0e.jpg' (Flickr8k) and '1000268201.jpg' (Flickr30k) -> '1000268201'."""
    return Path(name.strip()).stem.split("_")[0]


def reader(root: Path):
    """A function path-in-the-repository -> bytes, for a checkout or a bare git directory."""
    if (root / "data" / "task2").is_dir():
        return lambda inside: (root / inside).read_bytes()
    if (root / "HEAD").is_file():
        return lambda inside: subprocess.run(["git", "--git-dir", str(root), "show", f"HEAD:{inside}"], check=True, capture_output=True).stdout
    raise SystemExit(f"error: {root} is neither a checkout of multi30k/dataset nor its git directory")


def sentences(root: Path, excluded: set[str]) -> tuple[list[str], int]:
    """The English captions of every photo not in ``excluded``, and how many were left out."""
    read = reader(root)
    kept, left_out = [], 0
    for split, names in SPLITS:
        photos = [flickr_id(name) for name in read(f"data/task2/image_splits/{names}").decode().split()]
        for number in range(1, 6):
            lines = gzip.decompress(read(f"data/task2/raw/{split}.{number}.en.gz")).decode("utf-8").splitlines()
            if len(lines) != len(photos):
                raise SystemExit(f"error: {split}.{number}.en has {len(lines)} captions for {len(photos)} photos")
            for photo, line in zip(photos, lines):
                if photo in excluded:
                    left_out += 1
                elif line.strip():
                    kept.append(" ".join(line.split()))
    return kept, left_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("multi30k", type=Path, help="a checkout of multi30k/dataset, or its git directory")
    parser.add_argument("--out", type=Path, required=True, help="the text file to write")
    parser.add_argument("--exclude", type=Path, nargs="*", default=[], help="image lists (one name per line) whose photos' captions are left out")
    args = parser.parse_args()
    excluded = {flickr_id(name) for path in args.exclude for name in path.read_text(encoding="utf-8").split()}
    kept, left_out = sentences(args.multi30k, excluded)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, "\n".join(kept) + "\n")
    print(f"wrote {len(kept):,d} sentences to {args.out}; left out {left_out:,d} of {len(excluded):,d} excluded photos")


if __name__ == "__main__":
    main()
