"""Write the hardened model in the input's format, to a temporary file beside it then renamed.

- ONNX: ``torch.onnx.export`` of the trained converted module (dynamo exporter, opset 18, the
  original input and output names, a dynamic batch axis unless the input graph had a fixed one;
  the legacy exporter at opset 17 if the dynamo exporter fails), then checked against an
  onnxruntime session on a real batch (a mismatch is an error).
- torch.export (.pt2): the trained program module exported again with ``torch.export`` (dynamic
  batch unless the input program had a static one). The program keeps the train/eval behaviour
  it was exported with, so BatchNorm statistics stay frozen and dropout stays off in training.
- TorchScript: the trained module saved with ``torch.jit.save`` (with calibration: scripted
  inside a Sequential with the bias layer).
- State dict (.pt/.pth/.safetensors): the architecture's ``state_dict()``; a calibration bias
  cannot be appended to weights without code, so ``--calibrate`` is refused for state dicts.

The calibration bias, when there is one, is a final layer adding a constant per-class vector to
the logits. Normalisation given with ``--mean/--std`` is not written into the model (the
input file did not have it either): scan the output with the same options.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from robaudit.errors import ConfigError, ModelLoadError
from robaudit.harden.train import LogitBias
from robaudit.models import LoadedModel, Normalize
from robaudit.models.exported import ExportedModule
from robaudit.models.onnx import FixedBatch, OrtRunner, check_against_runtime
from robaudit.reports import atomic_write, temporary_beside

ONNX_OPSET = 18


def split_normalize(module: nn.Module) -> tuple[Normalize | None, nn.Module]:
    """``(Normalize or None, the model as stored in the file)`` of a loaded module."""
    if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], Normalize):
        return module[0], module[1]
    return None, module


def check_exportable(loaded: LoadedModel, calibrate: bool) -> None:
    """Refuse, before any training, what cannot be written back."""
    if loaded.format == "state_dict" and calibrate:
        raise ConfigError(
            "--calibrate appends a bias layer to the model, which a state dict (weights without "
            "code) cannot hold; export the model with torch.export (.pt2) or ONNX first"
        )


def write_model(loaded: LoadedModel, out: Path, example: torch.Tensor,
                bias: list[float] | None) -> float | None:
    """Write the (trained) ``loaded.module`` to ``out``; for ONNX, the max logit difference
    between torch and onnxruntime on ``example`` (pixels in [0, 1])."""
    normalize, core = split_normalize(loaded.module)
    core = core.cpu().eval()
    x = example.detach().cpu().float()
    if normalize is not None:
        x = normalize.cpu()(x)
    head = None if bias is None else LogitBias(torch.tensor(bias))
    if loaded.format == "onnx":
        return _write_onnx(core, loaded.path, out, x, head)
    if loaded.format == "torch.export":
        _write_exported(core, out, x, head)
    elif loaded.format == "torchscript":
        final = core if head is None else torch.jit.script(nn.Sequential(core, head))
        buffer = io.BytesIO()
        torch.jit.save(final, buffer)
        atomic_write(out, buffer.getvalue())
    else:
        _write_state_dict(core, out)
    return None


def _with_head(module: nn.Module, head: LogitBias | None) -> nn.Module:
    # No .eval() here: a torch.export program module refuses train/eval toggling, and the bias
    # layer behaves the same in both modes.
    return module if head is None else nn.Sequential(module, head)


def _write_onnx(core: nn.Module, source: Path, out: Path, x: torch.Tensor,
                head: LogitBias | None) -> float:
    original = OrtRunner(source)
    fixed = core.batch_size if isinstance(core, FixedBatch) else None
    final = _with_head(core.module if isinstance(core, FixedBatch) else core, head).eval()
    example = x[:1].expand(fixed, *x.shape[1:]).contiguous() if fixed else x[:2]
    batch = torch.export.Dim("batch", min=1)
    # The exporters need a file name; the file gets the user's umask mode, as reports do.
    tmp = temporary_beside(out, ".onnx")
    names = {"input_names": [original.input_name], "output_names": [original.output_name]}
    try:
        try:
            program = torch.onnx.export(
                final, (example,), dynamo=True, opset_version=ONNX_OPSET, **names,
                dynamic_shapes=None if fixed else ({0: batch},), external_data=False,
                verbose=False,
            )
            program.save(str(tmp), external_data=False)
        except Exception:  # the dynamo exporter fails on some graphs the legacy one handles
            torch.onnx.export(
                final, (example,), str(tmp), dynamo=False, opset_version=17, **names,
                dynamic_axes=None if fixed else {names["input_names"][0]: {0: "batch"}},
            )
        runner = OrtRunner(tmp)
        check_model = final if fixed is None else FixedBatch(final, fixed)
        difference = check_against_runtime(check_model, runner, x)
        os.replace(tmp, out)
    except ModelLoadError as exc:
        raise ModelLoadError(f"the hardened ONNX model does not match onnxruntime: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return difference


def _write_exported(core: nn.Module, out: Path, x: torch.Tensor, head: LogitBias | None) -> None:
    program_module = core.program if isinstance(core, ExportedModule) else core
    static = core.static_batch if isinstance(core, ExportedModule) else None
    final = _with_head(program_module, head)
    example = x[:1].expand(static, *x.shape[1:]).contiguous() if static else x[:2]
    dynamic = None if static else ({0: torch.export.Dim("batch", min=1)},)
    program = torch.export.export(final, (example,), dynamic_shapes=dynamic)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write(out, buffer.getvalue())


def _write_state_dict(core: nn.Module, out: Path) -> None:
    state = {name: value.detach().cpu().contiguous() for name, value in core.state_dict().items()}
    if out.suffix.lower() == ".safetensors":
        from safetensors.torch import save

        atomic_write(out, save(state))
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(out, buffer.getvalue())
