"""CIFAR-10 and CIFAR-100 read from their Python batch files without unpickling code.

The batch files are pickles, and ``pickle.load`` on a file from the user's --data-root would run
whatever the file asks for. The genuine files hold only dicts of strings, lists of ints and uint8
numpy arrays, so they are read by an unpickler that builds nothing else.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from robaudit.data.source import one_line
from robaudit.errors import DataError

_IMAGE_BYTES = 3 * 32 * 32


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(text, 'latin1'); other codecs
    # (zlib, base64, ...) are never needed and are refused.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"global '_codecs.encode' with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _allowed() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # Files pickled by numpy 1 name numpy.core, by numpy 2 numpy._core: the same functions.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArraysOnly(pickle.Unpickler):
    """Builds only numpy arrays, dtypes and scalars besides Python's plain containers."""

    _ALLOWED = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}'")
        return found


def read_batch(path: Path) -> dict[str, Any]:
    """One CIFAR batch or meta file as a dict, refusing any pickled object but arrays."""
    try:
        with path.open("rb") as f:
            content = _ArraysOnly(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{path} holds pickled Python objects ({one_line(exc)}) that no CIFAR batch file "
            "holds, which robaudit will not unpickle because that can run code; replace it with "
            "the genuine file (delete it; --download fetches it)"
        ) from exc
    except Exception as exc:  # truncated or foreign files fail in many ways, all meaning one
        raise DataError(
            f"cannot read {path} as a CIFAR batch file ({one_line(exc)}); replace it with the "
            "genuine file (delete it; --download fetches it)"
        ) from exc
    if not isinstance(content, dict):
        raise DataError(
            f"{path} holds a {type(content).__name__}, not a CIFAR batch (a dict); replace it "
            "with the genuine file (delete it; --download fetches it)"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in content.items()}


class CifarImages(torch.utils.data.Dataset[tuple[Any, int]]):
    """CIFAR images (N, 32, 32, 3 uint8) and labels; items are (transform(PIL image), label)."""

    def __init__(self, data: np.ndarray, targets: list[int], classes: list[str],
                 transform: Callable[[Any], Any]) -> None:
        self.data = data
        self.targets = targets
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def load_cifar(name: str, root: Path, split: str, download: bool,
               transform: Callable[[Any], Any]) -> CifarImages:
    """CIFAR-10 or -100 (``name``) from ``root``, downloaded there first when ``download``."""
    from torchvision import datasets

    source = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = root / source.base_folder
    files = [n for n, _ in (source.train_list if split == "train" else source.test_list)]
    meta_file, names_key = source.meta["filename"], source.meta["key"]
    if download and not all((folder / n).is_file() for n in [*files, meta_file]):
        from torchvision.datasets.utils import download_and_extract_archive

        # torchvision checks the archive's md5 before extracting it.
        download_and_extract_archive(source.url, str(root), filename=source.filename,
                                     md5=source.tgz_md5)
    missing = [n for n in [*files, meta_file] if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"{name} ({split}) at {root}: not found (no {folder / missing[0]}); pass --download "
            "to fetch it, or fix --data-root"
        )
    images, targets = [], []
    for file_name in files:
        batch = read_batch(folder / file_name)
        data, labels = _checked(batch, folder / file_name)
        images.append(data)
        targets += labels
    classes = _names(read_batch(folder / meta_file), names_key, folder / meta_file)
    if targets and max(targets) >= len(classes):
        raise DataError(
            f"{folder}: labels go up to {max(targets)} but {meta_file} names {len(classes)} "
            "classes; replace the files with the genuine ones (delete them; --download fetches "
            "them)"
        )
    data = np.vstack(images).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
    return CifarImages(np.ascontiguousarray(data), targets, classes, transform)


def _checked(batch: dict[str, Any], path: Path) -> tuple[np.ndarray, list[int]]:
    data = batch.get("data")
    labels = batch.get("labels", batch.get("fine_labels"))
    ok = (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
        and data.shape[1] == _IMAGE_BYTES and isinstance(labels, list)
        and len(labels) == len(data)
        and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in labels)
    )
    if not ok:
        raise DataError(
            f"{path} is not a CIFAR batch: it needs 'data' (uint8, N x {_IMAGE_BYTES}) and "
            "'labels' or 'fine_labels' (N integers); replace it with the genuine file "
            "(delete it; --download fetches it)"
        )
    return data, [int(k) for k in labels]


def _names(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(
            f"{path} has no list of class names under {key!r}; replace it with the genuine file "
            "(delete it; --download fetches it)"
        )
    return list(names)
