"""Architectures for state dicts (``--arch``), and fitting a state dict into one.

``torchvision:NAME`` builds an untrained torchvision model (never downloading weights);
``package.module:factory`` imports and runs that Python code, so it is as trusted as the user who
names it.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from robaudit.errors import ModelLoadError, first_line
from robaudit.models.exported import ExportedModule

_LOG = logging.getLogger(__name__)


def build_arch(arch: str, num_classes: int | None) -> nn.Module:
    """Build an untrained model from "torchvision:NAME" or "package.module:factory".

    The second form imports and runs the named Python code, like ``python -m`` would.
    """
    source, sep, name = arch.partition(":")
    if not sep or not source or not name:
        hint = f"; did you mean torchvision:{arch}?" if _torchvision_has(arch) else ""
        raise ModelLoadError(
            f"arch {arch!r} should be 'torchvision:NAME' or 'package.module:factory'{hint}"
        )
    if source == "torchvision":
        return _torchvision_model(name, num_classes)
    return _factory_model(source, name, num_classes, arch)


def _torchvision_has(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models()


def _torchvision_model(name: str, num_classes: int | None) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "see torchvision's list_models()"
        raise ModelLoadError(f"torchvision has no model named {name!r}; {hint}")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        # weights=None: robaudit never downloads; the weights come from the user's file.
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception as exc:  # torchvision rejects some num_classes/arch combinations
        raise ModelLoadError(
            f"cannot build torchvision:{name} with num_classes={num_classes} ({first_line(exc)})"
        ) from exc


def _factory_model(module_name: str, attr: str, num_classes: int | None, arch: str) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import {module_name!r} for arch {arch!r} ({exc}); install it or add its "
            "folder to PYTHONPATH"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"{module_name} has no callable {attr!r} for arch {arch!r}")
    try:
        model = factory(num_classes=num_classes) if num_classes is not None else factory()
    except Exception as exc:  # user code: report it, keep the traceback chained
        raise ModelLoadError(
            f"arch factory {arch} raised {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"arch factory {arch} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    """Load ``state`` into ``model`` strictly, naming mismatched keys and shapes on failure."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_some(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_some(unexpected)})")
        raise ModelLoadError(
            f"the state dict does not fit arch {arch}: {' and '.join(parts)} keys; "
            "check that --arch names the architecture the weights were trained with"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ModelLoadError(
            f"the state dict does not fit arch {arch}: shapes differ (file vs arch) for "
            f"{_some(wrong)}; check --arch and --num-classes"
        )
    model.load_state_dict(state, strict=True)


def fit_model(
    model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, num_classes: int | None
) -> nn.Module:
    """``model`` (built from ``arch``) with ``state`` loaded; rebuilt first with the state's class
    count when ``num_classes`` was not given and only the outputs' size differs.

    An architecture's default class count (torchvision's 1000) rarely is the checkpoint's, and the
    checkpoint says its count in the shape of its last layer, so it is not asked for.
    """
    if num_classes is None:
        inferred = _state_classes(model.state_dict(), state)
        if inferred is not None:
            count, layer = inferred
            _LOG.info("--num-classes not given: building %s with %d classes, the size of the "
                      "state dict's %s", arch, count, layer)
            model = build_arch(arch, count)
    fit_state_dict(model, state, arch)
    return model


def _state_classes(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> tuple[int, str] | None:
    """(class count, layer) when the state differs from ``expected`` only in its outputs.

    That is: every tensor of a differing shape differs in its first dimension alone, all by the
    same count, and the architecture's last weight of two or more dimensions is among them (its
    classifier; auxiliary classifiers such as Inception's differ the same way).
    """
    weights = [k for k, v in expected.items() if k.endswith("weight") and v.dim() >= 2]
    if not weights:
        return None
    last = weights[-1]
    counts = set()
    for key, want in expected.items():
        got = state.get(key)
        if got is None or tuple(got.shape) == tuple(want.shape):
            continue
        if got.dim() != want.dim() or got.dim() == 0 or got.shape[1:] != want.shape[1:]:
            return None
        counts.add(int(got.shape[0]))
    if len(counts) != 1 or last not in state or tuple(state[last].shape) == tuple(
        expected[last].shape
    ):
        return None
    return counts.pop(), last


def input_channels(module: nn.Module) -> int | None:
    """The channel count a model's input takes, when its first layer says so; else None.

    torch.export programs record their input shape; other models are asked their first 2-D
    convolution (TorchScript and convolution-free models say nothing).
    """
    for layer in module.modules():
        if isinstance(layer, ExportedModule):
            shape = layer.input_shape
            return shape[1] if len(shape) == 4 and isinstance(shape[1], int) else None
        if isinstance(layer, nn.Conv2d):
            return layer.in_channels
    return None


def output_count(module: nn.Module, x: torch.Tensor) -> int | None:
    """How many logits ``module`` gives for the one-image batch ``x``; None when it cannot run.

    The scan's own first pass reports why a model cannot run, so failures are not raised here.
    """
    try:
        with torch.no_grad():
            out = module(x)
    except Exception:  # any failure is reported, better worded, by the scan's first pass
        return None
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None


def _some(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... {len(items) - limit} more" if len(items) > limit else "")
