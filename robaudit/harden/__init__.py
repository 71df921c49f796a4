"""``robaudit harden``: fine-tune a model so that its weakest classes catch up.

Adversarial fine-tuning (PGD-AT or TRADES) with per-class loss weights and optionally per-class
ε from a weighting scheme (:mod:`robaudit.harden.reweight`: ``gate``, ``frl``, ``cfa``,
``inverse``, ``none``), a validation scan every epoch (on ``--val-data``, or a seeded stratified
hold-out of the training data: :mod:`robaudit.harden.holdout`) that keeps the epoch with the highest
worst-class robust accuracy among those within the user's budget of class-mean and clean accuracy
(:mod:`robaudit.harden.state`), atomic checkpoints and ``--resume``
(:mod:`robaudit.harden.checkpoint`), an optional per-class logit bias tuned at inference time
(:mod:`robaudit.harden.calibrate`), and the model written back in its input format
(:mod:`robaudit.harden.export`), scanned before and after.
"""

from __future__ import annotations

from typing import Any

from robaudit.harden.config import HardenConfig

__all__ = ["CRITERION", "HardenConfig", "HardenProgress", "HardenResult", "harden", "to_dict"]

def __getattr__(name: str) -> Any:
    # The run (and torch) load on first use, so that ``robaudit --help`` can list harden's
    # options from HardenConfig without them.
    if name == "CRITERION":
        from robaudit.harden.state import CRITERION

        return CRITERION
    if name in ("HardenProgress", "HardenResult", "harden", "to_dict"):
        from robaudit.harden import run

        return getattr(run, name)
    raise AttributeError(f"module 'robaudit.harden' has no attribute {name!r}")
