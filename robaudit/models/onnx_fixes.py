"""robaudit's own fixes to onnx2torch: converters it lacks and graph rewrites it needs.

onnx2torch 1.5.15 predates the opsets that current exporters emit (Split-18, ScatterND-18, the
opset-20 Gelu, Reduce* with an ``axes`` input, ...) and mishandles a few graph patterns (weights
behind Identity or Constant nodes, Reshape with allowzero, LayerNormalization whose recorded shape
is unknown). This module registers the missing converters with onnx2torch's registry on import
and rewrites those patterns before conversion; :func:`fix_graph` is its entry point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import onnx
import torch
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

from robaudit.models.onnx_ops import (
    convert_layer_norm,
    convert_scatter_nd,
    convert_slice,
    convert_split,
)

__all__ = ["FIX_DOMAIN", "all_nodes", "fix_graph"]

#: Private domain for nodes robaudit converts itself whatever the model's opset (a graph rewrite
#: moves them here, out of reach of onnx2torch's own converters for the same op).
FIX_DOMAIN = "robaudit"

_Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]

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


#: Ops that robaudit always converts itself, whatever the model's opset: fix_graph moves them to
#: FIX_DOMAIN, where these converters (and not onnx2torch's own) take them.
_REROUTED: dict[str, _Converter] = {
    "LayerNormalization": convert_layer_norm,
    "ScatterND": convert_scatter_nd,
    "Slice": convert_slice,
}


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
    _register("Split", (18,), convert_split)
    for op_type, converter in {"Reshape": _convert_reshape, **_REROUTED}.items():
        if not _is_registered(op_type, 1, FIX_DOMAIN):
            add_converter(operation_type=op_type, version=1, domain=FIX_DOMAIN)(converter)


_register_converters()


# --------------------------------------------------------------------------------------------
# Graph rewrites before conversion
# --------------------------------------------------------------------------------------------


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If/Loop bodies can read outer values)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from all_nodes(subgraph)


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
    for node in all_nodes(graph):
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)


def _reroute(model: onnx.ModelProto) -> None:
    """Move the nodes robaudit converts itself to its own domain (see ``_REROUTED``), and Reshape
    nodes with allowzero=1, which onnx2torch refuses."""
    moved = False
    for node in model.graph.node:
        allowzero = any(a.name == "allowzero" and a.i == 1 for a in node.attribute)
        if node.domain in ("", "ai.onnx") and (
            node.op_type in _REROUTED or (node.op_type == "Reshape" and allowzero)
        ):
            node.domain = FIX_DOMAIN
            moved = True
    if moved and all(opset.domain != FIX_DOMAIN for opset in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(FIX_DOMAIN, 1))


def fix_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` rewritten so that onnx2torch converts it exactly."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    _fold_constants_and_identities(fixed.graph)
    # Shapes first: onnx2torch infers them again, but cannot see through robaudit's domain, so
    # what follows a rerouted node would lose its recorded shape.
    # Without them (a graph over 2 GB is a ValueError) onnx2torch's own inference is all there is.
    with contextlib.suppress(onnx.shape_inference.InferenceError, ValueError):
        fixed = onnx.shape_inference.infer_shapes(fixed)
    _reroute(fixed)
    return fixed
