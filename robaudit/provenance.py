"""Where a report's figures came from: versions and hardware."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch

from robaudit import __version__


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, for the report's provenance."""

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    onnxruntime = version("onnxruntime-gpu") or version("onnxruntime")
    return {
        "robaudit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "onnx": version("onnx"),
        "onnx2torch": version("onnx2torch"),
        "onnxruntime": onnxruntime,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine()
        ),
        "threads": torch.get_num_threads(),
    }
