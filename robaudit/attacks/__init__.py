"""Attacks in the L∞ or L2 ball, in pixel space [0, 1], and the engine that runs them.

An attack is one file (its step rule) and one line in :data:`ATTACKS` below.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from robaudit.attacks.base import Attack, AttackOutcome, example_seed
from robaudit.attacks.losses import (
    cross_entropy_targeted,
    cw_margin,
    dlr,
    dlr_targeted,
    temperature_cross_entropy,
)
from robaudit.attacks.pgd import PGD
from robaudit.attacks.square import Square
from robaudit.choices import NORMS, PRESETS
from robaudit.errors import ConfigError

__all__ = ["ATTACKS", "NORMS", "PGD", "PRESETS", "Attack", "AttackOutcome", "AttackSettings",
           "Square", "build_attack", "build_attacks", "catalogue", "example_seed", "one_step_pairs",
           "prototype"]

#: AutoAttack's reference budgets (Croce and Hein 2020): APGD's iterations, APGD-T's target
#: classes, Square's queries.
REFERENCE_STEPS = 100
REFERENCE_TARGETS = 9
#: Target classes of dlr-t and ce-t (the scan's finish): on the example, L2, 5 targets land on
#: AutoAttack's figure at 40% of the passes of 9 (benchmarks/RESULTS.md).
TARGETS = 5
REFERENCE_QUERIES = 5000


@dataclass(frozen=True)
class AttackSettings:
    """The hyperparameters every attack is built from."""

    eps: float
    steps: int = 20
    step_size: float | None = None
    restarts: int = 1
    temperatures: tuple[float, ...] = (0.1, 0.5)
    schedule: str = "halving"
    norm: str = "linf"
    #: Square's queries per example.
    queries: int = REFERENCE_QUERIES
    #: Target classes of the targeted attacks (the most likely wrong ones); None: each attack's
    #: own default (AutoAttack's 9 for apgd-t, 5 for dlr-t and ce-t).
    targets: int | None = None
    #: The model's classes, when known: a targeted attack aims at its classes - 1 wrong ones at
    #: most (a run more would repeat a target).
    classes: int | None = None

    def targeted(self, default: int) -> int:
        """Target classes of a targeted attack: ``targets`` (else ``default``), capped."""
        wanted = self.targets or default
        return wanted if self.classes is None else max(1, min(wanted, self.classes - 1))

    def pgd(self, name: str, **overrides) -> PGD:
        """A PGD with these settings, some of them overridden."""
        kwargs = {"steps": self.steps, "step_size": self.step_size, "restarts": self.restarts,
                  "schedule": self.schedule, "norm": self.norm, **overrides}
        return PGD(self.eps, name=name, **kwargs)


def _fgsm(s: AttackSettings) -> PGD:
    # One step of size eps from the clean input (Goodfellow et al., 2015): FGSM under L∞, FGM
    # (the normalised gradient) under L2.
    return PGD(s.eps, steps=1, step_size=s.eps, restarts=1, random_start=False, norm=s.norm,
               schedule="fixed", name="fgsm")


def _reference(s: AttackSettings, name: str, **overrides) -> PGD:
    # AutoAttack's own budget: 100 iterations from 2*eps, halving; no restarts.
    return s.pgd(name, steps=REFERENCE_STEPS, step_size=None, restarts=1, schedule="halving",
                 **overrides)


#: Attack name -> (factory, one-line description).
ATTACKS: dict[str, tuple[Callable[[AttackSettings], Attack], str]] = {
    "fgsm": (_fgsm, "FGSM (L2: FGM): one gradient step of size eps"),
    "pgd": (lambda s: s.pgd("pgd"), "PGD on cross-entropy, random start (Madry et al. 2018)"),
    "tpgd": (lambda s: s.pgd("tpgd", losses=[temperature_cross_entropy(t)
                                             for t in s.temperatures]),
             "Temperature-PGD: PGD on cross-entropy of softmax(z/T) (Tian et al. 2021)"),
    "cw": (lambda s: s.pgd("cw", losses=[cw_margin]),
           "PGD on the CW margin loss max_{j!=y} z_j - z_y"),
    "dlr": (lambda s: s.pgd("dlr", losses=[dlr]),
            "PGD on the scale-invariant DLR loss (Croce and Hein 2020)"),
    "dlr-t": (lambda s: s.pgd("dlr-t", losses=[dlr_targeted], targets=s.targeted(TARGETS)),
              "PGD on targeted DLR, one run per most likely wrong class"),
    "ce-t": (lambda s: s.pgd("ce-t", losses=[cross_entropy_targeted],
                              targets=s.targeted(TARGETS)),
             "PGD on targeted cross-entropy, one run per most likely wrong class"),
    "apgd-ce": (lambda s: _reference(s, "apgd-ce"),
                "AutoAttack's APGD-CE budget: 100 halving steps on cross-entropy"),
    "apgd-t": (lambda s: _reference(s, "apgd-t", losses=[dlr_targeted],
                                    targets=s.targeted(REFERENCE_TARGETS)),
               "AutoAttack's APGD-T budget: 100 halving steps of targeted DLR per target"),
    "square": (lambda s: Square(s.eps, queries=s.queries, norm=s.norm),
               "Square Attack: gradient-free random search, forward passes only "
               "(Andriushchenko et al. 2020)"),
}

def build_attack(name: str, settings: AttackSettings) -> Attack:
    """The attack called ``name``; ``ConfigError`` with a suggestion for an unknown name."""
    try:
        factory, _description = ATTACKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, [*ATTACKS, *PRESETS], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown attack '{name}'.{hint} Choose from: {', '.join(ATTACKS)}, or a preset: "
            f"{', '.join(PRESETS)}."
        ) from None
    return factory(settings)


def build_attacks(names: Sequence[str], settings: AttackSettings) -> list[Attack]:
    return [build_attack(name, settings) for name in names]


@functools.cache
def prototype(name: str) -> Attack:
    """The attack called ``name`` with default settings: what the scan asks of its traits
    (gradient-based or not, scale-invariant, targeted) when it has only a name."""
    return build_attack(name, AttackSettings(eps=1.0))


def one_step_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """(one-step, iterative) pairs among the untargeted gradient attacks ``names``: the one-step
    attack must never be the stronger of a pair unless the gradients mislead (a sign of
    gradient masking)."""
    kinds = {a: prototype(a) for a in names}
    iterative = [a for a, k in kinds.items()
                 if k.uses_gradient and not k.single_step and not k.targeted]
    return [(one, many) for one, k in kinds.items() if k.single_step for many in iterative]


def catalogue() -> list[str]:
    """A line per attack (its name, description and traits) and per preset: ``robaudit
    attacks``."""
    lines = []
    for name, (_factory, description) in ATTACKS.items():
        kind = prototype(name)
        traits = ["gradient" if kind.uses_gradient else "queries only"]
        traits += [t for t, on in (("scale-invariant", kind.scale_invariant),
                                   ("targeted", kind.targeted), ("one step", kind.single_step))
                   if on]
        lines.append(f"{name:8} {description} [{', '.join(traits)}]")
    return lines + [f"{name:8} preset: {', '.join(names)}" for name, names in PRESETS.items()]
