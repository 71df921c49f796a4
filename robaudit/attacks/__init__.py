"""Attacks in the L∞ ball, in pixel space [0, 1], and the engine that runs them on a batch."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from robaudit.attacks.base import AttackOutcome
from robaudit.attacks.losses import cw_margin, temperature_cross_entropy
from robaudit.attacks.pgd import PGD
from robaudit.errors import ConfigError

__all__ = ["ATTACKS", "PGD", "AttackOutcome", "AttackSettings", "build_attack", "build_attacks"]


@dataclass(frozen=True)
class AttackSettings:
    """The hyperparameters every attack is built from."""

    eps: float
    steps: int = 20
    step_size: float | None = None
    restarts: int = 1
    temperatures: tuple[float, ...] = (0.1, 0.5)
    schedule: str = "halving"


def _fgsm(s: AttackSettings) -> PGD:
    # One signed-gradient step of size eps from the clean input (Goodfellow et al., 2015).
    return PGD(s.eps, steps=1, step_size=s.eps, restarts=1, random_start=False, name="fgsm")


def _pgd(s: AttackSettings) -> PGD:
    return PGD(s.eps, steps=s.steps, step_size=s.step_size, restarts=s.restarts,
               schedule=s.schedule, name="pgd")


def _tpgd(s: AttackSettings) -> PGD:
    losses = [temperature_cross_entropy(t) for t in s.temperatures]
    return PGD(s.eps, steps=s.steps, step_size=s.step_size, restarts=s.restarts, losses=losses,
               schedule=s.schedule, name="tpgd")


def _cw(s: AttackSettings) -> PGD:
    return PGD(s.eps, steps=s.steps, step_size=s.step_size, restarts=s.restarts,
               losses=[cw_margin], schedule=s.schedule, name="cw")


#: Attack name -> (factory, one-line description).
ATTACKS: dict[str, tuple[Callable[[AttackSettings], PGD], str]] = {
    "fgsm": (_fgsm, "FGSM: one signed-gradient step of size eps"),
    "pgd": (_pgd, "PGD on cross-entropy, random start (Madry et al. 2018)"),
    "tpgd": (_tpgd, "Temperature-PGD: PGD on cross-entropy of softmax(z/T) (Tian et al. 2021)"),
    "cw": (_cw, "PGD on the CW margin loss max_{j!=y} z_j - z_y"),
}

def build_attack(name: str, settings: AttackSettings) -> PGD:
    """The attack called ``name``; ``ConfigError`` with a suggestion for an unknown name."""
    try:
        factory, _description = ATTACKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, ATTACKS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown attack '{name}'.{hint} Choose from: {', '.join(ATTACKS)}."
        ) from None
    return factory(settings)


def build_attacks(names: Sequence[str], settings: AttackSettings) -> list[PGD]:
    return [build_attack(name, settings) for name in names]
