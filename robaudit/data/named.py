"""torchvision data sets by name, read from (or downloaded to) a root folder.

None of them unpickles what it reads: CIFAR's batch files are read by :mod:`robaudit.data.cifar`,
torchvision reads MNIST's processed files and ImageNet's meta.bin with
``torch.load(weights_only=True)``, SVHN's and ImageNet's .mat files with scipy's loadmat (no
pickle), STL-10's raw bytes with numpy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robaudit.data.channels import Channels
from robaudit.data.cifar import load_cifar
from robaudit.data.folder import ResizeCrop, load_rgb
from robaudit.data.source import one_line
from robaudit.errors import DataError

TORCHVISION_NAMES = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn", "stl10", "imagenet")

_SPLITS = {
    "mnist": ("train", "test"),
    "fashionmnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "svhn": ("train", "test", "extra"),
    # STL-10's 'unlabeled' split has no labels to audit against.
    "stl10": ("train", "test"),
    "imagenet": ("train", "val"),
}

# ImageNet's standard evaluation: resize to 256/224 of the crop, then a centre crop.
_IMAGENET_CROP = 224
_IMAGENET_RESIZE_RATIO = 256 / 224


def canonical_name(spec: str) -> str | None:
    """The data set name ``spec`` means ('CIFAR-10' -> 'cifar10'), or None."""
    name = spec.strip().lower().replace("-", "").replace("_", "")
    return name if name in TORCHVISION_NAMES else None


def load_named(
    name: str, root: str | Path, *, download: bool, split: str, image_size: int | None,
    channels: Channels,
) -> tuple[torch.utils.data.Dataset[Any], np.ndarray, list[str], str]:
    """Open torchvision's ``name``; (dataset, targets, class names, description)."""
    if name == "imagenet" and split == "test":
        split = "val"  # ImageNet's test labels were never published; val is its test set
    if split not in _SPLITS[name]:
        raise DataError(f"{name} has no split {split!r}; choose one of {', '.join(_SPLITS[name])}")
    if name == "imagenet" and download:
        raise DataError(
            "imagenet cannot be downloaded automatically (its licence needs a manual download); "
            "put ILSVRC2012_devkit_t12.tar.gz and ILSVRC2012_img_val.tar in --data-root and "
            "leave out --download"
        )
    root_path = Path(root).expanduser()
    description = f"{name} ({split}) at {root}"
    if not download and not root_path.is_dir():
        raise DataError(
            f"--data-root {root} is not a folder; point it at the folder holding {name}, "
            "or add --download to fetch it there"
        )
    try:
        dataset = _open(name, root_path, split, download, _transform(name, image_size, channels))
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        if name == "imagenet":
            hint = (
                "put ILSVRC2012_devkit_t12.tar.gz and ILSVRC2012_img_val.tar (or the extracted "
                "val/ folder and meta.bin) in --data-root"
            )
        else:
            hint = "pass --download to fetch it, or fix --data-root"
        raise DataError(f"{description}: not found ({one_line(exc)}); {hint}") from exc
    except OSError as exc:  # network or disk failure while downloading or extracting
        raise DataError(
            f"{description}: could not fetch or read it ({one_line(exc)}); check the network "
            "and that --data-root is writable, or download it by hand"
        ) from exc
    return dataset, _targets(dataset), _class_names(name, dataset), description


def _transform(
    name: str, image_size: int | None, channels: Channels
) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms

    steps: list[Callable[[Any], Any]] = [channels]
    if name == "imagenet":
        crop = image_size or _IMAGENET_CROP
        steps += [
            transforms.Resize(round(crop * _IMAGENET_RESIZE_RATIO)),
            transforms.CenterCrop(crop),
        ]
    elif image_size is not None:
        steps.append(ResizeCrop((image_size, image_size)))
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


def _open(
    name: str, root: Path, split: str, download: bool, transform: Callable[[Any], torch.Tensor]
) -> torch.utils.data.Dataset[Any]:
    from torchvision import datasets

    if name == "imagenet":
        return datasets.ImageNet(str(root), split=split, transform=transform, loader=load_rgb)
    if name in ("cifar10", "cifar100"):
        # Never torchvision's CIFAR loader: it reads the batch files with pickle.load.
        return load_cifar(name, root, split, download, transform)
    if name in ("svhn", "stl10"):
        cls = datasets.SVHN if name == "svhn" else datasets.STL10
        return cls(str(root), split=split, transform=transform, download=download)
    cls = {
        "mnist": datasets.MNIST,
        "fashionmnist": datasets.FashionMNIST,
    }[name]
    return cls(str(root), train=split == "train", transform=transform, download=download)


def _targets(dataset: Any) -> np.ndarray:
    # Labels live in different attributes per data set; none of them decodes an image.
    labels = dataset.labels if hasattr(dataset, "labels") else dataset.targets
    if isinstance(labels, torch.Tensor):
        labels = labels.numpy()
    return np.asarray(labels, dtype=np.int64)


def _class_names(name: str, dataset: Any) -> list[str]:
    if name == "svhn":  # torchvision maps SVHN's digit 0 (stored as 10) to label 0
        return [str(k) for k in range(10)]
    if name != "imagenet":
        return [str(c) for c in dataset.classes]
    # ImageNet classes are tuples of synonyms; the first is the common name, but a few common
    # names repeat ("crane", "maillot"), so those get their WordNet id to stay unique.
    first = [synonyms[0] for synonyms in dataset.classes]
    repeated = {n for n, count in Counter(first).items() if count > 1}
    return [
        f"{n} ({wnid})" if n in repeated else n
        for n, wnid in zip(first, dataset.wnids, strict=True)
    ]
