"""Model loading: any supported file becomes an eval-mode nn.Module that takes pixels in [0,1].

Formats are told apart by content first and extension second: ONNX (converted with onnx2torch and
kept next to the original in onnxruntime), torch.export archives (.pt2), TorchScript archives, and
state dicts (torch.save or .safetensors) with an ``arch``. Normalisation, when given, is part of
the returned module, so attacks measure eps in pixel units.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from robaudit.errors import ConfigError, ModelLoadError, first_line
from robaudit.models.arch import build_arch, fit_model, input_channels, output_count
from robaudit.models.detect import (
    ONNX,
    SAFETENSORS,
    TORCH_EXPORT,
    TORCH_SAVE,
    TORCHSCRIPT,
    detect_format,
)
from robaudit.models.exported import load_exported
from robaudit.models.normalize import Normalize, make_normalize
from robaudit.models.state_dict import load_state_dict
from robaudit.models.torchscript import load_torchscript

__all__ = [
    "LoadedModel", "Normalize", "input_channels", "load_model", "output_count", "verify_runtime"
]


@dataclass
class LoadedModel:
    """A model ready to audit, and where it came from."""

    #: Eval mode; takes pixels in [0,1] (Normalize inside when mean/std were given); returns logits.
    #: With normalisation it is ``nn.Sequential(Normalize, model)``, so ``module[1]`` is the model
    #: as stored in the file.
    module: nn.Module
    #: "onnx" | "torch.export" | "torchscript" | "state_dict"
    format: str
    path: Path
    #: ONNX only: runs the original file in onnxruntime on pixel input (normalising first) and
    #: returns logits on the CPU; None for the other formats.
    runtime: Callable[[torch.Tensor], torch.Tensor] | None
    #: One line for reports, e.g. "model.onnx (ONNX opset 18, onnxruntime CPUExecutionProvider)".
    description: str


class _NormalizedRuntime:
    """Runs an ONNX file in onnxruntime on pixel input, applying the same normalisation first."""

    def __init__(self, runner: Callable[[torch.Tensor], torch.Tensor], normalize: Normalize | None):
        self.runner = runner
        # A CPU copy: the audited module's Normalize moves to the audit device with the model.
        self.normalize = copy.deepcopy(normalize).cpu() if normalize is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float()
        if self.normalize is not None:
            x = self.normalize(x)
        return self.runner(x)


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load a model file for auditing.

    ``arch`` ("torchvision:NAME" or "package.module:factory", the latter imports and runs that
    code) and ``num_classes`` apply only to state dicts, which hold weights but no architecture.
    Raises ModelLoadError for files that cannot be read or trusted, ConfigError for bad options.
    """
    path = Path(path)
    normalize = make_normalize(mean, std)
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    file_format = detect_format(path)

    runtime: Callable[[torch.Tensor], torch.Tensor] | None = None
    if file_format in (TORCH_SAVE, SAFETENSORS):
        model, fmt, detail = _load_state_dict_model(path, file_format, arch, num_classes)
    else:
        if arch is not None or num_classes is not None:
            option = "--arch" if arch is not None else "--num-classes"
            raise ModelLoadError(
                f"{path} is a {_FORMAT_NAMES[file_format]}, which carries its own architecture; "
                f"drop {option} (it is only for state dicts)"
            )
        if file_format == ONNX:
            model, runner, detail = _load_onnx(path)
            runtime = _NormalizedRuntime(runner, normalize)
            fmt = "onnx"
        elif file_format == TORCH_EXPORT:
            model, batch = load_exported(path)
            fmt, detail = "torch.export", f"torch.export, {batch}"
        else:
            model, fmt, detail = load_torchscript(path), "torchscript", "TorchScript"

    module: nn.Module = model if normalize is None else nn.Sequential(normalize, model)
    module = _to_device(module, device).eval()
    return LoadedModel(
        module=module,
        format=fmt,
        path=path,
        runtime=runtime,
        description=f"{path.name} ({detail})",
    )


def verify_runtime(model: LoadedModel, x: torch.Tensor) -> float | None:
    """For ONNX, check the converted module against onnxruntime on the pixel batch ``x``.

    Both see the same normalised input. Returns the largest absolute logit difference, or None
    for formats that have no separate runtime. Raises ModelLoadError when they disagree.
    """
    if model.format != "onnx" or model.runtime is None:
        return None
    from robaudit.models.onnx import check_against_runtime

    # The audited module (Normalize included) against the original file behind the same
    # normalisation: exactly what the attacks will differentiate through.
    x = x.detach().to(device=_module_device(model.module), dtype=torch.float32)
    return check_against_runtime(model.module, model.runtime, x)  # type: ignore[arg-type]


_FORMAT_NAMES = {
    ONNX: "ONNX model",
    TORCH_EXPORT: "torch.export archive",
    TORCHSCRIPT: "TorchScript archive",
}


def _load_state_dict_model(
    path: Path, file_format: str, arch: str | None, num_classes: int | None
) -> tuple[nn.Module, str, str]:
    if arch is None:
        # Read the file first so that a pickled module or unsafe pickle gets its own message.
        state = load_state_dict(path, file_format)
        raise ModelLoadError(
            f"{path} is a state dict ({len(state)} tensors, e.g. {next(iter(state))!r}): weights "
            "without an architecture; pass --arch torchvision:NAME or --arch package.module:factory"
        )
    model = build_arch(arch, num_classes)
    state = load_state_dict(path, file_format)
    model = fit_model(model, state, arch, num_classes)
    source = "safetensors" if file_format == SAFETENSORS else "state dict"
    return model, "state_dict", f"{source} on {arch}"


def _load_onnx(path: Path) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], str]:
    # Imported here: onnx, onnx2torch and onnxruntime are heavy and only needed for ONNX files.
    from robaudit.models.onnx import load_onnx

    module, runner = load_onnx(path)
    providers = ", ".join(getattr(runner, "providers", None) or ["onnxruntime"])
    opset = _onnx_opset(path)
    opset_text = f"ONNX opset {opset}, " if opset is not None else "ONNX, "
    return module, runner, f"{opset_text}onnxruntime {providers}"


def _onnx_opset(path: Path) -> int | None:
    """The default-domain opset of an ONNX file, None when it cannot be read."""
    try:
        import onnx

        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # only the description suffers; load_onnx already validated the file
        return None
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _to_device(module: nn.Module, device: str | torch.device) -> nn.Module:
    try:
        return module.to(torch.device(device))
    except (RuntimeError, AssertionError, ValueError) as exc:  # torch's ways to say "no device"
        raise ConfigError(
            f"cannot put the model on device {str(device)!r} ({first_line(exc)}); choose an "
            "available device such as 'cpu' or 'cuda:0'"
        ) from exc


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
