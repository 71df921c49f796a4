"""What a scan found: :class:`ScanResult`, with its verdicts and exit code decided once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from robaudit.compare import Figures
from robaudit.config import ScanConfig
from robaudit.errors import ExitCode
from robaudit.gate import GatePolicy, Judgement, Verdict, judge_scan
from robaudit.masking import Escalation
from robaudit.metrics import WORST, ClassStats, Records, Summary


@dataclass
class ScanResult:
    """Everything a scan found. Reports are rendered from its JSON form."""

    config: ScanConfig
    class_names: list[str]
    stats: list[ClassStats]
    summary: Summary
    #: The gate's verdicts on every figure, judged once (see :meth:`judged_by`).
    judgement: Judgement
    #: Adversarial confusion per attack: row = true class, column = predicted class.
    confusion: dict[str, list[list[int]]]
    model: dict[str, Any]
    data: dict[str, Any]
    environment: dict[str, Any]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    #: Signs of gradient masking found: ``{"check": ..., "message": ...}``.
    sanity: list[dict[str, str]] = field(default_factory=list)
    #: Per-class robust accuracy at each ε when several ran (ascending ε).
    sweep: list[dict[str, Any]] = field(default_factory=list)
    #: Adversarial examples of flagged classes, as PNG data URIs (see robaudit.gallery).
    gallery: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: True when the scan was interrupted: figures cover the examples audited so far.
    partial: bool = False
    created: str = ""
    #: The baseline report's figures, when the gate judged drops against one.
    baseline: Figures | None = None
    #: Each attack that ran, escalation's included: its name, settings and description.
    attacks: list[dict[str, Any]] = field(default_factory=list)
    #: What the masking checks saw, where escalation ran, and which classes stay unreliable.
    escalation: Escalation = field(default_factory=Escalation)
    #: A sequential scan's rounds and each class's decision (see robaudit/rounds.py).
    sequential: dict[str, Any] | None = None
    #: What the scan's command exits with: decided once, with the verdicts.
    exit_code: ExitCode = ExitCode.OK
    #: Why ``exit_code`` is a usage error although the scan ran (``--strict``), else None.
    problem: str | None = None
    #: The gated ε's per-example outcomes (not in the reports: harden pairs its epochs by them).
    records: Records | None = field(default=None, repr=False, compare=False)

    @property
    def attack_names(self) -> list[str]:
        return [a["name"] for a in self.attacks] or list(self.config.attacks)

    @property
    def verdicts(self) -> list[Verdict]:
        """A verdict per class on the gated figure."""
        return self.judgement.verdicts

    @property
    def flagged(self) -> list[Verdict]:
        return self.judgement.flagged

    def judged_by(self, policy: GatePolicy, *, allow_unreliable: bool | None = None) -> Judgement:
        """This scan's figures under another policy, judged exactly as the scan judges them
        (unreliable classes fail unless allowed; ``allow_unreliable`` defaults to the scan's)."""
        allow = self.config.allow_unreliable if allow_unreliable is None else allow_unreliable
        return judgement_of(self.stats, policy, self.attack_names, self.baseline, self.escalation,
                          allow)


def judgement_of(stats: Sequence[ClassStats], policy: GatePolicy, attacks: Sequence[str],
               baseline: Figures | None, escalation: Escalation, allow: bool) -> Judgement:
    return judge_scan(stats, policy, [*attacks, WORST],
                      baseline=baseline.robust if baseline else None,
                      unreliable=escalation.unreliable, allow_unreliable=allow)


def exit_outcome(config: ScanConfig, partial: bool, judgement: Judgement,
          sanity: Sequence[dict[str, str]]) -> tuple[ExitCode, str | None]:
    """The exit code and, for a usage error, why: the only place a scan's code is decided."""
    if partial:
        return ExitCode.INTERRUPTED, None
    if config.strict and sanity:
        checks = ", ".join(item["check"] for item in sanity)
        return ExitCode.USAGE_ERROR, (
            f"--strict: the sanity checks found signs of gradient masking ({checks}); "
            "the robust accuracies above may be overestimated")
    return (ExitCode.FLAGGED if judgement.flagged else ExitCode.OK), None
