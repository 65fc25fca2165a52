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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from captioner.atomic import atomic_directory, recover_directory
from captioner.data.vocabulary import Vocabulary
from captioner.errors import CaptionerError, CheckpointError
from captioner.limits import MAX_VOCABULARY

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


#: Bounds on what a checkpoint's files may ask us to read before anything is checked: the JSON files,
#: the safetensors header (a real one lists each tensor in ~100 bytes), and the vocabulary.
MAX_CONFIG_BYTES = 1_000_000
MAX_VOCAB_BYTES = 64_000_000
MAX_HEADER_BYTES = 16_000_000
MAX_VOCAB_SIZE = MAX_VOCABULARY
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class StoredCheckpoint:
    """A checkpoint folder whose small parts were read and checked: config, vocabulary, and the name
    and shape of every stored tensor (from the safetensors header). The weights are read by
    :meth:`tensors` only once the shapes are known to match the model the config describes."""

    folder: Path
    config: dict[str, Any]
    vocab: Vocabulary
    shapes: dict[str, tuple[int, ...]]  # as the model sees them (int8 matrices by their own shape, no scales)
    int8: bool = False  # whether its matrices are stored in int8 (saved with precision="int8")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every weight on the CPU, float (int8 matrices dequantised), each checked to be finite."""
        weights = self.folder / WEIGHTS
        try:
            tensors = load_file(str(weights), device="cpu")  # parses a JSON header and copies bytes: no code runs
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"checkpoint {weights} is not a valid safetensors file (corrupt or truncated?): {_first_line(error)}") from None
        tensors = dequantize_int8(tensors, self.folder)
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"checkpoint {self.folder}: {name} holds NaN or infinite values; the model cannot caption (was its training diverging?)")
        return tensors


def open_checkpoint(path: str | os.PathLike) -> StoredCheckpoint:
    """Read and cross-check a checkpoint folder's config, vocabulary and tensor shapes; every read is bounded."""
    folder = _checkpoint_folder(Path(path))
    config = read_config(folder)
    vocab_size = config.get("vocab_size")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 4 <= vocab_size <= MAX_VOCAB_SIZE:
        raise CheckpointError(f"checkpoint {folder}: config.json's vocab_size must be a whole number from 4 to {MAX_VOCAB_SIZE:,}, not {str(vocab_size)[:40]}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {WEIGHTS}")
    shapes, int8 = read_shapes(weights)
    vocab_path = folder / VOCAB
    if vocab_path.is_file() and vocab_path.stat().st_size > MAX_VOCAB_BYTES:
        raise CheckpointError(f"checkpoint {folder}: {VOCAB} is {vocab_path.stat().st_size:,} bytes, over the {MAX_VOCAB_BYTES:,}-byte limit")
    try:
        vocab = Vocabulary.load(vocab_path)
    except CaptionerError as error:
        raise CheckpointError(f"checkpoint {folder}: {error}") from None
    if vocab_size != len(vocab):
        raise CheckpointError(f"checkpoint {folder}: config.json says {vocab_size} words but vocab.json has {len(vocab)}")
    return StoredCheckpoint(folder, config, vocab, shapes, int8)


def read_shapes(weights: Path) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Tensor name -> shape from a safetensors file's header alone (its size bounded, every entry checked
    against the file's length), int8 scales left out, and whether there were any (int8 matrices); no
    tensor data is read."""

    def invalid(detail: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {weights} is not a valid safetensors file (corrupt or truncated?): {detail}")

    size = weights.stat().st_size
    with open(weights, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise invalid("shorter than its 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise invalid(f"a header of {length:,} bytes, over the {MAX_HEADER_BYTES:,}-byte limit")
        if 8 + length > size:
            raise invalid(f"its header runs past the end of the file ({size:,} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError) as error:
            raise invalid(f"its header is not JSON ({_first_line(error)})") from None
    if not isinstance(header, dict):
        raise invalid("its header is not a JSON object")
    data_bytes = size - 8 - length
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in _DTYPE_BYTES and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
        ok = ok and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in [*entry["shape"], *entry["data_offsets"]]) and len(entry["data_offsets"]) == 2
        if not ok:
            raise invalid(f"the entry of {str(name)[:60]!r} is not a tensor description")
        start, end = entry["data_offsets"]
        elements = 1
        for n in entry["shape"]:
            elements *= n
        if not start <= end <= data_bytes or end - start != elements * _DTYPE_BYTES[entry["dtype"]]:
            raise invalid(f"{str(name)[:60]!r} does not fit the file ({end:,} of {data_bytes:,} data bytes)")
        if not name.endswith(INT8_SCALE):
            shapes[name] = tuple(entry["shape"])
    return shapes, len(shapes) < len(header) - ("__metadata__" in header)


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


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
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"checkpoint {config_path} is {config_path.stat().st_size:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte limit")
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


def check_tensors(folder: str | os.PathLike, shapes: dict[str, tuple[int, ...]], expected: dict[str, torch.Tensor]) -> None:
    """Every expected tensor present with the right shape, and nothing else."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        raise CheckpointError(f"checkpoint {folder} does not match its config: {'; '.join(parts)}")
    for name, tensor in expected.items():
        if tuple(shapes[name]) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {folder} does not match its config or vocabulary: {name} has shape {tuple(shapes[name])}, expected {tuple(tensor.shape)}"
            )
