"""Per-class statistics of an audit: accuracies, Wilson intervals, confusion, rank correlation.

Everything here works on plain per-example arrays, so the same figures come out of one process,
of several (after their counts are summed), and of a partial run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

#: The name under which the worst case over all attacks is reported.
WORST = "worst"


@dataclass(frozen=True)
class Rate:
    """``correct`` of ``n``, with a 95% Wilson score interval."""

    correct: int
    n: int
    low: float
    high: float

    @property
    def acc(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @classmethod
    def of(cls, correct: int, n: int) -> Rate:
        return cls(int(correct), int(n), *wilson_interval(int(correct), int(n)))


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval (Wilson, 1927): sound near 0 and 1 and for small n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation with average ranks for ties; None when a side is constant."""
    ra, rb = ranks(a), ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """0-based ranks in ascending order of ``values``; tied values share their average rank."""
    values = np.asarray(values, dtype=float)
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values), dtype=float)
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):  # ties share their average rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


@dataclass
class Records:
    """Per-example outcomes of an audit, in data set order of processing."""

    attack_names: list[str]
    index: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)
    clean_pred: list[np.ndarray] = field(default_factory=list)
    clean_margin: list[np.ndarray] = field(default_factory=list)
    adv_pred: dict[str, list[np.ndarray]] = field(default_factory=dict)
    adv_margin: dict[str, list[np.ndarray]] = field(default_factory=dict)
    forwards: dict[str, list[np.ndarray]] = field(default_factory=dict)
    bad_gradient: dict[str, list[np.ndarray]] = field(default_factory=dict)
    #: Predictions of the deployed runtime (onnxruntime) on each attack's adversarial example.
    runtime_pred: dict[str, list[np.ndarray]] = field(default_factory=dict)
    runtime_clean_pred: list[np.ndarray] = field(default_factory=list)
    #: Columns that ran only on earlier attacks' survivors and carry the others' results (the
    #: finish, escalation): cumulative, so not ranked against the others.
    carried: list[str] = field(default_factory=list)

    #: The columns every example has, and those each attack adds (name -> batches).
    EXAMPLE_COLUMNS: ClassVar[tuple[str, ...]] = ("index", "y", "clean_pred", "clean_margin",
                                                  "runtime_clean_pred")
    ATTACK_COLUMNS: ClassVar[tuple[str, ...]] = ("adv_pred", "adv_margin", "forwards",
                                                 "bad_gradient", "runtime_pred")

    def __len__(self) -> int:
        return int(sum(len(part) for part in self.y))

    def labels(self) -> np.ndarray:
        return self.array("y").astype(np.int64)

    def clean_correct(self) -> np.ndarray:
        """Per example: classified correctly when clean (the examples that were attacked)."""
        return self.array("clean_pred").astype(np.int64) == self.labels()

    def robust_under(self, attacks: Sequence[str] | None = None) -> np.ndarray:
        """Per example: correct when clean and under every one of ``attacks`` (default: all)."""
        y = self.labels()
        ok = self.clean_correct()
        for a in self.attack_names if attacks is None else attacks:
            ok &= self.array("adv_pred", a).astype(np.int64) == y
        return ok

    def strongest(self, attacks: Sequence[str]) -> np.ndarray:
        """Per example, the position in ``attacks`` of the strongest one: a breaking attack if
        any broke it, else the lowest margin."""
        y = self.labels()
        preds = np.stack([self.array("adv_pred", a).astype(np.int64) for a in attacks])
        margins = np.stack([self.array("adv_margin", a) for a in attacks])
        return np.where(preds != y, -np.inf, margins).argmin(axis=0)

    def extend(self, part: Records) -> None:
        """Append ``part``'s batches, column by column."""
        for name in self.EXAMPLE_COLUMNS:
            getattr(self, name).extend(getattr(part, name))
        for name in self.ATTACK_COLUMNS:
            for attack, values in getattr(part, name).items():
                getattr(self, name).setdefault(attack, []).extend(values)

    def pack(self) -> dict[str, Any]:
        """Every column as one array: what a rank sends under torchrun (see :meth:`unpack`)."""
        packed: dict[str, Any] = {f: self.array(f) for f in self.EXAMPLE_COLUMNS
                                  if getattr(self, f)}
        for f in self.ATTACK_COLUMNS:
            packed[f] = {a: self.array(f, a) for a in getattr(self, f)}
        return packed

    @classmethod
    def unpack(cls, attack_names: Sequence[str], packs: Sequence[dict[str, Any]]) -> Records:
        """The records of several :meth:`pack` results, one after the other."""
        merged = cls(attack_names=list(attack_names))
        for packed in packs:
            for f in cls.EXAMPLE_COLUMNS:
                if f in packed:
                    getattr(merged, f).append(packed[f])
            for f in cls.ATTACK_COLUMNS:
                for a, values in packed[f].items():
                    getattr(merged, f).setdefault(a, []).append(values)
        return merged

    @property
    def independent(self) -> list[str]:
        """The attacks whose columns stand alone (each ran on every clean-correct example): the
        ones that can be ranked and compared with each other."""
        return [a for a in self.attack_names if a not in self.carried]

    def array(self, name: str, attack: str | None = None) -> np.ndarray:
        """One field concatenated over batches."""
        parts = getattr(self, name) if attack is None else getattr(self, name).get(attack, [])
        return np.concatenate(parts) if parts else np.zeros(0)


@dataclass(frozen=True)
class ClassStats:
    """Figures of one class."""

    index: int
    name: str
    n: int
    clean: Rate
    #: Robust accuracy under each attack, plus ``WORST``: the worst case over all of them.
    robust: dict[str, Rate]
    #: Worst-case robust accuracy confirmed by the deployed runtime (ONNX models only).
    runtime_robust: Rate | None
    mean_clean_margin: float
    mean_adv_margin: float
    #: Where the broken examples went, worst case over attacks: counts per predicted class.
    confusion_row: list[int]


@dataclass(frozen=True)
class GainSplit:
    """How the strongest attack's gain over the weakest spreads over classes."""

    weakest: str
    strongest: str
    total_broken: int
    #: Per class: extra examples the strongest attack broke (may be negative).
    per_class: list[int]
    #: Share of the gain in the half of classes least robust under the weakest attack.
    vulnerable_half_share: float | None


@dataclass(frozen=True)
class Summary:
    """Figures across classes."""

    n: int
    clean_acc: float
    #: Per attack (and ``WORST``): accuracy over all examples (micro average).
    robust_acc: dict[str, float]
    #: Per attack (and ``WORST``): mean of class robust accuracies (macro average).
    mean_class_robust: dict[str, float]
    worst_class: str
    worst_class_robust: float
    best_class: str
    best_class_robust: float
    gap: float
    std: float
    #: Spearman correlation of the class ranking between each pair of attacks.
    rank_correlation: dict[str, float | None]
    gain_split: GainSplit | None
    #: Accuracy the deployed runtime confirms (ONNX only): clean and worst case.
    runtime_clean_acc: float | None
    runtime_robust_acc: float | None
    #: Share of attacked examples with zero or non-finite input gradients, per attack.
    bad_gradient_share: dict[str, float]
    #: Mean forward passes per clean-correct example, per attack.
    mean_forwards: dict[str, float]


def robust_flags(records: Records, on: str) -> np.ndarray:
    """Per example: robust on figure ``on`` (an attack, or ``WORST``), as :func:`class_stats`
    counts it."""
    clean_ok = records.clean_correct()
    if on == WORST:
        return _worst_case(records, clean_ok)[0]
    return clean_ok & (records.array("adv_pred", on).astype(np.int64) == records.labels())


def class_stats(records: Records, class_names: Sequence[str]) -> list[ClassStats]:
    """Figures per class from per-example records."""
    k = len(class_names)
    y = records.labels()
    clean_ok = records.clean_correct()
    robust_ok = {a: clean_ok & (records.array("adv_pred", a) == y) for a in records.attack_names}
    worst_ok, worst_pred, worst_margin = _worst_case(records, clean_ok)
    runtime_ok = _runtime_robust(records, y)
    clean_margin = records.array("clean_margin")

    stats = []
    for c in range(k):
        of_c = y == c
        n = int(of_c.sum())
        rates = {a: Rate.of(int(ok[of_c].sum()), n) for a, ok in robust_ok.items()}
        rates[WORST] = Rate.of(int(worst_ok[of_c].sum()), n)
        broken = of_c & clean_ok & ~worst_ok
        attacked = of_c & clean_ok
        stats.append(
            ClassStats(
                index=c,
                name=class_names[c],
                n=n,
                clean=Rate.of(int(clean_ok[of_c].sum()), n),
                robust=rates,
                runtime_robust=(
                    None if runtime_ok is None else Rate.of(int(runtime_ok[of_c].sum()), n)
                ),
                mean_clean_margin=_mean(clean_margin[of_c]),
                mean_adv_margin=_mean(worst_margin[attacked]),
                confusion_row=np.bincount(worst_pred[broken], minlength=k)[:k].tolist(),
            )
        )
    return stats


def confusion(records: Records, num_classes: int, attack: str) -> list[list[int]]:
    """Adversarial confusion of one attack: row = true class, column = where broken ones went."""
    y = records.labels()
    clean_ok = records.clean_correct()
    pred = records.array("adv_pred", attack).astype(np.int64)
    # A NaN or inf output predicts no class (its pred is num_classes): broken, in no column.
    went = clean_ok & (pred != y) & (pred < num_classes)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y[went], pred[went]), 1)
    return matrix.tolist()


def summarize(records: Records, stats: Sequence[ClassStats]) -> Summary:
    """Figures across classes."""
    y = records.labels()
    n = len(y)
    clean_ok = records.clean_correct()
    names = [*records.attack_names, WORST]
    present = [s for s in stats if s.n > 0]
    worst_acc = np.array([s.robust[WORST].acc for s in present])
    worst_i, best_i = int(worst_acc.argmin()), int(worst_acc.argmax())
    runtime_ok = _runtime_robust(records, y)
    runtime_clean = records.array("runtime_clean_pred")
    forwards = {}
    bad = {}
    for a in records.attack_names:
        attacked = clean_ok
        forwards[a] = _mean(records.array("forwards", a)[attacked])
        bad[a] = _mean(records.array("bad_gradient", a)[attacked].astype(float))
    return Summary(
        n=n,
        clean_acc=_mean(clean_ok.astype(float)),
        robust_acc={a: sum(s.robust[a].correct for s in stats) / n if n else float("nan")
                    for a in names},
        mean_class_robust={a: _mean(np.array([s.robust[a].acc for s in present])) for a in names},
        worst_class=present[worst_i].name,
        worst_class_robust=float(worst_acc[worst_i]),
        best_class=present[best_i].name,
        best_class_robust=float(worst_acc[best_i]),
        gap=float(worst_acc[best_i] - worst_acc[worst_i]),
        std=float(worst_acc.std()),
        rank_correlation=_rank_correlations(records.independent, present),
        # A cumulative column always "breaks more" than the attacks it carries: not a gain.
        gain_split=_gain_split(records.independent, present),
        runtime_clean_acc=(
            None if len(runtime_clean) == 0 else _mean(runtime_clean.astype(np.int64) == y)
        ),
        runtime_robust_acc=None if runtime_ok is None else _mean(runtime_ok.astype(float)),
        bad_gradient_share=bad,
        mean_forwards=forwards,
    )


def _worst_case(
    records: Records, clean_ok: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example: robust under every attack, the prediction and margin of the strongest one."""
    y = records.array("y").astype(np.int64)
    preds = np.stack([records.array("adv_pred", a).astype(np.int64) for a in records.attack_names])
    margins = np.stack([records.array("adv_margin", a) for a in records.attack_names])
    robust = clean_ok & (preds == y).all(axis=0)
    # The strongest attack on an example is a breaking one if any broke it, else lowest margin.
    score = np.where(preds != y, -np.inf, margins)
    strongest = score.argmin(axis=0)
    cols = np.arange(len(y))
    return robust, preds[strongest, cols], margins[strongest, cols]


def _runtime_robust(records: Records, y: np.ndarray) -> np.ndarray | None:
    if not records.runtime_clean_pred:
        return None
    ok = records.array("runtime_clean_pred").astype(np.int64) == y
    for a in records.attack_names:
        ok &= records.array("runtime_pred", a).astype(np.int64) == y
    return ok


def _rank_correlations(attacks: Sequence[str],
                       stats: Sequence[ClassStats]) -> dict[str, float | None]:
    result = {}
    for i, a in enumerate(attacks):
        for b in attacks[i + 1 :]:
            result[f"{a}~{b}"] = spearman(
                [s.robust[a].acc for s in stats], [s.robust[b].acc for s in stats]
            )
    return result


def _gain_split(attacks: Sequence[str], stats: Sequence[ClassStats]) -> GainSplit | None:
    if len(attacks) < 2:
        return None
    totals = {a: sum(s.robust[a].correct for s in stats) for a in attacks}
    weakest = max(attacks, key=lambda a: totals[a])
    strongest = min(attacks, key=lambda a: totals[a])
    gains = [s.robust[weakest].correct - s.robust[strongest].correct for s in stats]
    total = sum(gains)
    order = sorted(range(len(stats)), key=lambda i: stats[i].robust[weakest].acc)
    vulnerable = order[: max(1, len(order) // 2)]
    share = None if total <= 0 else sum(gains[i] for i in vulnerable) / total
    return GainSplit(weakest, strongest, total, gains, share)


def _mean(values: np.ndarray | float) -> float:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()) if arr.size else float("nan")


def sweep_figures(records: list[Records], eps_list: list[float], class_names: list[str],
                  eps_text: Callable[[float], str]) -> list[dict[str, Any]]:
    """Per-class robust accuracy at each ε of a sweep (robustness-vs-ε curves); none for one ε."""
    if len(records) < 2:
        return []
    entries = []
    for eps, rec in zip(eps_list, records, strict=True):
        if len(rec) == 0:
            continue
        stats = class_stats(rec, class_names)
        summary = summarize(rec, stats)
        entries.append({
            "eps": eps,
            "eps_text": eps_text(eps),
            "robust_acc": summary.robust_acc,
            "mean_class_robust": summary.mean_class_robust,
            "classes": [{"name": s.name, "n": s.n,
                         "robust": {a: r.acc for a, r in s.robust.items()},
                         "ci95": {a: [r.low, r.high] for a, r in s.robust.items()}}
                        for s in stats],
        })
    return entries
