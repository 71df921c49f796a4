"""How much would dropping hopeless examples early save, and what would it lose? (issue #4, P2)

Not a robaudit feature: evidence for a decision. Runs the default attacks (PGD, T-PGD at 0.1 and
0.5, 20 steps, halving) on the bundled example with three seeds, records every job's margin
``z_y - max_{j≠y} z_j`` at every step, and then replays a discarding rule offline: at the given
checkpoint steps a job is dropped (counted robust) when its margin is above ``slack`` times the
largest margin, at that step, of the jobs that broke later in *another* seed's run. It prints the
passes saved and the broken jobs lost. Run with ``python benchmarks/discard_study.py``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from robaudit.attacks import AttackSettings, build_attacks
from robaudit.attacks.engine import Engine
from robaudit.attacks.losses import margin
from robaudit.attacks.stream import stream_audit
from robaudit.models import load_model

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"
RULES = ((2,), (3,), (2, 4, 8), (3, 6, 9, 12))
SLACKS = (1.0, 1.25, 1.5)


class Recording(Engine):
    """An engine that notes each job's margin at each of its steps (from the logits it sees)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.trajectories: dict[tuple, list[float]] = defaultdict(list)
        self._seen: list[torch.Tensor] = []
        super().__init__(self._observe(model), None)

    def _observe(self, model: torch.nn.Module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            out = model(x)
            self._seen.append(out.detach())
            return out
        return forward

    def step(self):
        rows = [(job.key, run) for job, run in zip(self.jobs, self.run, strict=True)]
        y = self.y[: self.n].clone()
        self._seen.clear()
        finished = super().step()
        for key, value in zip(rows, margin(self._seen[0], y).tolist(), strict=True):
            self.trajectories[key].append(value)
        return finished


def trajectories(seed: int) -> dict[tuple, list[float]]:
    model = load_model(DIGITS / "model.pt2").module
    data = np.load(DIGITS / "test.npz")
    x = torch.from_numpy(data["x"]).float() / 255
    y = torch.from_numpy(data["y"]).long()
    attacks = build_attacks(["pgd", "tpgd"], AttackSettings(eps=0.2))
    engine = Recording(model)
    for _ in stream_audit(model, [(x, y, torch.arange(len(x)))], [attacks], batch_size=None,
                          seed=seed, engine=engine):
        pass
    return dict(engine.trajectories)


def thresholds(runs: dict[tuple, list[float]], steps: tuple[int, ...]) -> dict[int, float]:
    """Per checkpoint step: the largest margin there of a job that broke after it."""
    out = {}
    for t in steps:
        late = [m[t] for m in runs.values() if m[-1] < 0 and len(m) > t + 1]
        out[t] = max(late) if late else float("inf")
    return out


def replay(runs: dict[tuple, list[float]], limit: dict[int, float],
           slack: float) -> tuple[int, float]:
    """Broken jobs lost and the share of passes saved, had the rule been applied."""
    total = sum(len(m) for m in runs.values())
    lost = saved = 0
    for m in runs.values():
        for t in sorted(limit):
            if len(m) <= t + 1:
                break
            if m[t] > slack * limit[t]:
                saved += len(m) - (t + 1)
                lost += m[-1] < 0
                break
    return lost, saved / total


def main() -> None:
    torch.set_num_threads(2)
    seeds = (0, 1, 2)
    runs = {s: trajectories(s) for s in seeds}
    broken = {s: sum(m[-1] < 0 for m in r.values()) for s, r in runs.items()}
    print(f"jobs per seed: {len(runs[0])}; broken: {broken}")
    for steps in RULES:
        for slack in SLACKS:
            cells = []
            for learn, apply in zip(seeds, seeds[1:] + seeds[:1], strict=True):
                lost, saved = replay(runs[apply], thresholds(runs[learn], steps), slack)
                cells.append(f"lost {lost}, saved {saved:.0%}")
            print(f"checkpoints {steps}, slack {slack}: " + "; ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
