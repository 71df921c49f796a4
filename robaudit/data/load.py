"""``load_data``: turn what the user wrote after --data into a DataSource."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from robaudit.data.channels import Channels
from robaudit.data.folder import load_folder, resized_warning
from robaudit.data.named import TORCHVISION_NAMES, canonical_name, load_named
from robaudit.data.source import DataSource, resolve_class_names
from robaudit.data.tensors import load_tensor_file
from robaudit.errors import DataError

TENSOR_SUFFIXES = (".npz", ".pt", ".pth")
_LOG = logging.getLogger(__name__)

_ACCEPTED = (
    f"--data takes a data set name ({', '.join(TORCHVISION_NAMES)}) with --data-root, "
    "a folder of class sub-folders of images, or a .npz/.pt file with arrays x and y"
)


def load_data(
    spec: str | Path,
    *,
    root: str | Path | None = None,
    download: bool = False,
    split: str = "test",
    class_names_file: str | Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> DataSource:
    """Open the data set ``spec`` names: a torchvision name, an image folder, or a .npz/.pt file.

    A known name wins over a folder of the same name; write ``./cifar10`` for the folder.
    Torchvision data sets are read from ``root`` and downloaded only when ``download`` is true.
    ``image_size`` resizes and centre-crops every image to a square of that side (ImageNet:
    resize to 256/224 of it first). ``class_names_file`` (one name per line) replaces the names
    the data set carries. ``channels`` (1 or 3) converts the images to greyscale or RGB; None keeps
    each data set's own (image folders: RGB) until ``source.channels.count`` is set.
    """
    if image_size is not None and image_size < 1:
        raise DataError(f"image size must be a positive number of pixels, got {image_size}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
    convert = Channels(channels)
    numbered = False
    text = str(spec)
    name = canonical_name(text)
    if name is not None:
        if root is None:
            folder_hint = (
                f" (to read the folder {text}, write ./{text})" if Path(text).is_dir() else ""
            )
            raise DataError(
                f"{name} is read from a folder on disk: pass --data-root DIR (and --download to "
                f"fetch it there){folder_hint}"
            )
        dataset, targets, own_names, description = load_named(
            name, root, download=download, split=split, image_size=image_size, channels=convert
        )
    else:
        path = Path(text).expanduser()
        description = text
        if path.is_dir():
            dataset, targets, own_names = load_folder(path, image_size, convert)
        elif path.is_file() and path.suffix.lower() in TENSOR_SUFFIXES:
            dataset, targets, own_names = load_tensor_file(path, image_size, convert)
            numbered = True  # the file's labels are integers of its own choosing
        elif path.is_file():
            raise DataError(f"{text} is a {path.suffix or 'suffix-less'} file; {_ACCEPTED}")
        else:
            raise DataError(
                f"no such data set, folder or file: {text!r}{_suggest(text)}; {_ACCEPTED}"
            )
    class_names = resolve_class_names(targets, own_names, class_names_file, what=description)
    numbered = numbered or own_names is None or own_names == [str(k) for k in range(len(own_names))]
    return DataSource(dataset, targets, class_names, description, convert, numbered)


def fit_to_model(
    source: DataSource,
    indices: np.ndarray,
    channels: int | None,
    outputs: Callable[[torch.Tensor], int | None],
) -> None:
    """Fit the selection ``indices`` of ``source`` to a model: give images its ``channels`` (the
    count its first layer takes, None when unknown) unless one was chosen, warn about resized
    images, and name the classes the model outputs (``outputs(one-image batch)``) beyond a
    numbered data set's own."""
    if source.channels.count is None and channels in (1, 3):
        source.channels.count = channels
        _LOG.info("images go to the model with %d channel(s), what its first layer takes "
                  "(--channels sets it)", channels)
    warning = resized_warning(source.dataset, indices)
    if warning:
        source.warnings.append(warning)
    if not len(indices):
        return
    before = source.num_classes
    if source.widen_classes(outputs(source.dataset[int(indices[0])][0].unsqueeze(0)) or 0):
        _LOG.info("the model has %d outputs and the data set %d classes: classes %d-%d have no "
                  "examples and are named by their index", source.num_classes, before, before,
                  source.num_classes - 1)


def _suggest(text: str) -> str:
    guess = text.strip().lower().replace("-", "").replace("_", "")
    close = difflib.get_close_matches(guess, TORCHVISION_NAMES, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
