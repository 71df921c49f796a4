"""The scan pipeline end to end on the bundled example, against a plain reference PGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robaudit.audit import scan
from robaudit.config import ScanConfig
from robaudit.metrics import WORST


def reference_pgd_robust(model, x, y, eps, steps, generator):
    """Madry's PGD, written plainly: no early stop, whole batch every step."""
    alpha = 2.5 * eps / steps
    correct = model(x).argmax(1) == y
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps, generator=generator)).clamp(0, 1)
    robust = correct.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        robust &= logits.argmax(1) == y
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps)
        x_adv = x_adv.clamp(0, 1)
    with torch.no_grad():
        robust &= model(x_adv).argmax(1) == y
    return robust


@pytest.fixture(scope="module")
def digits_pgd_result():
    from conftest import DIGITS

    config = ScanConfig(model=str(DIGITS / "model.pt2"), data=str(DIGITS / "test.npz"),
                        attacks=("pgd",), eps=0.2, steps=20)
    return scan(config)


def test_pgd_agrees_with_a_reference_pgd_on_the_example_model(digits, digits_pgd_result):
    model = torch.export.load(digits / "model.pt2").module()
    data = np.load(digits / "test.npz")
    x = torch.from_numpy(data["x"]).float() / 255
    y = torch.from_numpy(data["y"]).long()
    robust = reference_pgd_robust(model, x, y, 0.2, 20, torch.Generator().manual_seed(0))
    reference = float(robust.float().mean())
    ours = digits_pgd_result.summary.robust_acc["pgd"]
    assert abs(ours - reference) <= 0.01, (ours, reference)
    # And the figure is the example's known one (README of examples/digits): about 65%.
    assert 0.60 <= ours <= 0.70


def test_early_stop_spends_fewer_passes_than_plain_pgd(digits_pgd_result):
    # Plain PGD spends 21 forward passes on every clean-correct example. About two thirds stay
    # robust and pay all 21; the third that breaks stops early, at about 9 passes on average.
    assert 15.0 < digits_pgd_result.summary.mean_forwards["pgd"] < 18.0


def test_class_disparity_of_the_example_is_visible(digits_pgd_result):
    stats = {s.name: s.robust[WORST].acc for s in digits_pgd_result.stats}
    assert stats["8"] < 0.25 and stats["0"] > 0.9
    assert digits_pgd_result.summary.worst_class == "8"
