"""What the attack engine takes and gives back: jobs (one example under one attack), their results,
the size of a working batch, and the one error a model can raise under bf16 autocast."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from robaudit.attacks.base import Attack
from robaudit.errors import ModelOutputError

#: The working batch when none is given, for inputs of 2**19 / 256 = 2048 values or more.
DEFAULT_BATCH = 256


def auto_batch_size(numel: int) -> int:
    """The working batch for inputs of ``numel`` values when the user sets none.

    About 2 MiB of float32 input, between 256 and 4096 rows: a small model's passes cost several
    times less per example in batches of thousands than of hundreds (on the CPU as on a GPU),
    and inputs of at most 2048 values (32x32 greyscale, 8x8 colour) rarely feed large models.
    """
    return max(DEFAULT_BATCH, min(4096, (1 << 19) // max(1, numel)))


@dataclass(frozen=True)
class Job:
    """One example under one attack."""

    key: Hashable
    x: torch.Tensor  # CHW, in [0, 1]
    y: int
    seed: int
    attack: Attack
    #: The clean logits, which targeted objectives choose their target classes from (computed
    #: when a targeted run starts if not given).
    clean_logits: torch.Tensor | None = None


@dataclass(slots=True)
class Finished:
    """A job's result: the first misclassified iterate, else the lowest-margin one seen."""

    key: Hashable
    x_adv: torch.Tensor
    logits: torch.Tensor
    broken: bool
    forwards: int
    bad_gradient: bool


@contextmanager
def amp_errors(amp: bool, device_type: str) -> Iterator[None]:
    """Under autocast, an operation without a bf16 kernel is the user's to fix: say so."""
    try:
        yield
    except RuntimeError as exc:
        if not amp:
            raise
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()),
                     type(exc).__name__)
        raise ModelOutputError(
            f"the model does not run under --amp (bf16 autocast on {device_type}): "
            f"{first.rstrip('.')}; run without --amp"
        ) from exc
