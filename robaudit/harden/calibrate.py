"""Inference-time calibration: a per-class logit bias that lifts the worst class.

A bias ``b`` added to the logits moves the decision boundaries between classes: raising ``b_k``
wins back examples of class k that an attack pushes just across a boundary, at the price of
examples of other classes pushed into k (Tian et al., KDD 2021, lift the weakest class at
inference time in the same spirit). robaudit tunes ``b`` on the validation set:

1. attack the current (biased) model with the scan's PGD and keep each example's clean and
   adversarial logits;
2. on those logits, greedy coordinate search: for each class and each step in
   ±{0.1, 0.25, 0.5, 1, 2}, take the single change that most raises the worst-class robust
   accuracy (ties: the mean over classes), subject to clean accuracy not falling more than
   ``max_clean_drop`` below the unbiased model's; repeat while something improves;
3. check the proposal with a fresh PGD attack on the biased model (the attack adapts to the
   bias); keep it only if the measured worst-class robust accuracy rose and the clean accuracy
   held, else stop. Up to three rounds.

The figures are tuned on the validation set, so they are optimistic there: judge the result on
held-out data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from robaudit.config import ScanConfig
from robaudit.harden.train import Split, Validation, pgd_batches, validate

STEPS = (0.1, 0.25, 0.5, 1.0, 2.0)
ROUNDS = 3


@dataclass
class Calibration:
    """The bias found and the validation figures without and with it."""

    bias: list[float]
    before: Validation
    after: Validation
    rounds: list[dict[str, object]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"bias": self.bias, "before": self.before.to_dict(), "after": self.after.to_dict(),
                "rounds": self.rounds}


def calibrate(module: nn.Module, data: Split, scan: ScanConfig, max_clean_drop: float,
              before: Validation | None = None) -> Calibration:
    """Tune a per-class logit bias for ``module`` on ``data`` (see the module docstring)."""
    k = len(data.class_names)
    bias = torch.zeros(k)
    start = before if before is not None else validate(module, data, scan)
    best = start
    floor = start.clean_acc - max_clean_drop
    rounds: list[dict[str, object]] = []
    for _ in range(ROUNDS):
        clean_logits, adv_logits = _logits(module, data, scan, bias)
        proposal = _search(clean_logits, adv_logits, data.y, bias, floor)
        if torch.equal(proposal, bias):
            break
        measured = validate(module, data, scan, proposal)
        accepted = (measured.worst_robust > best.worst_robust
                    and measured.clean_acc >= floor - 1e-12)
        rounds.append({"bias": proposal.tolist(), "worst_robust": measured.worst_robust,
                       "mean_robust": measured.mean_robust, "clean_acc": measured.clean_acc,
                       "accepted": accepted})
        if not accepted:
            break
        bias, best = proposal, measured
    return Calibration(bias.tolist(), start, best, rounds)


def _logits(module: nn.Module, data: Split, scan: ScanConfig,
            bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and adversarial logits (the scan's first attack) of the model with ``bias``, with
    the bias taken off again."""
    clean, adv = [], []
    for _idx, _y, batch in pgd_batches(module, data, scan, bias):
        clean.append(batch.clean_logits.cpu() - bias)
        adv.append(batch.outcomes[scan.attacks[0]].logits.cpu() - bias)
    return torch.cat(clean), torch.cat(adv)


def _figures(clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, bias: torch.Tensor,
             k: int) -> tuple[float, float, float]:
    """(worst-class robust, mean-class robust, clean accuracy) of logits with ``bias``."""
    clean_ok = (clean + bias).argmax(dim=1) == y
    robust_ok = clean_ok & ((adv + bias).argmax(dim=1) == y)
    per_class = []
    for c in range(k):
        of_c = y == c
        if of_c.any():
            per_class.append(float(robust_ok[of_c].float().mean()))
    return min(per_class), sum(per_class) / len(per_class), float(clean_ok.float().mean())


def _search(clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, bias: torch.Tensor,
            floor: float) -> torch.Tensor:
    k = clean.shape[1]
    y = y.cpu()
    current = bias.clone()
    worst, mean, _ = _figures(clean, adv, y, current, k)
    for _ in range(10 * k):  # each pass accepts one change; this bounds the passes
        best_change: tuple[float, float, torch.Tensor] | None = None
        for c in range(k):
            for step in (*STEPS, *(-s for s in STEPS)):
                trial = current.clone()
                trial[c] += step
                w, m, acc = _figures(clean, adv, y, trial, k)
                if acc < floor - 1e-12 or (w, m) <= (worst, mean):
                    continue
                if best_change is None or (w, m) > best_change[:2]:
                    best_change = (w, m, trial)
        if best_change is None:
            break
        worst, mean, current = best_change
    return current
