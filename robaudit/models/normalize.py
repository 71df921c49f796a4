"""Per-channel input normalisation as a module, so attacks always work in [0,1] pixel space."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from robaudit.errors import ConfigError, DataError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for pixel batches shaped (N, C, H, W).

    mean and std are buffers shaped (1, C, 1, 1), so they follow ``.to(device)`` and are saved
    with the model. One value broadcasts over every channel (grey-scale statistics).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t, std_t = _validated(mean, std)
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.mean.shape[1]
        # Broadcasting would turn a channel mismatch into an opaque shape error deep in the model.
        if channels != 1 and (x.dim() != 4 or x.shape[1] != channels):
            raise DataError(
                f"input batch has shape {tuple(x.shape)} but mean/std have {channels} channels; "
                "give images shaped (N, C, H, W) with as many channels as mean and std"
            )
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _validated(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Check mean/std and return them as float32 vectors; ConfigError names the problem."""
    try:
        mean_list = [float(v) for v in mean]
        std_list = [float(v) for v in std]
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"mean and std must be sequences of numbers, got mean={mean!r} std={std!r}"
        ) from exc
    if not mean_list or len(mean_list) != len(std_list):
        raise ConfigError(
            f"mean has {len(mean_list)} values and std has {len(std_list)}; "
            "give one value per input channel for both (e.g. 3 for RGB)"
        )
    if not all(math.isfinite(v) for v in mean_list + std_list):
        raise ConfigError(f"mean and std must be finite, got mean={mean_list} std={std_list}")
    if any(v <= 0 for v in std_list):
        raise ConfigError(f"every std value must be > 0, got std={std_list}")
    if any(abs(v) > 1 for v in mean_list):
        # robaudit feeds pixels in [0,1]; (255x - m)/s == (x - m/255)/(s/255), so dividing both
        # by 255 is right even for a model trained on 0-255 inputs.
        raise ConfigError(
            f"mean={mean_list} looks like 0-255 pixel units but robaudit feeds pixels in [0,1]; "
            "divide both mean and std by 255"
        )
    return torch.tensor(mean_list, dtype=torch.float32), torch.tensor(std_list, dtype=torch.float32)


def make_normalize(mean: Sequence[float] | None, std: Sequence[float] | None) -> Normalize | None:
    """A Normalize for the given statistics, None when neither is given."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        missing = "std" if std is None else "mean"
        raise ConfigError(f"mean and std go together but {missing} is missing; give both or none")
    return Normalize(mean, std)
