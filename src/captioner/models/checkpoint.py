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

PLAIN_FORMAT = 1  # one decoder, floating-point weights
EXTENDED_FORMAT = 2  # adds ensembles ("ensemble": several decoders and/or views) and int8 weights
CHECKPOINT_FORMAT = EXTENDED_FORMAT  # the newest format this version reads
INT8_SCALE = ".int8_scale"  # int8 weight W is stored with W.int8_scale: W = int8 * scale[:, None]
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


def save_checkpoint(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    vocab: Vocabulary,
    *,
    extra_files: dict[str, bytes] | None = None,
    format: int = PLAIN_FORMAT,
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
    return dequantize_int8(tensors, folder), config, vocab


def quantize_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices to int8 with one float32 scale per row (symmetric, round to nearest); other floating
    tensors (biases) to float16. A quarter of float32's size, for word and gate weights whose rows
    span similar ranges."""
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.dim() == 2:
            weight = tensor.float()
            scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (rows,)
            stored[name] = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            stored[name + INT8_SCALE] = scale
        else:
            stored[name] = tensor.half() if tensor.is_floating_point() else tensor
    return stored


def dequantize_int8(tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """The float32 weights of int8 ones (see :func:`quantize_int8`); other tensors as they are."""
    result = {name: tensor for name, tensor in tensors.items() if not name.endswith(INT8_SCALE)}
    for name, scale in tensors.items():
        if not name.endswith(INT8_SCALE):
            continue
        weight = result.get(name[: -len(INT8_SCALE)])
        if weight is None or weight.dtype != torch.int8 or weight.dim() != 2 or tuple(scale.shape) != (weight.shape[0],):
            raise CheckpointError(f"checkpoint {folder}: {name} does not match an int8 matrix")
        result[name[: -len(INT8_SCALE)]] = weight.float() * scale.float()[:, None]
    unscaled = [name for name, tensor in result.items() if tensor.dtype == torch.int8]
    if unscaled:
        raise CheckpointError(f"checkpoint {folder}: int8 tensor {unscaled[0]} has no {INT8_SCALE}")
    return result


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
