"""What every attack is and returns: the attack protocol, its objectives, its outcome, and the
per-example seeded randomness the engine gives it.

An attack is a *step rule*: where a run starts, how it moves from one iterate to the next (from the
input gradient of its objective, or from queries alone), how it stays inside the threat model, and
how many forward passes it may spend. The engine (:mod:`robaudit.attacks.engine`) owns everything
attacks share: the working batch, the per-example early stop, the best iterate, bf16 with fp32
confirmation and the gradient health flags. Attacks never import the engine.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from robaudit.attacks.losses import margin
from robaudit.choices import NORMS

Model = Callable[[torch.Tensor], torch.Tensor]
#: ``loss(logits, y, target)``: one value per example, higher means closer to broken. ``target``
#: is the class a targeted loss pushes towards (ignored by untargeted losses).
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def predict(logits: torch.Tensor) -> torch.Tensor:
    """Each row's predicted class: its argmax, or ``logits.shape[1]`` (one past the last class,
    never a label) when the row holds a NaN or an inf.

    A non-finite output is no prediction, so it never counts as correct: argmax reads a row of
    NaNs as class 0, and a model that turns NaN off the data would keep class 0 "robust".
    """
    finite = torch.isfinite(logits).all(dim=1)
    return torch.where(finite, logits.argmax(dim=1), logits.shape[1])


@dataclass(frozen=True)
class Objective:
    """What one run ascends: a loss and, for targeted runs, which wrong class it aims at.

    ``target_rank`` k > 0 aims at the class with the (k+1)-th largest clean logit: the k-th most
    likely wrong class of a correctly classified example (APGD-T's choice of targets).
    """

    loss: Loss
    target_rank: int = 0


class Attack:
    """The contract between an attack and the engine, with its defaults, and what an attack is.

    A subclass is a step rule: gradient attacks (``uses_gradient``) provide ``objective_of_run``
    and ``checkpoint_interval`` (see :class:`robaudit.attacks.pgd.PGD`); gradient-free ones
    provide ``start`` and ``propose`` (see :class:`robaudit.attacks.square.Square`). What the
    rest of robaudit needs to know about an attack, it asks its traits (``uses_gradient``,
    ``scale_invariant``, ``targeted``, ``single_step``, ``runs``), never its name.
    """

    #: Whether a step needs the input gradient (else: forward passes only).
    uses_gradient: bool = True
    #: Whether every run starts from a random point in the ball.
    random_start: bool = True
    #: The first step size (gradient attacks).
    initial_step_size: float = 0.0

    def __init__(self, eps: float, *, steps: int, norm: str, name: str) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.eps = eps
        #: The budget of one run: the steps it may take (each one forward pass; gradient
        #: attacks add one backward pass and one last check).
        self.steps = steps
        self.norm = norm
        self.name = name
        #: The attack whose part this is (see :meth:`parts`); its own name otherwise.
        self.family = name

    @cached_property
    def stream(self) -> int:
        """Where this attack's random numbers begin among an example's random streams."""
        return (zlib.crc32(self.name.encode()) & 0xFFFF) << 16

    @property
    def runs(self) -> int:
        """Runs in all (random starts times objectives); each only on examples still robust."""
        return 1

    @property
    def scale_invariant(self) -> bool:
        """Whether its objective ignores the logits' scale and shift: a saturated softmax cannot
        starve its gradients."""
        return False

    @property
    def targeted(self) -> bool:
        """Whether its runs push towards chosen wrong classes."""
        return False

    @property
    def single_step(self) -> bool:
        """Whether it takes one step from the clean input: a baseline an iterative attack must
        never lose to (if it does, gradients mislead)."""
        return False

    @property
    def halving(self) -> bool:
        """Whether its step size halves at checkpoints (see ``checkpoint_interval``)."""
        return False

    def checkpoint_interval(self, step: int) -> int | None:
        """At a checkpoint of the step size (``step`` steps taken), the steps since the previous
        one; None elsewhere."""
        return None

    def parts(self) -> list[Attack]:
        """The attack as jobs to run side by side: one per run where runs are independent."""
        return [self]

    def describe(self) -> dict[str, object]:
        """Its settings, for the reports."""
        return {}


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
        return predict(self.logits)

    def margin(self, y: torch.Tensor) -> torch.Tensor:
        return margin(self.logits, y)

    @classmethod
    def unbroken(cls, x: torch.Tensor, logits: torch.Tensor) -> AttackOutcome:
        """The outcome of not attacking at all (used for examples that are already wrong)."""
        n = x.shape[0]
        zeros = torch.zeros(n, dtype=torch.long, device=x.device)
        return cls(x.clone(), zeros.bool(), logits.clone(), zeros, zeros.bool())


def example_seed(index: int, seed: int) -> int:
    """The seed of one example's randomness: its data set index and the user's ``--seed``.

    Every random start and every random query of an example derives from it, so figures do not
    depend on batch size, order or sharding. The gallery and harden replay attacks with it.
    """
    return index + seed * (1 << 32)


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64 of every element of a uint64 array (numpy's uint64 arithmetic wraps): every bit
    of a value reaches the low 32 bits, which are all that torch's CPU generator (a Mersenne
    Twister) takes from its seed."""
    v = values + np.uint64(0x9E3779B97F4A7C15)
    v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return v ^ (v >> np.uint64(31))


def _stream_seeds(keys: Sequence[tuple[int, int]]) -> np.ndarray:
    seeds, streams = (np.array(column, dtype=np.uint64) for column in zip(*keys, strict=True))
    return _mix(_mix(seeds) ^ streams)


def fill_uniform_noise(out: torch.Tensor, keys: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Fill row ``i`` of the CPU tensor ``out`` with noise uniform in [-1, 1] from the generator of
    ``keys[i] = (seed, stream)``: one example (:func:`example_seed`) and one run.

    Seeding per example and per run makes a result independent of batch size, batch order and
    sharding across processes.
    """
    if not keys:
        return out
    generator = torch.Generator()
    for row, seed in zip(out, (_stream_seeds(keys) >> np.uint64(1)).tolist(), strict=True):
        generator.manual_seed(seed)
        row.uniform_(-1.0, 1.0, generator=generator)
    return out


def stream_keys(keys: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """32-bit keys of ``(seed, stream)`` pairs for :func:`counter_uniform`."""
    if not keys:
        return torch.zeros(0, dtype=torch.long, device=device)
    low = (_stream_seeds(keys) & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return torch.from_numpy(low).to(device)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 without overflowing int64: split x into 16-bit halves.
    return (((x & 0xFFFF) * c) + (((x >> 16) * (c & 0xFFFF)) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32, C. Wellons) of int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(keys: torch.Tensor, counters: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` numbers uniform in [0, 1) for each row: a pure function of the row's key
    (:func:`stream_keys`) and counter (its step), computed on the device in one pass.

    A gradient-free attack draws new random numbers at every query of every example; re-seeding
    a generator per example per query would cost more than the query itself.
    """
    j = torch.arange(count, device=keys.device)
    salt = _hash32((counters[:, None] * count + j) & _M32)
    bits = _hash32((keys[:, None] ^ salt) & _M32)
    return bits.double().div_(float(1 << 32)).float()


def checkpoint_table(attacks: Sequence[Attack], device: torch.device) -> tuple[bool, torch.Tensor]:
    """Whether any of ``attacks`` halves its step size, and per attack (row) and step (column)
    the steps since the previous checkpoint where that step is one (0 elsewhere)."""
    halving = [a.halving for a in attacks]
    width = max(a.steps for a in attacks) + 1
    table = torch.zeros((len(attacks), width), dtype=torch.long)
    for k, a in enumerate(attacks):
        if halving[k]:
            for step in range(a.steps + 1):
                table[k, step] = a.checkpoint_interval(step) or 0
    return any(halving), table.to(device)

