"""DDP plumbing for ``torchrun``: nothing home-made, just the environment torchrun sets.

Under ``torchrun --nproc-per-node N -m captioner train ...`` (or ``... caption ...``, which shares
the images out) the variables RANK, WORLD_SIZE and LOCAL_RANK are set; the process group uses NCCL
on GPUs and gloo on CPUs. Without them, the command runs in a single process and every helper here
is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from captioner.device import resolve_device
from captioner.errors import ConfigError

MAX_PROCESSES = 4096  # torchrun's WORLD_SIZE


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """``value`` from rank 0, on every rank."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def check_same_weights(self, module: torch.nn.Module) -> None:
        """Raise if the ranks' copies of ``module`` have drifted apart (DDP must keep them identical:
        a parameter whose gradients it does not synchronise would drift, and rank 0 would save only
        its own copy). A collective: every rank calls it."""
        if not self.enabled:
            return
        with torch.no_grad():
            fingerprint = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in module.parameters()]).cpu()  # (params, 2)
        fingerprints = self.gather(fingerprint)
        drifted = [rank for rank, other in enumerate(fingerprints) if not torch.equal(other, fingerprints[0])]
        if drifted:
            raise RuntimeError(f"the weights of rank(s) {drifted} differ from rank 0's: gradients were not synchronised")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def setup(device_name: str, timeout_minutes: float = 180) -> tuple[Distributed, torch.device]:
    """Join the process group if torchrun started us; pick the device.

    ``timeout_minutes`` bounds every collective. The other ranks wait in one while rank 0 builds the
    feature cache or validates, which on a large set (COCO on CPUs: most of an hour) outlasts
    PyTorch's default (30 minutes for gloo, 10 for NCCL).
    """
    try:
        world_size, rank, local_rank = (int(os.environ.get(name, default)) for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
    if not 0 <= rank < world_size <= MAX_PROCESSES or local_rank < 0:
        raise ConfigError(f"RANK {rank} of WORLD_SIZE {world_size}: RANK must be from 0 to WORLD_SIZE - 1, WORLD_SIZE from 1 to {MAX_PROCESSES}")
    device = resolve_device(device_name, local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = Distributed(rank, world_size, local_rank)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return info, device


def wrap_for_ddp(module: torch.nn.Module, info: Distributed, device: torch.device) -> torch.nn.Module:
    """The module each training step runs: under DDP, a wrapper over the parameters that train *now*
    (DDP synchronises only the gradients of parameters that required them when it was built, so it
    is wrapped again when fine-tuning unfreezes the encoder); the module itself otherwise."""
    if not info.enabled:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def cleanup(info: Distributed) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
