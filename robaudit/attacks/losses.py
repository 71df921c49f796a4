"""Losses an attack ascends. Each takes ``(logits, y, target)`` and returns one value per example;
higher means closer to broken. ``target`` is the class a targeted loss aims at; untargeted losses
ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Keeps DLR's denominator away from zero when the top logits tie (Croce and Hein use 1e-12).
_DLR_FLOOR = 1e-12

Target = torch.Tensor | None


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, target: Target = None) -> torch.Tensor:
    """Plain cross-entropy, the PGD loss of Madry et al."""
    return F.cross_entropy(logits, y, reduction="none")


@dataclass(frozen=True)
class TemperatureCrossEntropy:
    """Cross-entropy of ``softmax(z / T)`` (Tian et al., KDD 2021).

    Its logit gradient is ``(softmax(z/T) - onehot(y)) / T``: T < 1 concentrates the push on the
    strongest wrong class, T > 1 spreads it over all of them.
    """

    temperature: float

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, target: Target = None
                 ) -> torch.Tensor:
        return F.cross_entropy(logits / self.temperature, y, reduction="none")


def temperature_cross_entropy(temperature: float) -> TemperatureCrossEntropy:
    """The loss of Temperature-PGD at temperature ``temperature``."""
    return TemperatureCrossEntropy(temperature)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j``: positive while the example is classified correctly."""
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true_logit - others.amax(dim=1)


def cw_margin(logits: torch.Tensor, y: torch.Tensor, target: Target = None) -> torch.Tensor:
    """The Carlini-Wagner margin loss ``max_{j != y} z_j - z_y``."""
    return -margin(logits, y)


def dlr(logits: torch.Tensor, y: torch.Tensor, target: Target = None) -> torch.Tensor:
    """The Difference of Logits Ratio (Croce and Hein, ICML 2020):
    ``-(z_y - max_{j != y} z_j) / (z_π1 - z_π3)``, with ``z_π`` the logits sorted in decreasing
    order. Invariant to shifting and to scaling the logits, so a model whose logits are scaled
    until the softmax saturates cannot hide its gradients from it.

    With two classes there is no ``z_π3``, and no loss of two logits is both shift- and
    scale-invariant yet not constant: it can only depend on the sign of ``z_y - z_other``
    (``z_π1 - z_π2`` as the denominator makes DLR ±1, with a zero gradient everywhere). DLR is
    then the CW margin: PGD steps along the sign (L∞) or the direction (L2) of its gradient,
    and its step-size schedule compares its values along one run, so scaling the logits by a
    constant changes none of its iterates; unlike cross-entropy's, its gradient does not vanish
    when the softmax saturates.
    """
    if logits.shape[1] < 3:
        return cw_margin(logits, y)
    ordered = logits.sort(dim=1, descending=True).values
    scale = ordered[:, 0] - ordered[:, 2] + _DLR_FLOOR
    return -margin(logits, y) / scale


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (APGD-T): ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)``.

    With three classes there is no ``z_π4``, and ``z_π1 - z_π3`` alone equals the numerator
    when the target is the least likely class (the loss is then constant, its gradient zero):
    the denominator is ``z_π1 - (z_π2 + z_π3) / 2`` instead, still shift- and scale-invariant
    and never identical to a target's gap. With two classes the only target is the only wrong
    class: the CW margin, as for :func:`dlr`. (AutoAttack's own checks warn that DLR needs three
    classes and targeted DLR four.)
    """
    classes = logits.shape[1]
    if classes < 3:
        return cw_margin(logits, y)
    ordered = logits.sort(dim=1, descending=True).values
    below = 1 if classes == 3 else 2  # the first of the two logits averaged
    scale = ordered[:, 0] - 0.5 * (ordered[:, below] + ordered[:, below + 1])
    gap = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)
    return -gap / (scale + _DLR_FLOOR)


def cross_entropy_targeted(logits: torch.Tensor, y: torch.Tensor,
                           target: torch.Tensor) -> torch.Tensor:
    """Targeted cross-entropy: ``-CE(z, t)``, rising as the target class becomes likely."""
    return -F.cross_entropy(logits, target, reduction="none")


#: The losses that do not change when the logits are scaled or shifted: a saturated softmax,
#: which starves cross-entropy's gradients, cannot hide from them.
SCALE_INVARIANT = frozenset({dlr, dlr_targeted})
