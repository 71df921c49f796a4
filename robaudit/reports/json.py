"""The JSON report: every figure of a scan, with its configuration and provenance.

Schema ``robaudit.scan`` version 1. NaN (a class with no examples) is written as ``null``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from robaudit.gate import GatePolicy, Verdict, thresholds
from robaudit.metrics import ClassStats, Rate, Summary
from robaudit.portfolio import describe_attacks
from robaudit.reports import atomic_write
from robaudit.reports.schema import SCHEMA, SCHEMA_VERSION, read_json
from robaudit.result import ScanResult

__all__ = ["SCHEMA", "SCHEMA_VERSION", "dumps", "read_json", "to_dict",
           "without_images", "write_json"]



def _rate(rate: Rate | None) -> dict[str, Any] | None:
    if rate is None:
        return None
    return {"acc": rate.acc, "correct": rate.correct, "n": rate.n, "ci95": [rate.low, rate.high]}


def _verdict(verdict: Verdict) -> dict[str, Any]:
    return {
        "passed": verdict.passed,
        "status": verdict.status,
        "unreliable": verdict.unreliable,
        "failures": [
            {"policy": f.policy, "value": f.value, "threshold": f.threshold, "message": f.message}
            for f in verdict.failures
        ],
    }


def without_images(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with the gallery's pictures left out (the JSON file keeps them only with
    ``--json-images``; the HTML report always shows them)."""
    return {**doc, "gallery": _gallery(doc.get("gallery") or {}, images=False)}


def to_dict(result: ScanResult) -> dict[str, Any]:
    """The report document. Everything the other reports show comes from here."""
    config = result.config
    policy = config.gate_policy()
    baseline = result.baseline
    # Per-attack verdicts under the same policy, judged with the scan: JUnit has a suite each.
    by_figure = result.judgement.by_figure
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": result.created,
        "partial": result.partial,
        "verdict": {
            "passed": not result.flagged,
            # False when no policy was set: every class "passed" because none was gated.
            "gated": policy.active,
            "exit_code": int(result.exit_code),
            "flagged": [v.name for v in result.flagged],
            "unreliable": [v.name for v in result.verdicts if v.unreliable is not None],
            "gate": _gate(policy, result.stats),
        },
        "baseline": None if baseline is None else {
            "path": baseline.path, "created": baseline.created, "robust": baseline.robust,
        },
        "config": {**config.to_dict(), "eps_text": config.eps_text(),
                   "sources": list(config.sources)},
        "model": result.model,
        "data": result.data,
        "environment": result.environment,
        "attacks": result.attacks or describe_attacks(config, config.attacks),
        "escalation": result.escalation.to_dict(),
        # A sequential scan's rounds; per class, in "classes", what its sequence decided.
        "sequential": None if result.sequential is None else
        {k: v for k, v in result.sequential.items() if k != "classes"},
        "class_names": result.class_names,
        "classes": [_class(s, result.verdicts[s.index],
                           {name: verdicts[s.index] for name, verdicts in by_figure.items()},
                           (result.sequential or {}).get("classes", {}).get(s.name))
                    for s in result.stats],
        "summary": _summary(result.summary),
        "confusion": result.confusion,
        "timings": result.timings,
        "warnings": result.warnings,
        "sanity": result.sanity,
        "sweep": result.sweep,
        "gallery": result.gallery,
    }
    return _clean(doc)


def _gate(policy: GatePolicy, stats: list[ClassStats]) -> dict[str, Any]:
    return {
        "on": policy.on,
        "min_class_robust": policy.min_class_robust,
        "min_ratio": policy.min_ratio,
        "max_gap": policy.max_gap,
        "max_drop": policy.max_drop,
        "significance": policy.significance,
        # The lines the gate drew (the class mean and best class worked in): for the HTML chart.
        "thresholds": thresholds(stats, policy),
    }


def _class(s: ClassStats, verdict: Verdict, by_figure: dict[str, Verdict],
           sequential: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "index": s.index,
        "name": s.name,
        "n": s.n,
        "clean": _rate(s.clean),
        "robust": {name: _rate(rate) for name, rate in s.robust.items()},
        "runtime_robust": _rate(s.runtime_robust),
        # Rounded: float32 sums differ in the 8th digit between batch sizes, and the
        # report should not.
        "mean_clean_margin": _round(s.mean_clean_margin),
        "mean_adv_margin": _round(s.mean_adv_margin),
        "confusion_row": s.confusion_row,
        "verdict": _verdict(verdict),
        "verdict_by_figure": {n: _verdict(v) for n, v in by_figure.items()},
        **({} if sequential is None else {"sequential": sequential}),
    }


def _summary(summary: Summary) -> dict[str, Any]:
    return {
        "n": summary.n,
        "clean_acc": summary.clean_acc,
        "robust_acc": summary.robust_acc,
        "mean_class_robust": summary.mean_class_robust,
        "worst_class": {"name": summary.worst_class, "robust_acc": summary.worst_class_robust},
        "best_class": {"name": summary.best_class, "robust_acc": summary.best_class_robust},
        "gap": summary.gap,
        "std": summary.std,
        "rank_correlation": summary.rank_correlation,
        "gain_split": None if summary.gain_split is None else {
            "weakest": summary.gain_split.weakest,
            "strongest": summary.gain_split.strongest,
            "total_broken": summary.gain_split.total_broken,
            "per_class": summary.gain_split.per_class,
            "vulnerable_half_share": summary.gain_split.vulnerable_half_share,
        },
        "runtime_clean_acc": summary.runtime_clean_acc,
        "runtime_robust_acc": summary.runtime_robust_acc,
        "bad_gradient_share": summary.bad_gradient_share,
        "mean_forwards": summary.mean_forwards,
    }


def _gallery(gallery: dict[str, list[dict[str, Any]]], images: bool) -> dict[str, Any]:
    if images:
        return gallery
    pictures = ("clean", "adversarial", "perturbation")
    return {name: [{k: v for k, v in item.items() if k not in pictures} for item in items]
            for name, items in gallery.items()}


def _round(value: float) -> float:
    return round(value, 5) if math.isfinite(value) else value


def _clean(value: Any) -> Any:
    """NaN and inf have no JSON form: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    atomic_write(path, dumps(doc).encode("utf-8"))
