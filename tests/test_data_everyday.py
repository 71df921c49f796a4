"""Everyday data sets through the real CLI: CIFAR batch files read without unpickling code,
greyscale image folders, data sets with fewer classes than the model, and state dicts whose
class count comes from their own last layer.

Every case builds its files in ``tmp_path`` from the bundled digits (1x8x8, 10 classes) or from
small models made here, and runs ``robaudit scan`` with small flags.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DIGITS
from PIL import Image

from robaudit.cli import main
from robaudit.errors import ExitCode

FAST = ("--per-class", "4", "--steps", "2", "--device", "cpu")
DIGITS_X, DIGITS_Y = (np.load(DIGITS / "test.npz")[k] for k in ("x", "y"))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["scan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def assert_one_error_line(code: int, err: str) -> str:
    assert code == ExitCode.USAGE_ERROR
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def first_of_each_class(per_class: int) -> np.ndarray:
    return np.concatenate([np.flatnonzero(np.equal(DIGITS_Y, k))[:per_class] for k in range(10)])


# --- CIFAR batch files ----------------------------------------------------------------------


class Payload:
    """What a hostile batch file holds: unpickling it would create the file ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.target}",))


def write_cifar10(root: Path, per_class: int = 3) -> Path:
    """A CIFAR-10 folder in the genuine format: pickled dicts of uint8 arrays and int lists."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = [k for k in range(10) for _ in range(per_class)]
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            "batch_label": name,
            "labels": labels,
            "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(len(labels))],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    meta = {"num_cases_per_batch": len(labels), "label_names": names, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


TINY_NETS = '''
from torch import nn


def conv(num_classes=1000, channels=3):
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, num_classes),
    )


def grey(num_classes=1000):
    return conv(num_classes, channels=1)
'''


@pytest.fixture
def tiny_nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module ``tiny_nets_h22`` with the factory ``conv``, importable for --arch."""
    (tmp_path / "tiny_nets_h22.py").write_text(TINY_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("tiny_nets_h22", None)


def conv_state_dict(path: Path, num_classes: int, channels: int) -> Path:
    import tiny_nets_h22

    torch.manual_seed(0)
    torch.save(tiny_nets_h22.conv(num_classes, channels).state_dict(), path)
    return path


def test_cifar10_batch_files_are_read_and_audited(
    tmp_path: Path, tiny_nets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_cifar10(tmp_path / "data")
    model = conv_state_dict(tmp_path / "model.pt", 10, 3)
    code, _, err = run(capsys, str(model), "--arch", "tiny_nets_h22:conv", "--data", "cifar10",
                       "--data-root", str(tmp_path / "data"), *FAST, "--json",
                       str(tmp_path / "r.json"))
    assert code in (ExitCode.OK, ExitCode.FLAGGED), err
    doc = report(tmp_path / "r.json")
    assert doc["class_names"][:3] == ["airplane", "automobile", "bird"]
    assert [c["n"] for c in doc["classes"]] == [3] * 10  # the test batch's 3 images per class
    assert doc["data"]["size"] == 30


@pytest.mark.parametrize("hostile", ["test_batch", "batches.meta"])
def test_cifar10_batch_file_with_code_is_refused_unrun(
    tmp_path: Path, tiny_nets: Path, capsys: pytest.CaptureFixture[str], hostile: str
) -> None:
    folder = write_cifar10(tmp_path / "data")
    pwned = tmp_path / "PWNED"
    content = {"data": Payload(pwned), "labels": [0]} if hostile == "test_batch" else {
        "label_names": [Payload(pwned)]}
    (folder / hostile).write_bytes(pickle.dumps(content, protocol=2))
    model = conv_state_dict(tmp_path / "model.pt", 10, 3)
    code, _, err = run(capsys, str(model), "--arch", "tiny_nets_h22:conv", "--data", "cifar10",
                       "--data-root", str(tmp_path / "data"), *FAST)
    line = assert_one_error_line(code, err)
    assert f"{folder / hostile} holds pickled Python objects (global 'posix.system')" in line
    assert "will not unpickle because that can run code" in line
    assert not pwned.exists()


def test_cifar10_missing_batch_file_says_which(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_cifar10(tmp_path / "data")
    (folder / "test_batch").unlink()
    code, _, err = run(capsys, str(DIGITS / "model.onnx"), "--data", "cifar10", "--data-root",
                       str(tmp_path / "data"), *FAST)
    line = assert_one_error_line(code, err)
    assert f"not found (no {folder / 'test_batch'}); pass --download" in line


# --- greyscale image folders ----------------------------------------------------------------


def write_png_folder(root: Path, indices: np.ndarray, odd_size: int | None = None) -> Path:
    """The digits at ``indices`` as mode-L PNGs under class folders 0..9."""
    for number, i in enumerate(indices):
        image = Image.fromarray(DIGITS_X[i, 0], mode="L")
        if odd_size is not None and number == len(indices) - 1:
            image = image.resize((odd_size, odd_size))
        folder = root / str(int(DIGITS_Y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("model", ["model.onnx", "model.pt2"])
def test_greyscale_png_folder_is_audited_like_the_arrays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    chosen = first_of_each_class(2)
    folder = write_png_folder(tmp_path / "pngs", chosen)
    np.savez(tmp_path / "same.npz", x=DIGITS_X[chosen], y=DIGITS_Y[chosen])
    figures = []
    for data in (folder, tmp_path / "same.npz"):
        out = tmp_path / f"{data.name}.json"
        code, _, err = run(capsys, str(DIGITS / model), "--data", str(data), "--steps", "2",
                           "--device", "cpu", "--json", str(out))
        assert code in (ExitCode.OK, ExitCode.FLAGGED), err
        doc = report(out)
        figures.append([(c["n"], c["clean"]["correct"], c["robust"]["worst"]["correct"])
                        for c in doc["classes"]])
        assert doc["warnings"] == []
    assert figures[0] == figures[1]
    assert [n for n, _, _ in figures[0]] == [2] * 10


def test_channels_option_overrides_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_png_folder(tmp_path / "pngs", first_of_each_class(1))
    code, _, err = run(capsys, str(DIGITS / "model.onnx"), "--data", str(folder), "--channels",
                       "3", *FAST)
    line = assert_one_error_line(code, err)
    assert "inputs of shape (3, 8, 8)" in line
    code, _, err = run(capsys, str(DIGITS / "model.onnx"), "--data", str(folder), "--channels",
                       "2", *FAST)
    assert assert_one_error_line(code, err) == "error: channels is 1 or 3, not 2"


def test_mixed_image_sizes_are_resized_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_png_folder(tmp_path / "pngs", first_of_each_class(2), odd_size=12)
    code, out, err = run(capsys, str(DIGITS / "model.onnx"), "--data", str(folder), *FAST,
                         "--json", str(tmp_path / "r.json"))
    assert code in (ExitCode.OK, ExitCode.FLAGGED), err
    first = folder / "0" / f"{first_of_each_class(2)[0]:04d}.png"
    expected = (
        f"1 of 20 audited images are not 8x8 like the first image ({first}); they were resized "
        "and centre-cropped to 8x8: pass --image-size N to choose the size (N x N) for every "
        "image"
    )
    assert report(tmp_path / "r.json")["warnings"] == [expected]
    assert "audited images are not 8x8" in out + err


# --- fewer classes in the data than the model has ---------------------------------------------


def test_data_with_four_of_ten_classes_audits_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = DIGITS_Y < 4
    np.savez(tmp_path / "four.npz", x=DIGITS_X[keep], y=DIGITS_Y[keep])
    code, _, err = run(capsys, str(DIGITS / "model.onnx"), "--data", str(tmp_path / "four.npz"),
                       *FAST, "--json", str(tmp_path / "r.json"))
    assert code in (ExitCode.OK, ExitCode.FLAGGED), err
    doc = report(tmp_path / "r.json")
    assert doc["class_names"] == [str(k) for k in range(10)]
    assert [c["n"] for c in doc["classes"]] == [4] * 4 + [0] * 6


def test_named_folder_with_fewer_classes_is_still_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Folder names are not the model's indices: sorted folder positions would be a guess.
    for i, name in zip(first_of_each_class(1)[:4], ["ant", "bee", "cat", "dog"], strict=True):
        (tmp_path / "pngs" / name).mkdir(parents=True)
        Image.fromarray(DIGITS_X[i, 0], mode="L").save(tmp_path / "pngs" / name / "a.png")
    code, _, err = run(capsys, str(DIGITS / "model.onnx"), "--data", str(tmp_path / "pngs"),
                       *FAST)
    line = assert_one_error_line(code, err)
    assert "the model outputs 10 classes but the data set has 4" in line


# --- state dicts: the class count from the checkpoint -------------------------------------------


def test_num_classes_comes_from_the_state_dict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torchvision

    torch.manual_seed(0)
    model = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), model)
    args = (str(model), "--arch", "torchvision:resnet18", "--data", str(DIGITS / "test.npz"),
            "--per-class", "1", "--steps", "1", "--device", "cpu")
    code, _, err = run(capsys, *args, "-v", "--json", str(tmp_path / "r.json"))
    assert code in (ExitCode.OK, ExitCode.FLAGGED), err
    assert ("--num-classes not given: building torchvision:resnet18 with 10 classes, the size "
            "of the state dict's fc.weight") in err
    # resnet18 takes RGB: the greyscale digits were given three channels.
    assert "images go to the model with 3 channel(s)" in err
    assert len(report(tmp_path / "r.json")["classes"]) == 10
    code, _, err = run(capsys, *args, "--num-classes", "7")
    line = assert_one_error_line(code, err)
    assert "shapes differ (file vs arch) for fc.weight (10, 512) vs (7, 512)" in line


def test_num_classes_from_a_factory_state_dict(
    tmp_path: Path, tiny_nets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = conv_state_dict(tmp_path / "model.pt", 10, 1)
    code, _, err = run(capsys, str(model), "--arch", "tiny_nets_h22:grey", "--data",
                       str(DIGITS / "test.npz"), *FAST, "-v")
    assert code in (ExitCode.OK, ExitCode.FLAGGED), err
    assert "with 10 classes, the size of the state dict's 4.weight" in err
