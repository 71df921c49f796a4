"""What a harden run carries from epoch to epoch, and the rule that picks the kept epoch.

**The budget.** The input model's validation figures (epoch 0, judged as the gate judges: the
worst case over the scan's attacks) set three conditions: class-mean robust accuracy at most
``max_mean_drop`` below the input model's, clean accuracy at most ``max_clean_drop`` below it,
and every class that passed the gate's policy on the validation set still passes it and has not
fallen by more than the paired noise of its fall (validation figures are optimistic: a class that
passes there with room may sit on its bar on new images), nor at all if it passed within one
standard error of its bar. Among the
epochs that meet all three (the input model always does), the kept one has the highest
worst-class robust accuracy, **counted only beyond the noise** (see :func:`noise`): an epoch
displaces the one kept so far when its worst class is higher by more than the noise of the
difference, or when its worst class is no lower and its class mean is higher by more than the
noise of that difference (a model better everywhere by a little is better); between epochs, a
worst-class gain within the noise also goes to the higher class mean, but the input model is
displaced only by a gain beyond the noise. Both models are judged on the same examples, so the
noise is that of a paired difference: it counts the examples on which they disagree. When no
epoch qualifies, the input model is kept and the reports say why each epoch was refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from robaudit.harden.train import Validation

#: The rule by which the kept checkpoint is chosen, as reports state it.
CRITERION = ("highest worst-class robust accuracy (the gate's worst case) on the validation set, "
             "beyond the noise of the gain (one standard error, paired over the examples), or a "
             "class mean higher beyond its noise at a worst class no lower, among the epochs "
             "whose class-mean robust and clean accuracy stay within the budget and that fail "
             "no class the input model passed nor let one fall beyond the noise")
#: Figures are fractions of whole examples: a difference below this is rounding.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Budget:
    """The conditions an epoch must meet to be kept."""

    max_mean_drop: float
    max_clean_drop: float
    mean_floor: float
    clean_floor: float
    #: Classes (by name) that passed the gate's policy on the validation set before training.
    keep_passing: list[str] = field(default_factory=list)

    @classmethod
    def around(cls, base: Validation, max_mean_drop: float, max_clean_drop: float,
               class_names: list[str] | None = None) -> Budget:
        names = class_names or []
        passing = [n for n, ok in zip(names, base.passed, strict=False) if ok]
        return cls(max_mean_drop, max_clean_drop, base.mean_robust - max_mean_drop,
                   base.clean_acc - max_clean_drop, passing)

    def refusals(self, v: Validation, class_names: list[str] | None = None,
                 base: Validation | None = None) -> list[str]:
        """Why ``v`` is out of the budget (empty when it is within); with ``base`` (the input
        model's figures), a class that passed and fell beyond the noise is a reason too."""
        why = []
        if v.mean_robust < self.mean_floor - TOLERANCE:
            why.append(f"class mean {v.mean_robust:.1%} < {self.mean_floor:.1%}")
        if v.clean_acc < self.clean_floor - TOLERANCE:
            why.append(f"clean {v.clean_acc:.1%} < {self.clean_floor:.1%}")
        if class_names and v.verdicts:
            status = dict(zip(class_names, v.verdicts, strict=True))
            lost = [n for n in self.keep_passing if status.get(n) != "passed"]
            if lost:
                why.append(f"fails {', '.join(lost)}, which passed before")
            if base is not None and _paired(v, base):
                why += [fall for n, fall in self._falls(v, base, class_names) if n not in lost]
        return why

    def _falls(self, v: Validation, base: Validation,
               class_names: list[str]) -> list[tuple[str, str]]:
        """The classes that passed before and fell by more than the paired noise of the fall,
        or fell at all having passed within their noise (one standard error) of their bar."""
        falls = []
        for k, name in enumerate(class_names):
            if name not in self.keep_passing or not v.n[k]:
                continue
            drop = base.robust[k] - v.robust[k]
            spread = math.sqrt(_disagree(v, base, k) + 1) / v.n[k]
            bar = base.bars[k] if base.bars else None
            if drop > spread + TOLERANCE:
                falls.append((name, f"{name} fell {drop * 100:.1f} pp, beyond the noise "
                                    f"({spread * 100:.1f} pp)"))
            elif (drop > TOLERANCE and bar is not None
                  and base.robust[k] - bar < base.class_se(k)):
                falls.append((name, f"{name} fell {drop * 100:.1f} pp and passed within the "
                                    f"noise of its bar ({base.robust[k]:.1%} against "
                                    f"{bar:.1%})"))
        return falls

    def to_dict(self) -> dict[str, Any]:
        return {"max_mean_drop": self.max_mean_drop, "max_clean_drop": self.max_clean_drop,
                "mean_floor": self.mean_floor, "clean_floor": self.clean_floor,
                "keep_passing": list(self.keep_passing)}


def noise(a: Validation, b: Validation) -> float:
    """One standard error of the difference between the worst classes of ``a`` and ``b``.

    Judged on the same examples (both carry their outcomes), the difference is paired: for each
    of the two worst classes, ``sqrt(d + 1) / n`` with ``d`` the examples the models disagree on
    (one more, so that no disagreement is not taken as certainty), the larger of the two.
    Otherwise the classes are counted apart (:meth:`Validation.class_se`); zero when the counts
    are unknown."""
    if _paired(a, b):
        return max(math.sqrt(_disagree(a, b, k) + 1) / a.n[k]
                   for k in {a.worst_index, b.worst_index})
    if not (a.n and b.n):
        return 0.0
    return math.hypot(a.class_se(a.worst_index), b.class_se(b.worst_index))


def mean_noise(a: Validation, b: Validation) -> float:
    """One standard error of the paired difference of the class means of ``a`` and ``b``
    (``sqrt(sum_k (d_k + 1/K) / n_k^2) / K``); infinite when they cannot be paired."""
    if not _paired(a, b):
        return math.inf
    k = len(a.n)
    return math.sqrt(sum((_disagree(a, b, c) + 1 / k) / a.n[c] ** 2
                         for c in range(k) if a.n[c])) / k


def _paired(a: Validation, b: Validation) -> bool:
    return bool(a.outcomes) and [len(o) for o in a.outcomes] == [len(o) for o in b.outcomes]


def _disagree(a: Validation, b: Validation, k: int) -> int:
    return sum(x != y for x, y in zip(a.outcomes[k], b.outcomes[k], strict=True))


def better(a: Validation, b: Validation, *, b_is_input: bool = False) -> bool:
    """Whether ``a`` is better than ``b``: its worst class higher beyond the noise, or its
    class mean higher beyond its noise at a worst class no lower; between epochs (not against
    the input model), also a higher class mean at a worst class no lower."""
    gain = a.worst_robust - b.worst_robust
    if gain > noise(a, b) + TOLERANCE:
        return True
    if gain < -TOLERANCE:
        return False
    lift = a.mean_robust - b.mean_robust
    return lift > mean_noise(a, b) + TOLERANCE or (not b_is_input and lift > TOLERANCE)


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
    #: The validation set's class names (the budget names the classes that must keep passing).
    class_names: list[str] = field(default_factory=list)
    #: The moving average of the weights (empty when off); each epoch hands it back.
    ema: dict[str, torch.Tensor] = field(default_factory=dict)

    def offer(self, candidate: Candidate, refused: list[str] | None = None) -> bool:
        """Keep ``candidate`` if the budget admits it and it beats the best so far; says
        whether the budget admitted it (``refused``: the budget's reasons, when the caller has
        them already)."""
        if refused is None:
            refused = self.budget.refusals(candidate.validation, self.class_names, self.base)
        within = not refused
        if within and better(candidate.validation, self.best.validation,
                             b_is_input=self.best.epoch == 0):
            self.best = candidate
        return within

    @property
    def base(self) -> Validation | None:
        """The input model's validation figures (epoch 0's record)."""
        return Validation.from_dict(self.history[0]["validation"]) if self.history else None

    @property
    def within_budget(self) -> list[int]:
        return [h["epoch"] for h in self.history if h.get("within_budget")]

    def to_checkpoint(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "budget": self.budget.to_dict(),
                "best": {"epoch": self.best.epoch, "state": self.best.state,
                         "validation": self.best.validation.to_dict()},
                "history": self.history, "class_names": self.class_names, "ema": self.ema}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> RunState:
        best = state["best"]
        return cls(int(state["epoch"]), Budget(**state["budget"]),
                   Candidate(int(best["epoch"]), best["state"],
                             Validation.from_dict(best["validation"])),
                   list(state["history"]), list(state["class_names"]), state["ema"])
