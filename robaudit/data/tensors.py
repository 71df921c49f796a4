"""Images held in memory: .npz files with arrays x and y, and .pt files holding {'x', 'y'}."""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robaudit.data.channels import Channels
from robaudit.data.source import one_line
from robaudit.errors import DataError, first_line

# Float images may carry rounding error from whoever scaled them; beyond this they are not [0, 1].
RANGE_TOLERANCE = 1e-6
_SAVE_PLAIN = (
    "save plain tensors instead, torch.save({'x': images, 'y': labels}, path), or arrays with "
    "np.savez(path, x=images, y=labels)"
)


class TensorImages(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Images in memory as one NCHW tensor, uint8 0-255 or float32 0-1, made float per batch.

    Keeping uint8 images as uint8 costs a quarter of the memory of float32; :meth:`batch` slices
    many items at once, which is what :func:`robaudit.data.iter_batches` uses.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, image_size: int | None = None,
        channels: Channels | None = None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.image_size = image_size
        self.channels = channels or Channels()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch(torch.tensor([index]))
        return x[0], int(y[0])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``index`` as (x float32 NCHW in [0, 1], y int64)."""
        x = self.images[index]
        x = x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x.to(torch.float32)
        x = self.channels.tensor(x)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size,) * 2:
            from torchvision.transforms.v2 import functional as F

            x = F.resize(x, [self.image_size], antialias=True)
            x = F.center_crop(x, [self.image_size, self.image_size]).clamp_(0, 1)
        return x, self.labels[index]


def load_tensor_file(
    path: Path, image_size: int | None, channels: Channels | None = None
) -> tuple[TensorImages, np.ndarray, list[str] | None]:
    """Read a .npz or .pt file into (dataset, targets, class names it carries or None)."""
    arrays = _read_npz(path) if path.suffix.lower() == ".npz" else _read_pt(path)
    where = str(path)
    if "x" not in arrays or "y" not in arrays:
        raise DataError(
            f"{where} holds {sorted(arrays) or 'nothing'}; robaudit needs 'x' (images) and "
            "'y' (integer labels)"
        )
    x, y = np.asarray(arrays["x"]), np.asarray(arrays["y"])
    if x.size == 0 or y.size == 0:
        raise DataError(
            f"{where} contains no examples (x has shape {x.shape}, y has shape {y.shape}); "
            "store at least one image and label"
        )
    targets = _labels(y, len(x), where)
    images = _images_nchw(x, where)
    names = _class_names(arrays["class_names"], where) if "class_names" in arrays else None
    return TensorImages(images, torch.from_numpy(targets), image_size, channels), targets, names


def _read_npz(path: Path) -> dict[str, Any]:
    # np.load falls back to unpickling anything that is not a zip; say what is wrong instead.
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"cannot read {path}: it is not an .npz (zip) archive; write it with "
            "np.savez(path, x=images, y=labels)"
        )
    try:
        # allow_pickle=False: an .npz must not be able to run code when it is read.
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(
                f"{path} holds Python objects, which robaudit does not unpickle; store x and y as "
                "numeric arrays and class_names as a str array (np.array(names, dtype=str))"
            ) from exc
        raise DataError(f"cannot read {path}: {one_line(exc)}; write it with np.savez") from exc
    except Exception as exc:  # a broken zip raises any of several types, all meaning "unreadable"
        raise DataError(f"cannot read {path}: {one_line(exc)}; write it with np.savez") from exc


def _read_pt(path: Path) -> dict[str, Any]:
    try:
        # weights_only=True: a .pt file is a pickle, and only plain tensors and containers are safe.
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message suggests weights_only=False, the one thing not to do with it.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise DataError(
            f"cannot read {path} safely (torch.load with weights_only=True): it holds pickled "
            f"Python objects{what} besides tensors, which robaudit will not unpickle because "
            f"that can run code; {_SAVE_PLAIN}"
        ) from exc
    except Exception as exc:  # zip, storage and EOF errors come in many types, all meaning one
        raise DataError(
            f"cannot read {path} as a torch.save file ({first_line(exc)}); {_SAVE_PLAIN}"
        ) from exc
    if not isinstance(content, Mapping):
        raise DataError(
            f"{path} holds a {type(content).__name__}, not a dict; "
            "save it with torch.save({'x': images, 'y': labels})"
        )
    arrays: dict[str, Any] = {}
    for key, value in content.items():
        if isinstance(value, torch.Tensor):
            # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
            value = value.float() if value.dtype == torch.bfloat16 else value
            arrays[str(key)] = value.detach().cpu().numpy()
        else:
            arrays[str(key)] = value
    return arrays


def _labels(y: np.ndarray, count: int, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{where}: y has shape {y.shape}; store one integer label per example "
            "(for one-hot labels, y.argmax(1))"
        )
    if y.dtype.kind not in "iu":
        raise DataError(
            f"{where}: labels must be integers, but y has dtype {y.dtype}; "
            "store y as an integer array (e.g. y.astype(np.int64))"
        )
    if len(y) != count:
        raise DataError(
            f"{where}: x has {count} examples but y has {len(y)} labels; store one label per image"
        )
    if int(y.min()) < 0:
        raise DataError(f"{where}: labels must be >= 0, but y holds {int(y.min())}")
    return y.astype(np.int64)


def _images_nchw(x: np.ndarray, where: str) -> torch.Tensor:
    if x.ndim == 3:  # N,H,W: grayscale without a channel axis
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(
            f"{where}: x has shape {x.shape}; store images as N,C,H,W or N,H,W,C "
            "(or N,H,W for grayscale)"
        )
    # NCHW wins when both axes could be channels (e.g. N,3,32,3): it is torch's layout.
    if x.shape[1] not in (1, 3):
        if x.shape[3] not in (1, 3):
            raise DataError(
                f"{where}: x has shape {x.shape}; found no channel axis of size 1 or 3 at "
                "position 1 (N,C,H,W) or 3 (N,H,W,C)"
            )
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype.kind != "f":
        raise DataError(f"{where}: x has dtype {x.dtype}; store images as uint8 0-255 or float 0-1")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: x holds NaN or infinite values; store finite pixels in [0, 1]")
    low, high = float(x.min()), float(x.max())
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise DataError(
            f"{where}: float pixels must lie in [0, 1] but range over [{low:g}, {high:g}]; "
            "scale them to [0, 1] (before any normalisation) or store uint8 0-255"
        )
    np.clip(x, 0, 1, out=x)
    return torch.from_numpy(x)


def _class_names(names: Any, where: str) -> list[str]:
    array = np.asarray(names)
    if array.ndim != 1 or array.dtype.kind not in "US" or len(array) == 0:
        raise DataError(
            f"{where}: class_names must be a non-empty 1-D array of strings, got "
            f"dtype {array.dtype} and shape {array.shape}"
        )
    result = [n.decode() if isinstance(n, bytes) else str(n) for n in array.tolist()]
    if len(set(result)) != len(result):
        raise DataError(f"{where}: class_names has duplicates; class names must be unique")
    return result
