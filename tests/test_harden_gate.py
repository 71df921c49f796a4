"""harden's default weighting scheme, ``gate`` (the gate's own policy as constraints), and how
an epoch's gain is told from the noise of the validation set."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from conftest import harden_config

from robaudit.harden.reweight import Feedback, make_scheme
from robaudit.harden.state import Budget, Candidate, RunState, better, mean_noise, noise
from robaudit.harden.train import Validation

config = harden_config


def test_gate_is_the_default_scheme():
    assert config().reweight == "gate"


def test_a_class_below_its_bar_gains_weight_and_one_that_passed_gains_it_back_when_it_falls():
    scheme = make_scheme(config(reweight="gate", frl_rate=0.5, frl_limit=0.8, gate_margin=0.05), 3)
    assert scheme.settings().bndy_weight == [1.0, 1.0, 1.0]
    # The input model: a at 90% and b at 45% pass the 40% floor, c at 10% fails it.
    scheme.update(Feedback([1.0] * 3, [0.9, 0.45, 0.1], bars=[0.4] * 3,
                           passed=[True, True, False]))
    # Targets: a keeps 90%, b its bar + margin (45%), c 45%; only c is short: phi_c = 0.175.
    assert scheme.state["target"] == pytest.approx([0.9, 0.45, 0.45])
    first = scheme.settings()
    assert first.bndy_weight == pytest.approx([1 / 1.175, 1 / 1.175, 1.525 / 1.175])
    assert first.nat_weight == first.bndy_weight
    # a falls to 80% and c rises to 30%: phi = [0.05, 0, 0.25], weights 1 + 3 phi over their mean.
    scheme.update(Feedback([1.0] * 3, [0.8, 0.45, 0.3]))
    assert scheme.state["phi"] == pytest.approx([0.05, 0.0, 0.25])
    assert scheme.settings().bndy_weight == pytest.approx([1.15 / 1.3, 1 / 1.3, 1.75 / 1.3])
    # Back above their targets, the multipliers fall to zero: uniform weights again.
    scheme.update(Feedback([1.0] * 3, [1.0, 0.9, 1.0]))
    assert scheme.settings().bndy_weight == pytest.approx([1.0, 1.0, 1.0])


def test_the_multipliers_stay_within_their_limit():
    scheme = make_scheme(config(reweight="gate", frl_rate=10.0, frl_limit=0.8), 2)
    scheme.update(Feedback([1.0] * 2, [0.0, 0.0], bars=[0.5, 0.5], passed=[False, False]))
    assert sum(scheme.state["phi"]) == pytest.approx(0.8)
    assert scheme.settings().bndy_weight == pytest.approx([1.0, 1.0])


def test_without_a_policy_classes_below_the_mean_less_tau_are_lifted():
    scheme = make_scheme(config(reweight="gate", frl_tau=0.05, gate_margin=0.05), 3)
    scheme.update(Feedback([1.0] * 3, [0.9, 0.6, 0.3], bars=[None] * 3, passed=[True] * 3))
    # Mean 60% less tau: 55%; each class keeps at least its own figure.
    assert scheme.state["target"] == pytest.approx([0.9, 0.6, 0.55])
    assert scheme.state["phi"] == pytest.approx([0.0, 0.0, 0.125])


# --- the noise of a gain, paired over the validation examples --------------------------------


def _paired(*classes: str) -> Validation:
    """Validation figures from per-class outcome strings ("1": robust)."""
    correct = [c.count("1") for c in classes]
    n = [len(c) for c in classes]
    robust = [k / m for k, m in zip(correct, n, strict=True)]
    worst = min(range(len(robust)), key=lambda k: robust[k])
    return Validation([1.0] * len(n), robust, 1.0, sum(robust) / len(n), robust[worst],
                      str(worst), n, correct, ["passed"] * len(n), outcomes=list(classes))


def test_the_same_counts_are_a_gain_or_noise_depending_on_which_examples_changed():
    base = _paired("11" + "0" * 23, "1" * 20 + "0" * 5)
    # 2 -> 4 of 25 by two more robust examples: d = 2, noise sqrt(3)/25 = 6.9 pp < 8 pp.
    two_more = _paired("1111" + "0" * 21, base.outcomes[1])
    assert noise(two_more, base) == pytest.approx(3**0.5 / 25)
    assert better(two_more, base, b_is_input=True)
    # 4 of 25 on other examples: the models disagree on 6, noise sqrt(7)/25 = 10.6 pp > 8 pp.
    others = _paired("00" + "1111" + "0" * 19, base.outcomes[1])
    assert noise(others, base) == pytest.approx(7**0.5 / 25)
    assert not better(others, base, b_is_input=True)
    # Unpaired (no outcomes): the classes are counted apart, 9.6 pp.
    plain = replace(two_more, outcomes=[])
    assert noise(plain, base) == pytest.approx(0.0962, abs=5e-4)


def test_a_class_mean_higher_beyond_its_noise_displaces_the_input_at_a_worst_class_no_lower():
    base = _paired("1" * 24 + "0" * 16, "1" * 30 + "0" * 10)
    # Worst class +1 of 40 (within its noise sqrt(2)/40), the other +6: class mean +8.75 pp
    # against a paired noise of sqrt((1.5 + 6.5) / 40**2) / 2 = 3.5 pp.
    lifted = _paired("1" * 25 + "0" * 15, "1" * 36 + "0" * 4)
    assert lifted.worst_robust - base.worst_robust < noise(lifted, base)
    assert mean_noise(lifted, base) == pytest.approx(8**0.5 / 40 / 2)
    assert better(lifted, base, b_is_input=True)
    # The same lift elsewhere with the worst class one example lower is not better.
    lower = _paired("1" * 23 + "0" * 17, "1" * 36 + "0" * 4)
    assert not better(lower, base, b_is_input=True)
    # Without outcomes there is no paired noise for the mean: only the worst class counts.
    assert mean_noise(replace(lifted, outcomes=[]), base) == math.inf
    assert not better(replace(lifted, outcomes=[]), base, b_is_input=True)


def test_a_class_that_passed_may_not_fall_beyond_the_noise_even_while_it_still_passes():
    names = ["a", "b"]
    base = replace(_paired("1" * 20 + "0" * 5, "11" + "0" * 23),
                   verdicts=["passed", "flagged"])
    budget = Budget.around(base, 0.5, 0.5, names)  # a budget wide enough not to matter
    assert budget.keep_passing == ["a"]
    # a: 20 -> 16 of 25 (four examples broken, still passing): 16 pp against sqrt(5)/25.
    fell = replace(_paired("1" * 16 + "0" * 9, "1" * 10 + "0" * 15),
                   verdicts=["passed", "passed"])
    assert budget.refusals(fell, names, base) == ["a fell 16.0 pp, beyond the noise (8.9 pp)"]
    assert budget.refusals(fell, names) == []  # without the input's outcomes: verdicts only
    # a: 20 -> 19 (one broken): 4 pp within sqrt(2)/25 = 5.7 pp; b may fall, it never passed.
    slipped = replace(_paired("1" * 19 + "0" * 6, "1" + "0" * 24),
                      verdicts=["passed", "flagged"])
    assert budget.refusals(slipped, names, base) == []
    run = RunState(0, budget, Candidate(0, {}, base), [{"epoch": 0, "validation": base.to_dict()}],
                   names)
    assert not run.offer(Candidate(1, {}, fell)) and run.best.epoch == 0


def test_when_the_input_is_kept_harden_says_which_way_to_turn_the_learning_rate():
    from robaudit.harden.run import _what_next

    base = _paired("1" * 20 + "0" * 5)
    history = [{"epoch": 0, "validation": base.to_dict()}, {"epoch": 1, "refused": []},
               {"epoch": 2, "refused": []}]
    run = RunState(2, Budget.around(base, 0.02, 0.01, ["a"]), Candidate(0, {}, base), history,
                   ["a"])
    assert _what_next(config(lr=5e-5), run) == (
        "the model moved too little: a larger --lr (this run: 5e-05) or more --epochs may move "
        "it beyond the noise")
    history[1]["refused"] = ["a fell 16.0 pp, beyond the noise (8.9 pp)"]
    mixed = _what_next(config(), run)
    assert mixed == "more --epochs, another --lr or a larger budget may find one"


def test_a_class_that_passed_close_to_its_bar_may_not_fall_at_all():
    names = ["a", "b"]
    # a passes at 11 of 25 (44%) against a 40% bar: within one standard error (9.6 pp) of it.
    base = replace(_paired("1" * 11 + "0" * 14, "1" * 20 + "0" * 5),
                   verdicts=["passed", "passed"], bars=[0.4, 0.4])
    budget = Budget.around(base, 0.5, 0.5, names)
    # One example fewer: 4 pp, within the fall's noise (5.7 pp), still passing, but refused.
    fell = replace(_paired("1" * 10 + "0" * 15, "1" * 20 + "0" * 5), verdicts=["passed"] * 2)
    assert budget.refusals(fell, names, base) == [
        "a fell 4.0 pp and passed within the noise of its bar (44.0% against 40.0%)"]
    # b, 40 pp above the bar, may lose one example: within its noise.
    b_fell = replace(_paired("1" * 11 + "0" * 14, "1" * 19 + "0" * 6), verdicts=["passed"] * 2)
    assert budget.refusals(b_fell, names, base) == []
