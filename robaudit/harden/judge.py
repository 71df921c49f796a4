"""Validation as the gate judges: the scan itself on the validation data.

Every epoch's weights are scanned with the scan's own settings (its attacks, the finish, escalation
where masking shows, the gate's policy from the same config), so the figure harden chooses on is
the one the gate judges: the worst case over the attacks. Only onnxruntime's confirmation is left
out: the input file's runtime holds the input model's weights, not the epoch's.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from robaudit.audit import ScanResult, scan
from robaudit.config import ScanConfig
from robaudit.harden.train import Validation
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
    )

