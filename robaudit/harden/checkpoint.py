"""Checkpoints: written atomically after every epoch, read back with ``weights_only=True``.

A checkpoint holds only tensors and plain data: the model's and the optimiser's state, the
weighting scheme's state (with CFA's weight average), the budget, the best state so far, the
history of epochs, the global torch RNG state and the settings that must match on resume,
among them the input model file's SHA-256. ``--resume`` checks every field's presence and type,
that the weights fit the model and are finite, before anything runs.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from robaudit.errors import UsageError
from robaudit.reports import atomic_write

FORMAT = "robaudit.harden.checkpoint"
VERSION = 4
#: What ``--resume`` reads: each field's type, or the fields of a nested dict (a float field
#: takes an int too).
FIELDS: dict[str, Any] = {
    "identity": dict, "model": dict, "optimizer": {"state": dict, "param_groups": list},
    "scheme": dict, "rng": torch.Tensor, "epoch": int,
    "budget": {**dict.fromkeys(("max_mean_drop", "max_clean_drop", "mean_floor", "clean_floor"),
                               float), "keep_passing": list},
    "best": {"epoch": int, "state": dict,
             "validation": {"clean": list, "robust": list, "clean_acc": float,
                            "mean_robust": float, "worst_robust": float, "worst_class": str}},
    "history": list, "class_names": list, "ema": dict,
}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` so that a kill at any moment leaves the old file or the new."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path, identity: dict[str, Any],
                    model: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Read a checkpoint for ``--resume``; UsageError when it is missing, damaged, from another
    run, or (given the ``model``'s state dict) of another model or with non-finite weights."""
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}; run without --resume to start, "
                         "or pass --checkpoint with the file of the interrupted run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise UsageError(f"--resume: cannot read checkpoint {path} ({type(exc).__name__}); "
                         "delete it and start again without --resume") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"--resume: {path} is not a robaudit harden checkpoint")
    if state.get("version") != VERSION:
        raise UsageError(f"--resume: checkpoint {path} was written by another version of "
                         "robaudit harden; start again without --resume")
    _check_fields(path, state, FIELDS, "")
    if model is not None:
        _check_model(path, state, model, identity)
    differs = [k for k, v in identity.items() if state["identity"].get(k) != v]
    if differs:
        raise UsageError(
            f"--resume: checkpoint {path} was made with other settings ({', '.join(differs)}); "
            "resume with the same command, or start again without --resume"
        )
    for where, value in _tensors(state, ("model", "best", "optimizer")):
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise UsageError(f"--resume: checkpoint {path} holds non-finite weights ({where}): "
                             "the run it saved had diverged; start again without --resume, "
                             "with a smaller --lr")
    return state


def _check_fields(path: Path, state: dict[str, Any], fields: dict[str, Any], at: str) -> None:
    for key, kind in fields.items():
        value, where = state.get(key), f"{at}{key}"
        ok = isinstance(value, dict) if isinstance(kind, dict) else (
            isinstance(value, (int, float)) if kind is float else isinstance(value, kind))
        if not ok or isinstance(value, bool):
            name = "a dict" if isinstance(kind, dict) else f"a {kind.__name__}"
            raise UsageError(f"--resume: checkpoint {path} is damaged: {where} is missing or "
                             f"not {name}; delete it and start again without --resume")
        if isinstance(kind, dict):
            _check_fields(path, value, kind, f"{where}.")


def _check_model(path: Path, state: dict[str, Any], model: Mapping[str, torch.Tensor],
                 identity: dict[str, Any]) -> None:
    """The checkpoint's weights must have the model's names and shapes, and its input model
    file the same SHA-256."""
    for where, weights in (("model", state["model"]), ("best.state", state["best"]["state"])):
        shapes = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
        wanted = {k: tuple(v.shape) for k, v in model.items()}
        odd = sorted(set(shapes.items()) ^ set(wanted.items()))
        if odd or len(shapes) != len(weights):
            reason = f"its {where} has other weights: {odd[0][0] if odd else 'not tensors'}"
            raise _other_model(path, reason)
    if state["identity"].get("model_sha256") != identity.get("model_sha256"):
        raise _other_model(path, "the model file's SHA-256 differs")


def _other_model(path: Path, reason: str) -> UsageError:
    return UsageError(f"--resume: checkpoint {path} was made for another model ({reason}); "
                      "resume with the interrupted run's model, or start again without --resume")


def _tensors(value: Any, keys: tuple[str, ...] | None = None,
             at: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor under ``value`` (under its ``keys`` only, when given), with its path."""
    if isinstance(value, torch.Tensor):
        return [(at, value)]
    if isinstance(value, dict):
        items = [(k, value[k]) for k in keys if k in value] if keys else value.items()
        return [t for k, v in items for t in _tensors(v, None, f"{at}.{k}" if at else str(k))]
    if isinstance(value, (list, tuple)):
        return [t for i, v in enumerate(value) for t in _tensors(v, None, f"{at}[{i}]")]
    return []


def model_sha256(path: str) -> str:
    """The SHA-256 of a model file (read once per file version: every epoch's checkpoint
    stores it)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
