"""Class weighting schemes: what each class trains with in the next epoch.

Every scheme turns the figures of the last epoch into :class:`ClassSettings`: a loss weight for
each class's clean ("natural") term and for its adversarial ("boundary") term, an ε and a TRADES β
per class. Weights are scaled so that a uniform weighting is 1 for every class; the training loss
divides by the batch's total weight, so only their ratios matter. A scheme is a small class in
:data:`SCHEMES`, looked up by the name ``--reweight`` gives:

- ``none``: uniform weights, the scan's ε, the configured β (plain adversarial fine-tuning).
- ``inverse``: both weights of class k proportional to its validation robust error ``1 - r_k``
  (normalised to mean 1; a class already at 100% keeps a small floor weight).
- ``frl``: Fair Robust Learning, Reweight (and Remargin with per-class ε), Xu et al., ICML 2021.
  Lagrange multipliers φ_nat, φ_bndy ≥ 0, one per class, rise with the class's validation gap:
  ``φ_i ← max(0, φ_i + α · (R_i − mean_j R_j − τ))`` for the clean error R_nat and the boundary
  error R_bndy (clean-correct but broken by PGD); then each vector is scaled back onto
  ``Σφ ≤ limit``. The Lagrangian ``R + Σ_i φ_i (R_i − R)`` with ``R = mean_i R_i`` gives class i
  the loss weight ``1/K + φ_i − mean(φ)`` (times K here), which stays positive since
  ``Σφ ≤ limit < 1``. Remargin: ``ε_i ← ε_i · exp(α · (R_bndy,i − R_bndy − τ))``, kept in
  [ε, 2ε] (the paper grows the margin of classes with large boundary errors).
- ``gate``: the gate's own policy as constraints (the default). Each class's target is the bar the
  gate's policy sets it on the validation set plus ``gate_margin`` (without a policy: the input
  model's class mean less ``frl_tau``), and a class that passed on the validation set before
  training also keeps its input figure. Multipliers ``φ_i ← max(0, φ_i + α (target_i − r_i))``
  (``r_i``: the class's validation robust accuracy, the gate's worst case; α = ``frl_rate``),
  scaled back onto ``Σφ ≤ frl_limit``; class i's weight, both terms, is its coefficient in the
  Lagrangian ``mean_i R_i + Σ_i φ_i R_i`` of the robust errors: ``1 + K φ_i``, normalised to mean
  1. A class below its bar gains weight until it clears it; a class that passed gains weight as
  soon as it falls below where it started, and the others give way.
- ``cfa``: Class-wise Calibrated Fair Adversarial training, Wei et al., CVPR 2023. With ``t_k``
  the class's robust accuracy on its own training examples in the previous epoch:
  ``ε_k = (λ1 + t_k) · ε`` (CCM) and ``β_k = (λ2 + t_k) · β`` (CCR, TRADES only; the loss is
  ``(CE + β_k KL) / (1 + β_k)``); the first epoch uses ε and β. FAWA: after an epoch whose
  worst-class validation robust accuracy reaches the threshold (by default the input model's
  own), the weights join an exponential average that starts from that first joining model; the
  average, once started, is what the epoch hands back (:meth:`Scheme.hand_back`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch loads when a scheme hands weights back, not when --help lists them
    import torch
    from torch import nn

# A scheme reads its hyperparameters from the HardenConfig, typed loosely here: config.py
# validates --reweight against SCHEMES, so this module must not import it.
HardenConfig = Any


@dataclass
class ClassSettings:
    """What each class trains with for one epoch (index = class)."""

    nat_weight: list[float]
    bndy_weight: list[float]
    eps: list[float]
    beta: list[float]

    def to_dict(self) -> dict[str, list[float]]:
        return {"nat_weight": self.nat_weight, "bndy_weight": self.bndy_weight,
                "eps": self.eps, "beta": self.beta}


@dataclass
class Feedback:
    """The figures a scheme updates from, per class."""

    #: Validation clean and PGD robust accuracy.
    val_clean: list[float]
    val_robust: list[float]
    #: Robust accuracy on the training examples of the last epoch (None before the first).
    train_robust: list[float] | None = None
    #: Per class: the robust accuracy the gate's policy asks of it on the validation set (None:
    #: no policy sets one), and whether the gate passed it there.
    bars: list[float | None] | None = None
    passed: list[bool] | None = None


class Scheme:
    """A weighting scheme's state: ``update`` moves it, ``settings`` reads it. Plain
    adversarial fine-tuning (``none``): uniform weights, one ε."""

    name: ClassVar[str] = "none"
    #: Per-class ε: True always, False never, None only with ``--class-eps``.
    class_eps: ClassVar[bool | None] = False
    #: Whether the scheme averages weights itself (then harden's own moving average is off).
    averages: ClassVar[bool] = False

    def __init__(self, num_classes: int, config: HardenConfig) -> None:
        self.num_classes = num_classes
        self.config = config
        self.eps = config.scan.eps
        self.beta = config.beta
        #: Per-class lists the scheme moves (FRL multipliers, CFA's t_k, ...).
        self.state: dict[str, list[float]] = {}

    def settings(self) -> ClassSettings:
        k = self.num_classes
        return ClassSettings([1.0] * k, [1.0] * k, [self.eps] * k, [self.beta] * k)

    def update(self, feedback: Feedback) -> None:
        """Take in the last epoch's figures (before the first epoch: the model as loaded)."""

    def hand_back(self, module: nn.Module, worst_robust: float) -> dict[str, Any]:
        """After an epoch's validation (``worst_robust``: its worst-class robust accuracy):
        what the scheme notes for the epoch's record. ``averaged`` in the notes (a state dict)
        means the scheme hands back those weights instead of the module's own."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {name: list(values) for name, values in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {name: [float(v) for v in values] for name, values in state.items()}


class Inverse(Scheme):
    """Both weights proportional to the class's validation robust error."""

    name = "inverse"

    def settings(self) -> ClassSettings:
        base = super().settings()
        if "weight" in self.state:
            base.nat_weight, base.bndy_weight = self.state["weight"], list(self.state["weight"])
        return base

    def update(self, feedback: Feedback) -> None:
        errors = [1.0 - r for r in feedback.val_robust]
        self.state["weight"] = _normalise([max(e, 0.01) for e in errors])


class FRL(Scheme):
    """Fair Robust Learning: Reweight, and Remargin with ``--class-eps``."""

    name = "frl"
    class_eps = None

    def settings(self) -> ClassSettings:
        base = super().settings()
        if "phi_nat" not in self.state:
            return base
        base.nat_weight = _lagrangian_weights(self.state["phi_nat"])
        base.bndy_weight = _lagrangian_weights(self.state["phi_bndy"])
        if self.config.class_eps:
            base.eps = [self.eps * f for f in self.state["eps_factor"]]
        return base

    def update(self, feedback: Feedback) -> None:
        k, c = self.num_classes, self.config
        nat = [1.0 - a for a in feedback.val_clean]
        bndy = [a - r for a, r in zip(feedback.val_clean, feedback.val_robust, strict=True)]
        gap_nat = [e - sum(nat) / k - c.frl_tau for e in nat]
        gap_bndy = [e - sum(bndy) / k - c.frl_tau for e in bndy]
        phi_nat = self.state.get("phi_nat", [0.0] * k)
        phi_bndy = self.state.get("phi_bndy", [0.0] * k)
        self.state["phi_nat"] = _project(
            [p + c.frl_rate * g for p, g in zip(phi_nat, gap_nat, strict=True)], c.frl_limit)
        self.state["phi_bndy"] = _project(
            [p + c.frl_rate * g for p, g in zip(phi_bndy, gap_bndy, strict=True)], c.frl_limit)
        factor = self.state.get("eps_factor", [1.0] * k)
        self.state["eps_factor"] = [
            min(2.0, max(1.0, f * math.exp(c.frl_rate * g)))
            for f, g in zip(factor, gap_bndy, strict=True)
        ]


class Gate(Scheme):
    """The gate's policy as constraints: classes below their bar, and classes that passed and
    fall, gain weight (see the module's docstring)."""

    name = "gate"

    def settings(self) -> ClassSettings:
        base = super().settings()
        if "phi" in self.state:
            weights = _normalise([1.0 + self.num_classes * p for p in self.state["phi"]])
            base.nat_weight, base.bndy_weight = weights, list(weights)
        return base

    def update(self, feedback: Feedback) -> None:
        c, robust = self.config, feedback.val_robust
        if "target" not in self.state:  # the model as loaded sets each class's target
            self.state["target"] = _targets(robust, feedback.bars, feedback.passed,
                                            c.gate_margin, c.frl_tau)
            self.state["phi"] = [0.0] * self.num_classes
        phi = [p + c.frl_rate * (t - r)
               for p, t, r in zip(self.state["phi"], self.state["target"], robust, strict=True)]
        self.state["phi"] = _project(phi, c.frl_limit)


def _targets(robust: Sequence[float], bars: Sequence[float | None] | None,
             passed: Sequence[bool] | None, margin: float, tau: float) -> list[float]:
    """Each class's target: its bar plus ``margin`` (no bar: the class mean less ``tau``), and
    at least its own figure if it passed."""
    k = len(robust)
    fallback = sum(robust) / k - tau
    bars = bars or [None] * k
    passed = passed or [True] * k
    return [max(fallback if bar is None else bar + margin, r if ok else 0.0)
            for r, bar, ok in zip(robust, bars, passed, strict=True)]


class CFA(Scheme):
    """Class-wise calibrated margins (and TRADES β) plus fairness-aware weight averaging."""

    name = "cfa"
    class_eps = True
    averages = True

    def __init__(self, num_classes: int, config: HardenConfig) -> None:
        super().__init__(num_classes, config)
        #: FAWA's running average; empty until an epoch joins.
        self.average: dict[str, torch.Tensor] = {}

    def settings(self) -> ClassSettings:
        base = super().settings()
        if "train_robust" in self.state:
            t, c = self.state["train_robust"], self.config
            base.eps = [(c.lambda1 + tk) * self.eps for tk in t]
            if c.objective == "trades":
                base.beta = [(c.cfa_lambda2 + tk) * self.beta for tk in t]
        return base

    def update(self, feedback: Feedback) -> None:
        if feedback.train_robust is not None:
            self.state["train_robust"] = list(feedback.train_robust)
        elif "threshold" not in self.state:  # the model as loaded sets the default threshold
            given = self.config.cfa_threshold
            self.state["threshold"] = [min(feedback.val_robust) if given is None else given]

    def hand_back(self, module: nn.Module, worst_robust: float) -> dict[str, Any]:
        joined = worst_robust >= self.state["threshold"][0]
        if joined:
            import torch

            with torch.no_grad():
                if not self.average:
                    self.average = {k: v.detach().clone() for k, v in module.state_dict().items()}
                else:
                    average_into(self.average, module, self.config.cfa_decay)
        notes: dict[str, Any] = {"fawa_joined": joined,
                                 "fawa_threshold": self.state["threshold"][0]}
        if self.average:
            notes["averaged"] = self.average
        return notes

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.average = state.pop("average", {})
        super().load_state_dict(state)


#: The weighting schemes by the name ``--reweight`` takes.
SCHEMES: dict[str, type[Scheme]] = {s.name: s for s in (Gate, FRL, CFA, Inverse, Scheme)}


def make_scheme(config: HardenConfig, num_classes: int) -> Scheme:
    """The scheme ``config.reweight`` names, in its initial state."""
    return SCHEMES[config.reweight](num_classes, config)


def average_into(average: dict[str, torch.Tensor], module: nn.Module, decay: float) -> None:
    """``θ̄ ← decay·θ̄ + (1 − decay)·θ`` for floating-point entries (CFA's weight averaging)."""
    import torch

    with torch.no_grad():
        for name, value in module.state_dict().items():
            if value.is_floating_point():
                average[name].mul_(decay).add_(value, alpha=1 - decay)
            else:
                average[name].copy_(value)


def _project(phi: Sequence[float], limit: float) -> list[float]:
    """Clip to φ ≥ 0, then scale down onto ``Σφ ≤ limit``."""
    clipped = [max(0.0, p) for p in phi]
    total = sum(clipped)
    return [p * limit / total for p in clipped] if total > limit else clipped


def _lagrangian_weights(phi: Sequence[float]) -> list[float]:
    # K · (1/K + φ_i − mean φ): the coefficient of class i's error in the Lagrangian, scaled
    # so that φ = 0 gives 1 for every class.
    k = len(phi)
    mean = sum(phi) / k
    return [1.0 + k * (p - mean) for p in phi]


def _normalise(values: Sequence[float]) -> list[float]:
    mean = sum(values) / len(values)
    return [v / mean for v in values]
