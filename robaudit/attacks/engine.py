"""Runs the attacks on one batch: a clean pass, then every attack on the clean-correct examples."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from robaudit.attacks.base import AttackOutcome, Model
from robaudit.attacks.pgd import PGD


@dataclass
class BatchAudit:
    """Clean logits and each attack's outcome for every example of a batch.

    Examples misclassified when clean are not attacked: their outcome is the clean input.
    """

    x: torch.Tensor
    y: torch.Tensor
    clean_logits: torch.Tensor
    outcomes: dict[str, AttackOutcome]

    @property
    def clean_correct(self) -> torch.Tensor:
        return self.clean_logits.argmax(dim=1) == self.y


def audit_batch(
    model: Model,
    attacks: Sequence[PGD],
    x: torch.Tensor,
    y: torch.Tensor,
    seeds: torch.Tensor,
    *,
    seconds: dict[str, float] | None = None,
) -> BatchAudit:
    """Attack one batch with each attack independently (per-attack and worst-case figures).

    ``seconds``, when given, accumulates the time each attack took.
    """
    with torch.no_grad():
        clean_logits = model(x)
    correct = (clean_logits.argmax(dim=1) == y).nonzero().squeeze(1)
    outcomes: dict[str, AttackOutcome] = {}
    for attack in attacks:
        started = time.perf_counter()
        outcome = AttackOutcome.unbroken(x, clean_logits)
        if correct.numel():
            sub = attack(model, x[correct], y[correct], seeds[correct])
            outcome.x_adv[correct] = sub.x_adv
            outcome.logits[correct] = sub.logits
            outcome.broken[correct] = sub.broken
            outcome.forwards[correct] = sub.forwards
            outcome.bad_gradient[correct] = sub.bad_gradient
        outcomes[attack.name] = outcome
        if seconds is not None:
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            seconds[attack.name] = seconds.get(attack.name, 0.0) + time.perf_counter() - started
    return BatchAudit(x, y, clean_logits, outcomes)
