"""Several processes, one audit: ``torchrun --nproc-per-node N -m robaudit scan ...``.

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; nothing else is needed. Each rank
audits a disjoint shard of the (stratified) selection, the per-example records of all ranks are
gathered, and every rank computes the same figures from them. Random starts are seeded per
example, so the result equals a single-process run on the same data and seed. Only rank 0 prints
and writes reports. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from robaudit.errors import RobauditError, UsageError
from robaudit.metrics import Records


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> Context:
    """This process's place in a torchrun job (a single process when not under torchrun)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)")\
            from None
    return Context(rank, world, local_rank)


def is_main_process() -> bool:
    return context().is_main


def init(ctx: Context, device: torch.device) -> None:
    """Join the process group (once), NCCL for CUDA devices and gloo otherwise."""
    if not ctx.active or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))


def shard(indices: np.ndarray, ctx: Context) -> np.ndarray:
    """This rank's disjoint share of the selection (every rank selected the same indices)."""
    return indices[ctx.rank :: ctx.world] if ctx.active else indices


def gather(records: Records, ctx: Context, error: BaseException | None = None) -> Records:
    """All ranks' records, on every rank. A rank that failed ends the others with its message."""
    if not ctx.active:
        if error is not None:
            raise error
        return records
    message = None if error is None else f"{type(error).__name__}: {error}"
    parts: list[Any] = [None] * ctx.world
    dist.all_gather_object(parts, {"error": message, "records": None if error else
                                   records.pack()})
    failed = [(r, p["error"]) for r, p in enumerate(parts) if p["error"] is not None]
    if failed:
        if error is not None:
            raise error
        rank, text = failed[0]
        raise RobauditError(f"rank {rank} of {ctx.world} failed: {text}")
    return Records.unpack(records.attack_names, [part["records"] for part in parts])


def any_partial(partial: bool, ctx: Context) -> bool:
    """True on every rank when any rank was interrupted."""
    if not ctx.active:
        return partial
    flags: list[Any] = [None] * ctx.world
    dist.all_gather_object(flags, partial)
    return any(flags)


def finish(ctx: Context) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
