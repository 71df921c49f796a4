"""The DataSource every loader returns, and class names: from a file, checked against labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robaudit.data.channels import Channels
from robaudit.errors import DataError

#: More classes than any real classifier has (ImageNet-21k has 21,841); beyond it a label is a bug.
MAX_CLASSES = 100_000


@dataclass
class DataSource:
    """A data set ready to audit.

    ``dataset[i]`` is ``(x, y)``: ``x`` a float32 CHW tensor in [0, 1], ``y`` an int. ``targets``
    holds every label without decoding any image, so sampling never touches the images.
    """

    dataset: torch.utils.data.Dataset[Any]
    targets: np.ndarray
    class_names: list[str]
    description: str
    #: The channel count the images reach the model with; shared with the dataset's transform.
    channels: Channels = field(default_factory=Channels)
    #: Whether labels are the model's output indices by themselves (integer labels, or classes
    #: named 0..K-1), rather than positions in a list of names.
    numbered: bool = False
    #: What the report should say about how the data was read.
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """How many classes the data set names (some may have no examples)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.targets)

    def widen_classes(self, count: int) -> bool:
        """Name classes up to ``count`` (a model's outputs) when this data set has fewer.

        Only numbered labels can stand for the model's indices; the classes without examples are
        named by their index. False when the names stay as they are.
        """
        extra = [str(k) for k in range(len(self.class_names), count)]
        if not self.numbered or not extra or set(extra) & set(self.class_names):
            return False
        self.class_names = [*self.class_names, *extra]
        return True


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, for messages that embed it."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def read_class_names(path: str | Path) -> list[str]:
    """Read class names from a text file: one per line, blank lines ignored, no duplicates."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"class names file {path} is not UTF-8 text; save it as UTF-8, one name per line"
        ) from exc
    except OSError as exc:
        raise DataError(
            f"cannot read class names file {path}: {exc.strerror or one_line(exc)}; "
            "pass a text file with one class name per line"
        ) from exc
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"class names file {path} has no names; write one class name per line")
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if name in seen:
            # Reports key figures by class name, so two classes must never share one.
            raise DataError(
                f"class names file {path} names {name!r} twice (names {seen[name]} and {number});"
                " class names must be unique"
            )
        seen[name] = number
    return names


def resolve_class_names(
    targets: np.ndarray,
    own_names: list[str] | None,
    class_names_file: str | Path | None,
    *,
    what: str,
) -> list[str]:
    """Choose the class names and check every label has one.

    ``own_names`` are the names the data set carries (None when it has none: then the names are
    '0'..'K-1' with K = max label + 1). A file given by the user replaces them, and must have the
    same count when the data set defines its classes.
    """
    names = own_names
    if class_names_file is not None:
        file_names = read_class_names(class_names_file)
        if own_names is not None and len(file_names) != len(own_names):
            raise DataError(
                f"class names file {class_names_file} has {len(file_names)} names but {what} has "
                f"{len(own_names)} classes; write one name per class, in label order"
            )
        names = file_names
    max_label = int(targets.max()) if len(targets) else -1
    if names is None:
        if max_label >= MAX_CLASSES:
            # One stray label like 2**40 would otherwise make that many class names (and a
            # confusion matrix of its square) and hang the scan instead of failing it.
            raise DataError(
                f"labels of {what} go up to {max_label}, more than the {MAX_CLASSES:,} classes "
                "robaudit audits; number the classes 0..K-1, one label per class"
            )
        return [str(k) for k in range(max_label + 1)]
    if max_label >= len(names):
        source = f"class names file {class_names_file}" if class_names_file else what
        raise DataError(
            f"labels of {what} go up to {max_label} but {source} has only {len(names)} class "
            f"names; give one name per class, for labels 0..{max_label}"
        )
    return list(names)
