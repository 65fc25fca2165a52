"""What changes the weights: the optimiser, its learning-rate schedule, and mixed precision.

Everything here is built once per run (as nanoGPT's ``train.py`` builds its autocast context and
its scaler once), so the training loop has no branches for precision: it always runs the step under
``precision.autocast`` and always goes through the scaler, which is a pass-through when disabled
(everything but fp16 on a GPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ContextManager

import torch
from torch import nn

from captioner.errors import ConfigError
from captioner.training.schedule import LearningRateSchedule

if TYPE_CHECKING:
    from captioner.models.captioner import Captioner
    from captioner.training.config import TrainConfig


def autocast_dtype(config: "TrainConfig", device: torch.device) -> torch.dtype | None:
    """The dtype the step runs in under autocast, or None for full precision."""
    if device.type != "cuda" or config.amp == "off":
        if config.amp == "fp16" and device.type != "cuda":
            raise ConfigError(f"amp=fp16 needs a CUDA device; this run is on {device} (amp=bf16 works on CPUs)")
        # CPUs with bf16 instructions (AVX512-BF16, AMX) run the matrix products about 1.7x faster;
        # elsewhere bf16 is emulated and slower, hence off under "auto".
        return torch.bfloat16 if config.amp == "bf16" else None
    if config.amp == "bf16" or (config.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


@dataclass
class MixedPrecision:
    """One autocast context and one gradient scaler (enabled only for fp16, whose gradients underflow)."""

    dtype: torch.dtype | None
    autocast: ContextManager[Any]
    scaler: torch.amp.GradScaler

    @classmethod
    def for_run(cls, config: "TrainConfig", device: torch.device) -> "MixedPrecision":
        dtype = autocast_dtype(config, device)
        autocast = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        return cls(dtype, autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


@dataclass
class Optimization:
    """Adam over the decoder (and the encoder stages fine-tuning trains, in their own group from the
    start), its schedule, mixed precision and gradient clipping."""

    optimizer: torch.optim.Optimizer
    schedule: LearningRateSchedule
    precision: MixedPrecision
    grad_clip: float

    @classmethod
    def for_run(cls, model: "Captioner", config: "TrainConfig", device: torch.device) -> "Optimization":
        encoder_parameters: list[nn.Parameter] = []
        if config.fine_tune_encoder:
            model.encoder.fine_tune(config.fine_tune_encoder)
            encoder_parameters = [p for p in model.encoder.parameters() if p.requires_grad]
            model.encoder.fine_tune(0)  # switched on at fine_tune_from_epoch; until then the encoder is the package's
        groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": config.decoder_lr}]
        if encoder_parameters:
            groups.append({"params": encoder_parameters, "lr": config.encoder_lr})
        optimizer = torch.optim.Adam(groups, weight_decay=config.weight_decay)
        schedule = LearningRateSchedule(
            optimizer,
            config.schedule,
            total_epochs=config.epochs,
            warmup_steps=config.warmup_steps,
            step_epochs=config.lr_step_epochs,
            gamma=config.lr_gamma,
            patience=config.plateau_patience,
            factor=config.plateau_factor,
            min_lr=config.min_lr,
        )
        return cls(optimizer, schedule, MixedPrecision.for_run(config, device), config.grad_clip)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` (scaled for fp16, unscaled again), clipped to ``grad_clip``."""
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.scaler.scale(loss).backward()
        self.precision.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            trainable = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trainable, self.grad_clip)

    def step(self) -> None:
        """Apply the gradients and advance the schedule by one step."""
        self.precision.scaler.step(self.optimizer)
        self.precision.scaler.update()
        self.schedule.after_step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "scaler": self.precision.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state.get("scaler"):  # {} (or None, from older runs) when the scaler was off
            self.precision.scaler.load_state_dict(state["scaler"])
