"""Folders of images, one sub-folder per class, read lazily one image at a time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from robaudit.data.channels import Channels
from robaudit.data.source import one_line
from robaudit.errors import DataError

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

# What decoding a broken image raises: truncated or unknown files (OSError), bad headers
# (SyntaxError, ValueError), and images large enough to be a decompression bomb.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """Decode one image as RGB, or raise DataError naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise DataError(
            f"cannot read image {path}: {one_line(exc)}; fix or remove the file"
        ) from exc


class ResizeCrop:
    """Resize a PIL image to cover ``size`` (height, width), keeping its aspect; crop the centre.

    A batch needs equal sizes; cropping rather than stretching keeps objects undistorted.
    """

    def __init__(self, size: tuple[int, int], first: str | None = None) -> None:
        self.size = size
        #: The image whose size ``size`` is, when no size was chosen; None when one was.
        self.first = first

    def __call__(self, image: Image.Image) -> Image.Image:
        height, width = self.size
        if image.size == (width, height):
            return image
        scale = max(height / image.height, width / image.width)
        resized = (
            max(width, round(image.width * scale)),
            max(height, round(image.height * scale)),
        )
        image = image.resize(resized, Image.Resampling.BILINEAR)
        left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
        return image.crop((left, top, left + width, top + height))

    def __repr__(self) -> str:
        return f"ResizeCrop(size={self.size})"


def load_folder(
    path: Path, image_size: int | None, channels: Channels | None = None
) -> tuple[ImageFolder, np.ndarray, list[str]]:
    """An ImageFolder over ``path`` with the images made one size; (dataset, targets, names).

    With ``image_size`` every image is resized and centre-cropped to image_size x image_size;
    without it, to the size of the first image, so images of mixed sizes still batch
    (:func:`resized_warning` says how many were). Images are decoded as RGB, then converted by
    ``channels``.
    """
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import Compose, ToTensor

    _refuse_link_loops(path)
    try:
        # allow_empty: an empty class folder still takes its label index, so labels keep matching
        # the model's outputs (folders are numbered in sorted order).
        dataset = ImageFolder(str(path), loader=load_rgb, allow_empty=True)
    except FileNotFoundError as exc:
        raise DataError(
            f"{path} has no class folders ({one_line(exc)}); lay images out as "
            f"{path}/<class name>/<image file>"
        ) from exc
    except OSError as exc:  # e.g. a folder without read permission
        raise DataError(
            f"cannot list image folder {path}: {exc.strerror or one_line(exc)}; check its "
            "permissions"
        ) from exc
    if not dataset.samples:
        raise DataError(
            f"{path} contains no examples: its class folders {dataset.classes[:5]} hold no images "
            "(.png, .jpg, ...); put images in them"
        )
    first = None
    if image_size is not None:
        size = (image_size, image_size)
    else:
        first = dataset.samples[0][0]
        try:
            size = _image_size(first)
        except _DECODE_ERRORS as exc:
            raise DataError(
                f"cannot read image {first}: {one_line(exc)}; fix or remove the file"
            ) from exc
    dataset.transform = Compose([channels or Channels(), ResizeCrop(size, first), ToTensor()])
    targets = np.asarray(dataset.targets, dtype=np.int64)
    return dataset, targets, list(dataset.classes)


def resized_warning(dataset: object, indices: np.ndarray) -> str | None:
    """How many selected images were resized to the first image's size, or None.

    Reads only the images' headers. Unreadable images are left to the decoding, which names them.
    """
    steps = getattr(getattr(dataset, "transform", None), "transforms", [])
    resize = next((t for t in steps if isinstance(t, ResizeCrop)), None)
    if resize is None or resize.first is None:
        return None
    resized = 0
    for index in indices.tolist():
        try:
            resized += _image_size(dataset.samples[index][0]) != resize.size
        except _DECODE_ERRORS:
            continue
    if not resized:
        return None
    height, width = resize.size
    return (
        f"{resized} of {len(indices)} audited images are not {width}x{height} like the first "
        f"image ({resize.first}); they were resized and centre-cropped to {width}x{height}: "
        "pass --image-size N to choose the size (N x N) for every image"
    )


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:  # reads the header only
        return image.height, image.width


def _refuse_link_loops(path: Path) -> None:
    """Refuse a folder whose symbolic links lead back to a folder that holds them.

    torchvision's ImageFolder follows directory links (class folders are often links into a
    shared store, and two classes may link to the same folder), so links are followed here too;
    only a cycle is refused, because ImageFolder would list its images again at every level
    until the operating system's link limit.
    """
    # The real paths of each folder's ancestors and itself; os.walk visits parents first.
    chains = {str(path): frozenset({os.path.realpath(path)})}
    for top, folders, _ in os.walk(path, followlinks=True):
        chain = chains.pop(top)
        for folder in folders:
            child = os.path.join(top, folder)
            real = os.path.realpath(child)
            if real in chain:
                raise DataError(
                    f"image folder {path} has a symbolic-link loop: {child} leads back to "
                    f"{real}, which holds it, so its images would be listed over and over; "
                    "remove the link or point it outside its own parent folders"
                )
            chains[child] = chain | {real}
