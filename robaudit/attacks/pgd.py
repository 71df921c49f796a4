"""Projected gradient descent in the L∞ ball, with the losses robaudit attacks with.

PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
Temperature-PGD: Tian et al., "Analysis and Applications of Class-wise Robustness in Adversarial
Training", KDD 2021. Threat model: ``||x_adv - x||_∞ <= eps`` in pixel space ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from robaudit.attacks.base import AttackOutcome, Loss, Model, uniform_start
from robaudit.attacks.losses import cross_entropy, margin


class PGD:
    """L∞ PGD: ``x <- clip_[0,1](Π_eps(x + step_size * sign(∇x L(f(x), y))))``.

    Each example stops costing compute at the first iterate that is misclassified; restarts and
    further losses run only on the examples still robust. With several losses (the temperatures of
    Temperature-PGD) the worst case over them counts.
    """

    def __init__(
        self,
        eps: float,
        *,
        steps: int = 20,
        step_size: float | None = None,
        restarts: int = 1,
        losses: Sequence[Loss] = (cross_entropy,),
        random_start: bool = True,
        name: str = "pgd",
    ) -> None:
        self.eps = eps
        self.steps = steps
        self.step_size = 2.5 * eps / steps if step_size is None else step_size
        self.restarts = restarts
        self.losses = tuple(losses)
        self.random_start = random_start
        self.name = name

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> AttackOutcome:
        """Attack ``x`` (labels ``y``); ``seeds`` (one per example) seed the random starts."""
        best: AttackOutcome | None = None
        runs = [(loss, restart) for loss in self.losses for restart in range(self.restarts)]
        for stream, (loss, _) in enumerate(runs):
            todo = (
                torch.arange(x.shape[0], device=x.device)
                if best is None
                else (~best.broken).nonzero().squeeze(1)
            )
            if todo.numel() == 0:
                break
            run = self._run(model, x[todo], y[todo], seeds[todo], loss, stream)
            if best is None:
                best = run
                continue
            best.forwards[todo] += run.forwards
            best.bad_gradient[todo] |= run.bad_gradient
            # A broken example keeps the iterate that broke it; a robust one keeps its
            # most adversarial (lowest-margin) iterate over all runs.
            better = run.broken | (margin(run.logits, y[todo]) < margin(best.logits[todo], y[todo]))
            take = todo[better]
            best.x_adv[take] = run.x_adv[better]
            best.logits[take] = run.logits[better]
            best.broken[take] = run.broken[better]
        if best is None:  # an empty batch
            return AttackOutcome.unbroken(x, x.new_zeros((0, 0)))
        return best

    def _run(
        self,
        model: Model,
        x: torch.Tensor,
        y: torch.Tensor,
        seeds: torch.Tensor,
        loss_fn: Loss,
        stream: int,
    ) -> AttackOutcome:
        n = x.shape[0]
        lower, upper = (x - self.eps).clamp(min=0.0), (x + self.eps).clamp(max=1.0)
        current = uniform_start(x, self.eps, seeds, stream) if self.random_start else x.clone()
        x_adv = current.clone()
        logits_out: torch.Tensor | None = None
        broken = torch.zeros(n, dtype=torch.bool, device=x.device)
        forwards = torch.zeros(n, dtype=torch.long, device=x.device)
        bad_gradient = torch.zeros(n, dtype=torch.bool, device=x.device)
        active = torch.arange(n, device=x.device)

        for step in range(self.steps + 1):
            wants_grad = step < self.steps
            xa = current.detach().requires_grad_(wants_grad)
            with torch.set_grad_enabled(wants_grad):
                logits = model(xa)
            if logits_out is None:
                logits_out = logits.new_empty((n, logits.shape[1]))
            forwards[active] += 1
            x_adv[active] = xa.detach()
            logits_out[active] = logits.detach()
            wrong = logits.argmax(dim=1) != y[active]
            broken[active[wrong]] = True
            still = ~wrong
            if not wants_grad or not bool(still.any()):
                break
            (grad,) = torch.autograd.grad(loss_fn(logits, y[active])[still].sum(), xa)
            grad = grad[still]
            # Zero or non-finite input gradients are the classic sign of gradient masking:
            # keep count, and never let NaN reach the iterate.
            flat = grad.flatten(1)
            healthy = torch.isfinite(flat).all(dim=1) & (flat.abs().amax(dim=1) > 0)
            active = active[still]
            bad_gradient[active[~healthy]] = True
            direction = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0).sign()
            moved = xa.detach()[still] + self.step_size * direction
            current = torch.maximum(torch.minimum(moved, upper[active]), lower[active])

        assert logits_out is not None  # steps >= 0 means at least one forward pass
        return AttackOutcome(x_adv, broken, logits_out, forwards, bad_gradient)
