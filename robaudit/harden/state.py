"""What a harden run carries from epoch to epoch, and the rule that picks the kept epoch.

**The budget.** The input model's validation figures (epoch 0) set two floors: class-mean PGD
robust accuracy at most ``max_mean_drop`` below the input model's, clean accuracy at most
``max_clean_drop`` below it. Among the epochs within both (the input model always is), the kept
one has the highest worst-class PGD robust accuracy on the validation set (ties: the higher class
mean, then the earlier epoch). When no epoch within the budget lifts the worst class above the
input model's, the input model is kept (a higher class mean alone does not displace it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from robaudit.harden.train import Validation

#: The rule by which the kept checkpoint is chosen, as reports state it.
CRITERION = ("highest worst-class PGD robust accuracy on the validation set, among the epochs "
             "whose class-mean robust and clean accuracy stay within the budget")
#: Figures are fractions of whole examples: a difference below this is rounding.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Budget:
    """The floors an epoch must stay above to be kept."""

    max_mean_drop: float
    max_clean_drop: float
    mean_floor: float
    clean_floor: float

    @classmethod
    def around(cls, base: Validation, max_mean_drop: float, max_clean_drop: float) -> Budget:
        return cls(max_mean_drop, max_clean_drop, base.mean_robust - max_mean_drop,
                   base.clean_acc - max_clean_drop)

    def admits(self, v: Validation) -> bool:
        return (v.mean_robust >= self.mean_floor - TOLERANCE
                and v.clean_acc >= self.clean_floor - TOLERANCE)

    def to_dict(self) -> dict[str, float]:
        return {"max_mean_drop": self.max_mean_drop, "max_clean_drop": self.max_clean_drop,
                "mean_floor": self.mean_floor, "clean_floor": self.clean_floor}


def better(a: Validation, b: Validation, *, b_is_input: bool = False) -> bool:
    """Whether ``a`` lifts the worst class above ``b`` (ties: a higher class mean, except
    against the input model, which only a higher worst class displaces)."""
    if abs(a.worst_robust - b.worst_robust) > TOLERANCE:
        return a.worst_robust > b.worst_robust
    return not b_is_input and a.mean_robust > b.mean_robust + TOLERANCE


@dataclass
class Candidate:
    """An epoch's weights, as the scheme hands them back, and their validation figures."""

    epoch: int
    state: dict[str, torch.Tensor]
    validation: Validation


@dataclass
class RunState:
    """Everything a resumed run needs besides the model, optimiser and scheme."""

    epoch: int
    budget: Budget
    best: Candidate
    #: One plain-data record per epoch (epoch 0: the input model), as the report shows them.
    history: list[dict[str, Any]] = field(default_factory=list)

    def offer(self, candidate: Candidate) -> bool:
        """Keep ``candidate`` if the budget admits it and it beats the best so far; says
        whether the budget admitted it."""
        within = self.budget.admits(candidate.validation)
        if within and better(candidate.validation, self.best.validation,
                                  b_is_input=self.best.epoch == 0):
            self.best = candidate
        return within

    @property
    def within_budget(self) -> list[int]:
        return [h["epoch"] for h in self.history if h.get("within_budget")]

    def to_checkpoint(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "budget": self.budget.to_dict(),
                "best": {"epoch": self.best.epoch, "state": self.best.state,
                         "validation": self.best.validation.to_dict()},
                "history": self.history}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> RunState:
        best = state["best"]
        return cls(int(state["epoch"]), Budget(**state["budget"]),
                   Candidate(int(best["epoch"]), best["state"],
                             Validation.from_dict(best["validation"])),
                   list(state["history"]))
