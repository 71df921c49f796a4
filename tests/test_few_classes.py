"""Models with few classes, and models whose outputs turn NaN: right verdicts, not masking.

DLR and targeted DLR are defined for 2 and 3 classes (their 4-class formulas are constant there),
targeted attacks aim at most at the classes - 1 wrong ones, a 1-output model is refused, and a
NaN or inf output counts as misclassified instead of being read as class 0. The scans run the real
CLI on linear models built here on the bundled digits, whose optimal L∞ attack is known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIGITS, Linear
from torch import nn

from robaudit.attacks.base import predict
from robaudit.attacks.losses import cw_margin, dlr, dlr_targeted
from robaudit.cli import main
from robaudit.errors import ExitCode

FAST = ("--steps", "2", "--device", "cpu")


# -- the losses ---------------------------------------------------------------------------------


def test_dlr_of_three_classes_keeps_croce_and_heins_formula():
    z = torch.tensor([[2.0, 1.0, -1.0]])
    # -(z_y - z_π2) / (z_π1 - z_π3): z_π3 exists with three classes.
    assert dlr(z, torch.tensor([0])).tolist() == pytest.approx([-1 / 3])


def test_targeted_dlr_of_three_classes_is_not_constant_towards_the_least_likely_class():
    z = torch.tensor([[2.0, 1.0, -1.0]], requires_grad=True)
    y = torch.tensor([0])
    # Denominator z_π1 - (z_π2 + z_π3) / 2 = 2: gaps 1 (target 1) and 3 (target 2).
    towards = {t: dlr_targeted(z, y, torch.tensor([t])) for t in (1, 2)}
    assert [float(towards[t].detach()) for t in (1, 2)] == pytest.approx([-0.5, -1.5])
    # APGD-T's z_π1 - (z_π3 + z_π4)/2 would be z_π1 - z_π3 here: -1 whatever z, no gradient.
    (grad,) = torch.autograd.grad(towards[2].sum(), z)
    assert grad.abs().sum() > 0


def test_targeted_dlr_of_three_classes_is_unchanged_by_scaling_and_shifting():
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, target = torch.zeros(16, dtype=torch.long), torch.full((16,), 2)
    for c in (1e-3, 1e4):
        torch.testing.assert_close(dlr_targeted(c * z + 3.0, y, target), dlr_targeted(z, y, target))


def test_dlr_of_two_classes_is_the_cw_margin_whose_gradient_does_not_vanish():
    z = torch.tensor([[2.0, -1.0], [0.5, 4.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    for loss in (dlr(z, y), dlr_targeted(z, y, torch.tensor([1, 1]))):
        assert loss.tolist() == cw_margin(z, y).tolist() == [-3.0, 3.5]
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert grad.tolist() == [[-1.0, 1.0], [-1.0, 1.0]]


def test_a_non_finite_output_predicts_no_class():
    z = torch.tensor([[float("nan")] * 3, [0.0, float("inf"), 1.0], [0.0, 2.0, 1.0]])
    assert predict(z).tolist() == [3, 3, 1]


# -- few classes through the CLI ----------------------------------------------------------------


def digits(classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` examples of each of the first ``classes`` digits (uint8 NCHW)."""
    with np.load(DIGITS / "test.npz") as npz:
        x, y = npz["x"], npz["y"]
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(classes)])
    return x[keep], y[keep]


def centroids(x: np.ndarray, y: np.ndarray, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A nearest-centroid classifier as a linear one: ``z_c = mu_c·x - ||mu_c||² / 2``."""
    flat = torch.tensor(x, dtype=torch.float64).flatten(1) / 255
    mu = torch.stack([flat[torch.tensor(y) == c].mean(0) for c in range(classes)])
    return mu.float(), (-(mu**2).sum(1) / 2).float()


def save(module: nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch")
    program = torch.export.export(module.eval(), (torch.zeros(2, 1, 8, 8),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def optimal_robust(weight: torch.Tensor, bias: torch.Tensor, x: np.ndarray, y: np.ndarray,
                   eps: float) -> np.ndarray:
    """Per example, whether a linear model stays correct on the whole L∞ ball ∩ [0, 1]: for each
    wrong class j, the margin ``(w_y - w_j)·x' + b_y - b_j`` is lowest at the corner moving each
    pixel as far as the box allows against ``w_y - w_j``; robust when every such minimum is > 0."""
    w, b = weight.double().numpy(), bias.double().numpy()
    flat = x.reshape(len(x), -1).astype(np.float64) / 255
    down, up = np.minimum(eps, flat), np.minimum(eps, 1 - flat)
    robust = np.ones(len(x), dtype=bool)
    for j in range(len(w)):
        d = w[y] - w[j]
        lowest = (d * flat).sum(1) + b[y] - b[j] - (np.where(d > 0, d * down, -d * up)).sum(1)
        other = y != j
        assert (np.abs(lowest[other]) > 1e-3).all(), "a tie at the optimum: choose another eps"
        robust &= ~other | (lowest > 0)
    return robust


def scan_linear(tmp_path: Path, classes: int, per_class: int,
                eps: float) -> tuple[int, dict, np.ndarray]:
    """Scan a nearest-centroid linear model of ``classes`` digits: exit code, JSON report, and
    the optimal attack's robust count per class."""
    x, y = digits(classes, per_class)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    weight, bias = centroids(x, y, classes)
    model = save(Linear(weight, bias), tmp_path / "model.pt2")
    code = main(["scan", str(model), "--data", str(tmp_path / "data.npz"), *FAST,
                 "--eps", str(eps), "--json", str(tmp_path / "report.json")])
    doc = json.loads((tmp_path / "report.json").read_text())
    robust = optimal_robust(weight, bias, x, y, eps)
    return code, doc, np.bincount(y[robust], minlength=classes)


@pytest.mark.parametrize(("classes", "eps", "robust"), [(2, 0.25, [9, 8]), (3, 0.2, [4, 5, 6])])
def test_a_linear_model_of_few_classes_gets_its_exact_robust_count_not_unreliable(
        tmp_path: Path, classes: int, eps: float, robust: list[int]):
    code, doc, expected = scan_linear(tmp_path, classes, per_class=10, eps=eps)
    assert expected.tolist() == robust  # the optimum breaks some, not all: a count to match
    got = [c["robust"]["worst"]["correct"] for c in doc["classes"]]
    assert got == expected.tolist()
    assert doc["escalation"]["unreliable"] == {}
    statuses = [c["verdict"]["status"] for c in doc["classes"]]
    assert set(statuses) <= {"passed", "flagged"}
    assert code == (ExitCode.FLAGGED if "flagged" in statuses else ExitCode.OK)
    # The targeted finish aims at the classes - 1 wrong classes there are, not at 5.
    assert {a["name"]: a.get("targets") for a in doc["attacks"]}["dlr-t"] == classes - 1


def test_a_model_with_one_output_is_refused_in_one_line(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]):
    x, y = digits(1, per_class=4)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    model = save(Linear(torch.ones(1, 64), torch.zeros(1)), tmp_path / "model.pt2")
    code = main(["scan", str(model), "--data", str(tmp_path / "data.npz"), *FAST,
                 "--json", str(tmp_path / "report.json")])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE_ERROR
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "error: the model has 1 output: it cannot be attacked, since there is no other class to "
        "push an input to (argmax over one logit is always class 0); export a binary classifier "
        "with one logit z as two logits, torch.cat([torch.zeros_like(z), z], 1)"]
    assert not (tmp_path / "report.json").exists()


# -- NaN outputs --------------------------------------------------------------------------------


class OffGrid(nn.Module):
    """A linear model on black-and-white images whose logits are NaN as soon as a pixel is grey:
    fine on its data, NaN everywhere in the ball around it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.weight.T + self.bias
        grey = ((x > 0) & (x < 1)).flatten(1).any(dim=1, keepdim=True)
        return torch.where(grey, torch.full_like(z, float("nan")), z)


def test_nan_outputs_count_as_broken_and_the_report_says_so(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]):
    x, y = digits(10, per_class=4)
    x = np.where(x >= 128, 255, 0).astype(np.uint8)
    weight, bias = centroids(x, y, 10)
    grey = int(np.flatnonzero(y == 3)[0])
    x[grey, 0, 0, 0] = 128  # one clean input off the grid: its output is NaN too
    np.savez(tmp_path / "data.npz", x=x, y=y)
    model = save(OffGrid(weight, bias), tmp_path / "model.pt2")
    with torch.no_grad():
        clean = OffGrid(weight, bias)(torch.tensor(x, dtype=torch.float32) / 255)
    correct = np.isfinite(clean.numpy()).all(1) & (clean.argmax(1).numpy() == y)
    assert not correct[grey] and correct.sum() > 30

    code = main(["scan", str(model), "--data", str(tmp_path / "data.npz"), *FAST, "--eps",
                 "0.1", "--min-class-robust", "0.25", "--json", str(tmp_path / "report.json")])
    err = capsys.readouterr().err
    assert code == ExitCode.FLAGGED, err
    doc = json.loads((tmp_path / "report.json").read_text())

    classes = doc["classes"]
    # Every attack's first iterate is grey, so NaN: nothing stays robust, class 0 included.
    assert [c["robust"]["worst"]["correct"] for c in classes] == [0] * 10
    clean_correct = np.bincount(y[correct], minlength=10).tolist()
    assert [c["clean"]["correct"] for c in classes] == clean_correct
    assert [c["verdict"]["status"] for c in classes] == ["flagged"] * 10
    assert all(sum(c["confusion_row"]) == 0 for c in classes)  # broken towards no class
    warning = (f"the model's outputs were NaN or inf on {correct.sum()} of the {correct.sum()} "
               "attacked examples (pgd, tpgd) and on 1 clean example(s): those count as "
               "misclassified")
    assert [w for w in doc["warnings"] if w.startswith(warning)] == doc["warnings"]
    assert len(doc["warnings"]) == 1  # no sign of gradient masking
    assert not doc["escalation"]["ran"]
    assert f"warning: {warning}" in " ".join(err.split())  # rich wraps lines on the terminal
