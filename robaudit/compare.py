"""Per-class robust accuracy against a baseline report: what dropped, by how much, is it allowed.

Used by ``robaudit compare`` (two saved reports) and by ``scan --baseline`` (a saved report and the
scan in progress). The drop policy itself is the gate's ``max_drop``, so both judge alike.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robaudit.choices import FINISH
from robaudit.config import format_eps
from robaudit.errors import UsageError
from robaudit.gate import Failure, GatePolicy, judge
from robaudit.metrics import WORST, ClassStats, Rate, ranks, spearman
from robaudit.reports.schema import read_json

# eps goes through JSON as a float: equal settings may differ in the last bits.
_EPS_TOL = 1e-9
#: The document ``robaudit compare --json`` writes (``Comparison.to_dict()``).
COMPARE_SCHEMA = "robaudit.compare"
COMPARE_SCHEMA_VERSION = 1
#: Settings that change how strong the attacks are without changing what is measured.
_STRENGTH = ("steps", "restarts", "temperatures", "mode", "schedule")


@dataclass(frozen=True)
class Figures:
    """The per-class figures of one saved report and the settings they were measured with."""

    path: str
    created: str
    eps: float
    attacks: tuple[str, ...]
    #: Classes with examples in the report, in class order.
    audited: tuple[str, ...]
    #: Robust accuracy per figure (each attack and ``worst``), then per class name.
    robust: dict[str, dict[str, float]]
    #: Attack strength, for warnings: reports of weaker attacks compare but show false gains.
    strength: dict[str, Any] = field(default_factory=dict)
    partial: bool = False
    #: The threat model (reports from before the L2 ball are L∞).
    norm: str = "linf"

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], path: str | Path) -> Figures:
        config = doc["config"]
        robust: dict[str, dict[str, float]] = {}
        for c in doc["classes"]:
            if c["n"] == 0:
                continue
            for figure, rate in c["robust"].items():
                if rate is not None and rate["acc"] is not None:
                    robust.setdefault(figure, {})[c["name"]] = rate["acc"]
        return cls(
            path=str(path),
            created=doc.get("created", ""),
            eps=float(config["eps"]),
            # The finish's columns are part of the worst case (reports before it had none).
            attacks=(*config["attacks"], *(config.get("finish") or ())),
            audited=tuple(c["name"] for c in doc["classes"] if c["n"] > 0),
            robust=robust,
            strength={k: config.get(k) for k in _STRENGTH},
            partial=bool(doc.get("partial", False)),
            norm=str(config.get("norm", "linf")),
        )


def read_figures(path: str | Path) -> Figures:
    """A saved report's figures; UsageError when the file is not a robaudit report."""
    return Figures.from_doc(read_json(path), path)


def check_comparable(
    baseline: Figures,
    *,
    eps: float,
    attacks: Collection[str],
    audited: Collection[str] | None,
    against: str,
    norm: str = "linf",
) -> None:
    """UsageError naming every setting in which ``against`` differs from the baseline.

    Robust accuracy at another ε, under other attacks or over other classes is another figure:
    a "drop" between them would be meaningless.
    """
    differences = []
    if baseline.norm != norm:
        differences.append(f"threat model (baseline {baseline.norm}, {against} {norm})")
    if abs(baseline.eps - eps) > _EPS_TOL:
        differences.append(
            f"eps (baseline {format_eps(baseline.eps)}, {against} {format_eps(eps)})"
        )
    if set(baseline.attacks) != set(attacks):
        finish = set(baseline.attacks) ^ set(attacks) <= set(FINISH)
        differences.append(
            f"attacks (baseline {','.join(baseline.attacks)}, {against} {','.join(attacks)}"
            + (f"; a report without the {','.join(FINISH)} finish compares with a scan run with "
               "--finish none)" if finish else ")")
        )
    if audited is not None and set(baseline.audited) != set(audited):
        only_base = [c for c in baseline.audited if c not in set(audited)]
        only_new = [c for c in audited if c not in set(baseline.audited)]
        parts = []
        if only_base:
            parts.append(f"only in the baseline: {_names(only_base)}")
        if only_new:
            parts.append(f"only in {against}: {_names(only_new)}")
        differences.append(f"classes ({'; '.join(parts)})")
    if differences:
        raise UsageError(
            f"cannot compare {against} with the baseline {baseline.path}: they differ in "
            f"{', and '.join(differences)}. Compare reports made with the same norm, eps, "
            "attacks and classes"
        )


def _names(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def strength_warnings(baseline: Figures, strength: Mapping[str, Any], against: str) -> list[str]:
    """Differences in attack strength: allowed, but a weaker attack shows gains that are not."""
    warnings = []
    for key, value in strength.items():
        before = baseline.strength.get(key)
        if before is not None and value is not None and before != value:
            warnings.append(
                f"{key} differs (baseline {before}, {against} {value}): a weaker attack "
                "overestimates robust accuracy, so deltas mix model and attack changes"
            )
    if baseline.partial:
        warnings.append(f"the baseline {baseline.path} is partial (an interrupted scan)")
    return warnings


@dataclass(frozen=True)
class ClassDelta:
    """One class's robust accuracy before and after, and the policy failures of the change."""

    name: str
    n: int
    baseline: float
    current: float
    failures: tuple[Failure, ...]

    @property
    def delta(self) -> float:
        return self.current - self.baseline

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class RankMove:
    """One class's place in the ranking by robust accuracy: 1 is the least robust class."""

    name: str
    baseline: float
    current: float

    @property
    def moved(self) -> float:
        """Places towards the robust end (positive) or the vulnerable end (negative)."""
        return self.current - self.baseline


@dataclass(frozen=True)
class RankAgreement:
    """How far two models (or two runs) agree on which classes are the vulnerable ones."""

    #: Spearman's rank correlation of the classes' robust accuracies; None when one side has
    #: every class at the same figure (no ranking to compare).
    spearman: float | None
    #: Every class, in the order given.
    classes: tuple[RankMove, ...]
    #: The classes whose place moved most, largest move first (at most ``top``; none unmoved).
    moved_most: tuple[RankMove, ...]


def rank_agreement(baseline: Mapping[str, float], current: Mapping[str, float], *,
                   top: int = 3) -> RankAgreement:
    """Rank correlation between two per-class figures, over the classes both have.

    Tian et al. (KDD 2021) found the ranking of classes by robustness consistent across attacks
    and defences: a low correlation says this model's weak classes are not the baseline's.
    Places are 1-based from the least robust class; ties share their average place.
    """
    names = [name for name in baseline if name in current]
    before = [baseline[name] for name in names]
    after = [current[name] for name in names]
    moves = tuple(
        RankMove(name, float(b) + 1, float(a) + 1)
        for name, b, a in zip(names, ranks(before), ranks(after), strict=True)
    )
    # Largest move first; equal moves in the order given (class order).
    order = sorted(range(len(moves)), key=lambda i: -abs(moves[i].moved))
    moved_most = tuple(moves[i] for i in order if moves[i].moved != 0)[:top]
    return RankAgreement(spearman(before, after), moves, moved_most)


@dataclass(frozen=True)
class Comparison:
    """Per-class deltas of one figure between a baseline and a report."""

    baseline_path: str
    report_path: str
    figure: str
    eps: float
    #: None: no drop is judged; the comparison only shows the deltas.
    max_drop: float | None
    significance: bool
    classes: list[ClassDelta]
    warnings: list[str] = field(default_factory=list)
    #: The eps as the report wrote it (``8/255``).
    eps_text: str = ""

    @property
    def flagged(self) -> list[ClassDelta]:
        return [c for c in self.classes if not c.passed]

    @property
    def ranking(self) -> RankAgreement:
        """Whether the two reports agree on which classes are the least robust."""
        return rank_agreement({c.name: c.baseline for c in self.classes},
                              {c.name: c.current for c in self.classes})

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the terminal reporter (and anything else that renders it)."""

        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        ranking = self.ranking
        places = {m.name: m for m in ranking.classes}
        return {
            "schema": COMPARE_SCHEMA,
            "schema_version": COMPARE_SCHEMA_VERSION,
            "baseline": self.baseline_path,
            "report": self.report_path,
            "figure": self.figure,
            "eps": self.eps,
            "eps_text": self.eps_text or format_eps(self.eps),
            "max_drop": self.max_drop,
            # False without --max-drop: every class "passed" because none was judged.
            "gated": self.max_drop is not None,
            "significance": self.significance,
            "passed": not self.flagged,
            "flagged": [c.name for c in self.flagged],
            "mean_baseline": mean([c.baseline for c in self.classes]),
            "mean_current": mean([c.current for c in self.classes]),
            "rank_correlation": ranking.spearman,
            "rank_moved_most": [_move(m) for m in ranking.moved_most],
            "classes": [
                {
                    "name": c.name,
                    "n": c.n,
                    "baseline": c.baseline,
                    "current": c.current,
                    "delta": c.delta,
                    "rank_baseline": places[c.name].baseline,
                    "rank_current": places[c.name].current,
                    "passed": c.passed,
                    "failures": [
                        {"policy": f.policy, "value": f.value, "threshold": f.threshold,
                         "message": f.message}
                        for f in c.failures
                    ],
                }
                for c in self.classes
            ],
            "warnings": list(self.warnings),
        }


def _move(move: RankMove) -> dict[str, Any]:
    return {"name": move.name, "baseline": move.baseline, "current": move.current,
            "moved": move.moved}


def _stats(doc: Mapping[str, Any], figure: str) -> list[ClassStats]:
    """The report's classes as the gate's input, so compare judges exactly as a scan does."""

    def rate(d: Mapping[str, Any] | None) -> Rate:
        if d is None:
            return Rate(0, 0, 0.0, 1.0)
        return Rate(int(d["correct"]), int(d["n"]), float(d["ci95"][0]), float(d["ci95"][1]))

    return [
        ClassStats(
            index=c["index"], name=c["name"], n=c["n"], clean=rate(c["clean"]),
            robust={figure: rate(c["robust"].get(figure))}, runtime_robust=None,
            mean_clean_margin=math.nan, mean_adv_margin=math.nan, confusion_row=[],
        )
        for c in doc["classes"]
    ]


def compare(
    baseline: Figures,
    report: Mapping[str, Any],
    *,
    max_drop: float | None = None,
    report_path: str = "the report",
    figure: str | None = None,
    significance: bool | None = None,
) -> Comparison:
    """Judge each class of ``report`` (a JSON report document) against the baseline's figures.

    ``figure`` and ``significance`` default to the report's own gate settings; without
    ``max_drop`` nothing is judged. UsageError when the two were measured with different eps,
    attacks or classes.
    """
    if max_drop is not None and not 0 <= max_drop <= 1:
        raise UsageError(f"max_drop must be between 0 and 1, got {max_drop}")
    current = Figures.from_doc(report, report_path)
    check_comparable(baseline, eps=current.eps, attacks=current.attacks,
                     audited=current.audited, against=report_path, norm=current.norm)
    gate = report["verdict"]["gate"]
    figure = figure or gate["on"]
    if figure not in (*current.attacks, WORST):
        raise UsageError(
            f"cannot compare on {figure!r}: the reports have {', '.join(current.attacks)} "
            f"and {WORST}"
        )
    significance = bool(gate.get("significance")) if significance is None else significance
    policy = GatePolicy(max_drop=max_drop, significance=significance, on=figure)
    before = baseline.robust.get(figure, {})
    verdicts = {v.name: v for v in judge(_stats(report, figure), policy, before)}
    classes = [
        ClassDelta(c["name"], c["n"], before[c["name"]], c["robust"][figure]["acc"],
                   verdicts[c["name"]].failures)
        for c in report["classes"]
        if c["n"] > 0 and c["name"] in before
    ]
    warnings = strength_warnings(baseline, current.strength, report_path)
    if current.partial:
        warnings.append(f"{report_path} is partial (an interrupted scan)")
    return Comparison(
        baseline_path=baseline.path, report_path=report_path, figure=figure, eps=current.eps,
        max_drop=max_drop, significance=significance, classes=classes, warnings=warnings,
        eps_text=str(report["config"].get("eps_text") or format_eps(current.eps)),
    )
