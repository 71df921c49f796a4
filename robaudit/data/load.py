"""``load_data``: turn what the user wrote after --data into a DataSource."""

from __future__ import annotations

import difflib
from pathlib import Path

from robaudit.data.folder import load_folder
from robaudit.data.named import TORCHVISION_NAMES, canonical_name, load_named
from robaudit.data.source import DataSource, resolve_class_names
from robaudit.data.tensors import load_tensor_file
from robaudit.errors import DataError

TENSOR_SUFFIXES = (".npz", ".pt", ".pth")

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
) -> DataSource:
    """Open the data set ``spec`` names: a torchvision name, an image folder, or a .npz/.pt file.

    A known name wins over a folder of the same name; write ``./cifar10`` for the folder.
    Torchvision data sets are read from ``root`` and downloaded only when ``download`` is true.
    ``image_size`` resizes and centre-crops every image to a square of that side (ImageNet:
    resize to 256/224 of it first). ``class_names_file`` (one name per line) replaces the names
    the data set carries.
    """
    if image_size is not None and image_size < 1:
        raise DataError(f"image size must be a positive number of pixels, got {image_size}")
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
            name, root, download=download, split=split, image_size=image_size
        )
    else:
        path = Path(text).expanduser()
        description = text
        if path.is_dir():
            dataset, targets, own_names = load_folder(path, image_size)
        elif path.is_file() and path.suffix.lower() in TENSOR_SUFFIXES:
            dataset, targets, own_names = load_tensor_file(path, image_size)
        elif path.is_file():
            raise DataError(f"{text} is a {path.suffix or 'suffix-less'} file; {_ACCEPTED}")
        else:
            raise DataError(
                f"no such data set, folder or file: {text!r}{_suggest(text)}; {_ACCEPTED}"
            )
    class_names = resolve_class_names(targets, own_names, class_names_file, what=description)
    return DataSource(dataset, targets, class_names, description)


def _suggest(text: str) -> str:
    guess = text.strip().lower().replace("-", "").replace("_", "")
    close = difflib.get_close_matches(guess, TORCHVISION_NAMES, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
