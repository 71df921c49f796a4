"""Per-class statistics on hand-made records whose figures are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from robaudit.metrics import (
    WORST,
    Records,
    class_stats,
    confusion,
    spearman,
    summarize,
    wilson_interval,
)


def test_wilson_interval_known_values():
    # Values from Wilson (1927) / Newcombe (1998), z = 1.96.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_spearman_with_and_without_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3): 4.5 / sqrt(4.5 * 5).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def records() -> Records:
    """Three classes. Class 0: 4 examples, all clean-correct; pgd breaks one (to 2), cw breaks
    another (to 1). Class 1: 2 examples, one wrong when clean; nothing breaks. Class 2: none."""
    r = Records(attack_names=["pgd", "cw"])
    r.index.append(np.arange(6))
    r.y.append(np.array([0, 0, 0, 0, 1, 1]))
    r.clean_pred.append(np.array([0, 0, 0, 0, 1, 0]))
    r.clean_margin.append(np.array([1.0, 2.0, 3.0, 4.0, 1.0, -1.0]))
    r.adv_pred["pgd"] = [np.array([2, 0, 0, 0, 1, 0])]
    r.adv_margin["pgd"] = [np.array([-0.5, 1.0, 1.0, 2.0, 0.5, -1.0])]
    r.adv_pred["cw"] = [np.array([0, 1, 0, 0, 1, 0])]
    r.adv_margin["cw"] = [np.array([0.2, -0.1, 0.5, 1.0, 0.4, -1.0])]
    for name in ("forwards", "bad_gradient"):
        getattr(r, name)["pgd"] = [np.array([1, 21, 21, 21, 21, 0])]
        getattr(r, name)["cw"] = [np.array([21, 3, 21, 21, 21, 0])]
    r.bad_gradient = {a: [np.zeros(6, dtype=bool)] for a in ("pgd", "cw")}
    return r


def test_class_stats_counts_intervals_and_confusion():
    stats = class_stats(records(), ["a", "b", "c"])
    a, b, c = stats
    assert (a.n, a.clean.correct, a.robust["pgd"].correct, a.robust["cw"].correct) == (4, 4, 3, 3)
    assert a.robust[WORST].correct == 2
    assert a.robust[WORST].acc == 0.5
    assert (a.robust[WORST].low, a.robust[WORST].high) == pytest.approx(wilson_interval(2, 4))
    assert a.confusion_row == [0, 1, 1]  # one went to class 1 (cw), one to class 2 (pgd)
    assert (b.n, b.clean.correct, b.robust[WORST].correct) == (2, 1, 1)
    assert b.confusion_row == [0, 0, 0]
    assert c.n == 0 and math.isnan(c.robust[WORST].acc)
    # Worst-case margin per attacked example: -0.5, -0.1, 0.5, 1.0 for class 0.
    assert a.mean_adv_margin == pytest.approx(0.225)
    assert confusion(records(), 3, "pgd") == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]


def test_summary_across_classes():
    r = records()
    s = summarize(r, class_stats(r, ["a", "b", "c"]))
    assert s.n == 6 and s.clean_acc == pytest.approx(5 / 6)
    assert s.robust_acc[WORST] == pytest.approx(3 / 6)
    assert s.mean_class_robust[WORST] == pytest.approx((0.5 + 0.5) / 2)  # class c has no data
    assert s.robust_acc["pgd"] == pytest.approx(4 / 6)
    assert s.gap == 0.0
    assert s.mean_forwards["pgd"] == pytest.approx((1 + 21 * 3 + 21) / 5)
    assert s.gain_split is None or s.gain_split.total_broken == 0


def test_a_cumulative_column_is_neither_ranked_nor_counted_as_a_gain():
    # A finish column that carries pgd's and cw's breaks and adds one: it "breaks" 3 examples
    # of class 0 where pgd breaks 1, but only because it includes pgd.
    r = records()
    r.attack_names.append("dlr-t")
    r.adv_pred["dlr-t"] = [np.array([2, 1, 2, 0, 1, 0])]
    r.adv_margin["dlr-t"] = [np.array([-0.5, -0.1, -0.2, 1.0, 0.4, -1.0])]
    r.forwards["dlr-t"] = [np.array([0, 0, 5, 21, 21, 0])]
    r.bad_gradient["dlr-t"] = [np.zeros(6, dtype=bool)]
    r.carried.append("dlr-t")
    s = summarize(r, class_stats(r, ["a", "b", "c"]))
    assert r.independent == ["pgd", "cw"]
    assert s.robust_acc["dlr-t"] == pytest.approx(2 / 6)
    assert s.gain_split is None or {s.gain_split.weakest, s.gain_split.strongest} <= {"pgd", "cw"}
    assert all("dlr-t" not in pair for pair in (s.rank_correlation or {}))
