"""Bad input never costs a traceback: each case runs the real CLI and checks its exit code and
its one-line message.

Every case builds its bad file in ``tmp_path`` and pairs it with the bundled digits example
(1x8x8 inputs, 10 classes) for everything else, with small flags so that the cases which get as
far as running the model stay fast.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import DIGITS
from onnx import TensorProto, helper
from torch import nn

from robaudit.cli import main
from robaudit.errors import ExitCode

MODEL = DIGITS / "model.pt2"
ONNX_MODEL = DIGITS / "model.onnx"
DATA = DIGITS / "test.npz"
FAST = ("--per-class", "4", "--steps", "2", "--device", "cpu")
USAGE, NO_DATA = ExitCode.USAGE_ERROR, ExitCode.NO_DATA

Builder = Callable[[Path], list[str]]


def scan(model: str | Path = MODEL, data: str | Path = DATA, *extra: str) -> list[str]:
    return ["scan", str(model), "--data", str(data), *FAST, *extra]


def with_model(make: Callable[[Path], Path], *extra: str) -> Builder:
    """A case whose model file is made by ``make(tmp_path)``; the data is the example's."""
    return lambda tmp: scan(make(tmp), DATA, *extra)


def with_data(make: Callable[[Path], Path], *extra: str) -> Builder:
    """A case whose data file is made by ``make(tmp_path)``; the model is the example's."""
    return lambda tmp: scan(MODEL, make(tmp), *extra)


def with_options(*extra: str) -> Builder:
    return lambda tmp: scan(MODEL, DATA, *extra)


# ---------------------------------------------------------------------------------------------
# Bad model files


def write(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(content)
        return path

    return make


def truncated(source: Path, name: str) -> Callable[[Path], Path]:
    return write(name, source.read_bytes()[: source.stat().st_size // 2])


def random_bytes(name: str) -> Callable[[Path], Path]:
    return write(name, np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())


def onnx_file(*, inputs: int = 1, elem: int = TensorProto.FLOAT, op: str | None = None,
              external: bool = False) -> Callable[[Path], Path]:
    """A tiny ONNX classifier x(N,1,8,8) -> Flatten -> MatMul -> logits(N,10), made bad at will."""

    def make(tmp: Path) -> Path:
        weight = helper.make_tensor("W", TensorProto.FLOAT, [64, 10],
                                    np.full(640, 0.01, np.float32).tobytes(), raw=True)
        graph_inputs = [helper.make_tensor_value_info("x", elem, ["N", 1, 8, 8])]
        nodes, first = [], "x"
        if elem != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT))
            first = "xc"
        if inputs == 2:
            graph_inputs.append(
                helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 1, 8, 8]))
            nodes.append(helper.make_node("Add", [first, "x2"], ["xs"]))
            first = "xs"
        nodes += [helper.make_node("Flatten", [first], ["flat"], axis=1),
                  helper.make_node("MatMul", ["flat", "W"], ["z"])]
        last = "z"
        if op is not None:
            nodes.append(helper.make_node(op, ["z"], ["logits"]))
            last = "logits"
        graph = helper.make_graph(
            nodes, "tiny", graph_inputs,
            [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["N", 10])], [weight],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 8
        path = tmp / "tiny.onnx"
        if external:
            onnx.external_data_helper.convert_model_to_external_data(
                model, all_tensors_to_one_file=True, location="tiny.onnx.data",
                size_threshold=0)
        onnx.save_model(model, str(path))
        (tmp / "tiny.onnx.data").unlink(missing_ok=True)  # the weights file that got lost
        return path

    return make


def onnx_external_outside(tmp: Path) -> Path:
    """An ONNX file whose external data points outside its folder (path traversal)."""
    path = onnx_file()(tmp)
    model = onnx.load(str(path))
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../../../etc/hostname"), ("offset", "0"),
                       ("length", "2560")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    return path


class Tiny(nn.Module):
    """A linear digits classifier whose output is made wrong on purpose by ``kind``."""

    def __init__(self, kind: str = "ok", classes: int = 10) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x.flatten(1))
        if self.kind == "rank3":
            return z.unsqueeze(-1)
        if self.kind == "nan":
            return z * float("nan")
        if self.kind == "inf":
            return z + float("inf")
        if self.kind == "det":  # linalg.det has no bf16 kernel on the CPU: --amp cannot run it
            return z + 0 * torch.linalg.det(z[:, :4].reshape(-1, 2, 2))[:, None]
        return z


def torchscript(kind: str = "ok", classes: int = 10, name: str = "model.ts") -> Callable[
        [Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        with warnings.catch_warnings():  # TorchScript is deprecated, but users still have it
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.script(Tiny(kind, classes).eval()), str(path))
        return path

    return make


def exported(kind: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "model.pt2"
        program = torch.export.export(Tiny(kind).eval(), (torch.rand(2, 1, 8, 8),))
        torch.export.save(program, str(path))
        return path

    return make


def state_dict(name: str = "weights.pt") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        torch.save(Tiny().state_dict(), path)
        return path

    return make


def pickled_module(tmp: Path) -> Path:
    path = tmp / "module.pt"
    torch.save(Tiny(), path)
    return path


class RunsCode:
    """Unpickling this creates ``marker``: a stand-in for a pickle that runs any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def code_running_pickle(name: str, wrap: Callable[[Path], object],
                        how: str = "torch") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        payload = wrap(tmp / "PWNED")
        if how == "torch":
            torch.save(payload, path)
        else:
            with path.open("wb") as f:
                pickle.dump(payload, f)
        return path

    return make


# ---------------------------------------------------------------------------------------------
# Bad data files


def example_arrays(per_class: int = 5) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA) as d:
        x, y = d["x"], d["y"]
    keep = np.concatenate([np.flatnonzero(y == k)[:per_class] for k in range(10)])
    return x[keep], y[keep]


def npz(change: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]],
        name: str = "data.npz") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        np.savez(path, **change(*example_arrays()))
        return path

    return make


def labels_plus(offset: int) -> Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    def change(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        y = y.copy()
        y[0] = offset
        return {"x": x, "y": y}

    return change


def names_file(count: int, *, extra: str = "") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "names.txt"
        path.write_text("\n".join(f"c{i}" for i in range(count)) + extra)
        return path

    return make


def with_names(make: Callable[[Path], Path], *extra: str) -> Builder:
    return lambda tmp: scan(MODEL, DATA, "--class-names", str(make(tmp)), *extra)


def without_class_9(tmp: Path) -> list[str]:
    x, y = example_arrays()
    np.savez(tmp / "no9.npz", x=x[y != 9], y=y[y != 9])
    return scan(MODEL, tmp / "no9.npz", "--class-names", str(names_file(10)(tmp)),
                "--classes", "c9")


# ---------------------------------------------------------------------------------------------
# Bad config files, report paths and saved reports


def config_file(text: str, name: str = "robaudit.toml") -> Builder:
    def build(tmp: Path) -> list[str]:
        path = tmp / name
        path.write_text(text)
        return scan(MODEL, DATA, "--config", str(path))

    return build


def report_file(content: str | None) -> Builder:
    def build(tmp: Path) -> list[str]:
        path = tmp / "report.json"
        if content is not None:
            path.write_text(content)
        return ["report", str(path)]

    return build


def a_report_missing(key: str) -> Builder:
    """A saved report with one section removed, as a hand edit or a bad merge leaves it."""

    def build(tmp: Path) -> list[str]:
        doc = json.loads(SAVED_REPORT.read_text())
        del doc[key]
        path = tmp / "report.json"
        path.write_text(json.dumps(doc))
        return ["report", str(path)]

    return build


def compare(baseline: str | None, *extra: str, edit: Callable[[dict[str, Any]], None] | None = None,
            ) -> Builder:
    """``robaudit compare BASELINE SAVED_REPORT``: BASELINE is text, a missing file (None), or the
    saved report changed by ``edit``."""

    def build(tmp: Path) -> list[str]:
        path = tmp / "baseline.json"
        if edit is not None:
            doc = json.loads(SAVED_REPORT.read_text())
            edit(doc)
            path.write_text(json.dumps(doc))
        elif baseline is not None:
            path.write_text(baseline)
        return ["compare", str(path), str(SAVED_REPORT), *extra]

    return build


def other_eps(doc: dict[str, Any]) -> None:
    doc["config"]["eps"], doc["config"]["eps_text"] = 0.1, "0.1"
    for attack in doc["attacks"]:
        attack["eps"] = 0.1


def harden(*extra: str, out: str = "hardened.pt2", data: Path = DATA) -> Builder:
    """``robaudit harden`` of the example with one short epoch, made bad by ``extra``."""

    def build(tmp: Path) -> list[str]:
        return ["harden", str(MODEL), "--data", str(data), "--val-data", str(DATA),
                "--out", str(tmp / out), "--epochs", "1", "--per-class", "2", "--steps", "2",
                "--train-steps", "1", "--device", "cpu", *extra]

    return build


def harden_onto_itself(tmp: Path) -> list[str]:
    # A copy: should the check ever fail, the example model must not be overwritten.
    shutil.copy(MODEL, tmp / "hardened.pt2")
    args = harden()(tmp)
    args[1] = str(tmp / "hardened.pt2")
    return args


def report_in_a_directory(tmp: Path) -> list[str]:
    (tmp / "out.json").mkdir()
    return scan(MODEL, DATA, "--json", str(tmp / "out.json"))


def report_under_a_file(option: str) -> Builder:
    def build(tmp: Path) -> list[str]:
        (tmp / "blocker").write_text("")
        return scan(MODEL, DATA, option, str(tmp / "blocker" / "report"))

    return build


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Case:
    build: Builder
    code: int
    #: Words the one-line message must contain, in any order.
    words: tuple[str, ...]


CASES: dict[str, Case] = {
    # Model files
    "model-missing": Case(lambda tmp: scan(tmp / "nope.pt2"), USAGE,
                          ("nope.pt2", "does not exist")),
    "model-is-a-directory": Case(lambda tmp: scan(tmp), USAGE, ("is a directory",)),
    "model-empty": Case(with_model(write("empty.onnx", b"")), USAGE, ("is empty", "0 bytes")),
    "model-truncated-onnx": Case(with_model(truncated(ONNX_MODEL, "cut.onnx")), USAGE,
                                 ("cut.onnx", "truncated")),
    "model-truncated-pt2": Case(with_model(truncated(MODEL, "cut.pt2")), USAGE,
                                ("cut.pt2", "not a model file")),
    "model-random-bytes": Case(with_model(random_bytes("noise.bin")), USAGE,
                               ("noise.bin", "not a model file robaudit can read")),
    "model-random-bytes-onnx": Case(with_model(random_bytes("noise.onnx")), USAGE,
                                    ("noise.onnx", "not a readable ONNX model")),
    "model-text-file": Case(with_model(write("model.pt", b"hello\n")), USAGE,
                            ("not a model file",)),
    "onnx-missing-external-data": Case(with_model(onnx_file(external=True)), USAGE,
                                       ("external data file tiny.onnx.data", "missing")),
    "onnx-external-data-outside-its-folder": Case(with_model(onnx_external_outside), USAGE,
                                                  ("tiny.onnx", "outside")),
    "onnx-unsupported-op": Case(with_model(onnx_file(op="Hardmax")), USAGE,
                                ("cannot convert ONNX op Hardmax", "no converter")),
    "onnx-two-inputs": Case(with_model(onnx_file(inputs=2)), USAGE,
                            ("2 graph inputs", "exactly one image input")),
    "onnx-int-input": Case(with_model(onnx_file(elem=TensorProto.INT64)), USAGE,
                           ("element type int64", "float32")),
    "torchscript-given-as-state-dict": Case(
        with_model(torchscript(), "--arch", "torchvision:resnet18"), USAGE,
        ("TorchScript archive", "drop --arch")),
    "state-dict-given-as-torchscript": Case(with_model(state_dict("model.ts")), USAGE,
                                            ("is a state dict", "pass --arch")),
    "state-dict-does-not-fit-arch": Case(
        with_model(state_dict(), "--arch", "torchvision:resnet18", "--num-classes", "10"), USAGE,
        ("does not fit arch torchvision:resnet18", "missing")),
    "arch-unknown-torchvision-model": Case(
        with_model(state_dict(), "--arch", "torchvision:resnet19"), USAGE,
        ("no model named 'resnet19'", "did you mean")),
    "pickled-nn-module": Case(with_model(pickled_module), USAGE,
                              ("pickled torch.nn.Module", "torch.export")),
    "pickle-that-runs-code": Case(
        with_model(code_running_pickle("evil.pt", lambda m: {"w": RunsCode(m)})), USAGE,
        ("will not unpickle", "io.open")),
    "plain-pickle-that-runs-code": Case(
        with_model(code_running_pickle("evil.pkl", RunsCode, how="pickle")), USAGE,
        ("will not unpickle",)),
    # Model outputs
    "output-wrong-rank": Case(with_model(exported("rank3")), USAGE,
                              ("output has shape (40, 10, 1)", "(batch, classes)")),
    "output-wrong-class-count": Case(with_model(torchscript(classes=5)), USAGE,
                                     ("outputs 5 classes", "has 10")),
    "output-nan": Case(with_model(torchscript("nan")), USAGE, ("NaN or inf",)),
    "output-inf": Case(with_model(exported("inf")), USAGE, ("NaN or inf",)),
    "amp-without-bf16-kernel": Case(with_model(exported("det"), "--amp"), USAGE,
                                    ("does not run under --amp", "BFloat16",
                                     "run without --amp")),
    # Data
    "data-missing": Case(lambda tmp: scan(MODEL, tmp / "nope.npz"), USAGE,
                         ("no such data set", "nope.npz")),
    "data-random-bytes": Case(with_data(random_bytes("noise.npz")), USAGE,
                              ("not an .npz", "np.savez")),
    "data-pickle-that-runs-code": Case(
        with_data(code_running_pickle("evil.pt", lambda m: {"x": RunsCode(m)})), USAGE,
        ("cannot read", "weights_only=True")),
    "data-object-arrays": Case(
        with_data(npz(lambda x, y: {"x": x, "y": y.astype(object)})), USAGE,
        ("holds Python objects",)),
    "labels-out-of-range": Case(with_data(npz(labels_plus(10))), USAGE,
                                ("outputs 10 classes", "has 11")),
    "labels-out-of-range-of-names": Case(
        lambda tmp: scan(MODEL, npz(labels_plus(10))(tmp), "--class-names",
                         str(names_file(10)(tmp))), USAGE,
        ("go up to 10", "only 10 class names")),
    "labels-huge": Case(with_data(npz(labels_plus(2**40))), USAGE,
                        ("go up to 1099511627776", "100,000 classes")),
    "labels-negative": Case(with_data(npz(labels_plus(-1))), USAGE, ("labels must be >= 0",)),
    "labels-float": Case(with_data(npz(lambda x, y: {"x": x, "y": y.astype(np.float32)})), USAGE,
                         ("labels must be integers", "float32")),
    "labels-mismatched-length": Case(with_data(npz(lambda x, y: {"x": x, "y": y[:-3]})), USAGE,
                                     ("x has 50 examples but y has 47 labels",)),
    "data-no-y": Case(with_data(npz(lambda x, y: {"x": x, "labels": y})), USAGE,
                      ("needs 'x'", "'y'")),
    # Three channels go to a one-channel model as grey (data/channels.py); two cannot.
    "data-two-channels": Case(
        with_data(npz(lambda x, y: {"x": np.repeat(x, 2, axis=1), "y": y})), USAGE,
        ("x has shape (50, 2, 8, 8)", "no channel axis of size 1 or 3")),
    "data-wrong-size": Case(
        with_data(npz(lambda x, y: {"x": np.zeros((len(y), 1, 16, 16), np.uint8), "y": y})),
        USAGE, ("takes inputs shaped (N, 1, 8, 8)", "16, 16")),
    "data-wrong-size-torchscript": Case(
        lambda tmp: scan(torchscript()(tmp), npz(
            lambda x, y: {"x": np.zeros((len(y), 1, 16, 16), np.uint8), "y": y})(tmp)), USAGE,
        ("cannot run on the data's inputs of shape (1, 16, 16)", "mat1 and mat2 shapes")),
    "data-float-above-1": Case(
        with_data(npz(lambda x, y: {"x": x.astype(np.float32), "y": y})), USAGE,
        ("must lie in [0, 1]", "[0, 255]")),
    "data-nan-pixels": Case(
        with_data(npz(lambda x, y: {"x": np.full(x.shape, np.nan, np.float32), "y": y})), USAGE,
        ("NaN or infinite",)),
    "data-no-channel-axis": Case(
        with_data(npz(lambda x, y: {"x": np.zeros((len(y), 5, 8, 8), np.uint8), "y": y})), USAGE,
        ("no channel axis",)),
    "nothing-left-after-classes": Case(without_class_9, NO_DATA, ("nothing to audit", "c9")),
    "classes-unknown-name": Case(with_options("--classes", "0,eleven"), USAGE,
                                 ("eleven", "does not have")),
    # Class names
    "class-names-too-few": Case(with_names(names_file(9)), USAGE,
                                ("go up to 9", "only 9 class names")),
    "class-names-too-many": Case(with_names(names_file(11)), USAGE,
                                 ("outputs 10 classes", "has 11")),
    "class-names-duplicate": Case(with_names(names_file(10, extra="\nc3")), USAGE,
                                  ("names 'c3' twice",)),
    "class-names-missing-file": Case(lambda tmp: scan(MODEL, DATA, "--class-names",
                                                      str(tmp / "nope.txt")), USAGE,
                                     ("cannot read class names file", "nope.txt")),
    # Options
    "eps-negative": Case(with_options("--eps", "-0.1"), USAGE, ("eps must be in (0, 1]",)),
    "eps-zero": Case(with_options("--eps", "0"), USAGE, ("eps must be in (0, 1]", "got 0")),
    "eps-above-1": Case(with_options("--eps", "8"), USAGE, ("eps must be in (0, 1]", "8/255")),
    "eps-unparsable": Case(with_options("--eps", "8/2x5"), USAGE,
                           ("eps must be a number like 0.03 or 8/255", "8/2x5")),
    "eps-divide-by-zero": Case(with_options("--eps", "8/0"), USAGE, ("eps must be a number",)),
    "steps-zero": Case(with_options("--steps", "0"), USAGE, ("steps must be at least 1",)),
    "steps-negative": Case(with_options("--steps", "-3"), USAGE, ("steps must be at least 1",)),
    "steps-not-a-number": Case(with_options("--steps", "many"), USAGE,
                               ("'many' is not a valid integer",)),
    "attack-unknown-with-suggestion": Case(with_options("--attacks", "pgd,tpdg"), USAGE,
                                           ("unknown attack 'tpdg'", "Did you mean 'tpgd'?")),
    "attack-unknown": Case(with_options("--attacks", "autoattack"), USAGE,
                           ("unknown attack 'autoattack'", "Choose from")),
    "seed-negative": Case(with_options("--seed", "-1"), USAGE, ("seed must be between 0",)),
    "batch-size-absurd": Case(with_options("--batch-size", "10000000000"), USAGE,
                              ("batch_size must be between 1 and",)),
    "device-unknown": Case(with_options("--device", "tpu"), USAGE, ("device must be",)),
    "mean-without-std": Case(with_options("--mean", "0.5"), USAGE, ("mean and std go together",)),
    # Report paths
    "json-report-under-a-file": Case(report_under_a_file("--json"), USAGE,
                                     ("cannot write report", "not a writable directory")),
    "junit-report-under-a-file": Case(report_under_a_file("--junit"), USAGE,
                                      ("cannot write report", "not a writable directory")),
    "json-report-is-a-directory": Case(report_in_a_directory, USAGE,
                                       ("cannot write report", "is a directory")),
    # Config files
    "config-unknown-key": Case(config_file('epsilon = "8/255"\n'), USAGE,
                               ("unknown key 'epsilon'", "robaudit.toml", "Did you mean 'eps'")),
    "config-wrong-type": Case(config_file('steps = "twenty"\n'), USAGE,
                              ("steps", "invalid value", "robaudit.toml")),
    "config-wrong-type-list": Case(config_file("per_class = [4]\n"), USAGE,
                                   ("per_class", "robaudit.toml")),
    "config-eps-wrong-type": Case(config_file('eps = "eight"\n'), USAGE,
                                  ("eps must be a number", "'eight'", "robaudit.toml")),
    "config-eps-a-table": Case(config_file("eps = { value = 0.1 }\n"), USAGE,
                               ("eps must be a number", "robaudit.toml")),
    "config-not-toml": Case(config_file("eps = \n"), USAGE, ("not valid TOML", "robaudit.toml")),
    "config-pyproject-unknown-key": Case(
        config_file("[tool.robaudit]\nstep = 3\n", name="pyproject.toml"), USAGE,
        ("unknown key 'step'", "pyproject.toml")),
    "config-missing": Case(lambda tmp: scan(MODEL, DATA, "--config", str(tmp / "nope.toml")),
                           USAGE, ("config file", "nope.toml", "does not exist")),
    "html-report-under-a-file": Case(report_under_a_file("--html"), USAGE,
                                     ("cannot write report", "not a writable directory")),
    # Baselines and robaudit compare
    "baseline-without-max-drop": Case(
        lambda tmp: scan(MODEL, DATA, "--baseline", str(SAVED_REPORT)), USAGE,
        ("baseline report needs max_drop",)),
    "baseline-missing": Case(
        lambda tmp: scan(MODEL, DATA, "--baseline", str(tmp / "nope.json"), "--max-drop", "0.1"),
        USAGE, ("nope.json",)),
    "compare-baseline-missing": Case(compare(None, "--max-drop", "0.03"), USAGE,
                                     ("cannot read report", "baseline.json")),
    "compare-baseline-not-a-report": Case(compare("[1, 2]", "--max-drop", "0.03"), USAGE,
                                          ("not a robaudit scan report",)),
    "compare-max-drop-unparsable": Case(compare(None, "--max-drop", "lots", edit=lambda d: None),
                                        USAGE, ("max_drop must be a number", "'lots'")),
    "compare-max-drop-negative": Case(compare(None, "--max-drop", "-0.5", edit=lambda d: None),
                                      USAGE, ("max_drop", "-0.5")),
    "compare-other-eps": Case(compare(None, "--max-drop", "0.03", edit=other_eps), USAGE,
                              ("eps", "0.1")),
    "compare-unknown-figure": Case(
        compare(None, "--max-drop", "0.03", "--gate-on", "fgsm", edit=lambda d: None), USAGE,
        ("fgsm",)),
    # robaudit harden
    "harden-out-changes-format": Case(harden(out="hardened.onnx"), USAGE,
                                      ("must keep the input's format and suffix (.pt2)",)),
    "harden-out-is-the-input": Case(harden_onto_itself, USAGE, ("--out names the input model",)),
    "harden-out-under-a-file": Case(
        lambda tmp: (tmp / "blocker").write_text("") or harden(out="blocker/h.pt2")(tmp), USAGE,
        ("blocker is not a writable directory",)),
    "harden-epochs-negative": Case(harden("--epochs", "-1"), USAGE, ("epochs must be 0 or more",)),
    "harden-train-data-missing": Case(
        lambda tmp: harden(data=tmp / "nope.npz")(tmp), USAGE, ("no such data set", "nope.npz")),
    "harden-resume-from-a-non-checkpoint": Case(
        lambda tmp: harden("--resume", "--checkpoint", str(SAVED_REPORT))(tmp), USAGE,
        ("--resume: cannot read checkpoint",)),
    # Saved reports (robaudit report)
    "report-missing": Case(report_file(None), USAGE, ("cannot read report", "report.json")),
    "report-not-json": Case(report_file("{not json"), USAGE, ("is not a JSON file",)),
    "report-truncated": Case(lambda tmp: report_file(SAVED_REPORT.read_text()[:500])(tmp), USAGE,
                             ("is not a JSON file",)),
    "report-not-a-report": Case(report_file('{"a": 1}'), USAGE, ("not a robaudit scan report",)),
    "report-missing-a-section": Case(a_report_missing("classes"), USAGE,
                                     ("report.json", "classes")),
}

#: A real report, written once by a module-scoped fixture, for the saved-report cases.
SAVED_REPORT = Path()


@pytest.fixture(scope="module", autouse=True)
def _saved_report(tmp_path_factory: pytest.TempPathFactory) -> None:
    global SAVED_REPORT
    SAVED_REPORT = tmp_path_factory.mktemp("saved") / "report.json"
    assert main(scan(MODEL, DATA, "--json", str(SAVED_REPORT), "-q")) in (0, 1)


@pytest.fixture(autouse=True)
def _no_config_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A robaudit.toml or pyproject.toml where the tests run must not change what a case means.
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)


def error_line(err: str, words: tuple[str, ...]) -> str:
    """The one stderr line holding every word: robaudit's 'error: ...' or click's 'Error: ...'."""
    lines = [line for line in err.splitlines() if line.lower().startswith("error: ")]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    args = case.build(tmp_path)
    code = main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert code == case.code, captured.err
    error_line(captured.err, case.words)
    assert not (tmp_path / "PWNED").exists(), "unpickling ran code"


def test_an_unreadable_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "locked.pt2"
    shutil.copy(MODEL, path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reads (a directory case covers"
                        " unreadable paths)")
        assert main(scan(path)) == USAGE
        error_line(capsys.readouterr().err, ("cannot read model file", "permissions"))
    finally:
        path.chmod(0o600)


def test_an_unwritable_report_directory(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only directory is still writable")
        assert main(scan(MODEL, DATA, "--junit", str(locked / "j.xml"))) == USAGE
        error_line(capsys.readouterr().err, ("cannot write report", "not a writable directory"))
    finally:
        locked.chmod(0o700)


def test_a_code_running_pickle_does_not_run_when_loaded_directly(tmp_path: Path) -> None:
    # The table checks the marker after the CLI; this proves the marker would appear if the
    # pickle were ever loaded unsafely, so its absence there means something.
    path = code_running_pickle("evil.pkl", RunsCode, how="pickle")(tmp_path)
    with path.open("rb") as f:
        pickle.load(f)  # on purpose: the control case
    assert (tmp_path / "PWNED").exists()


def test_a_corrupted_zip_archive_is_a_usage_error(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.pt2"
    with zipfile.ZipFile(MODEL) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".json"):
                data = b"{" + data[: len(data) // 3]
            dst.writestr(item, data)
    assert main(scan(path)) == USAGE
    assert "Traceback" not in capsys.readouterr().err
