"""Losses an attack ascends. Each returns one value per example; higher means closer to broken."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy, the PGD loss of Madry et al."""
    return F.cross_entropy(logits, y, reduction="none")


def temperature_cross_entropy(temperature: float):
    """Cross-entropy of ``softmax(z / T)`` (Tian et al., KDD 2021).

    Its logit gradient is ``(softmax(z/T) - onehot(y)) / T``: T < 1 concentrates the push on the
    strongest wrong class, T > 1 spreads it over all of them.
    """

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits / temperature, y, reduction="none")

    return loss


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j``: positive while the example is classified correctly."""
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true_logit - others.amax(dim=1)


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Carlini-Wagner margin loss ``max_{j != y} z_j - z_y``."""
    return -margin(logits, y)
