"""The checkpoint format: one folder, nothing in it is ever unpickled.

::

    model.safetensors   tensors only (safetensors: a JSON header + raw bytes; cannot carry code)
    config.json         {"format": 1, "encoder": {...}, "decoder": {...}, "preprocessing": {...}, ...}
    vocab.json          the vocabulary the embedding and classifier rows correspond to

Writing builds the folder under a temporary name and renames it into place, so a crash (or a full
disk) mid-write leaves the previous checkpoint as it was. Reading checks every piece against the
others and fails with one line that says what does not match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from captioner.atomic import atomic_directory, recover_directory
from captioner.data.vocabulary import Vocabulary
from captioner.errors import CaptionerError, CheckpointError

SINGLE_FORMAT = 1  # one encoder, one decoder
ENSEMBLE_FORMAT = 2  # adds "ensemble": several decoders and/or views (captioner.models.ensemble)
CHECKPOINT_FORMAT = ENSEMBLE_FORMAT  # the newest format this version reads
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


def save_checkpoint(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    vocab: Vocabulary,
    *,
    extra_files: dict[str, bytes] | None = None,
    format: int = SINGLE_FORMAT,
) -> Path:
    """Write a checkpoint folder atomically, replacing a checkpoint already there (never another folder)."""
    path = Path(path)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    with atomic_directory(path, overwrite=True, marker=WEIGHTS, what="a checkpoint") as building:
        save_file(tensors, str(building / WEIGHTS), metadata={"format": "captioner", "version": str(format)})
        (building / CONFIG).write_text(json.dumps({"format": format, **config}, indent=2), encoding="utf-8")
        vocab.save(building / VOCAB)
        for name, data in (extra_files or {}).items():
            (building / name).write_bytes(data)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], Vocabulary]:
    """Read and cross-check a checkpoint folder: (tensors on CPU, config, vocabulary)."""
    folder = _checkpoint_folder(Path(path))
    config = read_config(folder)
    try:
        vocab = Vocabulary.load(folder / VOCAB)
    except CaptionerError as error:
        raise CheckpointError(f"checkpoint {folder}: {error}") from None
    if config.get("vocab_size") != len(vocab):
        raise CheckpointError(f"checkpoint {folder}: config.json says {config.get('vocab_size')} words but vocab.json has {len(vocab)}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {WEIGHTS}")
    try:
        tensors = load_file(str(weights), device="cpu")  # parses a JSON header and copies bytes: no code runs
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {weights} is not a valid safetensors file (corrupt or truncated?): {first_line}") from None
    return tensors, config, vocab


def read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {CONFIG}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CheckpointError(f"cannot read {config_path}: {error.strerror or error}") from None
    except RecursionError:
        raise CheckpointError(f"checkpoint {config_path} is not usable JSON: nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, a number over int's 4300-digit limit
        raise CheckpointError(f"checkpoint {config_path} is not valid JSON: {str(error).split(';')[0]}") from None
    if not isinstance(config, dict) or "format" not in config:
        raise CheckpointError(f"{config_path} is not a captioner checkpoint config (no 'format')")
    if not isinstance(config["format"], int) or isinstance(config["format"], bool) or config["format"] > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {folder} has format {config['format']}, newer than this captioner reads ({CHECKPOINT_FORMAT}); upgrade captioner"
        )
    return config


def _checkpoint_folder(path: Path) -> Path:
    recover_directory(path, marker=WEIGHTS)  # a crash while it was being replaced
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"refusing to load {path}: captioner checkpoints are safetensors folders and pickle files are never loaded (they can run code)"
            )
        if path.name == WEIGHTS:
            return path.parent
        raise CheckpointError(f"{path} is a file; a checkpoint is a folder with {WEIGHTS}, {CONFIG} and {VOCAB}")
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def check_tensors(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every expected tensor present with the right shape, and nothing else."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        raise CheckpointError(f"checkpoint {folder} does not match its config: {'; '.join(parts)}")
    for name, tensor in expected.items():
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {folder} does not match its config or vocabulary: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(tensor.shape)}"
            )
