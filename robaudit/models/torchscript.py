"""TorchScript archives.

A TorchScript archive runs its own TorchScript code (not Python): it is as trusted as the user who
names it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from robaudit.errors import ModelLoadError, first_line


def load_torchscript(path: Path) -> nn.Module:
    """Load a TorchScript archive onto the CPU."""
    try:
        with warnings.catch_warnings():
            # The deprecation notice is meant for authors, not for someone auditing a model.
            warnings.filterwarnings("ignore", r".*torch\.jit\.load.*deprecated", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch.jit.load raises RuntimeError and others for bad archives
        raise ModelLoadError(
            f"cannot load TorchScript archive {path} ({first_line(exc)}); save it again with "
            "torch.jit.save or export with torch.export instead"
        ) from exc
