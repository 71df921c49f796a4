"""What every attack takes and returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from robaudit.attacks.losses import margin

Model = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class AttackOutcome:
    """One attack's result for each example of a batch.

    ``x_adv`` is the first misclassified iterate of a broken example, else the last iterate.
    ``logits`` are the model's logits at ``x_adv``.
    """

    x_adv: torch.Tensor
    broken: torch.Tensor
    logits: torch.Tensor
    #: Forward passes spent on each example (the early stop shows here).
    forwards: torch.Tensor
    #: Examples whose input gradient was zero or not finite at some step (a gradient-masking sign).
    bad_gradient: torch.Tensor

    @property
    def pred(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)

    def margin(self, y: torch.Tensor) -> torch.Tensor:
        return margin(self.logits, y)

    @classmethod
    def unbroken(cls, x: torch.Tensor, logits: torch.Tensor) -> AttackOutcome:
        """The outcome of not attacking at all (used for examples that are already wrong)."""
        n = x.shape[0]
        zeros = torch.zeros(n, dtype=torch.long, device=x.device)
        return cls(x.clone(), zeros.bool(), logits.clone(), zeros, zeros.bool())


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64 of every element of a uint64 array (numpy's uint64 arithmetic wraps): every bit
    of a value reaches the low 32 bits, which are all that torch's CPU generator (a Mersenne
    Twister) takes from its seed."""
    v = values + np.uint64(0x9E3779B97F4A7C15)
    v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return v ^ (v >> np.uint64(31))


def fill_uniform_noise(out: torch.Tensor, keys: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Fill row ``i`` of the CPU tensor ``out`` with noise uniform in [-1, 1] from the generator of
    ``keys[i] = (seed, stream)``: one example (its data set index and the user's seed) and one run.

    Seeding per example and per run makes a result independent of batch size, batch order and
    sharding across processes.
    """
    if not keys:
        return out
    seeds, streams = (np.array(column, dtype=np.uint64) for column in zip(*keys, strict=True))
    generator = torch.Generator()
    for row, seed in zip(out, (_mix(_mix(seeds) ^ streams) >> np.uint64(1)).tolist(),
                         strict=True):
        generator.manual_seed(seed)
        row.uniform_(-1.0, 1.0, generator=generator)
    return out
