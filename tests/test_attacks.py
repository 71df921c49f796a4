"""Attacks against cases whose answer is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import Constant, Linear

from robaudit.attacks import AttackSettings, build_attack
from robaudit.attacks.losses import cw_margin, margin, temperature_cross_entropy
from robaudit.attacks.pgd import PGD
from robaudit.attacks.stream import audit_batch

EPS = 0.1


def two_class_linear(corner_margin: float, d: int = 16, seed: int = 0):
    """A 2-class linear model, an input x of class 0, and the optimal L∞ perturbation.

    The margin z_0 - z_1 at x is (w_0 - w_1)·x + b_0 - b_1; its minimum over the ε-ball is at
    x + ε·sign(w_1 - w_0), where it falls by ε·||w_0 - w_1||_1. The bias puts that minimum at
    ``corner_margin``. Weights are at least 0.5 in size, so any iterate a step away from the
    corner has a margin larger by at least 0.5·step_size.
    """
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(2, d, generator=g) + 0.5) * torch.where(torch.rand(2, d, generator=g) < 0.5,
                                                            -1.0, 1.0)
    x = torch.full((1, 1, 4, d // 4), 0.5)  # interior: the [0,1] box does not bind
    diff = w[0] - w[1]
    optimum = x + EPS * torch.sign(w[1] - w[0]).reshape(x.shape)
    clean_margin = float(diff @ x.flatten())
    bias = torch.tensor([corner_margin - clean_margin + EPS * float(diff.abs().sum()), 0.0])
    return Linear(w, bias), x, optimum


def test_pgd_reaches_the_optimal_linf_perturbation_of_a_linear_model():
    model, x, optimum = two_class_linear(corner_margin=-1e-4)
    out = PGD(EPS, steps=20)(model, x, torch.tensor([0]), torch.tensor([7]))
    assert out.broken.tolist() == [True]
    # The only misclassified points of the ball are within 1e-4/0.5 of the corner, and PGD
    # moves in steps of 0.0125: its first misclassified iterate is the corner itself.
    torch.testing.assert_close(out.x_adv, optimum, atol=1e-6, rtol=0)
    assert out.pred.tolist() == [1]


def test_pgd_ends_on_the_optimum_but_does_not_break_a_model_robust_at_it():
    model, x, optimum = two_class_linear(corner_margin=1e-3)
    out = PGD(EPS, steps=20)(model, x, torch.tensor([0]), torch.tensor([7]))
    assert out.broken.tolist() == [False]
    torch.testing.assert_close(out.x_adv, optimum, atol=1e-6, rtol=0)
    assert float(out.margin(torch.tensor([0]))) == pytest.approx(1e-3, abs=1e-5)
    assert out.forwards.tolist() == [21]  # steps + the check of the last iterate


def test_fgsm_is_one_step_of_size_eps_from_the_clean_input():
    model, x, optimum = two_class_linear(corner_margin=-1e-4)
    out = build_attack("fgsm", AttackSettings(EPS))(model, x, torch.tensor([0]), torch.tensor([0]))
    torch.testing.assert_close(out.x_adv, optimum, atol=1e-6, rtol=0)
    assert out.broken.tolist() == [True]
    assert out.forwards.tolist() == [2]


def test_every_loss_reaches_the_linear_optimum():
    model, x, optimum = two_class_linear(corner_margin=-1e-4, seed=3)
    for name in ("pgd", "tpgd", "cw"):
        attack = build_attack(name, AttackSettings(EPS, temperatures=(0.5, 2.0)))
        out = attack(model, x, torch.tensor([0]), torch.tensor([1]))
        assert out.broken.tolist() == [True], name
        torch.testing.assert_close(out.x_adv, optimum, atol=1e-6, rtol=0)


def test_a_constant_model_cannot_be_broken_and_its_zero_gradients_are_flagged():
    model = Constant(torch.tensor([2.0, 0.0, 1.0]))
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(5, dtype=torch.long)
    out = PGD(0.3, steps=10, restarts=2)(model, x, y, torch.arange(5))
    assert out.broken.tolist() == [False] * 5
    assert out.bad_gradient.tolist() == [True] * 5
    assert out.forwards.tolist() == [22] * 5  # 2 restarts x (10 steps + final check)


def test_iterates_stay_in_the_eps_ball_and_the_pixel_box():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10))
    x = torch.rand(32, 3, 4, 4)
    x[:4] = 0.0
    x[4:8] = 1.0  # the box binds here
    y = model(x).argmax(1)
    out = PGD(0.05, steps=5)(model, x, y, torch.arange(32))
    assert float((out.x_adv - x).abs().max()) <= 0.05 + 1e-7
    assert float(out.x_adv.min()) >= 0.0 and float(out.x_adv.max()) <= 1.0


def test_examples_misclassified_when_clean_are_not_attacked():
    model, x, _ = two_class_linear(corner_margin=-1e-4)
    xs = x.repeat(3, 1, 1, 1)
    y = torch.tensor([0, 1, 0])  # the second is already wrong
    batch = audit_batch(model, [PGD(EPS, steps=20)], xs, y, torch.arange(3))
    outcome = batch.outcomes["pgd"]
    assert batch.clean_correct.tolist() == [True, False, True]
    assert outcome.forwards.tolist()[1] == 0
    torch.testing.assert_close(outcome.x_adv[1], xs[1])
    assert outcome.broken.tolist() == [True, False, True]


def test_an_example_stops_costing_forward_passes_once_broken():
    # diff = w_0 - w_1 = 1 everywhere: each step of 0.01 lowers the margin 0.5 by 0.16, so the
    # fifth iterate (after 4 steps) is the first one misclassified.
    w = torch.stack([torch.full((16,), 0.5), torch.full((16,), -0.5)])
    model = Linear(w, torch.tensor([0.5 - 8.0, 0.0]))  # margin at x = 0.5 is 16*0.5 - 7.5 = 0.5
    x = torch.full((1, 1, 4, 4), 0.5)
    out = PGD(EPS, steps=50, step_size=0.01, random_start=False)(
        model, x, torch.tensor([0]), torch.tensor([0])
    )
    assert out.broken.tolist() == [True]
    assert out.forwards.tolist() == [5]
    torch.testing.assert_close(out.x_adv, x - 0.04)


def test_restarts_only_rerun_robust_examples_and_results_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    x = torch.rand(6, 1, 4, 4)
    y = model(x).argmax(1)
    seeds = torch.arange(100, 106)
    attack = PGD(0.03, steps=3, restarts=3)
    whole = attack(model, x, y, seeds)
    alone = attack(model, x[4:5], y[4:5], seeds[4:5])
    torch.testing.assert_close(whole.x_adv[4:5], alone.x_adv)
    assert whole.forwards[4] == alone.forwards[0]
    # A robust example pays for every restart; a broken one stops paying when it breaks.
    robust = ~whole.broken
    assert (whole.forwards[robust] == 3 * 4).all()
    assert (whole.forwards[whole.broken] < 3 * 4).all()


def test_temperature_loss_has_the_documented_logit_gradient():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 0.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    for t in (0.5, 1.0, 4.0):
        (grad,) = torch.autograd.grad(temperature_cross_entropy(t)(logits, y).sum(), logits)
        expected = (F.softmax(logits.detach() / t, dim=1) - F.one_hot(y, 3)) / t
        torch.testing.assert_close(grad, expected)


def test_margins():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 0.0, 3.0]])
    y = torch.tensor([0, 0])
    assert margin(logits, y).tolist() == [1.0, -2.5]
    assert cw_margin(logits, y).tolist() == [-1.0, 2.5]


def noise(seed: int, stream: int) -> torch.Tensor:
    from robaudit.attacks.base import fill_uniform_noise

    return fill_uniform_noise(torch.empty(1, 1, 4, 4), [(seed, stream)])[0]


def test_the_user_seed_changes_every_random_start():
    for index in (0, 7):
        a = noise(index, 0)
        assert not torch.equal(a, noise(index + (1 << 32), 0))  # another --seed
        assert not torch.equal(a, noise(index, 1))  # another restart
        assert torch.equal(a, noise(index, 0))
        assert float(a.abs().max()) <= 1.0


def test_random_starts_are_pinned_and_do_not_depend_on_their_neighbours():
    from robaudit.attacks.base import fill_uniform_noise

    # Values of the seed mixing (SplitMix64 twice) and torch's generator since robaudit 0.1:
    # a change here changes every figure robaudit reports.
    keys = [(3, 0), (2**40 + 3, 0), (2**64 - 1, 2**32 + 5)]
    expected = [[-0.18362081, 0.09939075, -0.67046225, 0.45995200],
                [-0.63528740, -0.69666255, -0.45493770, -0.11903441],
                [-0.79514587, 0.57217789, 0.97162294, -0.75754178]]
    together = fill_uniform_noise(torch.empty(3, 2, 2), keys)
    torch.testing.assert_close(together.flatten(1), torch.tensor(expected))
    for row, key in zip(together, keys, strict=True):
        assert torch.equal(row, fill_uniform_noise(torch.empty(1, 2, 2), [key])[0])
