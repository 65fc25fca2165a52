"""A run's state and its checkpoints: ``last/`` (everything --resume needs) and ``best/`` (the best epoch's model).

The training state (optimiser, scheduler, scaler, RNGs, counters) is saved without pickle. A nested structure of dicts, lists, numbers, strings and tensors is split in two: the tensors go to
a safetensors file under their path ("optimizer/state/3/exp_avg"), everything else to JSON with a
``{"__tensor__": path}`` marker where a tensor was. Loading reverses it; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from captioner.errors import CheckpointError

if TYPE_CHECKING:
    from captioner.models.captioner import Captioner
    from captioner.training.config import TrainConfig
    from captioner.training.distributed import Distributed
    from captioner.training.optimization import Optimization

STATE_TENSORS, STATE_JSON = "training_state.safetensors", "training_state.json"
TRAIN_CONFIG = "train_config.json"


@dataclass
class RunState:
    """Counters and early-stopping state: everything about progress that is not a tensor."""

    epoch: int = 0  # the epoch being run (0-based)
    step_in_epoch: int = 0  # batches of this epoch already done
    global_step: int = 0
    best_score: float | None = None
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    self_critical: bool = False  # the self-critical phase has started
    hard_attention_baseline: float | None = None  # hard attention's moving-average reward (None until a batch sampled)
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class Checkpoints:
    """The checkpoints of the run in ``out``: ``last/`` holds the model and the whole training state
    (optimiser, schedule, scaler, counters, every rank's random state), so --resume continues exactly;
    ``best/`` holds the model of the best epoch with its validation scores. Rank 0 writes them."""

    def __init__(self, out: Path, dist_info: "Distributed") -> None:
        self.out, self.dist_info = out, dist_info

    def save_last(self, model: "Captioner", config: "TrainConfig", optimization: "Optimization", state: RunState) -> None:
        """A collective: every rank calls it (weights checked equal, random states gathered)."""
        self.dist_info.check_same_weights(model)  # what rank 0 saves is every rank's model
        rngs = self.dist_info.gather(rng_state())
        if self.dist_info.is_main:
            files = dump_state({**optimization.state_dict(), "run": dict(state.__dict__), "rng": rngs})
            files[TRAIN_CONFIG] = json.dumps(config.to_dict(), indent=2).encode()
            model.save(self.out / "last", extra_files=files)
        self.dist_info.barrier()

    def save_best(self, model: "Captioner", config: "TrainConfig", record: dict[str, Any]) -> None:
        if self.dist_info.is_main:
            files = {TRAIN_CONFIG: json.dumps(config.to_dict(), indent=2).encode(), "val_scores.json": json.dumps(record, indent=2).encode()}
            model.save(self.out / "best", extra_files=files)

    def restore(self, folder: Path, model: "Captioner", optimization: "Optimization") -> tuple[RunState, list[dict[str, Any]]]:
        """Load ``folder`` (a ``last/``) into ``model`` and ``optimization``; its run state and the ranks' random states."""
        from captioner.models.captioner import Captioner

        training_state = load_state(folder)
        resumed = Captioner.load(folder, device=model.device)
        model.decoder.load_state_dict(resumed.decoder.state_dict())
        if resumed.encoder_in_checkpoint:
            model.encoder.load_state_dict(resumed.encoder.state_dict())
            model.encoder_in_checkpoint = True
        optimization.load_state_dict(training_state)
        return RunState(**training_state["run"]), training_state["rng"]


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": path}
    if isinstance(value, dict):
        if not all(isinstance(key, (str, int)) for key in value):
            raise TypeError(f"cannot save a dict with keys of type {sorted({type(k).__name__ for k in value})} at {path}")
        # JSON keys are strings: remember which were ints (optimiser state is keyed by parameter index).
        return {"__dict__": [[key, _split(item, f"{path}/{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_split(item, f"{path}/{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_split(item, f"{path}/{i}", tensors) for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"cannot save a {type(value).__name__} at {path}")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_join(item, tensors) for item in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        if "__float__" in value:
            return float(value["__float__"])
        if "__tuple__" in value:
            return tuple(_join(item, tensors) for item in value["__tuple__"])
        if "__dict__" in value:
            return {key: _join(item, tensors) for key, item in value["__dict__"]}
    return value


def dump_state(state: dict[str, Any]) -> dict[str, bytes]:
    """``state`` as the two files that hold it: {file name: contents}."""
    from safetensors.torch import save as safetensors_bytes

    tensors: dict[str, torch.Tensor] = {}
    structure = _split(state, "state", tensors)
    return {STATE_TENSORS: safetensors_bytes(tensors), STATE_JSON: json.dumps(structure).encode("utf-8")}


def load_state(folder: Path) -> dict[str, Any]:
    try:
        structure = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / STATE_TENSORS), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no training state; it cannot be resumed (it is a model checkpoint only)") from None
    except (json.JSONDecodeError, SafetensorError, OSError) as error:
        raise CheckpointError(f"training state in {folder} is damaged: {str(error).splitlines()[0] if str(error) else error}") from None
    try:
        return _join(structure, tensors)
    except KeyError as error:
        raise CheckpointError(f"training state in {folder} is damaged: missing tensor {error}") from None


def rng_state() -> dict[str, Any]:
    import random

    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"name": numpy_state[0], "keys": numpy_state[1], "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"], numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
