"""Limits a run meets: memory (the working batch sized to it, running out of it is a message)
and a harden run that diverges or resumes from a checkpoint it cannot trust.

The memory cases plan for a budget set in ``ROBAUDIT_MEMORY_LIMIT`` far below the free memory,
so the figures do not depend on the machine and nothing large is allocated.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIGITS
from torch import nn

from robaudit.attacks.memory import row_cost
from robaudit.cli import main
from robaudit.config import ScanConfig
from robaudit.errors import ExitCode
from robaudit.harden import HardenConfig
from robaudit.harden.run import _diverged
from robaudit.harden.state import Budget, Candidate, RunState
from robaudit.harden.train import Diverged, Split, Validation
from robaudit.models import load_model

USAGE = ExitCode.USAGE_ERROR
FAST = ["--steps", "2", "--device", "cpu", "--attacks", "pgd", "--finish", "none"]
# Harden as tests/test_harden.py runs it, smaller still: 4 examples per class, one epoch.
HARDEN_FAST = ["--per-class", "4", "--steps", "2", "--attacks", "pgd", "--train-steps", "2",
               "--train-batch-size", "16", "--epochs", "1", "--config",
               str(DIGITS / "robaudit.toml")]


class Pooled(nn.Module):
    """A convolution then global pooling: the activation grows with the image, the output not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class Greedy(nn.Module):
    """Runs on one example; a batch of two or more asks for petabytes (refused at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wasted = x.new_zeros((x.shape[0] - 1) * 2**48)
        return self.fc(x.flatten(1)) + wasted.sum() * 0


def _export(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(module.eval(), (example,),
                                          dynamic_shapes=({0: batch},)), path)
    return path


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3x64x64 global-pooling model and 8 images it classifies as labelled."""
    tmp = tmp_path_factory.mktemp("pooled")
    torch.manual_seed(0)
    model = Pooled().eval()
    x = torch.rand(8, 3, 64, 64)
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    names = np.array([str(i) for i in range(10)])
    np.savez(tmp / "images.npz", x=x.numpy(), y=y, class_names=names)
    return _export(model, x[:2], tmp / "pooled.pt2"), tmp / "images.npz"


def _scan(model: Path, data: Path, *extra: str) -> list[str]:
    return ["scan", str(model), "--data", str(data), *FAST, *extra]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --- the working batch follows memory ----------------------------------------------------------


def test_a_row_costs_the_saved_activations_the_backward_and_the_engines_copies(pooled):
    model = load_model(str(pooled[0]), device=torch.device("cpu")).module.eval()
    # Saved for the backward: the input (3*64*64 floats, 49152 B), the ReLU's output
    # (8*64*64 floats, 131072 B) and the pooled features (8 floats, 32 B); the weights are
    # shared by all rows. The backward adds two of the largest, the engine 12 input copies.
    assert row_cost(model, torch.rand(3, 64, 64)) == (
        49152 + 131072 + 32 + 2 * 131072 + 12 * 49152)  # 1032224 B


def test_the_default_batch_shrinks_to_the_memory_limit_and_the_scan_completes(
        pooled, tmp_path, monkeypatch, capsys):
    # Without a limit the batch would be 256 rows (auto_batch_size for 12288 values): about
    # 252 MiB at 1032224 B a row. 16 MiB holds 16 rows.
    monkeypatch.setenv("ROBAUDIT_MEMORY_LIMIT", "16M")
    report = tmp_path / "r.json"
    assert main(_scan(*pooled, "--json", str(report))) == ExitCode.OK
    doc = json.loads(report.read_text())
    assert doc["environment"]["working_batch"] == 16
    assert doc["data"]["audited"] == 8 and not doc["partial"]
    assert doc["warnings"] == []


def test_an_explicit_batch_size_over_the_limit_is_honoured_with_a_warning(
        pooled, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBAUDIT_MEMORY_LIMIT", "16M")
    report = tmp_path / "r.json"
    assert main(_scan(*pooled, "--batch-size", "64", "--json", str(report))) == ExitCode.OK
    doc = json.loads(report.read_text())
    assert doc["environment"]["working_batch"] == 64
    assert doc["warnings"] == [
        "--batch-size 64 may not fit in memory: a row of 3x64x64 needs about 1008.0 KiB and "
        "16.0 MiB is available (see ROBAUDIT_MEMORY_LIMIT in the README); a --batch-size of 16 "
        "or less would fit"]
    assert "--batch-size 64 may not fit in memory" in capsys.readouterr().err


def test_when_not_one_row_fits_the_scan_stops_before_attacking_with_one_line(
        pooled, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROBAUDIT_MEMORY_LIMIT", "512K")
    report = tmp_path / "r.json"
    assert main(_scan(*pooled, "--json", str(report))) == USAGE
    assert _one_error_line(capsys) == (
        "error: not enough memory on cpu: attacking one example of 3x64x64 needs about "
        "1008.0 KiB, and 512.0 KiB is available (60% of the free memory, at most "
        "ROBAUDIT_MEMORY_LIMIT); free memory or use smaller images, or pass --batch-size 1 to "
        "try anyway")
    assert not report.exists()


def test_an_allocation_failure_names_the_batch_size_and_writes_no_report(tmp_path, capsys):
    model = _export(Greedy(), torch.rand(2, 1, 8, 8), tmp_path / "greedy.pt2")
    report = tmp_path / "r.json"
    args = ["scan", str(model), "--data", str(DIGITS / "test.npz"), "--per-class", "1", *FAST,
            "--batch-size", "8", "--json", str(report)]
    assert main(args) == USAGE
    assert _one_error_line(capsys) == (
        "error: out of memory on cpu with a working batch of 8: pass a smaller --batch-size "
        "(e.g. --batch-size 2), or set ROBAUDIT_MEMORY_LIMIT lower")
    assert not report.exists()


@pytest.mark.parametrize("value", ["lots", "-1G", "0"])
def test_a_bad_memory_limit_is_a_usage_error(pooled, monkeypatch, capsys, value):
    monkeypatch.setenv("ROBAUDIT_MEMORY_LIMIT", value)
    assert main(_scan(*pooled)) == USAGE
    assert _one_error_line(capsys) == (
        "error: ROBAUDIT_MEMORY_LIMIT must be a positive number of bytes such as 8G or 512M, "
        f"got {value!r}")


# --- harden: divergence ------------------------------------------------------------------------


def _harden(model: Path, out: Path, *extra: str) -> list[str]:
    return ["harden", str(model), "--data", str(DIGITS / "train.npz"), "--val-data",
            str(DIGITS / "test.npz"), "--out", str(out), *HARDEN_FAST, *extra]


def test_a_diverging_lr_stops_at_the_first_epoch_and_writes_nothing(tmp_path, capsys):
    out, report = tmp_path / "h.pt2", tmp_path / "h.json"
    code = main(_harden(DIGITS / "model.pt2", out, "--lr", "1e30", "--json", str(report)))
    assert code == USAGE
    line = _one_error_line(capsys)
    assert line.startswith("error: training diverged at epoch 1, batch ")
    assert line.endswith(f"with --lr 1e+30; pass a smaller --lr; no epoch before it was kept, "
                         f"so {out} was not written")
    assert not out.exists() and not report.exists()


def test_after_divergence_the_best_epoch_before_it_is_written_and_said(tmp_path):
    loaded = load_model(str(DIGITS / "model.pt2"), device=torch.device("cpu"))
    best = {k: v.detach().clone() + 0.5 for k, v in loaded.module.state_dict().items()}
    out = tmp_path / "h.pt2"
    config = HardenConfig(scan=ScanConfig(model=str(DIGITS / "model.pt2"),
                                          data=str(DIGITS / "test.npz"), eps=0.2),
                          train_data=str(DIGITS / "train.npz"), out=str(out), lr=0.5)
    figures = Validation([1.0], [0.5], 1.0, 0.5, 0.5, "0")
    run = RunState(2, Budget.around(figures, 0.02, 0.01), Candidate(1, best, figures))
    val = Split(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), torch.arange(4),
                [str(i) for i in range(10)])
    error = _diverged(config, loaded, run, val, Diverged(2, 3, "the loss became nan"))
    assert str(error) == ("training diverged at epoch 2, batch 3: the loss became nan with "
                          f"--lr 0.5; pass a smaller --lr; the best epoch before it (epoch 1) "
                          f"was written to {out}")
    written = load_model(str(out), device=torch.device("cpu")).module.state_dict()
    assert all(torch.equal(written[k], v) for k, v in best.items())


# --- harden: what --resume refuses ---------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the digits model and the checkpoint of a one-epoch harden run on it."""
    tmp = tmp_path_factory.mktemp("resume")
    model = tmp / "model.pt2"
    shutil.copy(DIGITS / "model.pt2", model)
    assert main(_harden(model, tmp / "h.pt2")) in (ExitCode.OK, ExitCode.FLAGGED)
    return model, tmp / "h.pt2"


def _nan_weight(state: dict) -> str:
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][key] = torch.full_like(state["model"][key], float("nan"))
    return f"holds non-finite weights (model.{key}): the run it saved had diverged; start " \
           "again without --resume, with a smaller --lr"


def _renamed_weight(state: dict) -> str:
    key = sorted(state["model"])[0]
    state["model"]["extra." + key] = state["model"].pop(key)
    return f"was made for another model (its model has other weights: extra.{key}); resume " \
           "with the interrupted run's model, or start again without --resume"


def _damaged(path: str, kind: str) -> str:
    return f"is damaged: {path} is missing or not {kind}; delete it and start again without " \
           "--resume"


def _no_optimizer(state: dict) -> str:
    del state["optimizer"]
    return _damaged("optimizer", "a dict")


def _bad_worst_class(state: dict) -> str:
    state["best"]["validation"]["worst_class"] = 3
    return _damaged("best.validation.worst_class", "a str")


def _no_budget_floor(state: dict) -> str:
    del state["budget"]["mean_floor"]
    return _damaged("budget.mean_floor", "a float")


@pytest.mark.parametrize("change", [_nan_weight, _renamed_weight, _no_optimizer,
                                    _bad_worst_class, _no_budget_floor])
def test_resume_refuses_a_checkpoint_it_cannot_trust_with_one_line(finished, tmp_path, capsys,
                                                                   change):
    model, out = finished
    state = torch.load(f"{out}.ckpt", weights_only=True)
    expected = change(state)
    checkpoint = tmp_path / "changed.ckpt"
    torch.save(state, checkpoint)
    code = main(_harden(model, out, "--resume", "--checkpoint", str(checkpoint)))
    assert code == USAGE
    assert _one_error_line(capsys) == f"error: --resume: checkpoint {checkpoint} {expected}"


def test_resume_refuses_a_checkpoint_of_another_model_file(finished, tmp_path, capsys):
    model, out = finished
    other = tmp_path / "model.pt2"  # the same architecture, other weights
    program = torch.export.load(model)
    with torch.no_grad():
        program.state_dict[next(iter(program.state_dict))].add_(1.0)
    torch.export.save(program, other)
    code = main(["harden", str(other), *_harden(model, out, "--resume", "--checkpoint",
                                                 f"{out}.ckpt")[2:]])
    assert code == USAGE
    assert _one_error_line(capsys) == (
        f"error: --resume: checkpoint {out}.ckpt was made for another model (the model file's "
        "SHA-256 differs); resume with the interrupted run's model, or start again without "
        "--resume")
