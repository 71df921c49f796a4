"""Checkpoints: written atomically after every epoch, read back with ``weights_only=True``.

A checkpoint holds only tensors and plain data: the model's and the optimiser's state, the
weighting scheme's state (with CFA's weight average), the budget, the best state so far, the
history of epochs, the global torch RNG state and the settings that must match on resume.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from robaudit.errors import UsageError
from robaudit.reports import atomic_write

FORMAT = "robaudit.harden.checkpoint"
VERSION = 2


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` so that a kill at any moment leaves the old file or the new."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint for ``--resume``; UsageError when it is missing or from another run."""
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
    differs = [k for k, v in identity.items() if state.get("identity", {}).get(k) != v]
    if differs:
        raise UsageError(
            f"--resume: checkpoint {path} was made with other settings ({', '.join(differs)}); "
            "resume with the same command, or start again without --resume"
        )
    return state
