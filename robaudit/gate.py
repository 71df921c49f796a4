"""The fairness gate: which classes fail which policy, with the figures that decided it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from robaudit.metrics import WORST, ClassStats

# Accuracies are ratios of counts: 0.9 - 0.3 must not exceed an allowed gap of 0.6 by rounding.
_TOL = 1e-9


@dataclass(frozen=True)
class GatePolicy:
    """Thresholds on per-class robust accuracy; ``None`` turns a policy off."""

    #: Absolute floor on a class's robust accuracy.
    min_class_robust: float | None = None
    #: Floor on a class's robust accuracy as a fraction of the mean over classes.
    min_ratio: float | None = None
    #: Largest allowed distance to the best class.
    max_gap: float | None = None
    #: Largest allowed drop against a baseline report.
    max_drop: float | None = None
    #: Flag a class only when its whole 95% Wilson interval fails the policy.
    significance: bool = False
    #: The figure judged: an attack's name, or ``worst`` (worst case over attacks).
    on: str = WORST

    @property
    def active(self) -> bool:
        return any(
            v is not None
            for v in (self.min_class_robust, self.min_ratio, self.max_gap, self.max_drop)
        )


@dataclass(frozen=True)
class Failure:
    """One failed policy: the figure, the threshold it missed, and a sentence saying so."""

    policy: str
    value: float
    threshold: float
    message: str


@dataclass(frozen=True)
class Verdict:
    index: int
    name: str
    robust_acc: float
    failures: tuple[Failure, ...]
    #: Why the class's figure cannot be trusted (signs of gradient masking that escalation did
    #: not remove), or None. Unless the user allowed it, this is also one of the failures.
    unreliable: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str:
        """``passed``, ``flagged`` (a policy failed) or ``unreliable`` (the figure is masked)."""
        if any(f.policy == UNRELIABLE for f in self.failures):
            return UNRELIABLE
        return "passed" if self.passed else "flagged"


#: The policy name of the failure an unreliable class gets.
UNRELIABLE = "unreliable"


def _mean_and_best(stats: Sequence[ClassStats], on: str) -> tuple[float, float]:
    """The class mean and the best class of figure ``on``, over the classes with examples."""
    accs = [s.robust[on].acc for s in stats if s.n > 0]
    return (sum(accs) / len(accs) if accs else 0.0), max(accs, default=0.0)


def thresholds(stats: Sequence[ClassStats], policy: GatePolicy) -> dict[str, float]:
    """The robust accuracy each class had to reach, per policy that sets one line for all
    classes: the floor, ``min_ratio`` x the class mean, the best class minus ``max_gap``. (The
    drop against a baseline is a line per class; its verdicts carry it.) Reports store these
    rather than work them out again."""
    mean, best = _mean_and_best(stats, policy.on)
    lines = {"min_class_robust": policy.min_class_robust,
             "min_ratio": None if policy.min_ratio is None else policy.min_ratio * mean,
             "max_gap": None if policy.max_gap is None else best - policy.max_gap}
    return {name: value for name, value in lines.items() if value is not None}


def judge(
    stats: Sequence[ClassStats],
    policy: GatePolicy,
    baseline: Mapping[str, float] | None = None,
    *,
    unreliable: Mapping[str, str] | None = None,
    allow_unreliable: bool = False,
) -> list[Verdict]:
    """A verdict per class. ``baseline`` maps class names to their robust accuracy before;
    ``unreliable`` maps class names to why their figure is masked: such a class fails whatever
    its figure, unless ``allow_unreliable``."""
    unreliable = unreliable or {}
    mean, best = _mean_and_best(stats, policy.on)
    verdicts = []
    for s in stats:
        rate = s.robust[policy.on]
        if s.n == 0:
            verdicts.append(Verdict(s.index, s.name, rate.acc, ()))
            continue
        # Under --significance a class fails only if even its optimistic bound fails.
        acc = rate.high if policy.significance else rate.acc
        shown = f"{rate.acc:.1%}"
        if policy.significance:
            shown += f" (95% CI up to {rate.high:.1%})"
        failures = []
        if policy.min_class_robust is not None and acc < policy.min_class_robust - _TOL:
            failures.append(Failure(
                "min_class_robust", rate.acc, policy.min_class_robust,
                f"robust accuracy {shown} is below the floor {policy.min_class_robust:.1%}",
            ))
        if policy.min_ratio is not None and acc < policy.min_ratio * mean - _TOL:
            failures.append(Failure(
                "min_ratio", rate.acc, policy.min_ratio * mean,
                f"robust accuracy {shown} is below {policy.min_ratio:g} x the class mean "
                f"{mean:.1%} = {policy.min_ratio * mean:.1%}",
            ))
        if policy.max_gap is not None and best - acc > policy.max_gap + _TOL:
            failures.append(Failure(
                "max_gap", best - rate.acc, policy.max_gap,
                f"robust accuracy {shown} is {_pp(best - rate.acc)} below the best class "
                f"({best:.1%}); allowed gap {_pp(policy.max_gap)}",
            ))
        if policy.max_drop is not None and baseline is not None and s.name in baseline:
            drop = baseline[s.name] - acc
            if drop > policy.max_drop + _TOL:
                failures.append(Failure(
                    "max_drop", baseline[s.name] - rate.acc, policy.max_drop,
                    f"robust accuracy {shown} dropped {_pp(baseline[s.name] - rate.acc)} from "
                    f"the baseline {baseline[s.name]:.1%}; allowed drop {_pp(policy.max_drop)}",
                ))
        why = unreliable.get(s.name)
        if why is not None and not allow_unreliable:
            failures.insert(0, Failure(
                UNRELIABLE, rate.acc, float("nan"),
                f"unreliable: {why} (robust accuracy {rate.acc:.1%} is an upper bound; "
                "--allow-unreliable judges it on its figures alone)",
            ))
        verdicts.append(Verdict(s.index, s.name, rate.acc, tuple(failures), why))
    return verdicts


def _pp(difference: float) -> str:
    """A difference of two accuracies, in percentage points: 3.0% of 50% would be 1.5 pp."""
    return f"{difference * 100:.1f} pp"


@dataclass(frozen=True)
class Judgement:
    """The gate's verdicts on every figure a scan reports; the gated figure (``on``) decides.

    A scan is judged once, by :func:`judge_scan`; reports, ``compare``, the pytest plugin and
    the exit code read this record instead of judging again."""

    on: str
    #: Verdicts per class (in class order) for each figure: every attack and the worst case.
    by_figure: Mapping[str, Sequence[Verdict]]

    @property
    def verdicts(self) -> list[Verdict]:
        """The verdicts on the gated figure: the ones that decide the exit code."""
        return list(self.by_figure[self.on])

    @property
    def flagged(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.passed]


def judge_scan(
    stats: Sequence[ClassStats],
    policy: GatePolicy,
    figures: Sequence[str],
    *,
    baseline: Mapping[str, Mapping[str, float]] | None = None,
    unreliable: Mapping[str, str] | None = None,
    allow_unreliable: bool = False,
) -> Judgement:
    """The one way a scan's classes are judged: ``policy`` on each figure in ``figures`` (and
    on the gated one, ``policy.on``). ``baseline`` maps a figure to the baseline's robust
    accuracy per class name; ``unreliable`` maps class names to why their figure is masked."""
    names = list(dict.fromkeys([*figures, policy.on]))
    by_figure = {
        name: judge(stats, replace(policy, on=name),
                    baseline.get(name) if baseline else None,
                    unreliable=unreliable, allow_unreliable=allow_unreliable)
        for name in names
    }
    return Judgement(policy.on, by_figure)
