"""Load ONNX classifiers as torch modules (via onnx2torch) and check them against onnxruntime.

PGD needs exact input gradients, so the ONNX graph is converted to torch with onnx2torch; the
original file stays runnable in onnxruntime so that the conversion can be checked on real data.
onnx2torch 1.5.15 predates the opsets that current exporters emit, so this module registers the
missing converters and rewrites the few graph patterns it mishandles before converting.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata

import numpy as np
import onnx
import onnx2torch
import onnxruntime
import torch
from google.protobuf.message import DecodeError
from onnx import defs
from onnx2torch.node_converters.registry import add_converter, get_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import (
    OnnxMapping,
    OperationConverterResult,
    get_const_value,
    onnx_mapping_from_node,
)
from torch import nn

from robaudit.errors import ModelLoadError

__all__ = ["OrtRunner", "check_against_runtime", "load_onnx"]

#: Private domain for nodes robaudit converts itself whatever the model's opset (a graph rewrite
#: moves them here, out of reach of onnx2torch's own converters for the same op).
FIX_DOMAIN = "robaudit"

_Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]


# --------------------------------------------------------------------------------------------
# Converters onnx2torch lacks
# --------------------------------------------------------------------------------------------


def _is_registered(op_type: str, version: int, domain: str = "") -> bool:
    try:
        get_converter(op_type, version, domain)
    except NotImplementedError:
        return False
    return True


def _since_versions(op_type: str) -> set[int]:
    """Versions at which the installed onnx package changed ``op_type``'s schema."""
    return {
        schema.since_version
        for schema in defs.get_all_schemas_with_history()
        if schema.name == op_type and schema.domain == ""
    }


def _register(op_type: str, versions: Sequence[int], converter: _Converter) -> None:
    # Only versions this onnx knows and onnx2torch does not cover: a later onnx2torch that adds
    # them wins, and add_converter would raise on a duplicate anyway.
    known = _since_versions(op_type)
    for version in versions:
        if version in known and not _is_registered(op_type, version):
            add_converter(operation_type=op_type, version=version)(converter)


def _delegate(op_type: str, version: int) -> _Converter:
    """A converter that reuses onnx2torch's converter of an older version of the same op."""

    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        return get_converter(op_type, version)(node, graph)

    return convert


# Version bumps that only widened the accepted element types (bfloat16, float8, int4, ...):
# inputs, outputs, attributes and float semantics are unchanged, so the older converter is exact.
_TYPE_ONLY_BUMPS: dict[str, tuple[int, tuple[int, ...]]] = {
    "Cast": (13, (19, 21, 23)),  # 19 adds `saturate`, which only applies to float8 targets
    "Constant": (13, (19, 21, 23, 24, 25)),
    "ConstantOfShape": (9, (20, 21, 23, 24, 25)),
    "Conv": (11, (22,)),
    "ConvTranspose": (11, (22,)),
    "Dropout": (13, (22,)),
    "Elu": (6, (22,)),
    "Equal": (13, (19,)),
    "Flatten": (13, (21, 23, 24, 25)),
    "GlobalAveragePool": (1, (22,)),
    "GreaterOrEqual": (12, (16,)),
    "HardSigmoid": (6, (22,)),
    "HardSwish": (14, (22,)),
    "Identity": (16, (19, 21, 23, 24, 25)),
    "InstanceNormalization": (6, (22,)),
    "LessOrEqual": (12, (16,)),
    "MaxPool": (12, (22,)),
    "Selu": (6, (22,)),
    "Shape": (15, (19, 21, 23, 24, 25)),
    "Softplus": (1, (22,)),
    "Softsign": (1, (22,)),
    "Squeeze": (21, (23, 24, 25)),
    "Transpose": (13, (21, 23, 24, 25)),
    "Unsqueeze": (13, (21, 23, 24, 25)),
}


def _convert_average_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    # AveragePool-19 added `dilations`; with unit dilations it is AveragePool-11.
    if any(d != 1 for d in node.attributes.get("dilations", [])):
        raise NotImplementedError("AveragePool with dilations other than 1 is not supported")
    return get_converter("AveragePool", 11)(node, graph)


def _convert_pad(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    # Pad-18 added the `axes` input and Pad-19 the `wrap` mode; without them it is Pad-13.
    if len(node.input_values) > 3 and node.input_values[3]:
        raise NotImplementedError("Pad with an `axes` input is not supported")
    if node.attributes.get("mode", "constant") == "wrap":
        raise NotImplementedError('Pad with mode="wrap" is not supported')
    return get_converter("Pad", 13)(node, graph)


class OnnxReshape(nn.Module):
    """ONNX Reshape with a shape known at conversion time, honouring ``allowzero``."""

    def __init__(self, shape: list[int], allowzero: bool) -> None:
        super().__init__()
        self.shape = shape
        self.allowzero = allowzero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.shape
        if not self.allowzero:
            # allowzero=0: a 0 copies the input's size at that index (torch would make it empty).
            shape = [x.shape[i] if size == 0 else size for i, size in enumerate(shape)]
        return torch.reshape(x, shape)


class OnnxDynamicReshape(nn.Module):
    """ONNX Reshape whose target shape is computed in the graph."""

    def __init__(self, allowzero: bool) -> None:
        super().__init__()
        self.allowzero = allowzero

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        sizes = [int(size) for size in shape.tolist()]
        if not self.allowzero:
            sizes = [x.shape[i] if size == 0 else size for i, size in enumerate(sizes)]
        return torch.reshape(x, sizes)


def _convert_reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    allowzero = bool(node.attributes.get("allowzero", 0))
    data_name, shape_name = node.input_values[:2]
    try:
        shape = get_const_value(shape_name, graph)
    except KeyError:
        return OperationConverterResult(OnnxDynamicReshape(allowzero), onnx_mapping_from_node(node))
    # A constant shape lives in the module, so the forward pass has no data-dependent sizes.
    sizes = [int(size) for size in torch.as_tensor(shape).reshape(-1).tolist()]
    mapping = OnnxMapping(inputs=(data_name,), outputs=node.output_values)
    return OperationConverterResult(OnnxReshape(sizes, allowzero), mapping)


_REDUCERS: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
    "ReduceL1": lambda x, dims, keep: x.abs().sum(dims, keepdim=keep),
    "ReduceL2": lambda x, dims, keep: torch.linalg.vector_norm(x, 2, dims, keepdim=keep),
    "ReduceLogSum": lambda x, dims, keep: x.sum(dims, keepdim=keep).log(),
    "ReduceLogSumExp": lambda x, dims, keep: torch.logsumexp(x, dims, keepdim=keep),
    "ReduceMax": lambda x, dims, keep: torch.amax(x, dims, keepdim=keep),
    "ReduceMean": lambda x, dims, keep: x.mean(dims, keepdim=keep),
    "ReduceMin": lambda x, dims, keep: torch.amin(x, dims, keepdim=keep),
    "ReduceProd": lambda x, dims, keep: _prod(x, dims, keep),
    "ReduceSumSquare": lambda x, dims, keep: x.square().sum(dims, keepdim=keep),
}


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    # torch.prod reduces one dimension at a time; going from the last keeps indices valid.
    for dim in sorted(dims, reverse=True):
        x = x.prod(dim, keepdim=keepdim)
    return x


class OnnxReduce(nn.Module):
    """ONNX Reduce* from opset 18 on, where ``axes`` became an input (constant here)."""

    def __init__(self, op_type: str, axes: list[int], keepdims: bool, noop_with_empty_axes: bool):
        super().__init__()
        self.op_type = op_type
        self.axes = axes
        self.keepdims = keepdims
        self.noop_with_empty_axes = noop_with_empty_axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.axes and self.noop_with_empty_axes:
            return x
        dims = [axis % x.dim() for axis in self.axes] if self.axes else list(range(x.dim()))
        return _REDUCERS[self.op_type](x, dims, self.keepdims)


def _convert_reduce(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axes: list[int] = []
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes_value = get_const_value(node.input_values[1], graph)
        except KeyError as exc:
            raise NotImplementedError("axes computed in the graph are not supported") from exc
        axes = [int(axis) for axis in torch.as_tensor(axes_value).reshape(-1).tolist()]
    module = OnnxReduce(
        node.operation_type,
        axes,
        keepdims=bool(node.attributes.get("keepdims", 1)),
        noop_with_empty_axes=bool(node.attributes.get("noop_with_empty_axes", 0)),
    )
    mapping = OnnxMapping(inputs=node.input_values[:1], outputs=node.output_values)
    return OperationConverterResult(module, mapping)


def _convert_gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    # Gelu became an ONNX op in opset 20; the dynamo exporter emits it for nn.GELU.
    approximate = node.attributes.get("approximate", "none")
    return OperationConverterResult(nn.GELU(approximate=approximate), onnx_mapping_from_node(node))


def _convert_mish(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(nn.Mish(), onnx_mapping_from_node(node))


def _register_converters() -> None:
    for op_type, (base, versions) in _TYPE_ONLY_BUMPS.items():
        _register(op_type, versions, _delegate(op_type, base))
    _register("AveragePool", (19, 22), _convert_average_pool)
    _register("Pad", (18, 19, 21, 23, 24, 25), _convert_pad)
    _register("Reshape", (19, 21, 23, 24, 25), _convert_reshape)
    _register("Gelu", (20,), _convert_gelu)
    _register("Mish", (18, 22), _convert_mish)
    for op_type in _REDUCERS:
        _register(op_type, (18, 20), _convert_reduce)
    if not _is_registered("Reshape", 1, FIX_DOMAIN):
        add_converter(operation_type="Reshape", version=1, domain=FIX_DOMAIN)(_convert_reshape)


_register_converters()


# --------------------------------------------------------------------------------------------
# Graph rewrites before conversion
# --------------------------------------------------------------------------------------------


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If/Loop bodies can read outer values)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_nodes(subgraph)


def _fold_constants_and_identities(graph: onnx.GraphProto) -> None:
    """Turn Constant tensors into initializers and bypass Identity nodes that copy initializers.

    onnx2torch reads Conv/Gemm/BatchNorm weights from ``graph.initializers`` only, and the legacy
    exporter feeds shared weights through Identity nodes (a KeyError in onnx2torch).
    """
    graph_outputs = {output.name for output in graph.output}
    initializers = {initializer.name for initializer in graph.initializer}
    renamed: dict[str, str] = {}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        folds_constant = (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and [a.name for a in node.attribute] == ["value"]
            and node.output[0] not in graph_outputs
        )
        folds_identity = (
            node.op_type == "Identity"
            and node.domain in ("", "ai.onnx")
            and node.input[0] in initializers
            and node.output[0] not in graph_outputs
        )
        if folds_constant:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            initializers.add(tensor.name)
        elif folds_identity:
            renamed[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    if len(kept) == len(graph.node):
        return
    del graph.node[:]
    graph.node.extend(kept)
    # Shapes recorded for the bypassed Identity outputs would describe values that no longer exist.
    stale = [value for value in graph.value_info if value.name in renamed]
    for value in stale:
        graph.value_info.remove(value)
    for node in _all_nodes(graph):
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)


def _reroute_allowzero_reshapes(model: onnx.ModelProto) -> None:
    """Move Reshape nodes with allowzero=1 to robaudit's domain: onnx2torch refuses them."""
    moved = False
    for node in model.graph.node:
        allowzero = any(a.name == "allowzero" and a.i == 1 for a in node.attribute)
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and allowzero:
            node.domain = FIX_DOMAIN
            moved = True
    if moved and all(opset.domain != FIX_DOMAIN for opset in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(FIX_DOMAIN, 1))


def fix_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` rewritten so that onnx2torch converts it exactly."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    _fold_constants_and_identities(fixed.graph)
    _reroute_allowzero_reshapes(fixed)
    return fixed


# --------------------------------------------------------------------------------------------
# onnxruntime
# --------------------------------------------------------------------------------------------


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # Old IR versions list initializers among the inputs; they are weights, not model inputs.
    initializers = {initializer.name for initializer in graph.initializer}
    return [value for value in graph.input if value.name not in initializers]


class OrtRunner:
    """Runs the original ONNX file in onnxruntime: ``runner(x)`` gives float32 logits on the CPU.

    ``x`` is what the graph expects (normalised if the graph does not normalise). Any batch size
    works: a graph with a fixed batch dimension gets chunks of that size, the last one padded.
    """

    def __init__(self, path: pathlib.Path) -> None:
        providers = ["CPUExecutionProvider"]
        if torch.cuda.is_available() and (
            "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        try:
            # From the path, not bytes, so that external data files are found next to it.
            self._session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(
                f"onnxruntime cannot load {path}: {_one_line(exc)}; "
                "check that the file was exported for a released ONNX opset"
            ) from exc
        #: Execution providers the session really uses (CUDA falls back to CPU when unusable).
        self.providers: list[str] = list(self._session.get_providers())
        (graph_input,) = self._session.get_inputs()
        self.input_name: str = graph_input.name
        self.output_name: str = self._session.get_outputs()[0].name
        batch = graph_input.shape[0] if graph_input.shape else None
        #: The graph's fixed batch size, or None when the batch dimension is free.
        self.batch_size: int | None = batch if isinstance(batch, int) and batch > 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        if self.batch_size is None or len(array) == self.batch_size:
            return self._run(array)
        chunks = []
        for start in range(0, len(array), self.batch_size):
            chunk = array[start : start + self.batch_size]
            missing = self.batch_size - len(chunk)
            if missing:
                padding = np.zeros((missing, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, padding])
            chunks.append(self._run(chunk)[: self.batch_size - missing])
        return torch.cat(chunks)

    def _run(self, array: np.ndarray) -> torch.Tensor:
        (output,) = self._session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(np.asarray(output, dtype=np.float32))


class FixedBatch(nn.Module):
    """Feeds a module converted from a fixed-batch graph in chunks of that batch size.

    Such graphs often bake the batch size into Reshape shapes. Zero padding of the last chunk
    cannot change the other rows (eval-mode layers act per example), and gradients stay exact.
    """

    def __init__(self, module: nn.Module, batch_size: int) -> None:
        super().__init__()
        self.module = module
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == self.batch_size:
            return self.module(x)
        outputs = []
        for chunk in torch.split(x, self.batch_size):
            missing = self.batch_size - len(chunk)
            if missing:
                chunk = torch.cat([chunk, chunk.new_zeros((missing, *chunk.shape[1:]))])
            outputs.append(self.module(chunk)[: self.batch_size - missing])
        return torch.cat(outputs)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_proto(path: pathlib.Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist; check the path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable ONNX model ({_one_line(exc, 120)}); "
            "check that it is a complete .onnx file, e.g. not truncated by a copy"
        ) from exc
    if model.ir_version == 0 or not model.graph.node:
        raise ModelLoadError(
            f"{path} is empty or not an ONNX model (no IR version or no graph nodes); "
            "export the model again with torch.onnx.export"
        )
    return model


def _check_external_data(model: onnx.ModelProto, path: pathlib.Path) -> None:
    tensors = list(model.graph.initializer) + [
        attribute.t for node in _all_nodes(model.graph) for attribute in node.attribute
    ]
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next(e.value for e in tensor.external_data if e.key == "location")
        if not (path.parent / location).is_file():
            raise ModelLoadError(
                f"{path} keeps its weights in the external data file {location}, which is "
                f"missing; put {location} next to {path.name}"
            )


def _check_signature(graph: onnx.GraphProto, path: pathlib.Path) -> None:
    inputs = _graph_inputs(graph)
    if len(inputs) != 1:
        names = ", ".join(value.name for value in inputs) or "none"
        raise ModelLoadError(
            f"{path} has {len(inputs)} graph inputs ({names}); robaudit needs exactly one image "
            "input: export a model that takes a single image batch"
        )
    element_type = inputs[0].type.tensor_type.elem_type
    if element_type != onnx.TensorProto.FLOAT:
        type_name = onnx.TensorProto.DataType.Name(element_type).lower()
        raise ModelLoadError(
            f"{path} input {inputs[0].name!r} has element type {type_name}; robaudit needs a "
            "float32 image input: export the model in float32"
        )
    if len(graph.output) != 1:
        names = ", ".join(value.name for value in graph.output) or "none"
        raise ModelLoadError(
            f"{path} has {len(graph.output)} graph outputs ({names}); robaudit needs exactly one "
            "(the logits): export a model that returns only the logits"
        )


def _unconvertible(node: onnx.NodeProto | OnnxNode, opset: int | None, why: str) -> ModelLoadError:
    op_type = node.op_type if isinstance(node, onnx.NodeProto) else node.operation_type
    domain = node.domain
    where = f"opset {opset}" + (f", domain {domain}" if domain not in ("", "ai.onnx") else "")
    return ModelLoadError(
        f"cannot convert ONNX op {op_type} ({where}) to torch: {why}; export the model with "
        "other ops or opset, or save it with torch.export (.pt2)"
    )


def _check_converters(model: onnx.ModelProto) -> None:
    opsets = {opset.domain or "": opset.version for opset in model.opset_import}
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        opset = opsets.get(domain)
        if opset is None:
            raise _unconvertible(node, None, f"the model imports no opset for domain {domain!r}")
        try:
            get_converter(node.op_type, opset, domain)
        except NotImplementedError:
            raise _unconvertible(
                node, opset, f"onnx2torch {metadata.version('onnx2torch')} has no converter for it"
            ) from None


def _blame_node(model: onnx.ModelProto, error: Exception) -> ModelLoadError:
    """Find which node's converter fails (only run after the whole conversion failed)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = OnnxGraph(inferred.graph)
    opsets = {opset.domain: opset.version for opset in model.opset_import}
    for node in graph.nodes.values():
        opset = opsets.get(node.domain)
        try:
            get_converter(node.operation_type, opset, node.domain)(node, graph)
        except Exception as exc:
            return _unconvertible(node, opset, _one_line(exc, 200))
    return ModelLoadError(
        f"onnx2torch failed to convert the graph: {_one_line(error, 200)}; "
        "please report it with the model to robaudit"
    )


def load_onnx(path: pathlib.Path) -> tuple[nn.Module, OrtRunner]:
    """Load an ONNX classifier as ``(torch module in eval mode, onnxruntime runner)``.

    External data files are read from the model's folder. Raises ModelLoadError when the file is
    missing, unreadable, has other than one float32 input and one output, or cannot be converted.
    """
    path = pathlib.Path(path)
    model = _read_proto(path)
    _check_external_data(model, path)
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelLoadError(
            f"{path} is not a valid ONNX model: {_one_line(exc, 200)}; export it again"
        ) from exc
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    _check_signature(model.graph, path)

    fixed = fix_graph(model)
    _check_converters(fixed)
    try:
        module = onnx2torch.convert(fixed)
    except Exception as exc:  # converters raise anything from KeyError to NotImplementedError
        raise _blame_node(fixed, exc) from exc

    runner = OrtRunner(path)
    if runner.batch_size is not None:
        module = FixedBatch(module, runner.batch_size)
    return module.eval(), runner


def check_against_runtime(
    module: nn.Module,
    runner: OrtRunner,
    x: torch.Tensor,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> float:
    """Compare ``module(x)`` with onnxruntime on a real batch; return the max absolute difference.

    Raises ModelLoadError when any logit differs by more than ``atol + rtol * |reference|``.
    """
    with torch.no_grad():
        converted = module(x).detach().to("cpu", torch.float32)
    reference = runner(x)
    if converted.shape != reference.shape:
        raise ModelLoadError(
            f"the converted model gives logits of shape {tuple(converted.shape)} but onnxruntime "
            f"gives {tuple(reference.shape)}; the conversion is not trustworthy: please report it"
        )
    difference = (converted - reference).abs()
    max_difference = float(difference.max()) if difference.numel() else 0.0
    if not torch.isfinite(difference).all() or (difference > atol + rtol * reference.abs()).any():
        raise ModelLoadError(
            f"the converted model differs from onnxruntime by up to {max_difference:.3g} "
            f"(tolerance atol={atol:g}, rtol={rtol:g}); the conversion is not trustworthy: "
            "please report it"
        )
    return max_difference
