"""Tests for robaudit.models.onnx: exporter round trips, onnx2torch fixes, and load errors."""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from robaudit.cli import main
from robaudit.errors import DataError, ModelLoadError
from robaudit.models.onnx import FixedBatch, OrtRunner, check_against_runtime, load_onnx

# onnxruntime 1.2x reads IR versions up to 10; onnx.helper would stamp a newer one.
IR_VERSION = 10


class SmallCNN(nn.Module):
    """Conv, batch norm, ReLU, pooling, flatten and linear: what a small classifier is made of."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = (
        SmallCNN() if arch == "small" else torchvision.models.resnet18(weights=None, num_classes=10)
    )
    # Non-trivial batch-norm statistics, so that folding them into convolutions is really tested.
    # ResNet's layer4 keeps its fresh statistics: their folded biases are all equal (zero), which
    # makes the legacy exporter share them through Identity nodes, a case onnx2torch mishandles.
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and not name.startswith("layer4"):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


def _export(model: nn.Module, path: pathlib.Path, exporter: str) -> None:
    example = torch.rand(2, 3, 32, 32)
    if exporter == "legacy":
        # The TorchScript exporter is deprecated, but users still ship its files.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            )
        return
    dynamic_shapes = (
        None if exporter == "dynamo-fixed-batch" else {"x": {0: torch.export.Dim("batch")}}
    )
    program = torch.onnx.export(
        model, (example,), dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False
    )
    program.save(str(path), external_data=exporter == "dynamo-external")


EXPORTS = [
    ("small", "legacy"),
    ("small", "dynamo"),
    ("small", "dynamo-fixed-batch"),
    ("resnet18", "legacy"),
    ("resnet18", "dynamo"),
    ("resnet18", "dynamo-external"),
]


@pytest.fixture(scope="module", params=EXPORTS, ids=["-".join(case) for case in EXPORTS])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nn.Module, pathlib.Path, str]:
    arch, exporter = request.param
    model = _build(arch)
    path = tmp_path_factory.mktemp(f"{arch}-{exporter}") / "model.onnx"
    _export(model, path, exporter)
    return model, path, exporter


def test_export_round_trip_matches_torch_and_runtime(
    exported: tuple[nn.Module, pathlib.Path, str],
) -> None:
    original, path, exporter = exported
    arch = "resnet18" if isinstance(original, torchvision.models.ResNet) else "small"
    if exporter == "dynamo-external":
        # The weights really are outside the .onnx file.
        assert (path.parent / "model.onnx.data").stat().st_size > 40_000_000
        assert path.stat().st_size < 1_000_000
    if (arch, exporter) == ("resnet18", "legacy"):
        ops = [node.op_type for node in onnx.load(str(path)).graph.node]
        assert ops.count("Identity") >= 3
    module, runner = load_onnx(path)
    assert not module.training
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    assert check_against_runtime(module, runner, x) < 1e-4
    with torch.no_grad():
        logits = module(x)
        expected = original(x)
    assert logits.shape == (5, 10)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runner(x), expected, atol=1e-4, rtol=1e-4)


def test_export_round_trip_input_gradients_are_exact(
    exported: tuple[nn.Module, pathlib.Path, str],
) -> None:
    original, path, _ = exported
    module, _ = load_onnx(path)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 3, 7])

    x_converted = x.clone().requires_grad_()
    nn.functional.cross_entropy(module(x_converted), y).backward()
    x_original = x.clone().requires_grad_()
    nn.functional.cross_entropy(original(x_original), y).backward()

    grad = x_converted.grad
    assert grad is not None
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, x_original.grad, atol=1e-6, rtol=1e-3)


def test_fixed_batch_graph_runs_any_batch_size(tmp_path: pathlib.Path) -> None:
    model = _build("small")
    path = tmp_path / "fixed.onnx"
    _export(model, path, "dynamo-fixed-batch")
    module, runner = load_onnx(path)
    assert runner.batch_size == 2
    assert isinstance(module, FixedBatch)
    x = torch.rand(5, 3, 32, 32)  # two full chunks and a padded one
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(module(x), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runner(x), expected, atol=1e-4, rtol=1e-4)


def test_runner_uses_cpu_without_cuda(tmp_path: pathlib.Path) -> None:
    path = _save(_model([_node("Relu", ["x"], ["y"])], [1, 4], [1, 4], opset=17), tmp_path)
    runner = OrtRunner(path)
    assert runner.providers[-1] == "CPUExecutionProvider"
    if not torch.cuda.is_available():
        assert runner.providers == ["CPUExecutionProvider"]
    out = runner(torch.tensor([[-1.0, 0.0, 2.0, -3.0]]))
    assert out.dtype == torch.float32
    assert out.tolist() == [[0.0, 0.0, 2.0, 0.0]]


# ----------------------------------------------------------------------------------------------
# Hand-built graphs for each onnx2torch problem
# ----------------------------------------------------------------------------------------------


def _node(
    op_type: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: object
) -> onnx.NodeProto:
    domain = str(attrs.pop("domain", ""))
    return helper.make_node(op_type, list(inputs), list(outputs), domain=domain, **attrs)


def _model(
    nodes: Sequence[onnx.NodeProto],
    in_shape: Sequence[int | str],
    out_shape: Sequence[int | str] | None,
    *,
    opset: int,
    initializers: Sequence[onnx.TensorProto] = (),
    extra_opsets: Sequence[tuple[str, int]] = (),
    inputs: Sequence[onnx.ValueInfoProto] | None = None,
    outputs: Sequence[onnx.ValueInfoProto] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "g",
        list(inputs)
        if inputs is not None
        else [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        list(outputs)
        if outputs is not None
        else [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=list(initializers),
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def _save(model: onnx.ModelProto, tmp_path: pathlib.Path, name: str = "model.onnx") -> pathlib.Path:
    path = tmp_path / name
    onnx.save_model(model, str(path))
    return path


def _const(
    name: str, values: Sequence[float] | np.ndarray, dtype: type = np.int64
) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _assert_matches_runtime(path: pathlib.Path, x: torch.Tensor, expected: torch.Tensor) -> None:
    module, runner = load_onnx(path)
    assert check_against_runtime(module, runner, x) < 1e-5
    with torch.no_grad():
        out = module(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


X4D = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 50 - 0.9


@pytest.mark.parametrize("opset", [14, 19, 21])
def test_reshape_with_zero_copying_a_dim(opset: int, tmp_path: pathlib.Path) -> None:
    # shape [0, -1]: 0 copies the batch size (allowzero=0), so the batch stays free.
    model = _model(
        [_node("Reshape", ["x", "shape"], ["y"])],
        ["n", 3, 4, 4],
        ["n", 48],
        opset=opset,
        initializers=[_const("shape", [0, -1])],
    )
    _assert_matches_runtime(_save(model, tmp_path), X4D, X4D.reshape(2, 48))


@pytest.mark.parametrize("opset", [14, 19, 21])
def test_reshape_allowzero(opset: int, tmp_path: pathlib.Path) -> None:
    model = _model(
        [_node("Reshape", ["x", "shape"], ["y"], allowzero=1)],
        [2, 3, 4, 4],
        [6, 16],
        opset=opset,
        initializers=[_const("shape", [6, -1])],
    )
    _assert_matches_runtime(_save(model, tmp_path), X4D, X4D.reshape(6, 16))


@pytest.mark.parametrize("allowzero", [0, 1])
def test_reshape_with_shape_computed_in_graph(allowzero: int, tmp_path: pathlib.Path) -> None:
    # Shape(x)[0:1] ++ [-1], the pattern exporters emit for x.flatten(1) with a dynamic batch.
    nodes = [
        _node("Shape", ["x"], ["batch"], start=0, end=1),
        _node("Concat", ["batch", "minus_one"], ["shape"], axis=0),
        _node("Reshape", ["x", "shape"], ["y"], allowzero=allowzero),
    ]
    model = _model(
        nodes, ["n", 3, 4, 4], ["n", 48], opset=19, initializers=[_const("minus_one", [-1])]
    )
    _assert_matches_runtime(_save(model, tmp_path), X4D, X4D.reshape(2, 48))


@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_mean_18_with_axes_input(keepdims: int, tmp_path: pathlib.Path) -> None:
    out_shape = [2, 3, 1, 1] if keepdims else [2, 3]
    model = _model(
        [_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)],
        [2, 3, 4, 4],
        out_shape,
        opset=18,
        initializers=[_const("axes", [2, -1])],
    )
    expected = X4D.mean((2, 3), keepdim=bool(keepdims))
    _assert_matches_runtime(_save(model, tmp_path), X4D, expected)


REDUCE_EXPECTED = {
    "ReduceL1": lambda x: x.abs().sum(-1),
    "ReduceL2": lambda x: x.square().sum(-1).sqrt(),
    "ReduceLogSum": lambda x: x.sum(-1).log(),
    "ReduceLogSumExp": lambda x: x.exp().sum(-1).log(),
    "ReduceMax": lambda x: x.max(-1).values,
    "ReduceMean": lambda x: x.mean(-1),
    "ReduceMin": lambda x: x.min(-1).values,
    "ReduceProd": lambda x: x.prod(-1),
    "ReduceSumSquare": lambda x: x.square().sum(-1),
}


@pytest.mark.parametrize("opset", [18, 20])
@pytest.mark.parametrize("op_type", sorted(REDUCE_EXPECTED))
def test_reduce_ops_18_and_20(op_type: str, opset: int, tmp_path: pathlib.Path) -> None:
    model = _model(
        [_node(op_type, ["x", "axes"], ["y"], keepdims=0)],
        [2, 3, 4, 4],
        [2, 3, 4],
        opset=opset,
        initializers=[_const("axes", [3])],
    )
    x = X4D.abs() + 0.5  # positive, so that ReduceLogSum is defined
    _assert_matches_runtime(_save(model, tmp_path), x, REDUCE_EXPECTED[op_type](x))


@pytest.mark.parametrize(("noop", "expected"), [(0, X4D.mean()), (1, X4D)])
def test_reduce_mean_18_without_axes(
    noop: int, expected: torch.Tensor, tmp_path: pathlib.Path
) -> None:
    out_shape = list(expected.shape) if noop else []
    model = _model(
        [_node("ReduceMean", ["x"], ["y"], keepdims=0, noop_with_empty_axes=noop)],
        [2, 3, 4, 4],
        out_shape,
        opset=18,
    )
    _assert_matches_runtime(_save(model, tmp_path), X4D, expected)


def _conv_weight() -> np.ndarray:
    return np.linspace(-1, 1, 5 * 3 * 3 * 3, dtype=np.float32).reshape(5, 3, 3, 3)


def test_identity_fed_initializers_are_folded(tmp_path: pathlib.Path) -> None:
    # The legacy exporter shares equal weights through Identity nodes; onnx2torch reads Conv
    # weights from initializers only. Here one Identity feeds two convolutions.
    weight = _conv_weight()
    nodes = [
        _node("Identity", ["w"], ["w_copy"]),
        _node("Conv", ["x", "w_copy"], ["a"], pads=[1, 1, 1, 1]),
        _node("Conv", ["x", "w_copy"], ["b"], pads=[1, 1, 1, 1]),
        _node("Sub", ["a", "b"], ["d"]),
        _node("Add", ["a", "d"], ["y"]),
    ]
    model = _model(
        nodes, [2, 3, 4, 4], [2, 5, 4, 4], opset=17, initializers=[_const("w", weight, np.float32)]
    )
    expected = nn.functional.conv2d(X4D, torch.from_numpy(weight), padding=1)
    _assert_matches_runtime(_save(model, tmp_path), X4D, expected)


def test_constant_fed_weights_and_identity_chains_are_folded(tmp_path: pathlib.Path) -> None:
    weight = _conv_weight()
    nodes = [
        _node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
        _node("Identity", ["w"], ["w1"]),
        _node("Identity", ["w1"], ["w2"]),
        _node("Conv", ["x", "w2"], ["y"]),
    ]
    model = _model(nodes, [2, 3, 4, 4], [2, 5, 2, 2], opset=17)
    expected = nn.functional.conv2d(X4D, torch.from_numpy(weight))
    _assert_matches_runtime(_save(model, tmp_path), X4D, expected)


def test_identity_of_initializer_as_graph_output_is_kept(tmp_path: pathlib.Path) -> None:
    # Folding would leave the output without a producing node; the model must still load.
    nodes = [_node("Identity", ["bias"], ["b"]), _node("Add", ["x", "b"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])]
    model = _model(
        nodes,
        [2, 4],
        None,
        opset=17,
        initializers=[_const("bias", [1, 2, 3, 4], np.float32)],
        outputs=outputs,
    )
    x = torch.zeros(2, 4)
    _assert_matches_runtime(_save(model, tmp_path), x, torch.tensor([[1.0, 2, 3, 4]] * 2))


# Ops whose newer versions only added element types (or attributes left at their default here):
# (op, opset, attributes, initializers, expected output of X4D).
NEWER_OPSETS = [
    (
        "Conv",
        22,
        {},
        [_const("w", _conv_weight(), np.float32)],
        lambda x: nn.functional.conv2d(x, torch.from_numpy(_conv_weight())),
    ),
    (
        "MaxPool",
        22,
        {"kernel_shape": [2, 2], "strides": [2, 2]},
        [],
        lambda x: nn.functional.max_pool2d(x, 2),
    ),
    (
        "AveragePool",
        19,
        {"kernel_shape": [2, 2], "strides": [2, 2]},
        [],
        lambda x: nn.functional.avg_pool2d(x, 2),
    ),
    (
        "AveragePool",
        22,
        {"kernel_shape": [2, 2], "strides": [2, 2], "dilations": [1, 1]},
        [],
        lambda x: nn.functional.avg_pool2d(x, 2),
    ),
    ("GlobalAveragePool", 22, {}, [], lambda x: x.mean((2, 3), keepdim=True)),
    ("Flatten", 21, {"axis": 1}, [], lambda x: x.flatten(1)),
    ("Flatten", 23, {"axis": 1}, [], lambda x: x.flatten(1)),
    ("Transpose", 21, {"perm": [0, 2, 3, 1]}, [], lambda x: x.permute(0, 2, 3, 1)),
    ("Identity", 21, {}, [], lambda x: x),
    ("Unsqueeze", 21, {}, [_const("axes", [1])], lambda x: x.unsqueeze(1)),
    (
        "Pad",
        19,
        {},
        [_const("pads", [0, 0, 1, 1, 0, 0, 1, 1])],
        lambda x: nn.functional.pad(x, (1, 1, 1, 1)),
    ),
    ("HardSwish", 22, {}, [], nn.functional.hardswish),
    ("Softplus", 22, {}, [], nn.functional.softplus),
    ("Elu", 22, {}, [], nn.functional.elu),
    ("Gelu", 20, {}, [], nn.functional.gelu),
    ("Gelu", 20, {"approximate": "tanh"}, [], lambda x: nn.functional.gelu(x, approximate="tanh")),
    ("Mish", 18, {}, [], nn.functional.mish),
]


@pytest.mark.parametrize(
    ("op_type", "opset", "attrs", "initializers", "reference"),
    NEWER_OPSETS,
    ids=[f"{case[0]}-{case[1]}-{i}" for i, case in enumerate(NEWER_OPSETS)],
)
def test_ops_of_newer_opsets_convert(
    op_type: str,
    opset: int,
    attrs: dict[str, object],
    initializers: list[onnx.TensorProto],
    reference: Callable[[torch.Tensor], torch.Tensor],
    tmp_path: pathlib.Path,
) -> None:
    expected = reference(X4D)
    inputs = ["x", *(tensor.name for tensor in initializers)]
    model = _model(
        [_node(op_type, inputs, ["y"], **attrs)],
        [2, 3, 4, 4],
        list(expected.shape),
        opset=opset,
        initializers=initializers,
    )
    _assert_matches_runtime(_save(model, tmp_path), X4D, expected)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def _load_error(path: pathlib.Path) -> str:
    with pytest.raises(ModelLoadError) as excinfo:
        load_onnx(path)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.fixture
def small_model_path(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "small.onnx"
    _export(_build("small"), path, "legacy")
    return path


def test_missing_file(tmp_path: pathlib.Path) -> None:
    message = _load_error(tmp_path / "nope.onnx")
    assert message == f"model file {tmp_path / 'nope.onnx'} does not exist; check the path"


def test_empty_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert "is empty or not an ONNX model" in _load_error(path)


def test_random_bytes(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    message = _load_error(path)
    assert "is not a readable ONNX model" in message
    assert "not truncated" in message


def test_truncated_file(small_model_path: pathlib.Path) -> None:
    data = small_model_path.read_bytes()
    small_model_path.write_bytes(data[: len(data) // 2])
    message = _load_error(small_model_path)
    assert "is not a readable ONNX model" in message or "is not a valid ONNX model" in message


def test_missing_external_data(tmp_path: pathlib.Path) -> None:
    model = onnx.load(str(_export_to(tmp_path / "in.onnx")))
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="ext.weights", size_threshold=0
    )
    (tmp_path / "ext.weights").unlink()
    message = _load_error(path)
    assert message == (
        f"{path} keeps its weights in the external data file ext.weights, which is missing; "
        "put ext.weights next to ext.onnx"
    )


def _export_to(path: pathlib.Path) -> pathlib.Path:
    _export(_build("small"), path, "legacy")
    return path


def test_external_data_saved_by_onnx_loads(tmp_path: pathlib.Path) -> None:
    model = onnx.load(str(_export_to(tmp_path / "in.onnx")))
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="ext.weights", size_threshold=0
    )
    module, runner = load_onnx(path)
    assert check_against_runtime(module, runner, torch.rand(4, 3, 32, 32)) < 1e-4


def test_two_graph_inputs(tmp_path: pathlib.Path) -> None:
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in ("x", "z")]
    model = _model([_node("Add", ["x", "z"], ["y"])], [], [1, 4], opset=17, inputs=inputs)
    message = _load_error(_save(model, tmp_path))
    assert "has 2 graph inputs (x, z); robaudit needs exactly one image input" in message


def test_initializers_listed_as_inputs_do_not_count(tmp_path: pathlib.Path) -> None:
    # IR < 4 models list weights among the graph inputs.
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in ("x", "bias")
    ]
    model = _model(
        [_node("Add", ["x", "bias"], ["y"])],
        [],
        [1, 4],
        opset=17,
        inputs=inputs,
        initializers=[_const("bias", [[1, 2, 3, 4]], np.float32)],
    )
    _assert_matches_runtime(
        _save(model, tmp_path), torch.ones(1, 4), torch.tensor([[2.0, 3, 4, 5]])
    )


def test_int64_input(tmp_path: pathlib.Path) -> None:
    inputs = [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 4])]
    nodes = [_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)]
    model = _model(nodes, [], [1, 4], opset=17, inputs=inputs)
    message = _load_error(_save(model, tmp_path))
    assert "input 'x' has element type int64; robaudit needs a float32 image input" in message


def test_two_graph_outputs(tmp_path: pathlib.Path) -> None:
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in ("y", "z")
    ]
    nodes = [_node("Relu", ["x"], ["y"]), _node("Neg", ["x"], ["z"])]
    model = _model(nodes, [1, 4], None, opset=17, outputs=outputs)
    message = _load_error(_save(model, tmp_path))
    assert "has 2 graph outputs (y, z); robaudit needs exactly one (the logits)" in message


def test_op_without_converter_is_named(tmp_path: pathlib.Path) -> None:
    model = _model([_node("Hardmax", ["x"], ["y"])], [1, 4], [1, 4], opset=13)
    message = _load_error(_save(model, tmp_path))
    assert message.startswith("cannot convert ONNX op Hardmax (opset 13) to torch: onnx2torch ")
    assert "has no converter for it" in message


def test_custom_domain_op_is_named(tmp_path: pathlib.Path) -> None:
    model = _model(
        [_node("Foo", ["x"], ["y"], domain="com.example")],
        [1, 4],
        [1, 4],
        opset=17,
        extra_opsets=[("com.example", 3)],
    )
    message = _load_error(_save(model, tmp_path))
    assert message.startswith("cannot convert ONNX op Foo (opset 3, domain com.example) to torch")


def test_converter_failure_names_the_op(tmp_path: pathlib.Path) -> None:
    # A converter exists for AveragePool-19, but not for the dilations it was given.
    nodes = [
        _node("Relu", ["x"], ["r"]),
        _node("AveragePool", ["r"], ["y"], kernel_shape=[2, 2], dilations=[2, 2]),
    ]
    model = _model(nodes, [2, 3, 4, 4], [2, 3, 2, 2], opset=19)
    message = _load_error(_save(model, tmp_path))
    assert message.startswith(
        "cannot convert ONNX op AveragePool (opset 19) to torch: "
        "AveragePool with dilations other than 1 is not supported"
    )


def test_reduce_with_computed_axes_names_the_op(tmp_path: pathlib.Path) -> None:
    nodes = [
        _node("Shape", ["x"], ["s"], start=1, end=2),
        _node("Sub", ["s", "one"], ["axes"]),  # axes = [2]: computed, not constant
        _node("ReduceMean", ["x", "axes"], ["y"], keepdims=0),
    ]
    model = _model(
        nodes,
        [2, 3, 4, 4],
        [2, 3, 4],
        opset=18,
        initializers=[_const("one", [1])],
    )
    message = _load_error(_save(model, tmp_path))
    assert message.startswith(
        "cannot convert ONNX op ReduceMean (opset 18) to torch: axes computed"
    )


class _Shifted(nn.Module):
    def __init__(self, module: nn.Module, shift: float) -> None:
        super().__init__()
        self.module = module
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) + self.shift


def test_check_against_runtime_rejects_a_wrong_conversion(small_model_path: pathlib.Path) -> None:
    module, runner = load_onnx(small_model_path)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    scale = float(runner(x).abs().max())
    with pytest.raises(ModelLoadError) as excinfo:
        check_against_runtime(_Shifted(module, 0.5), runner, x)
    assert str(excinfo.value) == (
        f"the converted model differs from onnxruntime by up to 0.5 on logits of scale "
        f"{scale:.3g} (tolerance 0.001 of the scale); the conversion is not trustworthy: "
        "please report it"
    )
    # Within a looser tolerance the same difference passes and is reported.
    assert check_against_runtime(
        _Shifted(module, 0.5), runner, x, rtol=0.6 / scale
    ) == pytest.approx(0.5, abs=1e-4)


def test_check_against_runtime_rejects_nan(small_model_path: pathlib.Path) -> None:
    module, runner = load_onnx(small_model_path)
    with pytest.raises(ModelLoadError, match="differs from onnxruntime by up to nan"):
        check_against_runtime(_Shifted(module, float("nan")), runner, torch.rand(2, 3, 32, 32))


# ----------------------------------------------------------------------------------------------
# Ops robaudit converts itself (robaudit.models.onnx_ops)
# ----------------------------------------------------------------------------------------------


def _split_then_swap(split_inputs: Sequence[str], **attrs: object) -> list[onnx.NodeProto]:
    # The two parts in reverse order, so that their sizes and their order both show.
    return [
        _node("Split", ["x", *split_inputs], ["a", "b"], axis=1, **attrs),
        _node("Concat", ["b", "a"], ["y"], axis=1),
    ]


def test_split_18_with_num_outputs_makes_the_last_part_smaller(tmp_path: pathlib.Path) -> None:
    # torch.chunk exports as Split-18 with num_outputs: 3 channels in 2 parts are 2 + 1.
    model = _model(_split_then_swap([], num_outputs=2), [2, 3, 4, 4], [2, 3, 4, 4], opset=18)
    expected = torch.cat([X4D[:, 2:], X4D[:, :2]], 1)
    _assert_matches_runtime(_save(model, tmp_path), X4D, expected)


def test_split_18_with_a_split_input(tmp_path: pathlib.Path) -> None:
    model = _model(
        _split_then_swap(["sizes"]),
        [2, 3, 4, 4],
        [2, 3, 4, 4],
        opset=18,
        initializers=[_const("sizes", [1, 2])],
    )
    expected = torch.cat([X4D[:, 1:], X4D[:, :1]], 1)
    _assert_matches_runtime(_save(model, tmp_path), X4D, expected)


def test_split_18_with_sizes_computed_in_the_graph(tmp_path: pathlib.Path) -> None:
    nodes = [
        _node("Shape", ["x"], ["channels"], start=1, end=2),  # [3]
        _node("Sub", ["channels", "two"], ["first"]),  # [1]
        _node("Concat", ["first", "two"], ["sizes"], axis=0),  # [1, 2]
        *_split_then_swap(["sizes"]),
    ]
    model = _model(
        nodes, [2, 3, 4, 4], [2, 3, 4, 4], opset=18, initializers=[_const("two", [2])]
    )
    expected = torch.cat([X4D[:, 1:], X4D[:, :1]], 1)
    _assert_matches_runtime(_save(model, tmp_path), X4D, expected)


UPDATES = torch.linspace(-2, 2, 2 * 4 * 4).reshape(2, 4, 4)


def _scatter(reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    # indices [[0, 1], [-1, 2]] address x[0, 1] and x[1, 2] (-1: the last batch row).
    out = X4D.clone()
    out[0, 1] = reduce(out[0, 1], UPDATES[0])
    out[1, 2] = reduce(out[1, 2], UPDATES[1])
    return out


SCATTER_CASES = [
    (16, "none", _scatter(lambda _, u: u)),
    (18, "none", _scatter(lambda _, u: u)),
    (18, "add", _scatter(torch.add)),
    (18, "mul", _scatter(torch.mul)),
    (18, "max", _scatter(torch.maximum)),
    (18, "min", _scatter(torch.minimum)),
]


@pytest.mark.parametrize(
    ("opset", "reduction", "expected"), SCATTER_CASES, ids=[f"{c[0]}-{c[1]}" for c in SCATTER_CASES]
)
def test_scatter_nd(
    opset: int, reduction: str, expected: torch.Tensor, tmp_path: pathlib.Path
) -> None:
    model = _model(
        [_node("ScatterND", ["x", "indices", "updates"], ["y"], reduction=reduction)],
        [2, 3, 4, 4],
        [2, 3, 4, 4],
        opset=opset,
        initializers=[
            _const("indices", [[0, 1], [-1, 2]]),
            _const("updates", UPDATES.numpy(), np.float32),
        ],
    )
    _assert_matches_runtime(_save(model, tmp_path), X4D, expected)


INT64_MAX = 2**63 - 1
SLICES = [
    # (starts, ends, axes, steps, expected)
    ([1], [INT64_MAX], [2], [1], X4D[:, :, 1:]),
    ([-1], [-INT64_MAX], [3], [-1], X4D.flip(3)),
    ([3, 0], [0, 2], [-1, 1], [-2, 1], X4D[:, 0:2][..., [3, 1]]),
    ([0, 1], [1, 3], None, None, X4D[0:1, 1:3]),
    ([2], [2], [1], None, X4D[:, 2:2]),
]


@pytest.mark.parametrize(("starts", "ends", "axes", "steps", "expected"), SLICES)
def test_slice(
    starts: list[int],
    ends: list[int],
    axes: list[int] | None,
    steps: list[int] | None,
    expected: torch.Tensor,
    tmp_path: pathlib.Path,
) -> None:
    values = {"starts": starts, "ends": ends, "axes": axes, "steps": steps}
    given = {name: value for name, value in values.items() if value is not None}
    model = _model(
        [_node("Slice", ["x", *given], ["y"])],
        [2, 3, 4, 4],
        list(expected.shape),
        opset=13,
        initializers=[_const(name, value) for name, value in given.items()],
    )
    _assert_matches_runtime(_save(model, tmp_path), X4D, expected)


def test_slice_with_starts_computed_in_the_graph(tmp_path: pathlib.Path) -> None:
    nodes = [
        _node("Shape", ["x"], ["channels"], start=1, end=2),  # [3]
        _node("Sub", ["channels", "two"], ["start"]),  # [1]
        _node("Slice", ["x", "start", "end", "axis"], ["y"]),
    ]
    initializers = [_const("two", [2]), _const("end", [INT64_MAX]), _const("axis", [1])]
    model = _model(nodes, [2, 3, 4, 4], [2, 2, 4, 4], opset=15, initializers=initializers)
    _assert_matches_runtime(_save(model, tmp_path), X4D, X4D[:, 1:])


def _layer_norm_model(tmp_path: pathlib.Path) -> pathlib.Path:
    # The last size is unknown in the recorded shape, as after swin_t's patch merging.
    scale = np.linspace(0.5, 1.5, 4, dtype=np.float32)
    bias = np.linspace(-0.1, 0.1, 4, dtype=np.float32)
    model = _model(
        [_node("LayerNormalization", ["x", "scale", "bias"], ["y"], epsilon=1e-5)],
        ["n", 3, 4, "w"],
        ["n", 3, 4, "w"],
        opset=17,
        initializers=[_const("scale", scale, np.float32), _const("bias", bias, np.float32)],
    )
    return _save(model, tmp_path)


def test_layer_norm_shape_comes_from_its_scale_when_unknown(tmp_path: pathlib.Path) -> None:
    path = _layer_norm_model(tmp_path)
    scale = torch.linspace(0.5, 1.5, 4)
    bias = torch.linspace(-0.1, 0.1, 4)
    expected = nn.functional.layer_norm(X4D, (4,), scale, bias, eps=1e-5)
    _assert_matches_runtime(path, X4D, expected)
    module, _ = load_onnx(path)
    (layer,) = [m for m in module.modules() if isinstance(m, nn.LayerNorm)]
    assert layer.normalized_shape == (4,)


def test_a_conversion_that_fails_is_blamed_not_the_data(tmp_path: pathlib.Path) -> None:
    module, runner = load_onnx(_layer_norm_model(tmp_path))
    (layer,) = [m for m in module.modules() if isinstance(m, nn.LayerNorm)]
    layer.normalized_shape = (0,)  # what onnx2torch alone builds for this graph
    with pytest.raises(ModelLoadError) as excinfo:
        check_against_runtime(module, runner, X4D)
    message = str(excinfo.value)
    assert message.startswith(
        "onnxruntime runs the model on inputs of shape (3, 4, 4), but robaudit's torch "
        "conversion of it fails (RuntimeError: "
    )
    assert message.endswith(
        "the conversion is at fault, not the data: please report it, or save the model with "
        "torch.export (.pt2)"
    )


def test_data_that_onnxruntime_refuses_is_blamed(small_model_path: pathlib.Path) -> None:
    module, runner = load_onnx(small_model_path)
    with pytest.raises(DataError) as excinfo:
        check_against_runtime(module, runner, torch.rand(2, 1, 32, 32))
    message = str(excinfo.value)
    assert message.startswith(
        "the model cannot run on the data's inputs of shape (1, 32, 32): onnxruntime says "
    )
    assert message.endswith(
        "check --image-size, the channel count, and that the model matches the data set"
    )


def test_conversion_check_scales_with_tiny_logits(tmp_path: pathlib.Path) -> None:
    # Logits below 1e-6, as efficientnet_b0 (3e-14) and mnasnet0_5 (4e-8) give at initialisation.
    model = _build("small")
    with torch.no_grad():
        model.classifier[1].weight.mul_(1e-7)
        model.classifier[1].bias.mul_(1e-7)
    path = tmp_path / "tiny.onnx"
    _export(model, path, "legacy")
    module, runner = load_onnx(path)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    scale = float(runner(x).abs().max())
    assert 1e-9 < scale < 1e-6
    assert check_against_runtime(module, runner, x) <= 1e-5 * scale

    # A deliberately wrong conversion: the first convolution's weights 10% too large.
    (conv, *_) = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        conv.weight.mul_(1.1)
    with torch.no_grad():
        difference = float((module(x) - runner(x)).abs().max())
    assert difference < 1e-6  # far below an absolute tolerance (the old check's was 1e-4)
    assert difference > 1e-2 * scale  # but 4% of the logits' scale
    with pytest.raises(ModelLoadError, match="the conversion is not trustworthy"):
        check_against_runtime(module, runner, x)


def _resize_classifier(tmp_path: pathlib.Path) -> pathlib.Path:
    # Resize-13 in "nearest" mode with ONNX's default rounding: onnx2torch warns that torch
    # rounds differently, although for a 2x upscale the results are the same.
    nodes = [
        _node("Resize", ["x", "", "scales"], ["big"], mode="nearest"),
        _node("ReduceMean", ["big"], ["mean"], axes=[2, 3], keepdims=0),
        _node("MatMul", ["mean", "w"], ["y"]),
    ]
    weight = np.linspace(-1, 1, 30, dtype=np.float32).reshape(3, 10)
    model = _model(
        nodes,
        ["n", 3, 4, 4],
        ["n", 10],
        opset=13,
        initializers=[_const("scales", [1, 1, 2, 2], np.float32), _const("w", weight, np.float32)],
    )
    return _save(model, tmp_path)


def test_converter_warnings_go_to_the_log(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _resize_classifier(tmp_path)
    caplog.set_level("INFO", logger="robaudit")
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        module, runner = load_onnx(path)
    assert escaped == []
    logged = [r.getMessage() for r in caplog.records if r.name == "robaudit.models.onnx"]
    assert any(
        m.startswith("UserWarning while converting the model: Pytorch's nearest neighbor")
        for m in logged
    )
    assert check_against_runtime(module, runner, X4D.abs()) < 1e-6


@pytest.mark.parametrize("verbose", [False, True])
def test_converter_warnings_show_only_with_verbose(
    verbose: bool, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _resize_classifier(tmp_path)
    pixels = np.random.default_rng(0).integers(0, 256, (10, 3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", x=pixels, y=np.arange(10))
    args = ["scan", str(path), "--data", str(tmp_path / "data.npz"), "--steps", "1"]
    assert main([*args, *(["-v"] if verbose else [])]) == 0
    captured = capsys.readouterr()
    shown = "robaudit: UserWarning while converting the model: Pytorch's nearest neighbor"
    assert (shown in captured.err) is verbose
    assert "warnings.warn" not in captured.out + captured.err
