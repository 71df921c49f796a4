"""Data: torchvision data sets by name, image folders, .npz/.pt tensors, stratified sampling.

Everything the audit needs from a data set is a :class:`DataSource`: a map-style dataset whose
items are ``(x, y)`` with ``x`` a float32 CHW tensor in [0, 1], the label of every item (read
without decoding images), and the class names. :func:`select_indices` picks a seeded, stratified
subset and :func:`iter_batches` streams it in batches.
"""

from __future__ import annotations

from robaudit.data.batches import iter_batches
from robaudit.data.load import fit_to_model, load_data
from robaudit.data.named import TORCHVISION_NAMES
from robaudit.data.sampling import select_classes, select_indices
from robaudit.data.source import DataSource, read_class_names

__all__ = [
    "TORCHVISION_NAMES",
    "DataSource",
    "fit_to_model",
    "iter_batches",
    "load_data",
    "read_class_names",
    "select_classes",
    "select_indices",
]
