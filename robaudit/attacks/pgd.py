"""Projected gradient descent, the step rule of every gradient attack robaudit runs.

PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
Temperature-PGD: Tian et al., "Analysis and Applications of Class-wise Robustness in Adversarial
Training", KDD 2021. Step-size halving and targeted DLR: APGD and APGD-T (Croce and Hein, "Reliable
evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks", ICML
2020), without APGD's momentum. Threat model: ``||x_adv - x||_p <= eps`` (p = ∞ or 2) in pixel
space ``[0, 1]``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from functools import cached_property

from robaudit.attacks.base import Attack, Loss, Objective
from robaudit.attacks.losses import SCALE_INVARIANT, TemperatureCrossEntropy, cross_entropy
from robaudit.attacks.runnable import Runnable
from robaudit.choices import SCHEDULES


class PGD(Attack, Runnable):
    """PGD: ``x <- Π_{ball ∩ [0,1]}(x + step_size · d)``, with ``d = sign(∇x L)`` under L∞ and
    ``∇x L / ||∇x L||_2`` under L2.

    Each example stops costing compute at the first iterate that is misclassified. ``restarts``
    random starts run for each loss in ``losses`` (the temperatures of Temperature-PGD) and, with
    ``targets`` k > 0, for each of the k most likely wrong classes; each only on examples still
    robust, and the worst case over all of them counts. With ``schedule="halving"`` the step size
    starts at 2·eps and halves when the loss stalls, as in APGD.
    """

    def __init__(
        self,
        eps: float,
        *,
        steps: int = 20,
        step_size: float | None = None,
        restarts: int = 1,
        losses: Sequence[Loss] = (cross_entropy,),
        targets: int = 0,
        random_start: bool = True,
        schedule: str = "halving",
        norm: str = "linf",
        name: str = "pgd",
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        super().__init__(eps, steps=steps, norm=norm, name=name)
        self.schedule = schedule
        if step_size is not None:
            self.initial_step_size = step_size
        elif schedule == "halving":
            self.initial_step_size = 2.0 * eps
        else:
            self.initial_step_size = 2.5 * eps / steps
        self.restarts = restarts
        ranks = range(1, targets + 1) if targets else (0,)
        self.objectives = tuple(Objective(loss, rank) for loss in losses for rank in ranks)
        self.random_start = random_start

    @property
    def step_size(self) -> float:
        return self.initial_step_size

    @property
    def runs(self) -> int:
        """Random starts in all: ``restarts`` for each objective."""
        return len(self.objectives) * self.restarts

    @property
    def scale_invariant(self) -> bool:
        return all(o.loss in SCALE_INVARIANT for o in self.objectives)

    @property
    def targeted(self) -> bool:
        return any(o.target_rank > 0 for o in self.objectives)

    @property
    def single_step(self) -> bool:
        return self.steps == 1 and not self.random_start

    @property
    def halving(self) -> bool:
        return self.schedule == "halving"

    def describe(self) -> dict[str, object]:
        about: dict[str, object] = {"steps": self.steps, "step_size": self.initial_step_size,
                                    "restarts": self.restarts, "schedule": self.schedule}
        targets = sum(o.target_rank > 0 for o in self.objectives)
        if targets:
            about["targets"] = targets
        temperatures = [o.loss.temperature for o in self.objectives
                        if isinstance(o.loss, TemperatureCrossEntropy)]
        if temperatures:
            about["temperatures"] = list(dict.fromkeys(temperatures))
        return about

    def objective_of_run(self, run: int) -> Objective:
        return self.objectives[run // self.restarts]

    def parts(self) -> list[Attack]:
        """One attack per run, to run side by side instead of one after the other: part ``r``
        starts where run ``r`` starts (the same random stream and objective) and takes the same
        steps, so the first part that breaks an example breaks it as run ``r`` would. The parts
        keep this attack's name as their ``family`` (for timings)."""
        if self.runs == 1:
            return [self]
        parts = []
        for run in range(self.runs):
            part = copy.copy(self)
            part.objectives = (self.objective_of_run(run),)
            part.restarts = 1
            part.name = f"{self.name}#{run + 1}"
            part.family = self.name
            part.__dict__["stream"] = self.stream + run  # overrides the cached property
            parts.append(part)
        return parts

    @cached_property
    def _checkpoints(self) -> dict[int, int]:
        """APGD's checkpoints: step -> steps since the previous checkpoint."""
        fractions = [0.0, 0.22]
        while fractions[-1] < 1.0:
            fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
        # Rounded first: 0.57 * 100 is 57.000000000000007 in floating point.
        steps = sorted({math.ceil(round(p * self.steps, 9)) for p in fractions if p <= 1.0})
        return {b: b - a for a, b in itertools.pairwise(steps) if b > 0}

    def checkpoint_interval(self, step: int) -> int | None:
        """At a checkpoint (``step`` steps taken), the steps since the previous one."""
        if not self.halving:
            return None
        return self._checkpoints.get(step)
