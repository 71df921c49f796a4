"""The threat models: the L∞ and the L2 ball of radius ε around x, within the pixel box [0, 1].

A gradient attack is the same loop under either norm; only its step direction, its random start
and its projection differ (as in foolbox's ``normalize``/``project`` hooks). Every function works
on a batch of rows with one ε per row.
"""

from __future__ import annotations

import torch

#: Keeps the L2 normalisation of a zero gradient or perturbation finite.
_TINY = 1e-12


def _view(eps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return eps.view((-1,) + (1,) * (like.dim() - 1))


def l2_norm(v: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row, shaped to broadcast against ``v``."""
    return v.flatten(1).norm(dim=1).view((-1,) + (1,) * (v.dim() - 1))


def direction(norm: str, grad: torch.Tensor) -> torch.Tensor:
    """The steepest-ascent direction of unit size: ``sign(g)`` (L∞) or ``g / ||g||_2`` (L2)."""
    if norm == "linf":
        return grad.sign()
    return grad / (l2_norm(grad) + _TINY)


def random_start(norm: str, x: torch.Tensor, eps: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
    """A random point of the ball from ``noise`` uniform in [-1, 1]: ``x + ε·noise`` under L∞, a
    point on the sphere of radius ε in the noise's direction under L2; clipped to the pixel box."""
    if norm == "linf":
        start = x + _view(eps, x) * noise
    else:
        start = x + _view(eps, x) * noise / (l2_norm(noise) + _TINY)
    return start.clamp(0.0, 1.0)


def project(norm: str, moved: torch.Tensor, x: torch.Tensor, eps: torch.Tensor,
            lo: torch.Tensor, hi: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Bring ``moved`` back into the ball around ``x`` and the pixel box, into ``out``.

    ``lo``/``hi`` are the L∞ ball intersected with the box. Under L2 the perturbation is scaled
    back onto the ball, then clipped to the box: clipping only moves a coordinate towards ``x``,
    so the result stays inside the ball.
    """
    if norm == "linf":
        return torch.clamp(moved, lo, hi, out=out)
    delta = moved - x
    scale = (_view(eps, x) / (l2_norm(delta) + _TINY)).clamp(max=1.0)
    return torch.clamp(x + delta * scale, 0.0, 1.0, out=out)


def perturbation_size(norm: str, delta: torch.Tensor) -> torch.Tensor:
    """``||delta||`` of each row under the norm (for reports and checks)."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)
