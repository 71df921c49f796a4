"""Validation as the gate judges: the scan itself on the validation data.

Every epoch's weights are scanned with the scan's own settings (its attacks, the finish, escalation
where masking shows, the gate's policy from the same config), so the figure harden chooses on is
the one the gate judges: the worst case over the attacks. Only onnxruntime's confirmation is left
out: the input file's runtime holds the input model's weights, not the epoch's.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from torch import nn

from robaudit.audit import ScanResult, scan
from robaudit.config import ScanConfig
from robaudit.gate import thresholds
from robaudit.harden.train import Validation
from robaudit.metrics import robust_flags
from robaudit.models import LoadedModel


def judge_weights(loaded: LoadedModel, module: nn.Module, config: ScanConfig) -> Validation:
    """Scan ``module`` (the weights under training, in ``loaded``'s wrapper) on ``config.data``."""
    view = replace(loaded, module=module, runtime=None)
    quiet = replace(config, runtime_check=False, json=None, junit=None, html=None)
    return from_scan(scan(quiet, model=view, gallery=False))  # no report shows its pictures


def from_scan(result: ScanResult) -> Validation:
    """A scan's per-class figures on the gate's figure, with the gate's verdicts."""
    on = result.judgement.on
    stats = result.stats
    # A class without validation examples has nothing to fix: it counts as fully robust.
    robust = [s.robust[on].acc if s.n else 1.0 for s in stats]
    worst = min(range(len(stats)), key=lambda k: robust[k])
    return Validation(
        clean=[s.clean.acc if s.n else 1.0 for s in stats],
        robust=robust,
        clean_acc=result.summary.clean_acc,
        mean_robust=sum(robust) / len(robust),
        worst_robust=robust[worst],
        worst_class=stats[worst].name,
        n=[s.n for s in stats],
        correct=[s.robust[on].correct for s in stats],
        verdicts=[v.status for v in result.verdicts],
        bars=bars(result),
        outcomes=outcomes(result),
    )


def outcomes(result: ScanResult) -> list[str]:
    """Per class, each example's outcome on the gated figure in data set order ("1" robust):
    empty for a sequential scan, which attacks only some examples."""
    records = result.records
    if records is None or result.sequential is not None:
        return []
    flags = robust_flags(records, result.judgement.on)
    order = np.argsort(records.array("index"), kind="stable")
    flags, y = flags[order], records.labels()[order]
    return ["".join("1" if f else "0" for f in flags[y == k])
            for k in range(len(result.class_names))]


def bars(result: ScanResult) -> list[float | None]:
    """Per class, the robust accuracy the scan's policy asked of it (the highest of its lines,
    a baseline drop's included); None where no policy sets one."""
    policy = result.config.gate_policy()
    common = max(thresholds(result.stats, policy).values(), default=None)
    out: list[float | None] = []
    for s in result.stats:
        bar = common
        if policy.max_drop is not None and result.baseline is not None:
            before = result.baseline.robust.get(policy.on, {}).get(s.name)
            if before is not None:
                bar = max(before - policy.max_drop, bar if bar is not None else 0.0)
        out.append(bar)
    return out

