"""A masked figure never passes: the signs of gradient masking per class, the escalation they
trigger, and the classes whose signs remain (judged *unreliable*).

Signs (Athalye et al. 2018; Croce and Hein 2020): zero or non-finite input gradients, probability
outputs, a randomised model, FGSM stronger than PGD, robustness rising with ε. Escalation runs the
scale-invariant DLR loss, then the gradient-free Square Attack, on the examples of the classes
concerned that every attack so far left robust, each on the survivors of the one before.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from robaudit.attacks import one_step_pairs, prototype
from robaudit.metrics import Records

#: A class shows the bad-gradient sign when more of its attacked examples than this had a zero
#: or non-finite input gradient at some step.
BAD_GRADIENT_SHARE = 0.05
#: After escalation, a class stays masked when even the scale-invariant loss had bad gradients
#: on more than this share of the examples it attacked: only a black-box search tested it.
RESIDUAL_BAD_GRADIENT_SHARE = 0.5
#: ... or when Square broke more than this share of its clean-correct examples (and at least
#: two) that every gradient attack left robust: the gradients do not find what is there.
SQUARE_EXCESS = 0.03
#: Signs that concern the whole model, not a class.
GLOBAL_SIGNS = ("probability_outputs", "randomised_model")
#: Signs that a scale-invariant loss with healthy gradients explains away: saturated softmax
#: (scaled logits, probability outputs) starves cross-entropy's gradients, not DLR's.
SATURATION_SIGNS = ("bad_gradients", "probability_outputs")


@dataclass
class Escalation:
    """What escalation did: the signs that triggered it, where it ran, and what it found."""

    #: Class name -> the checks that fired for it.
    signs: dict[str, list[str]] = field(default_factory=dict)
    attacks: tuple[str, ...] = ()
    #: Survivors attacked (at the gate's ε).
    examples: int = 0
    seconds: float = 0.0
    #: Class name -> why its figure is unreliable after escalation.
    unreliable: dict[str, str] = field(default_factory=dict)
    #: Classes whose only signs were saturation's, with healthy gradients under a
    #: scale-invariant loss: no gradient-free search was needed there.
    explained: list[str] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        return bool(self.attacks)

    def to_dict(self) -> dict[str, object]:
        return {"ran": self.ran, "attacks": list(self.attacks), "classes": sorted(self.signs),
                "examples": self.examples, "signs": self.signs,
                "unreliable": self.unreliable, "explained": self.explained}

    def warnings(self) -> list[str]:
        """What the report's warnings say about it: where it ran and what stayed unreliable."""
        found = []
        if self.ran:
            classes = ", ".join(sorted(self.signs))
            found.append(f"escalated: signs of gradient masking in class(es) {classes}; "
                         f"{' and '.join(self.attacks)} attacked their {self.examples} "
                         "surviving examples")
        if self.explained:
            found.append(f"class(es) {', '.join(self.explained)}: the zero gradients are "
                         "cross-entropy's on a saturated softmax; the scale-invariant DLR loss "
                         "had healthy gradients there and attacked them, so no gradient-free "
                         "search was needed")
        found += [f"class {name} is unreliable: {why}" for name, why in self.unreliable.items()]
        return found


def class_signs(records: Records, class_names: Sequence[str], global_checks: Sequence[str],
                sweep: Sequence[Records] = (), mode: str = "each") -> dict[str, list[str]]:
    """Class name -> the signs of masking seen in its figures (classes without any left out)."""
    y = records.labels()
    attacked = records.clean_correct()
    found: dict[str, list[str]] = {}
    everywhere = [c for c in global_checks if c in GLOBAL_SIGNS]
    for c, name in enumerate(class_names):
        mine = attacked & (y == c)
        checks = list(everywhere)
        if mine.any():
            bad = np.logical_or.reduce([records.array("bad_gradient", a)[mine].astype(bool)
                                        for a in records.attack_names])
            if bad.mean() > BAD_GRADIENT_SHARE:
                checks.append("bad_gradients")
            if mode == "each" and _fgsm_stronger(records, mine, y):
                checks.append("fgsm_stronger_than_pgd")
        if _rises_with_eps(sweep, c):
            checks.append("rises_with_eps")
        if checks:
            found[name] = checks
    return found


def _fgsm_stronger(records: Records, mine: np.ndarray, y: np.ndarray) -> bool:
    """Whether a one-step attack left fewer of ``mine`` robust than an iterative one did."""
    def robust(a: str) -> int:
        return int((records.array("adv_pred", a)[mine] == y[mine]).sum())

    slack = max(1, 0.01 * int(mine.sum()))
    return any(robust(one) < robust(many) - slack
               for one, many in one_step_pairs(records.independent))


def _rises_with_eps(sweep: Sequence[Records], c: int) -> bool:
    shares = []
    for rec in sweep:
        y = rec.labels()
        ok = rec.robust_under()
        n = int((y == c).sum())
        if n:
            shares.append((int(ok[y == c].sum()), n))
    return any(high / n_high > low / n_low + max(0.01, 1.5 / n_high)
               for (low, n_low), (high, n_high) in itertools.pairwise(shares))


def survivors(records: Records, class_names: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Data set indices of the examples of ``classes`` that every attack left robust."""
    y = records.labels()
    ok = records.robust_under()
    wanted = np.isin(y, [class_names.index(c) for c in classes])
    return np.sort(records.array("index").astype(np.int64)[ok & wanted])


def scale_invariant_bad_share(records: Records, mine: np.ndarray) -> float | None:
    """Of the examples in ``mine`` that a scale-invariant loss attacked, the share with a zero
    or non-finite input gradient under it (None when none ran on them)."""
    ran = np.zeros(len(mine), dtype=bool)
    bad = np.zeros(len(mine), dtype=bool)
    for a in records.attack_names:
        if prototype(a).scale_invariant:
            here = mine & (records.array("forwards", a) > 0)
            ran |= here
            bad |= here & records.array("bad_gradient", a).astype(bool)
    return float(bad[ran].mean()) if ran.any() else None


def persisting(records: Records, class_names: Sequence[str],
               signs: dict[str, list[str]]) -> list[str]:
    """The classes whose signs a scale-invariant loss did not explain away: a sign other than
    saturation, or zero gradients under that loss too (quantised or otherwise flat inputs)."""
    y = records.labels()
    attacked = records.clean_correct()
    found = []
    for name, checks in signs.items():
        if any(check not in SATURATION_SIGNS for check in checks):
            found.append(name)
            continue
        share = scale_invariant_bad_share(records, attacked & (y == class_names.index(name)))
        if share is not None and share > BAD_GRADIENT_SHARE:
            found.append(name)
    return found


def unreliable_classes(records: Records, class_names: Sequence[str],
                       signs: dict[str, list[str]], escalated: bool) -> dict[str, str]:
    """Class name -> why its figure stays unreliable after escalation (``escalated``: whether
    escalation was on; its columns, and the scan's own, are in ``records``)."""
    y = records.labels()
    attacked = records.clean_correct()
    searches = [a for a in records.attack_names if not prototype(a).uses_gradient]
    robust_gradient = records.robust_under([a for a in records.attack_names
                                            if prototype(a).uses_gradient])
    found = {}
    for name, checks in signs.items():
        c = class_names.index(name)
        mine = attacked & (y == c)
        n = int(mine.sum())
        if "randomised_model" in checks:
            found[name] = ("the model is randomised: figures without an expectation over its "
                           "randomness (EOT) overestimate robustness")
            continue
        if not n or not escalated:
            continue
        share = scale_invariant_bad_share(records, mine)
        if share is not None and share > RESIDUAL_BAD_GRADIENT_SHARE:
            found[name] = (f"input gradients stayed zero or not finite for {share:.0%} "
                           "of its examples under the scale-invariant DLR loss: only a "
                           "gradient-free search tested it")
            continue
        if searches:
            broken = np.logical_or.reduce([records.array("adv_pred", a).astype(np.int64) != y
                                           for a in searches])
            extra = int((mine & robust_gradient & broken).sum())
            if extra >= 2 and extra > SQUARE_EXCESS * n:
                found[name] = (f"the gradient-free {', '.join(searches)} attack broke {extra} "
                               f"of its {n} examples that every gradient attack left robust: "
                               "its gradients are masked, and a search of limited budget may still "
                               "overestimate it")
    return found
