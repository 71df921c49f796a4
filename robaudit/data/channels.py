"""The channel count images reach the model with: 1 (greyscale) or 3 (RGB)."""

from __future__ import annotations

import torch
from PIL import Image

# ITU-R 601-2 luma, the weights PIL's convert("L") uses, so tensors and image files agree.
_LUMA = (0.299, 0.587, 0.114)


class Channels:
    """Converts images to ``count`` channels; None keeps each data set's own.

    One instance is shared by a data set's transform (or its in-memory images) and its
    DataSource, so the count can be set once the model says what it takes.
    """

    def __init__(self, count: int | None = None) -> None:
        self.count = count

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.count is None:
            return image
        mode = "L" if self.count == 1 else "RGB"
        return image if image.mode == mode else image.convert(mode)

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        """The same conversion for a float NCHW batch in [0, 1] with 1 or 3 channels."""
        if self.count is None or x.shape[1] == self.count:
            return x
        if self.count == 3:
            return x.expand(-1, 3, -1, -1).contiguous()
        weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True).clamp_(0, 1)

    def __repr__(self) -> str:
        return f"Channels({self.count})"
