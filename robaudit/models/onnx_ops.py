"""Torch modules and onnx2torch converters for ONNX ops that robaudit converts itself.

Split-18 (``num_outputs`` or a ``split`` input), ScatterND (every version and reduction), Slice
(every version, indexing the way torch will keep supporting) and LayerNormalization whose
recorded input shape is unknown. robaudit.models.onnx_fixes registers them with onnx2torch.
"""

from __future__ import annotations

import torch
from onnx2torch.node_converters.registry import get_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import (
    OnnxMapping,
    OperationConverterResult,
    get_const_value,
    onnx_mapping_from_node,
)
from torch import nn

__all__ = ["convert_layer_norm", "convert_scatter_nd", "convert_slice", "convert_split"]


class OnnxSplit18(nn.Module):
    """ONNX Split from opset 18: sizes from the ``split`` input, or ``num_outputs`` equal parts.

    With ``num_outputs`` every part has ceil(size / num_outputs) elements and the last one what
    is left, which is what ``torch.split`` does with that part size (and what ``torch.chunk``
    exports as).
    """

    def __init__(self, axis: int, num_outputs: int, sizes: list[int] | None) -> None:
        super().__init__()
        self.axis = axis
        self.num_outputs = num_outputs
        self.sizes = sizes

    def forward(
        self, x: torch.Tensor, split: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        if split is not None:
            sizes: int | list[int] = [int(size) for size in split.tolist()]
        elif self.sizes is not None:
            sizes = self.sizes
        else:
            sizes = -(-x.shape[self.axis] // self.num_outputs)
        return torch.split(x, sizes, dim=self.axis)


def convert_split(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axis = node.attributes.get("axis", 0)
    data_name = node.input_values[0]
    split_name = node.input_values[1] if len(node.input_values) > 1 else ""
    if not split_name:
        module = OnnxSplit18(axis, len(node.output_values), None)
        return OperationConverterResult(module, OnnxMapping((data_name,), node.output_values))
    try:
        split = get_const_value(split_name, graph)
    except KeyError:  # sizes computed in the graph: read at run time
        module = OnnxSplit18(axis, len(node.output_values), None)
        return OperationConverterResult(module, onnx_mapping_from_node(node))
    sizes = [int(size) for size in torch.as_tensor(split).reshape(-1).tolist()]
    module = OnnxSplit18(axis, len(node.output_values), sizes)
    return OperationConverterResult(module, OnnxMapping((data_name,), node.output_values))


_SCATTER_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


class OnnxScatterND(nn.Module):
    """ONNX ScatterND (all versions): ``updates`` written at ``indices`` into a copy of ``data``.

    The leading dimensions that ``indices`` address are flattened so that one ``index_copy`` (or
    ``index_add``/``scatter_reduce`` for a reduction) does the work: differentiable in ``data`` and
    ``updates``, and with no Python loop over indices.
    """

    def __init__(self, reduction: str) -> None:
        super().__init__()
        self.reduction = reduction

    def forward(
        self, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor
    ) -> torch.Tensor:
        depth = indices.shape[-1]
        lead = data.shape[:depth]
        index = indices.reshape(-1, depth).long() % torch.tensor(lead, device=data.device)
        strides = torch.tensor([*lead[1:], 1], device=data.device).flip(0).cumprod(0).flip(0)
        rows = (index * strides).sum(1)
        flat = data.reshape(-1, *data.shape[depth:])
        values = updates.reshape(-1, *data.shape[depth:]).to(data.dtype)
        if self.reduction == "none":
            out = flat.index_copy(0, rows, values)
        elif self.reduction == "add":
            out = flat.index_add(0, rows, values)
        else:
            index = rows.reshape(-1, *[1] * (values.dim() - 1)).expand_as(values)
            out = flat.scatter_reduce(0, index, values, _SCATTER_REDUCE[self.reduction])
        return out.reshape(data.shape)


def convert_scatter_nd(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    reduction = node.attributes.get("reduction", "none")
    if reduction not in ("none", "add", "mul", "max", "min"):
        raise NotImplementedError(f"ScatterND with reduction={reduction!r} is not supported")
    return OperationConverterResult(OnnxScatterND(reduction), onnx_mapping_from_node(node))


def convert_layer_norm(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    # onnx2torch sizes nn.LayerNorm from the input's recorded shape, where an unknown size reads
    # as 0 (the legacy exporter leaves it unknown after swin_t's patch merging). The scale holds
    # one weight per normalised element, so its own shape is the normalised shape.
    result = get_converter("LayerNormalization", 17)(node, graph)
    layer = result.torch_module
    if isinstance(layer, nn.LayerNorm) and 0 in layer.normalized_shape:
        if layer.weight is None or layer.weight.dim() != len(layer.normalized_shape):
            raise NotImplementedError(
                "LayerNormalization whose normalised shape is neither recorded nor given by "
                "its scale is not supported"
            )
        layer.normalized_shape = tuple(layer.weight.shape)
    return result


class OnnxSlice(nn.Module):
    """ONNX Slice (all versions), indexing with a tuple of slices (Python's clamping is ONNX's).

    onnx2torch's Slice indexes with a list of slices, which torch deprecates (it warns that it
    will read it as a tensor index). Arguments computed in the graph come as forward inputs.
    """

    def __init__(self, constants: list[list[int] | None], from_inputs: list[bool]) -> None:
        super().__init__()
        #: starts, ends, axes, steps: known at conversion, absent (None), or read at run time.
        self.constants = constants
        self.from_inputs = from_inputs

    def forward(self, x: torch.Tensor, *computed: torch.Tensor) -> torch.Tensor:
        given = iter(computed)
        starts, ends, axes, steps = (
            _ints(next(given)) if from_input else constant
            for constant, from_input in zip(self.constants, self.from_inputs, strict=True)
        )
        if starts is None or ends is None:
            raise ValueError("Slice without starts or ends")
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        index: list[slice] = [slice(None)] * x.dim()
        flips: list[int] = []
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            axis %= x.dim()
            first, stop, step = slice(start, end, step).indices(x.shape[axis])
            if step < 0:  # torch slices forwards only: take the flipped axis forwards
                flips.append(axis)
                last = x.shape[axis] - 1
                first, stop, step = last - first, last - stop, -step
            index[axis] = slice(first, max(first, stop), step)
        if flips:
            x = x.flip(flips)
        return x[tuple(index)]


def _ints(value: object) -> list[int] | None:
    if value is None:
        return None
    return [int(v) for v in torch.as_tensor(value).reshape(-1).tolist()]


def convert_slice(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    names = ("starts", "ends", "axes", "steps")
    constants: list[list[int] | None] = []
    computed: list[str] = []
    from_inputs: list[bool] = []
    for position, name in enumerate(names, start=1):
        value_name = node.input_values[position] if len(node.input_values) > position else ""
        if not value_name:  # Slice-1 keeps them in attributes; absent axes/steps are defaults
            constants.append(_ints(node.attributes.get(name)))
            from_inputs.append(False)
            continue
        try:
            constants.append(_ints(get_const_value(value_name, graph)))
            from_inputs.append(False)
        except KeyError:  # computed in the graph: read at run time, in this order
            constants.append(None)
            from_inputs.append(True)
            computed.append(value_name)
    module = OnnxSlice(constants, from_inputs)
    mapping = OnnxMapping((node.input_values[0], *computed), node.output_values)
    return OperationConverterResult(module, mapping)
