"""Fairness policies on known per-class figures."""

from __future__ import annotations

import pytest

from robaudit.gate import GatePolicy, judge, thresholds
from robaudit.metrics import WORST, ClassStats, Rate


def cls(index: int, correct: int, n: int) -> ClassStats:
    rate = Rate.of(correct, n)
    return ClassStats(index, f"c{index}", n, Rate.of(n, n), {WORST: rate, "pgd": rate}, None,
                      0.0, 0.0, [])


# Robust accuracies 0.9, 0.6, 0.3 (mean 0.6, best 0.9); n = 10 for all.
STATS = [cls(0, 9, 10), cls(1, 6, 10), cls(2, 3, 10)]


def flagged(policy: GatePolicy, stats=STATS, baseline=None) -> dict[str, list[str]]:
    return {v.name: [f.policy for f in v.failures] for v in judge(stats, policy, baseline)
            if not v.passed}


def test_floor():
    assert flagged(GatePolicy(min_class_robust=0.5)) == {"c2": ["min_class_robust"]}
    assert flagged(GatePolicy(min_class_robust=0.3)) == {}  # at the floor passes


def test_ratio_to_the_mean():
    assert flagged(GatePolicy(min_ratio=0.8)) == {"c2": ["min_ratio"]}  # 0.3 < 0.48
    assert flagged(GatePolicy(min_ratio=0.5)) == {}  # 0.3 == 0.5 * 0.6


def test_gap_to_the_best_class():
    assert flagged(GatePolicy(max_gap=0.25)) == {"c1": ["max_gap"], "c2": ["max_gap"]}
    assert flagged(GatePolicy(max_gap=0.6)) == {}


def test_drop_against_a_baseline():
    policy = GatePolicy(max_drop=0.05)
    assert flagged(policy, baseline={"c0": 0.9, "c1": 0.7, "c2": 0.32}) == {"c1": ["max_drop"]}


def test_every_failed_policy_is_listed_with_its_figures():
    (verdict,) = [v for v in judge(STATS, GatePolicy(min_class_robust=0.5, max_gap=0.5))
                  if not v.passed]
    assert [f.policy for f in verdict.failures] == ["min_class_robust", "max_gap"]
    floor, gap = verdict.failures
    assert (floor.value, floor.threshold) == (0.3, 0.5)
    assert gap.value == pytest.approx(0.6)
    assert floor.message == "robust accuracy 30.0% is below the floor 50.0%"


def test_significance_spares_classes_whose_interval_reaches_the_floor():
    # 3/10 has a Wilson interval of about (10.8%, 60.3%): it reaches a 50% floor.
    assert flagged(GatePolicy(min_class_robust=0.5, significance=True)) == {}
    # 30/100 has (21.9%, 39.6%): wholly below the floor, so it is flagged.
    big = [cls(0, 90, 100), cls(1, 30, 100)]
    assert flagged(GatePolicy(min_class_robust=0.5, significance=True), big) == {
        "c1": ["min_class_robust"]
    }


def test_no_policy_flags_nothing_and_empty_classes_pass():
    assert flagged(GatePolicy()) == {}
    assert not GatePolicy().active
    assert flagged(GatePolicy(min_class_robust=0.99), [cls(0, 0, 0)]) == {}


def test_thresholds_are_the_lines_the_gate_judged_by():
    policy = GatePolicy(min_class_robust=0.5, min_ratio=0.8, max_gap=0.25)
    lines = thresholds(STATS, policy)
    assert lines == pytest.approx({"min_class_robust": 0.5, "min_ratio": 0.48, "max_gap": 0.65})
    # Every class below a line is the one the gate flags for that policy.
    for name, line in lines.items():
        below = {s.name for s in STATS if s.robust[WORST].acc < line - 1e-9}
        assert below == {v for v, policies in flagged(policy).items() if name in policies}
    assert thresholds(STATS, GatePolicy(max_drop=0.1)) == {}  # a line per class: none shared
    # The mean and the best class are of the classes with examples, as in judge().
    assert thresholds([*STATS, cls(3, 0, 0)], GatePolicy(min_ratio=0.5)) == \
        pytest.approx({"min_ratio": 0.3})
