"""``captioner`` entry point: parses the command line and turns user errors into one line.

Each command lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``;
heavy imports (torch) happen inside ``run`` so ``captioner --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import signal
import sys
import threading
from typing import Iterator, NoReturn, Sequence

import captioner
from captioner.errors import CaptionerError
from captioner.threads import fixed_threads

#: The order commands are listed in ``captioner --help``; any other ``*_command`` module follows.
PREFERRED_ORDER = ("caption", "prepare", "train", "evaluate", "ensemble", "export", "serve", "shapes")


def command_names() -> list[str]:
    """Every ``captioner.cli.NAME_command`` module is a command."""
    import pkgutil

    import captioner.cli

    found = [m.name[: -len("_command")] for m in pkgutil.iter_modules(captioner.cli.__path__) if m.name.endswith("_command")]
    return sorted(found, key=lambda name: (PREFERRED_ORDER.index(name) if name in PREFERRED_ORDER else len(PREFERRED_ORDER), name))


def path_name(value: str) -> str:
    """The argparse type of every file or folder argument: an empty name is refused, as it would
    otherwise mean the current folder (``Path("")``) or no output at all; it is an unset variable."""
    if not value:
        raise argparse.ArgumentTypeError("an empty name (an unset variable?) names no file or folder")
    return value


def add_runtime_arguments(parser: argparse.ArgumentParser, *, encoder: bool = True) -> None:
    """``--decoder-compute`` and (with ``encoder``) ``--encoder-runtime``, for the commands that run a loaded model."""
    parser.add_argument(
        "--decoder-compute", choices=("auto", "float32", "int8"), default="auto",
        help="decoding arithmetic: int8 (CPU only; about twice as fast at one photo), float32, or auto "
        "(default: int8 on a CPU for a model saved in int8, such as the shipped one; float32 otherwise)",
    )
    if not encoder:
        return
    parser.add_argument(
        "--encoder-runtime", choices=("auto", "torch", "onnx", "onnx-int8"), default="auto",
        help="what runs the image encoder on a CPU: onnx (onnxruntime, after 'captioner export MODEL'), onnx-int8 (its int8 "
        "version, after 'captioner export MODEL --int8': about twice as fast, some captions change), torch, "
        "or auto (default: onnx when onnxruntime is installed and the encoder was exported)",
    )  # fmt: skip


class VersionAction(argparse.Action):
    """``--version``: the installed version, read from the package metadata only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option_string: str | None = None) -> None:
        print(f"captioner {captioner.__version__}")
        parser.exit()


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line naming the command and where its help is, not argparse's usage
    block followed by the error; every command's parser is one (subparsers take their parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="captioner",
        description="Turn pictures into sentences: prepare caption datasets, train, evaluate and serve captioning models.",
        epilog="Run 'captioner COMMAND --help' for a command's options. Set CAPTIONER_DEBUG=1 to see tracebacks.",
    )
    parser.add_argument("--version", action=VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_names():
        module = importlib.import_module(f"captioner.cli.{name}_command")
        module.add_parser(subparsers)
    parser.command_parsers = subparsers.choices  # type: ignore[attr-defined]  # name -> its parser
    return parser


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, timeout, a service stopping) is delivered as a Ctrl-C while a command runs:
    half-built folders and part files are cleaned up or kept as on an interrupt, and training
    finishes the update it is in. (Main thread only; the handler before it is put back after.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's parser, whose help lists what it takes
        parser.command_parsers.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    debug = os.environ.get("CAPTIONER_DEBUG", "") not in ("", "0")
    if isinstance(sys.stdout, io.TextIOWrapper):  # a file name that is not UTF-8 prints as its own bytes, as the C locale does
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        fixed_threads()  # a bad CAPTIONER_THREADS is reported before any work
        with sigterm_as_interrupt():
            return int(args.run(args) or 0)
    except CaptionerError as error:
        if debug:
            raise
        print(f"captioner {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"captioner {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # disk full, permission denied, ... on the user's files
        if debug:
            raise
        where = f": {error.filename}" if getattr(error, "filename", None) else ""
        print(f"captioner {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except Exception as error:  # a bug: still one line, with a way to see more
        if debug:
            raise
        print(
            f"captioner {args.command}: internal error: {type(error).__name__}: {error} (set CAPTIONER_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
