"""``attack(model, x, y, seeds)``: one batch through the engine, as torchattacks users expect.

A mixin of the attack classes, apart from :class:`robaudit.attacks.base.Attack`: the engine
imports the attack contract, so the contract cannot import the engine.
"""

from __future__ import annotations

import torch

from robaudit.attacks.base import AttackOutcome, Model


class Runnable:
    """Makes an attack callable on one batch."""

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor,
                 seeds: torch.Tensor) -> AttackOutcome:
        """Attack ``x`` (labels ``y``); ``seeds`` (one per example) seed its randomness."""
        from robaudit.attacks.stream import attack_batch

        return attack_batch(self, model, x, y, seeds)  # type: ignore[arg-type]
