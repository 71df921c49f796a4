from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    # CI has 2 cores; more threads than that only adds contention.
    torch.set_num_threads(2)


@pytest.fixture
def digits() -> Path:
    return DIGITS


class Linear(nn.Module):
    """``z = W x + b`` on flattened input: the case whose optimal L∞ attack is known."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


class Constant(nn.Module):
    """Ignores its input: no perturbation can change its prediction."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)
