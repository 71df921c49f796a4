"""torchvision architectures through every export path: each one exported, loaded and scanned.

Random weights, 10 classes, 32x32 inputs, eval mode. Each case exports the model (the legacy
TorchScript-based ONNX exporter at opset 17, the dynamo ONNX exporter with a dynamic batch and
external data, or torch.export to .pt2), scans it with the command line on a handful of images
labelled with the model's own predictions (so every one is attacked), checks that onnxruntime
confirms every figure, class by class, and that the loaded module's input gradients are the
eager model's.

By default only the cases that needed robaudit's own converters run (about a minute on 2 cores):
shufflenet_v2_x0_5 from the dynamo exporter (Split-18) and swin_t from both exporters
(LayerNormalization of unknown recorded shape, ScatterND-18). ``ROBAUDIT_ZOO=1 pytest
tests/test_zoo.py`` runs all 39 cases (13 architectures x 3 formats; about 15 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import pathlib
import time
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from robaudit.cli import main
from robaudit.models import load_model

ARCHS = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "squeezenet1_1",
    "shufflenet_v2_x0_5",
    "regnet_y_400mf",
    "convnext_tiny",
    "vit_b_16",
    "googlenet",
    "mnasnet0_5",
    "wide_resnet50_2",
    "swin_t",
]
FORMATS = ["legacy", "dynamo", "pt2"]
#: The cases robaudit's own converters made loadable: they run in every test run.
DEFAULT = {("shufflenet_v2_x0_5", "dynamo"), ("swin_t", "legacy"), ("swin_t", "dynamo")}
FULL_ZOO = os.environ.get("ROBAUDIT_ZOO") == "1"
IMAGES = 4


def _case(arch: str, fmt: str) -> object:
    marks = [pytest.mark.slow]
    if (arch, fmt) not in DEFAULT and not FULL_ZOO:
        marks.append(pytest.mark.skip(reason="the full zoo runs with ROBAUDIT_ZOO=1"))
    return pytest.param(arch, fmt, marks=marks, id=f"{arch}-{fmt}")


def build(arch: str) -> nn.Module:
    """``arch`` with random weights (seed 0), 10 classes, for 32x32 inputs, in eval mode."""
    extra: dict[str, object] = {}
    if arch == "vit_b_16":
        extra = {"image_size": 32}
    elif arch == "googlenet":
        extra = {"aux_logits": False, "init_weights": True}
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10, **extra).eval()
    if arch == "vit_b_16":
        # torchvision zeroes ViT's head: all logits 0 would leave nothing to compare or attack.
        nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def export(model: nn.Module, fmt: str, folder: pathlib.Path) -> pathlib.Path:
    example = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    batch = torch.export.Dim("batch")
    if fmt == "pt2":
        path = folder / "model.pt2"
        program = torch.export.export(model, example, dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, str(path))
        return path
    path = folder / "model.onnx"
    if fmt == "legacy":
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated, still in use
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # swin_t's shape checks
            torch.onnx.export(
                model, example, str(path), dynamo=False, opset_version=17,
                input_names=["x"], output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
        return path
    program = torch.onnx.export(
        model, example, dynamo=True, dynamic_shapes={"x": {0: batch}}, verbose=False
    )
    program.save(str(path), external_data=True)
    return path


def own_predictions(model: nn.Module, folder: pathlib.Path) -> pathlib.Path:
    """A few random images labelled with the model's own predictions: all are clean-correct."""
    pixels = np.random.default_rng(0).integers(0, 256, (IMAGES, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        labels = model(torch.from_numpy(pixels).float() / 255).argmax(1).numpy()
    path = folder / "data.npz"
    names = np.array([f"c{k}" for k in range(10)], dtype=str)
    np.savez(path, x=pixels, y=labels.astype(np.int64), class_names=names)
    return path


@pytest.mark.parametrize(("arch", "fmt"), [_case(a, f) for a in ARCHS for f in FORMATS])
def test_architecture_scans_and_runtime_confirms(
    arch: str, fmt: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.perf_counter()
    model = build(arch)
    data = own_predictions(model, tmp_path)
    path = export(model, fmt, tmp_path)
    report = tmp_path / "report.json"
    code = main([
        "scan", str(path), "--data", str(data), "--eps", "0.5/255", "--attacks", "pgd",
        "--steps", "1", "--device", "cpu", "--json", str(report), "-q",
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # Third-party warnings (onnx2torch's, the exporters') stay out of the user's terminal.
    assert "Warning" not in captured.out + captured.err

    doc = json.loads(report.read_text())
    summary = doc["summary"]
    assert doc["data"]["audited"] == IMAGES
    assert summary["clean_acc"] == 1.0  # the labels are the eager model's own predictions
    classes = [c for c in doc["classes"] if c["n"]]
    if fmt == "pt2":
        assert doc["model"]["format"] == "torch.export"
        assert summary["runtime_robust_acc"] is None
    else:
        assert doc["model"]["format"] == "onnx"
        assert summary["runtime_clean_acc"] == 1.0
        assert summary["runtime_robust_acc"] == summary["robust_acc"]["worst"]
        for figures in classes:
            assert figures["runtime_robust"] == figures["robust"]["worst"], figures["name"]
    _assert_same_input_gradient(model, path, data)
    print(f"{arch} {fmt}: {time.perf_counter() - started:.1f} s")


def _assert_same_input_gradient(model: nn.Module, path: pathlib.Path, data: pathlib.Path) -> None:
    # The attacks differentiate the loaded module: its input gradient must be the model's own.
    with np.load(data) as arrays:
        x = torch.from_numpy(arrays["x"][:2]).float() / 255
        y = torch.from_numpy(arrays["y"][:2])
    gradients = []
    for module in (model, load_model(path).module):
        x_grad = x.clone().requires_grad_()
        nn.functional.cross_entropy(module(x_grad), y).backward()
        assert x_grad.grad is not None
        gradients.append(x_grad.grad)
    expected, loaded = gradients
    assert float((loaded - expected).abs().max()) <= 1e-3 * float(expected.abs().max())
