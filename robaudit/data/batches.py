"""Stream batches of a selection, never holding a whole image folder in memory."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from robaudit.data.source import DataSource
from robaudit.data.tensors import TensorImages
from robaudit.errors import ConfigError, DataError


def iter_batches(
    source: DataSource, indices: np.ndarray, batch_size: int, *, num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (x float32 NCHW in [0, 1], y int64, dataset indices int64) in the order of ``indices``.

    In-memory tensors are sliced directly; other data sets go through a DataLoader over a
    Subset, with ``num_workers`` processes decoding images. An unreadable image raises
    DataError naming the file.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be 1 or more, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"number of data workers must be 0 or more, got {num_workers}")
    order = np.asarray(indices, dtype=np.int64)
    if order.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {order.shape}")
    size = len(source.dataset)  # type: ignore[arg-type]
    if len(order) and (order.min() < 0 or order.max() >= size):
        raise ValueError(f"indices must lie in [0, {size}), got {order.min()}..{order.max()}")
    dataset_index = torch.from_numpy(order)

    if isinstance(source.dataset, TensorImages):
        for start in range(0, len(order), batch_size):
            batch_index = dataset_index[start : start + batch_size]
            x, y = source.dataset.batch(batch_index)
            yield x, y, batch_index
        return

    loader = DataLoader(
        Subset(source.dataset, order.tolist()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_items,
    )
    batches = iter(loader)
    start = 0
    try:
        for x, y in batches:
            yield x, y, dataset_index[start : start + len(y)]
            start += len(y)
    except DataError as exc:
        message = _worker_message(str(exc))
        if message is None:
            raise
        raise DataError(message) from None
    finally:
        # After an error or an early stop, the traceback keeps the iterator alive, and its
        # workers are stopped only when the garbage collector finds it, which then waits 5 s
        # for them; stopping them here is immediate.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def collate_items(items: Sequence[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (x, y) items into a batch, with a usable error when sizes differ."""
    shapes = sorted({tuple(x.shape) for x, _ in items})
    if len(shapes) > 1:
        raise DataError(
            f"images in one batch have different sizes {shapes}; pass an image size to resize "
            "them all to one"
        )
    x = torch.stack([x for x, _ in items]).to(torch.float32)
    return x, torch.tensor([int(y) for _, y in items], dtype=torch.int64)


def _worker_message(text: str) -> str | None:
    """The original one-line message of a DataError re-raised from a DataLoader worker.

    A worker's exception comes back as the same type carrying the whole remote traceback as its
    message; its last line is 'robaudit.errors.DataError: <message>'. None for a local error.
    """
    if "\n" not in text:
        return None
    for line in reversed(text.splitlines()):
        head, found, message = line.partition("DataError: ")
        if found and not head.strip(" .").count(" "):
            return message.strip()
    return None
