"""Validation data of harden's own: a seeded, stratified hold-out of the training data.

Without ``--val-data``, harden keeps ``--val-fraction`` of each class's training examples apart
(at least one of a class with two or more; a class with one example stays in training), and at
least :func:`minimum_per_class` of each class as long as that leaves half of it for training. It
never trains on them, validates every epoch on them and scans the model before and after on
them. The hold-out is written beside the output model as ``<out stem>.holdout.pt`` (``x``,
``y``, ``class_names`` and ``source_index``, the held-out examples' indices in the training
data), so the before/after scans read it like any data file and it can be scanned again later.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from robaudit.harden.train import Split
from robaudit.reports import atomic_write

#: Mixed into the seed so the hold-out draws from a stream of its own (not ``--per-class``'s).
STREAM = 0x686F6C64  # "hold"


#: One held-out example may move the class mean by at most this share of the mean budget.
RESOLUTION = 5


def minimum_per_class(classes: int, max_mean_drop: float) -> int:
    """The fewest examples per class a hold-out needs to resolve the class-mean budget: one
    example of a class moves the class mean by ``1 / (classes * n)``, and that must be at most
    a fifth of ``max_mean_drop`` (25 per class for 10 classes and a 2-point budget)."""
    if max_mean_drop <= 0:
        return 2**31  # no budget to resolve: as many as allowed (half of each class)
    return math.ceil(RESOLUTION / (classes * max_mean_drop) - 1e-9)


def hold_out(data: Split, fraction: float, seed: int,
             minimum: int = 1) -> tuple[Split, Split]:
    """``(training, held out)``: a stratified ``fraction`` of each class (at least ``minimum``,
    at most half the class), chosen by ``seed``.

    Both keep the data set order. The held-out split's ``index`` counts from 0 (its position in
    the hold-out file, which is what the scans seed each example's attack by).
    """
    rng = np.random.default_rng([seed, STREAM])
    y = data.y.cpu().numpy()
    chosen = [np.zeros(0, dtype=np.int64)]
    for k in range(len(data.class_names)):
        members = np.flatnonzero(y == k)
        if len(members) < 2:
            continue
        wanted = max(1, round(fraction * len(members)), min(minimum, len(members) // 2))
        n = min(len(members) - 1, wanted)
        chosen.append(rng.choice(members, size=n, replace=False))
    held = np.sort(np.concatenate(chosen))
    keep = np.ones(len(y), dtype=bool)
    keep[held] = False
    train_pos = torch.from_numpy(np.flatnonzero(keep))
    held_pos = torch.from_numpy(held)
    train = Split(data.x[train_pos.to(data.x.device)], data.y[train_pos.to(data.y.device)],
                  data.index[train_pos], data.class_names)
    val = Split(data.x[held_pos.to(data.x.device)], data.y[held_pos.to(data.y.device)],
                torch.arange(len(held), dtype=torch.int64), data.class_names,
                source_index=data.index[held_pos])
    return train, val


def holdout_path(out: str) -> Path:
    """Where the hold-out goes: beside the output model."""
    path = Path(out)
    return path.with_name(path.stem + ".holdout.pt")


def write_holdout(path: Path, val: Split) -> None:
    """Write the hold-out as a data file (uint8 when that loses nothing, as it is for images
    read from 8-bit files)."""
    x = val.x.detach().cpu()
    as_bytes = (x * 255).round().to(torch.uint8)
    if torch.equal(as_bytes.to(torch.float32).div_(255), x):
        x = as_bytes
    buffer = io.BytesIO()
    torch.save({"x": x, "y": val.y.detach().cpu(), "class_names": list(val.class_names),
                "source_index": val.index if val.source_index is None else val.source_index},
               buffer)
    atomic_write(path, buffer.getvalue())
