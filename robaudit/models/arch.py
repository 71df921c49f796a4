"""Architectures for state dicts (``--arch``), and fitting a state dict into one.

``torchvision:NAME`` builds an untrained torchvision model (never downloading weights);
``package.module:factory`` imports and runs that Python code, so it is as trusted as the user who
names it.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from robaudit.errors import ModelLoadError, first_line


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


def _some(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... {len(items) - limit} more" if len(items) > limit else "")
