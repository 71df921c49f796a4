"""Load ONNX classifiers as torch modules (via onnx2torch) and check them against onnxruntime.

PGD needs exact input gradients, so the ONNX graph is converted to torch with onnx2torch; the
original file stays runnable in onnxruntime so that the conversion can be checked on real data.
onnx2torch predates the opsets that current exporters emit: robaudit.models.onnx_fixes registers
the missing converters and rewrites the graph patterns it mishandles before converting.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import warnings
from collections.abc import Iterator
from importlib import metadata

import numpy as np
import onnx
import onnx2torch
import onnxruntime
import torch
from google.protobuf.message import DecodeError
from onnx2torch.node_converters.registry import get_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from torch import nn

from robaudit.errors import DataError, ModelLoadError
from robaudit.models.onnx_fixes import all_nodes, fix_graph

__all__ = ["OrtRunner", "check_against_runtime", "load_onnx", "logged_warnings"]

_LOG = logging.getLogger(__name__)


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


@contextlib.contextmanager
def logged_warnings() -> Iterator[None]:
    """Send the warnings raised inside (onnx2torch's, onnxruntime's, torch's) to robaudit's log.

    They speak to whoever maintains the converter, not to someone auditing a model, whose
    terminal they would clutter; ``robaudit scan -v`` shows the log. Whether the conversion can
    be trusted is decided by the check against onnxruntime, not by these warnings.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                _LOG.info(
                    "%s while converting the model: %s (%s:%d)",
                    warning.category.__name__,
                    warning.message,
                    warning.filename,
                    warning.lineno,
                )


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
        attribute.t for node in all_nodes(model.graph) for attribute in node.attribute
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

    with logged_warnings():
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
    rtol: float = 1e-3,
) -> float:
    """Compare ``module(x)`` with onnxruntime on a real batch; return the max absolute difference.

    The tolerance is relative to the logits' scale (their largest magnitude in onnxruntime over
    the batch): a logit may differ by at most ``rtol`` times that. An absolute tolerance cannot
    judge models whose logits are tiny (efficientnet_b0 at initialisation: 3e-14) or huge.
    Raises DataError when onnxruntime itself refuses ``x``, ModelLoadError when the converted
    module fails on an input that onnxruntime runs, or when the two disagree.
    """
    shape = tuple(x.shape[1:])
    try:
        reference = runner(x)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise DataError(
            f"the model cannot run on the data's inputs of shape {shape}: onnxruntime says "
            f"{_one_line(exc, 200)}; check --image-size, the channel count, and that the model "
            "matches the data set"
        ) from exc
    try:
        with torch.no_grad():
            converted = module(x).detach().to("cpu", torch.float32)
    except Exception as exc:  # whatever the converted module raises, the graph ran this input
        raise ModelLoadError(
            f"onnxruntime runs the model on inputs of shape {shape}, but robaudit's torch "
            f"conversion of it fails ({type(exc).__name__}: {_one_line(exc, 200)}); the "
            "conversion is at fault, not the data: please report it, or save the model with "
            "torch.export (.pt2)"
        ) from exc
    if converted.shape != reference.shape:
        raise ModelLoadError(
            f"the converted model gives logits of shape {tuple(converted.shape)} but onnxruntime "
            f"gives {tuple(reference.shape)}; the conversion is not trustworthy: please report it"
        )
    difference = (converted - reference).abs()
    max_difference = float(difference.max()) if difference.numel() else 0.0
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    if not torch.isfinite(difference).all() or max_difference > rtol * scale:
        raise ModelLoadError(
            f"the converted model differs from onnxruntime by up to {max_difference:.3g} on "
            f"logits of scale {scale:.3g} (tolerance {rtol:g} of the scale); the conversion is "
            "not trustworthy: please report it"
        )
    return max_difference
