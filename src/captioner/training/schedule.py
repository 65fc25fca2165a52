"""Learning-rate schedules with warm-up: constant, step decay, plateau (on the validation metric), cosine.

One small class instead of stacking torch schedulers: its whole state is a few numbers (saved with
the run for ``--resume``), and it sets every parameter group's rate from its base rate.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class LearningRateSchedule:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: str,
        *,
        total_epochs: int,
        warmup_steps: int = 0,
        step_epochs: int = 3,
        gamma: float = 0.8,
        patience: int = 1,
        factor: float = 0.5,
        min_lr: float = 1e-6,
    ) -> None:
        self.optimizer, self.kind = optimizer, kind
        self.total_epochs, self.warmup_steps = total_epochs, warmup_steps
        self.step_epochs, self.gamma, self.patience, self.factor, self.min_lr = step_epochs, gamma, patience, factor, min_lr
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.scale = 1.0  # the epoch-level multiplier (step, plateau, cosine)
        self.best: float | None = None
        self.bad_epochs = 0
        self.steps = 0
        self.phase_start = 0  # the epoch the current phase (cross-entropy, then self-critical) began
        self._apply()

    def _apply(self) -> None:
        warm = min(1.0, (self.steps + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = max(base * self.scale, self.min_lr) * warm

    def after_step(self) -> None:
        self.steps += 1
        if self.warmup_steps and self.steps <= self.warmup_steps:
            self._apply()

    def after_epoch(self, epoch: int, metric: float | None = None) -> None:
        """Call after epoch ``epoch`` (0-based) with the validation metric (higher is better)."""
        done, length = epoch + 1 - self.phase_start, max(self.total_epochs - self.phase_start, 1)  # epochs of this phase
        if self.kind == "step":
            self.scale = self.gamma ** (done // self.step_epochs)
        elif self.kind == "cosine":
            self.scale = 0.5 * (1 + math.cos(math.pi * min(done, length) / length))
        elif self.kind == "plateau" and metric is not None:
            if self.best is None or metric > self.best:
                self.best, self.bad_epochs = metric, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs > self.patience - 1:
                    self.scale *= self.factor
                    self.bad_epochs = 0
        self._apply()

    def restart(self, base_lrs: list[float], epoch: int) -> None:
        """Start a new training phase at ``epoch`` (0-based) from new base rates: step decay and the
        cosine curve count from there, no plateau history."""
        self.base_lrs = list(base_lrs)
        self.scale, self.best, self.bad_epochs, self.phase_start = 1.0, None, 0, epoch
        self._apply()

    @property
    def rates(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs, "steps": self.steps, "base_lrs": self.base_lrs, "phase_start": self.phase_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.best, self.bad_epochs, self.steps = state["scale"], state["best"], state["bad_epochs"], state["steps"]
        self.base_lrs = list(state["base_lrs"])
        self.phase_start = state.get("phase_start", 0)
        self._apply()
