"""``captioner caption``: caption image files, folders and globs with a trained model.

Output on stdout, one line per image: ``PATH<TAB>CAPTION``. With ``--n-best N`` (N > 1) the
alternatives follow that line, one per line, as ``<TAB>RANK. CAPTION`` (RANK 2..N), so
``grep -v '^<TAB>'`` keeps the best captions only; so does ``--tags``'s ``<TAB>tags: WORD P, ...``
line, which follows them. Unreadable images are reported on stderr, one
line each, and skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.errors import CaptionerError, ConfigError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from captioner.cli.caption_output import JsonLinesOutput
    from captioner.decoding import GenerationConfig
    from captioner.models.captioner import Captioner, CaptionResult

#: The image read from standard input (``captioner caption - < photo.jpg``).
STDIN = Path("-")
#: With fewer images than this, no progress bar is shown.
PROGRESS_MIN_IMAGES = 20
PREFIX = "captioner caption"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from captioner.cli.main import add_runtime_arguments, path_name
    from captioner.limits import DEFAULT_BEAM_SIZE

    parser = subparsers.add_parser(
        "caption",
        help="write a caption for each image",
        description=(
            "Caption image files, folders (their image files) and glob patterns with a trained model.\n\n"
            "output: one line per image on stdout, PATH<TAB>CAPTION (a newline, tab or backslash in PATH\n"
            "written \\n, \\t, \\\\). With --n-best N > 1 the next N-1\n"
            "captions follow that line, one per line, as <TAB>RANK. CAPTION (RANK 2..N).\n"
            "Images that cannot be read are reported on stderr, one line each, and skipped; the exit\n"
            "status is then 1 (0 when every image was captioned)."
        ),
        epilog=(
            "examples:\n"
            "  captioner caption photo.jpg\n"
            "  captioner caption photos/ 'more/*.png' --model runs/f8k/best --json captions.jsonl\n"
            "  captioner caption dog.jpg --n-best 3 --attention attention/\n"
            "  captioner caption cat.jpg --tags --require laptop\n"
            "  curl -s https://example.com/dog.jpg | captioner caption -     (captioner itself never downloads)\n"
            "\n"
            "--json FILE writes one JSON object per captioned image:\n"
            '  {"source", "caption", "words", "score", "log_prob", "n_best": [{"caption", "score", "log_prob"}, ...],\n'
            '   "tags": [{"word", "probability"}, ...], "constraints": [[word, ...], ...], "constraints_met",\n'
            '   "familiar" (true: near the model\'s training photos, so no concept was required; null: not asked)}\n'
            '  (plus "attention_figure", its PNG, with --attention).\n'
            "--attention DIR writes NAME.png per image (NAME from the image file; NAME-2.png, ... when two\n"
            "  images share a name): the image with the caption, then each word's attention over the image."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", type=path_name, metavar="IMAGE", help="image files, folders or glob patterns (quote globs); - reads one image from standard input")
    parser.add_argument("--model", default="default", type=path_name, metavar="PATH", help="checkpoint folder, or 'default' for the shipped model (default)")
    parser.add_argument("--beam", type=int, default=DEFAULT_BEAM_SIZE, metavar="K", help=f"beam size; 1 is greedy decoding (default {DEFAULT_BEAM_SIZE}, as everywhere: 5 scores the same on the Flickr8k dev split and takes twice as long)")
    parser.add_argument("--n-best", type=int, default=1, metavar="N", help="also print the next N-1 best captions (default 1; the beam is widened to N if smaller)")
    parser.add_argument("--max-length", type=int, metavar="N", help="longest caption in words (default: the model's)")
    parser.add_argument("--length-penalty", type=float, metavar="ALPHA", help="GNMT length penalty; > 0 favours longer captions (default: the model's own, 0 unless it says otherwise)")
    parser.add_argument("--no-repeat-ngram", type=int, metavar="N", help="no N-gram twice in a caption, 0: off (default: the model's own, off unless it says otherwise)")
    parser.add_argument("--early-stopping", choices=("exact", "heuristic"), help="when beam search stops: exact (what running to --max-length finds) or heuristic (sooner; default: the model's own)")
    parser.add_argument("--block-bad-endings", action=argparse.BooleanOptionalAction, help="never end a caption on what the training captions never end on (\"a\", \"in a blue\"); default: the model's own")
    parser.add_argument("--block-doubled-words", action=argparse.BooleanOptionalAction, help="never write a word twice in a row (\"are are\") nor twice around and/or (\"a red and red\"); default: the model's own")
    parser.add_argument("--tags", action="store_true", help="also print each image's visual concepts (what the encoder's ImageNet classifier sees) and their probabilities")
    parser.add_argument("--require", action="append", default=[], metavar="WORDS", help="the caption must name one of these comma-separated words (repeatable: --require cat,kitten --require laptop); words the model never learnt are added")
    parser.add_argument("--concepts", type=int, metavar="N", help="the caption must name up to N of the image's likeliest visual concepts, 0: none (default: the model's own)")
    parser.add_argument("--concept-threshold", type=float, metavar="P", help="... those at least this likely, 0 < P <= 1 (default: the model's own)")
    parser.add_argument("--familiar-percentile", type=float, metavar="Q", help="... only on photos farther from the model's training photos than Q%% of its dev photos are, 0 <= Q <= 100; 0: every photo (default: the model's own)")
    parser.add_argument("--json", type=path_name, metavar="FILE", help="also write the captions as JSON lines to FILE, in input order (FILE.partial until the run ends)")
    parser.add_argument("--resume", action="store_true", help="with --json: caption only the images FILE (or the FILE.partial of a run that stopped) does not have yet")
    parser.add_argument("--attention", type=path_name, metavar="DIR", help="write a picture of each word's attention per image into DIR (attention models only)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="images decoded and captioned together (default 16)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    add_runtime_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


# ----- inputs -------------------------------------------------------------------------------------


def expand_inputs(entries: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders and globs -> (image paths in order, without repeats; entries that matched nothing).

    Missing plain files are kept (they are reported as unreadable later, like any bad image).
    """
    from captioner.data.images import list_images

    paths: list[Path] = []
    seen: set[Path] = set()
    empty: list[str] = []
    for entry in entries:
        if is_url(entry):
            empty.append(entry)
            continue
        found = [STDIN] if entry == str(STDIN) else list_images([entry])
        if not found:
            empty.append(entry)
        for path in found:
            key = Path(os.path.abspath(path))
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths, empty


def is_url(entry: str) -> bool:
    return entry.split("://", 1)[0].lower() in ("http", "https", "ftp", "s3", "gs") and "://" in entry


def why_nothing(entry: str) -> str:
    """Why a command-line entry gave no image to caption, in a few words."""
    if is_url(entry):
        return f"{entry} is a URL: captioner works offline and never downloads; save the image and caption the file"
    path = Path(entry)
    if path.is_dir():
        return f"{entry} has no image files"
    if path.exists():
        return f"{entry} is not a file"
    if any(char in entry for char in "*?["):
        return f"{entry} matches no files"
    return f"{entry} does not exist"


def refuse_outputs_over_inputs(args: argparse.Namespace, paths: list[Path]) -> None:
    """One line, before any captioning, when ``--json`` or ``--attention`` would write over one of
    the images being captioned (``--json photo.jpg``; ``--attention photos/`` holding ``dog.png``,
    whose figure is named ``dog.png``)."""
    inputs = {_file_id(path): path for path in paths if path != STDIN}
    inputs.pop(None, None)
    if args.json is not None and _file_id(Path(args.json)) in inputs:
        raise ConfigError(f"--json {args.json} is one of the images to caption: choose another file")
    if args.attention is not None:
        for path, name in attention_names(paths).items():
            if _file_id(Path(args.attention) / name) in inputs:
                raise ConfigError(f"--attention {args.attention} would write the figure {name} over the image {inputs[_file_id(Path(args.attention) / name)]}: choose another folder")


def _file_id(path: Path) -> tuple[int, int] | None:
    """What a file is, whatever the path names it by (links, ``..``); None when it does not exist."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def refuse_if_nothing(entries: list[str], paths: list[Path]) -> None:
    """One clear error when not a single input could be an image (all missing or matching nothing)."""
    if any(path == STDIN or path.exists() for path in paths):
        return
    reasons = [why_nothing(entry) for entry in entries]
    raise CaptionerError(f"no images to caption: {'; '.join(reasons)}")


#: The settings this command's flags give, by their names elsewhere.
FLAGS = {
    "beam_size": "--beam",
    "n_best": "--n-best",
    "num_return": "--n-best",
    "max_length": "--max-length",
    "length_penalty": "--length-penalty",
    "no_repeat_ngram_size": "--no-repeat-ngram",
    "batch_size": "--batch-size",
    "constraints": "--require",
    "concept_constraints": "--concepts",
    "concept_threshold": "--concept-threshold",
    "concept_familiar_percentile": "--familiar-percentile",
}


def check_options(args: argparse.Namespace) -> GenerationConfig:
    """Refuse bad option values before any model or image is loaded; the decoding they ask for."""
    from captioner import ranges
    from captioner.decoding import GenerationConfig

    try:
        ranges.whole_number("batch_size", args.batch_size, 1, 4096)
        config = GenerationConfig.for_captions(
            args.beam, args.n_best, max_length=args.max_length, length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram,
            early_stopping=args.early_stopping, block_bad_endings=args.block_bad_endings, block_doubled_words=args.block_doubled_words,
            constraints=tuple(tuple(word.strip() for word in words.split(",")) for words in args.require),
            concept_constraints=args.concepts, concept_threshold=args.concept_threshold, concept_familiar_percentile=args.familiar_percentile,
        )
    except ranges.SettingError as error:
        raise error.named(FLAGS) from None
    if args.resume and not args.json:
        raise ConfigError("--resume goes with --json FILE: the file it reads what is captioned already from")
    if args.json and Path(args.json).is_dir():
        raise ConfigError(f"--json {args.json} is a folder; give a file name such as captions.jsonl")
    if args.attention and Path(args.attention).exists() and not Path(args.attention).is_dir():
        raise ConfigError(f"--attention {args.attention} exists and is not a folder")
    return config


def attention_names(paths: list[Path]) -> dict[Path, str]:
    """A distinct PNG file name per image, from its name: ``dog.png``; ``dog-2.png`` for a second ``dog.*``.

    Names are given in input order, so re-running the same command rewrites the same files.
    Comparison ignores case (two names differing only in case are one file on macOS and Windows).
    """
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in paths:
        stem = "stdin" if path == STDIN else path.stem or "image"
        candidate, number = f"{stem}.png", 1
        while candidate.lower() in taken:
            number += 1
            candidate = f"{stem}-{number}.png"
        taken.add(candidate.lower())
        names[path] = candidate
    return names


# ----- output -------------------------------------------------------------------------------------


def caption_lines(source: str, result: CaptionResult, n_best: int, *, tags: bool = False) -> list[str]:
    """``PATH<TAB>CAPTION``, then ``<TAB>RANK. CAPTION`` for the alternatives when ``n_best`` > 1,
    then ``<TAB>tags: WORD P, ...`` with ``tags`` (and whether the photo was familiar enough to the
    model to leave its concepts out); a caption that could not name what ``--require`` asked for
    says so on its line."""
    unmet = "  [does not name every required word]" if result.constraints_met is False else ""
    lines = [f"{printable(source)}\t{result.text}{unmet}"]
    if n_best > 1:
        lines.extend(f"\t{rank}. {alternative.text}" for rank, alternative in enumerate(result.n_best[1:n_best], start=2))
    if tags:
        familiar = "  (a photo like its training photos: no concept required)" if result.familiar else ""
        lines.append("\ttags: " + (", ".join(f"{word} {probability:.2f}" for word, probability in result.tags) or "(none)") + familiar)
    return lines


#: Where a backslash is not the path separator (POSIX), it is escaped too, so an escape reads one way
#: back; on Windows, whose names hold no control characters, paths print as they are.
CONTROL_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", **({"\\": "\\\\"} if os.sep == "/" else {})}


def printable(path: str) -> str:
    """A path as the first field of a ``PATH<TAB>CAPTION`` line: a backslash and the control
    characters a file name may hold (a newline, a tab) escaped, as ``ls -b`` does, so every
    caption stays one line of two fields; ``--json`` keeps the name as it is."""
    if not any(char in CONTROL_ESCAPES or ord(char) < 32 or ord(char) == 127 for char in path):
        return path
    return "".join(CONTROL_ESCAPES.get(char, f"\\x{ord(char):02x}" if ord(char) < 32 or ord(char) == 127 else char) for char in path)


def json_record(result: CaptionResult, figure: Path | None) -> dict[str, Any]:
    record = result.to_dict()
    if figure is not None:
        record["attention_figure"] = str(figure)
    return record


@dataclass
class Console:
    """Writes caption lines to stdout and notes to stderr without breaking the progress bar."""

    bar: Any = None  # a tqdm bar, or None

    def out(self, line: str) -> None:
        self._write(line, sys.stdout)

    def err(self, line: str) -> None:
        self._write(f"{PREFIX}: {line}", sys.stderr)

    def _write(self, line: str, stream: Any) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=stream)
        else:
            print(line, file=stream)
        stream.flush()


# ----- the run ------------------------------------------------------------------------------------


def read_chunk(paths: list[Path], draft: int) -> tuple[list[tuple[Path, Image.Image]], list[str]]:
    """Decode images: (the readable ones, one line for each unreadable one)."""
    from captioner.data.images import load_image, read_stream
    from captioner.errors import ImageLoadError

    loaded, errors = [], []
    for path in paths:
        try:
            source = read_stream(sys.stdin.buffer, "<standard input>") if path == STDIN else path
            loaded.append((path, load_image(source, name="<standard input>" if path == STDIN else None, draft=draft)))
        except ImageLoadError as error:
            errors.append(f"{error} (skipped)")
    return loaded, errors


def decoded_ahead(paths: list[Path], size: int, draft: int) -> Iterator[tuple[list[Path], tuple[list[tuple[Path, Image.Image]], list[str]]]]:
    """(chunk, read_chunk(chunk)) for each ``size`` images in turn, the next chunk's files decoded by
    a worker thread while the caller captions this one (JPEG decoding releases the GIL): at most two
    chunks of images in memory, whatever the number of files."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [paths[start : start + size] for start in range(0, len(paths), size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = pool.submit(read_chunk, batches[0], draft) if batches else None
        for index, chunk in enumerate(batches):
            decoded = pending.result()  # type: ignore[union-attr]
            pending = pool.submit(read_chunk, batches[index + 1], draft) if index + 1 < len(batches) else None
            yield chunk, decoded


def write_attention(folder: Path, name: str, image: Image.Image, result: CaptionResult, model: Captioner) -> Path | None:
    import numpy as np

    from captioner.visualize.attention import encoder_view, save_attention_figure

    attention = result.attention
    if attention is None:
        if result.words:
            return None  # the model gave no attention maps for this caption
        attention = np.zeros((0, 1, 1), dtype=np.float32)
    view = encoder_view(image, model.preprocessing)
    return save_attention_figure(folder / name, view, result.words, attention, caption=result.text)


def caption_images(model: Captioner, loaded: list[tuple[Path, Image.Image]], config: GenerationConfig) -> list[CaptionResult]:
    """Caption decoded images as one batch; each result (and its n-best list) names its file."""
    import torch

    if not loaded:
        return []
    pixels = torch.stack([model.preprocessing(image) for _, image in loaded])  # (b, 3, S, S)
    return model.caption_batch(pixels, config, [str(path) for path, _ in loaded])


def run(args: argparse.Namespace) -> int:
    from captioner.cli.caption_output import JsonLinesOutput
    from captioner.training.distributed import cleanup, setup

    config = check_options(args)
    paths, empty = expand_inputs(args.images)
    refuse_if_nothing(args.images, paths)
    refuse_outputs_over_inputs(args, paths)
    # Under torchrun each process captions every world_size-th input: shares follow the input list,
    # not what is left to do, so processes that see different earlier output still split it exactly.
    shard, device = setup(args.device, timeout_minutes=7 * 24 * 60)  # on a big folder the shares end far apart
    if shard.enabled and args.json is None:
        raise ConfigError("under torchrun, give --json FILE: each process writes its share and the first merges them into FILE, in input order")
    output = JsonLinesOutput(args.json, resume=args.resume, rank=shard.rank, world_size=shard.world_size) if args.json is not None else None
    shard.barrier()  # every process has looked at what earlier runs left before any of them writes
    if output:
        output.open()
    done = output.done if output else set()
    todo = [path for index, path in enumerate(paths) if index % shard.world_size == shard.rank and (path == STDIN or str(path) not in done)]
    if done and shard.is_main:
        print(f"{PREFIX}: {sum(str(path) in done for path in paths)} of {len(paths)} images are in {args.json} already (--resume): not captioned again", file=sys.stderr)
    try:
        failed = caption_all(args, config, todo, empty if shard.is_main else [], output, device)
    except BaseException:
        note = output.abandon() if output else None
        if note:
            print(f"{PREFIX}: {note}", file=sys.stderr)
        raise
    if output:
        output.close()
        shard.barrier()
        if shard.is_main:
            output.merge([str(path) for path in paths])
        shard.barrier()  # no process ends (torchrun stops the rest when one fails) before FILE is written
    cleanup(shard)
    if failed:
        print(f"{PREFIX}: {failed} of {len(todo) + len(empty)} inputs could not be captioned", file=sys.stderr)
        return 1
    return 0


def caption_all(
    args: argparse.Namespace, config: GenerationConfig, paths: list[Path], empty: list[str], output: JsonLinesOutput | None, device: torch.device
) -> int:
    """Caption every image, writing lines (and JSON records) batch by batch; returns how many failed."""
    from tqdm import tqdm

    from captioner.models.captioner import Captioner

    model = Captioner.load(args.model, device=device, decoder_compute=args.decoder_compute, encoder_runtime=args.encoder_runtime)
    console = Console()
    for entry in empty:
        console.err(f"{why_nothing(entry)} (skipped)")

    attention_folder = Path(args.attention) if args.attention is not None else None
    if attention_folder is not None and model.config.decoder.kind != "attention":
        console.err(f"note: {args.model} is a Show and Tell model, which has no attention; --attention writes no pictures")
        attention_folder = None
    if attention_folder is not None:
        attention_folder.mkdir(parents=True, exist_ok=True)
    names = attention_names(paths) if attention_folder is not None else {}

    failed = len(empty)
    with tqdm(
        total=len(paths), unit="img", desc="captioning", leave=False, file=sys.stderr,
        disable=True if args.quiet or len(paths) < PROGRESS_MIN_IMAGES else None,
    ) as bar:
        console.bar = bar
        for chunk, (loaded, errors) in decoded_ahead(paths, args.batch_size, model.preprocessing.draft_size):
            for error in errors:
                console.err(error)
            failed += len(chunk) - len(loaded)
            records = []
            for (path, image), result in zip(loaded, caption_images(model, loaded, config)):
                figure = write_attention(attention_folder, names[path], image, result, model) if attention_folder else None
                for line in caption_lines(result.source, result, args.n_best, tags=args.tags):
                    console.out(line)
                records.append(json_record(result, figure))
            if output:
                output.write(records)
            bar.update(len(chunk))
        console.bar = None
    return failed

