"""Square Attack: gradient-free random search with square-shaped updates, forward passes only.

Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a query-efficient black-box adversarial
attack via random search", ECCV 2020. Each query changes the perturbation inside one random square
window (L∞: every pixel of the window to ±ε, one sign per channel; L2: the mass of a second window
moved into the first, as a centred bump) and keeps the change when the margin ``z_y - max_{j≠y}
z_j`` falls. It needs no gradient, so it breaks models whose gradients are masked (saturated
softmax, quantised or randomised inputs) that gradient attacks report as robust.

The window's side shrinks along the paper's schedule: a share ``p`` of the image's pixels,
halved at fixed fractions of the query budget.
"""

from __future__ import annotations

import torch

from robaudit.attacks.base import Attack, counter_uniform
from robaudit.attacks.norms import l2_norm
from robaudit.attacks.runnable import Runnable

#: Where ``p`` halves, in ten-thousandths of the query budget (the paper's schedule).
_HALVINGS = torch.tensor([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000])


class Square(Attack, Runnable):
    """The Square Attack's step rule under the L∞ or L2 norm; ``queries`` forward passes a run."""

    uses_gradient = False

    def __init__(self, eps: float, *, queries: int = 5000, p_init: float = 0.8,
                 norm: str = "linf", name: str = "square") -> None:
        # The starting point is the first query; each step after it one more.
        super().__init__(eps, steps=max(0, queries - 1), norm=norm, name=name)
        self.queries = queries
        self.p_init = p_init

    def describe(self) -> dict[str, object]:
        return {"queries": self.queries}

    def side(self, steps: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The window's side for each row after ``steps`` queries: about a share ``p`` of the
        image's pixels, ``p`` halving along the budget."""
        done = torch.div(steps * 10000, max(1, self.queries), rounding_mode="floor")
        halvings = (done[:, None] > _HALVINGS.to(steps.device)).sum(dim=1)
        p = self.p_init / torch.pow(2.0, halvings.float())
        side = torch.sqrt(p * height * width).round().long()
        return side.clamp(1, max(1, min(height, width) - 1))

    def start(self, x: torch.Tensor, eps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Vertical stripes: each column of each channel at +ε or -ε (L2: scaled to norm ε)."""
        n, c, _h, w = x.shape
        signs = torch.where(counter_uniform(keys, torch.zeros_like(keys), c * w) < 0.5, -1.0, 1.0)
        stripes = signs.view(n, c, 1, w).expand_as(x)
        view = (-1, 1, 1, 1)
        if self.norm == "linf":
            return (x + eps.view(view) * stripes).clamp(0.0, 1.0)
        return (x + eps.view(view) * stripes / l2_norm(stripes)).clamp(0.0, 1.0)

    def propose(self, best: torch.Tensor, x: torch.Tensor, eps: torch.Tensor,
                lo: torch.Tensor, hi: torch.Tensor, steps: torch.Tensor,
                keys: torch.Tensor) -> torch.Tensor:
        """The next query of each row: the best point so far, changed inside a random window."""
        n, c, h, w = x.shape
        side = self.side(steps, h, w)
        u = counter_uniform(keys, steps + 1, 4 + c)
        # Window corners, uniform over the positions where the window fits.
        top = (u[:, 0] * (h - side + 1)).long()
        left = (u[:, 1] * (w - side + 1)).long()
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + side)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + side)[:, None])
        window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # n, 1, h, w
        signs = torch.where(u[:, 4:] < 0.5, -1.0, 1.0).view(n, c, 1, 1)
        if self.norm == "linf":
            return self._linf(best, x, eps, lo, hi, window, signs)
        second = self._second_window(u, side, h, w, rows, cols)
        return self._l2(best, x, eps, window, second, top, left, side, signs)

    @staticmethod
    def _linf(best, x, eps, lo, hi, window, signs):
        proposal = torch.where(window, x + eps.view(-1, 1, 1, 1) * signs, best)
        proposal = torch.clamp(proposal, lo, hi)
        # A window that would not change anything wastes a query: flip its signs instead.
        same = ((proposal - best).abs() < 1e-7).flatten(1).all(dim=1)
        if bool(same.any()):
            flipped = torch.clamp(torch.where(window, x - eps.view(-1, 1, 1, 1) * signs, best),
                                  lo, hi)
            proposal = torch.where(same.view(-1, 1, 1, 1), flipped, proposal)
        return proposal

    @staticmethod
    def _second_window(u, side, h, w, rows, cols):
        top = (u[:, 2] * (h - side + 1)).long()
        left = (u[:, 3] * (w - side + 1)).long()
        in_rows = (rows >= top[:, None]) & (rows < (top + side)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + side)[:, None])
        return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]

    @staticmethod
    def _l2(best, x, eps, window, second, top, left, side, signs):
        """Move the perturbation's mass in both windows (and any unused budget) into the first,
        as a bump centred in it: the total L2 norm becomes ε (before clipping to the box)."""
        n, c, h, w = x.shape
        delta = best - x
        both = window | second
        # A bump of concentric squares, largest in the window's centre.
        rows = torch.arange(h, device=x.device).view(1, h, 1).float()
        cols = torch.arange(w, device=x.device).view(1, 1, w).float()
        centre_r = (top + (side - 1) / 2).view(n, 1, 1)
        centre_c = (left + (side - 1) / 2).view(n, 1, 1)
        ring = torch.maximum((rows - centre_r).abs(), (cols - centre_c).abs())
        bump = torch.where(window[:, 0], 1.0 / (ring + 1.0) ** 2, 0.0)[:, None]
        bump = bump / l2_norm(bump)
        per_channel = (delta * both).pow(2).flatten(2).sum(dim=2)  # n, c
        unused = (eps.pow(2) - delta.pow(2).flatten(1).sum(dim=1)).clamp(min=0.0)
        mass = (per_channel + unused[:, None] / c).sqrt().view(n, c, 1, 1)
        old = delta * window
        new = old + signs * bump * mass
        new = new * mass / (new.pow(2).flatten(2).sum(dim=2).sqrt().view(n, c, 1, 1) + 1e-12)
        proposal = torch.where(both, x + torch.where(window, new, 0.0), best)
        return proposal.clamp(0.0, 1.0)
