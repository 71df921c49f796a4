"""Seeded, stratified choice of which examples to audit."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from robaudit.errors import ConfigError, NothingToAudit


def select_indices(
    targets: np.ndarray,
    *,
    per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Indices into the data set to audit, sorted ascending (int64).

    Each class is shuffled by ``seed``; ``per_class`` keeps up to that many of each class, and
    ``limit`` then caps the total by taking one example from each class in turn (classes in a
    seeded order), so the subset stays balanced. With neither, every index. A larger
    ``per_class`` or ``limit`` with the same seed gives a superset, and the result depends only
    on ``targets`` and the arguments, so every distributed rank computes the same one.
    """
    targets = np.asarray(targets)
    if targets.ndim != 1:
        raise ValueError(f"targets must be 1-D, got shape {targets.shape}")
    for flag, value in (("--per-class", per_class), ("--limit", limit)):
        if value is not None and value < 0:
            raise ConfigError(f"{flag} must be 0 or more, got {value}")
    if len(targets) == 0:
        raise NothingToAudit("nothing to audit: the data set has no examples")
    if per_class is None and limit is None:
        return np.arange(len(targets), dtype=np.int64)

    rng = np.random.default_rng(seed)
    # Grouping by a stable sort is O(n log n), where a mask per class would be O(n * classes).
    order = np.argsort(targets, kind="stable")
    _, starts, counts = np.unique(targets[order], return_index=True, return_counts=True)
    class_turn = rng.permutation(len(starts))
    chosen, rank, turn = [], [], []
    for position, (start, count) in enumerate(zip(starts, counts, strict=True)):
        members = rng.permutation(order[start : start + count])
        if per_class is not None:
            members = members[:per_class]
        chosen.append(members)
        rank.append(np.arange(len(members)))
        turn.append(np.full(len(members), class_turn[position]))
    picked = np.concatenate(chosen)
    if limit is not None and limit < len(picked):
        # Round robin: every class's first example, then every class's second, and so on.
        key = np.concatenate(rank) * len(starts) + np.concatenate(turn)
        picked = picked[np.argsort(key, kind="stable")[:limit]]
    if len(picked) == 0:
        flag = "--per-class 0" if per_class == 0 else "--limit 0"
        raise NothingToAudit(f"nothing to audit: {flag} selects no examples")
    return np.sort(picked).astype(np.int64)


def select_classes(targets: np.ndarray, class_names: Sequence[str], classes: Sequence[str], *,
                   per_class: int | None, limit: int | None, seed: int) -> np.ndarray:
    """:func:`select_indices` among the examples of ``classes`` (every class when empty)."""
    if not classes:
        return select_indices(targets, per_class=per_class, limit=limit, seed=seed)
    unknown = [c for c in classes if c not in class_names]
    if unknown:
        raise ConfigError(
            f"--classes names {', '.join(unknown)}, which the data set does not have; "
            f"its classes are: {', '.join(class_names[:20])}"
        )
    wanted = [class_names.index(c) for c in classes]
    keep = np.flatnonzero(np.isin(targets, wanted))
    if keep.size == 0:
        raise NothingToAudit(
            f"nothing to audit: the data set has no examples of {', '.join(classes)}"
        )
    return keep[select_indices(targets[keep], per_class=per_class, limit=limit, seed=seed)]
