"""Class weighting schemes: what each class trains with in the next epoch.

Every scheme turns the figures of the last epoch into :class:`ClassSettings`: a loss weight for
each class's clean ("natural") term and for its adversarial ("boundary") term, an ε and a TRADES β
per class. Weights are scaled so that a uniform weighting is 1 for every class; the training loss
divides by the batch's total weight, so only their ratios matter.

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
- ``cfa``: Class-wise Calibrated Fair Adversarial training, Wei et al., CVPR 2023. With ``t_k``
  the class's robust accuracy on its own training examples in the previous epoch:
  ``ε_k = (λ1 + t_k) · ε`` (CCM) and ``β_k = (λ2 + t_k) · β`` (CCR, TRADES only; the loss is
  ``(CE + β_k KL) / (1 + β_k)``); the first epoch uses ε and β. Its weight averaging (FAWA) lives
  in the training loop: see :mod:`robaudit.harden.train`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from robaudit.harden.config import HardenConfig


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


@dataclass
class Scheme:
    """A weighting scheme's state; ``update`` moves it, ``settings`` reads it."""

    name: str
    num_classes: int
    eps: float
    beta: float
    config: HardenConfig
    #: FRL multipliers and per-class ε factors; CFA's last training robust accuracy.
    state: dict[str, list[float]] = field(default_factory=dict)

    def settings(self) -> ClassSettings:
        k = self.num_classes
        ones = [1.0] * k
        eps = [self.eps] * k
        beta = [self.beta] * k
        if self.name == "inverse" and "weight" in self.state:
            return ClassSettings(self.state["weight"], self.state["weight"], eps, beta)
        if self.name == "frl" and "phi_nat" in self.state:
            nat = _lagrangian_weights(self.state["phi_nat"])
            bndy = _lagrangian_weights(self.state["phi_bndy"])
            if self.config.uses_class_eps:
                eps = [self.eps * f for f in self.state["eps_factor"]]
            return ClassSettings(nat, bndy, eps, beta)
        if self.name == "cfa" and "train_robust" in self.state:
            t = self.state["train_robust"]
            eps = [(self.config.lambda1 + tk) * self.eps for tk in t]
            if self.config.objective == "trades":
                beta = [(self.config.cfa_lambda2 + tk) * self.beta for tk in t]
            return ClassSettings(ones, ones, eps, beta)
        return ClassSettings(ones, list(ones), eps, beta)

    def update(self, feedback: Feedback) -> None:
        """Take in the last epoch's figures (before the first epoch: the model as loaded)."""
        if self.name == "inverse":
            errors = [1.0 - r for r in feedback.val_robust]
            self.state["weight"] = _normalise([max(e, 0.01) for e in errors])
        elif self.name == "frl":
            self._update_frl(feedback)
        elif self.name == "cfa" and feedback.train_robust is not None:
            self.state["train_robust"] = list(feedback.train_robust)

    def _update_frl(self, feedback: Feedback) -> None:
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

    def state_dict(self) -> dict[str, Any]:
        return {name: list(values) for name, values in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {name: [float(v) for v in values] for name, values in state.items()}


def make_scheme(config: HardenConfig, num_classes: int) -> Scheme:
    """The scheme ``config.reweight`` names, in its initial state."""
    return Scheme(config.reweight, num_classes, config.scan.eps, config.beta, config)


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
