"""The sequential gate: the confidence sequence on simulated populations (known answers, no
model), then the scan's sequential mode through the real CLI on the bundled example."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DIGITS, interrupt_scan

from robaudit.cli import main
from robaudit.errors import ExitCode
from robaudit.reports.html import render_html
from robaudit.reports.schema import read_json
from robaudit.sequential import (
    ABOVE,
    BELOW,
    confidence_sequence,
    decide,
    needed,
    round_order,
)

pytest_plugins = ["pytester"]


def _population(size: int, robust: int, rng: np.random.Generator) -> np.ndarray:
    pop = np.zeros(size, dtype=bool)
    pop[:robust] = True
    rng.shuffle(pop)
    return pop


def _bounds(size: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """low[n, k] and high[n, k] for every sample: each trial is then a look-up."""
    low = np.zeros((size + 1, size + 1), dtype=np.int64)
    high = np.zeros_like(low)
    for n in range(size + 1):
        for k in range(n + 1):
            low[n, k], high[n, k], estimate = confidence_sequence(k, n, size, alpha)
            assert low[n, k] <= estimate <= high[n, k]
    return low, high


def _first_exit(low: np.ndarray, high: np.ndarray, seen: np.ndarray, lo: int, hi: int) -> int:
    """The first n (1-based) at which [low, high] leaves [lo, hi], or 0 if it never does."""
    steps = np.arange(1, len(seen) + 1)
    out = (low[steps, seen] > lo) | (high[steps, seen] < hi)
    return int(steps[out][0]) if out.any() else 0


def test_needed_counts_as_the_gate_judges() -> None:
    # 15 of 50 is exactly 30%: the gate passes it, so 15 suffice; 0.3 * 50 in floats is 15.0...
    assert needed(0.3, 50) == 15
    assert needed(0.31, 50) == 16
    assert needed(0.0, 50) == 0
    assert needed(1.0, 7) == 7


def test_the_whole_population_seen_is_exact_and_nothing_seen_is_everything() -> None:
    assert confidence_sequence(13, 40, 40, 0.01) == (13, 13, 13)
    low, high, _ = confidence_sequence(0, 0, 40, 0.01)
    assert (low, high) == (0, 40)


def test_an_all_robust_sample_is_decided_when_the_theory_says() -> None:
    # With the uniform prior and n robust of n, the mixture's likelihood is 1/(n+1), so a count
    # K is excluded once C(K,n)/C(C,n) <= alpha/(n+1): the floor 0.3 of 100 (K <= 29 fails)
    # falls at the first n where C(29,n)/C(100,n)*(n+1) <= 0.01.
    theory = next(n for n in range(1, 100)
                  if math.comb(29, n) / math.comb(100, n) * (n + 1) <= 0.01)
    assert theory == 5
    first = next(n for n in range(1, 100)
                 if decide(n, n, 100, needed(0.3, 100), 0.01).status == ABOVE)
    assert first == theory


def test_the_sequence_covers_the_truth_at_every_step_often_enough() -> None:
    # Anytime validity: the share of runs whose set ever misses the true count stays under
    # alpha (0.1 here, so that misses happen and the bound is tested, not only met).
    rng = np.random.default_rng(1)
    size, truth, alpha, trials = 40, 17, 0.1, 300
    low, high = _bounds(size, alpha)
    misses = sum(_first_exit(low, high, np.cumsum(_population(size, truth, rng)), truth, truth) > 0
                 for _ in range(trials))
    assert misses <= alpha * trials
    assert misses > 0  # the bound is not vacuous: some runs do stray


@pytest.mark.parametrize(("robust", "wrong"), [(15, BELOW), (14, ABOVE)])
def test_a_class_at_its_floor_is_decided_wrongly_no_more_than_allowed(robust: int,
                                                                      wrong: str) -> None:
    # 50 clean-correct examples of 50, floor 0.3: 15 robust passes exactly at the floor, 14
    # fails by one example; deciding after every example is the hardest case for the bound.
    rng = np.random.default_rng(2)
    alpha, trials, need = 0.05, 1000, needed(0.3, 50)
    low, high = _bounds(50, alpha)
    errors = 0
    for _ in range(trials):
        seen = np.cumsum(_population(50, robust, rng))
        n = _first_exit(low, high, seen, need - 1, need)  # decided: low >= need or high < need
        status = None if n == 0 else decide(int(seen[n - 1]), n, 50, need, alpha).status
        errors += status == wrong
    assert errors <= alpha * trials


def test_a_class_far_from_its_floor_is_decided_within_the_predicted_examples() -> None:
    # Robust 90% against a floor of 30%: the set drops K/C = 0.3 once n*KL(0.9||0.3) exceeds
    # log((C+1)/alpha) (the uniform prior's mixture loses at most log(C+1)).
    rng = np.random.default_rng(3)
    size, alpha, p, q = 200, 0.01, 0.9, 0.3
    kl = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    bound = math.log((size + 1) / alpha) / kl
    assert 12 < bound < 13
    stops = []
    for _ in range(60):
        seen = np.cumsum(_population(size, 180, rng))
        stops.append(next(n for n in range(1, size + 1)
                          if decide(int(seen[n - 1]), n, size, needed(q, size), alpha).status))
    assert np.median(stops) <= bound
    assert min(stops) >= 4  # 4 robust of 4 cannot yet exclude 30%: (0.3^4)*5 > 0.01


def test_round_order_depends_only_on_the_seed_and_the_indices() -> None:
    order = round_order(np.arange(100), seed=7)
    assert sorted(order.tolist()) == list(range(100))
    assert order.tolist() != list(range(100))
    # The relative order of a subset is the same as in the whole: no dependence on which
    # other examples (another rank's, another batch's) are there.
    evens = round_order(np.arange(0, 100, 2), seed=7)
    assert evens.tolist() == [i for i in order.tolist() if i % 2 == 0]
    assert round_order(np.arange(100), seed=8).tolist() != order.tolist()


# --- the scan's sequential mode, through the real CLI on the bundled digits example ----------

SMALL = ("--device", "cpu", "--eps", "0.2", "--attacks", "pgd", "--finish", "none", "--steps",
         "3", "--per-class", "30", "--min-class-robust", "0.5", "-q")


def _scan(tmp_path: Path, name: str, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / f"{name}.json"
    code = main(["scan", str(DIGITS / "model.pt2"), "--data", str(DIGITS / "test.npz"), *SMALL,
                 *extra, "--json", str(out)])
    return code, read_json(out)


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("sequential")
    return {"full": _scan(tmp, "full"), "sequential": _scan(tmp, "seq", "--sequential"),
            "batch": _scan(tmp, "batch", "--sequential", "--batch-size", "7")}


def test_a_sequential_scan_gives_the_full_scans_verdicts_attacking_fewer(scans: Any) -> None:
    (full_code, full), (code, seq) = scans["full"], scans["sequential"]
    assert code == full_code == ExitCode.FLAGGED
    assert seq["verdict"]["flagged"] == full["verdict"]["flagged"] == ["8", "9"]
    assert seq["sequential"]["of"] == sum(c["clean"]["correct"] for c in full["classes"]) == 293
    assert seq["sequential"]["attacked"] == 166  # the same seed attacks the same examples
    for c in seq["classes"]:
        s = c["sequential"]
        low, high = s["interval"]
        assert low <= c["robust"]["worst"]["acc"] <= high
        if s["decided"] == "above":
            assert low >= 0.5 and c["verdict"]["passed"]
        elif s["decided"] == "below":
            assert high < 0.5 and not c["verdict"]["passed"]
        if s["attacked"] < s["of"]:
            assert s["decided"] is not None and not s["exhausted"]
        else:  # examples ran out: judged on the full figure, as the full scan judges it
            full_class = full["classes"][c["index"]]
            assert c["robust"]["worst"] == full_class["robust"]["worst"]


def test_a_sequential_scan_does_not_depend_on_the_batch_size(scans: Any) -> None:
    (_, seq), (_, batch) = scans["sequential"], scans["batch"]
    assert batch["sequential"] == seq["sequential"]
    assert [c["sequential"] for c in batch["classes"]] == [c["sequential"] for c in seq["classes"]]
    assert [c["robust"] for c in batch["classes"]] == [c["robust"] for c in seq["classes"]]


@pytest.mark.parametrize(("extra", "message"), [
    (("--max-gap", "0.3"), "error: --sequential decides each class against its own floor; "
     "--max-gap depends on every class's figure: use --min-class-robust or --max-drop, or "
     "drop --sequential"),
    (("--min-ratio", "0.5"), "--min-ratio depends on every class's figure"),
    (("--confidence", "1"), "error: confidence must be at least 0.5 and below 1, got 1"),
    (("--eps", "0.1,0.2"), "error: --sequential judges one eps; a sweep needs every example"),
])
def test_what_a_sequential_scan_cannot_decide_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...],
        message: str) -> None:
    code = main(["scan", str(DIGITS / "model.pt2"), "--data", str(DIGITS / "test.npz"), *SMALL,
                 "--sequential", *extra, "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == ExitCode.USAGE_ERROR
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_two_gloo_ranks_give_one_processs_sequential_report(tmp_path: Path) -> None:
    # Each round's examples are sharded and gathered: the same rounds, decisions and figures.
    common = ["scan", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "test.npz"),
              "--config", str(DIGITS / "robaudit.toml"), "--steps", "3", "--per-class", "30",
              "--batch-size", "32", "--sequential", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    single = subprocess.run([sys.executable, "-m", "robaudit", *common, "--json", str(one)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == ExitCode.FLAGGED, single.stderr
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", "-m", "robaudit", *common, "--json",
                            str(two)], env=env, capture_output=True, text=True, timeout=300)
    assert ranks.returncode == ExitCode.FLAGGED, ranks.stderr[-3000:]
    docs = [read_json(one), read_json(two)]
    for doc in docs:
        for key in ("timings", "created", "environment"):
            del doc[key]
        del doc["config"]["json"]  # the two reports' paths
        # onnxruntime's check of the conversion runs once, on each rank's first batch of the
        # clean pass: a measurement of the load, not a figure of the scan (as in a full scan).
        del doc["model"]["runtime_max_abs_diff"]
    assert docs[0] == docs[1]
    seq = docs[1]["sequential"]
    assert (seq["rounds"], seq["attacked"], seq["of"]) == (4, 152, 293)
    assert docs[1]["verdict"]["flagged"] == ["8", "9"]
    assert ranks.stdout.count("flagged") == 1  # rank 0 alone prints


def test_ctrl_c_in_a_round_keeps_the_rounds_before_it_and_their_decisions(tmp_path: Path) -> None:
    # 200 steps in batches of 8: round 2 takes seconds, so the signal sent on its first progress
    # line lands inside it. An unfinished round decides nothing and is left out of the figures.
    report = tmp_path / "r.json"
    run = interrupt_scan(["scan", str(DIGITS / "model.pt2"), "--data", str(DIGITS / "test.npz"),
                          "--device", "cpu", "--eps", "0.2", "--attacks", "pgd", "--finish",
                          "none", "--steps", "200", "--batch-size", "8", "--per-class", "20",
                          "--min-class-robust", "0.4", "--sequential", "--json", str(report)],
                         signal.SIGINT, tmp_path, after="robaudit: attacking (round 2) ")
    assert run.code == ExitCode.INTERRUPTED, run.err
    assert "Traceback" not in run.err
    assert "robaudit: clean pass 200/200" in run.err
    doc = read_json(report)
    assert doc["partial"] is True and doc["verdict"]["exit_code"] == ExitCode.INTERRUPTED
    assert doc["sequential"]["rounds"] == 1
    states = {c["name"]: c["sequential"] for c in doc["classes"]}
    # Round 1 (8 of each class) decided four classes; their decisions stand as it made them.
    assert {k: s["decided"] for k, s in states.items() if s["decided"]} == dict.fromkeys(
        ["2", "5", "6", "7"], "above")
    for name, s in states.items():
        assert s["attacked"] == 8 and len(s["history"]) == 1, name  # round 2 left out
        assert s["round"] == (1 if s["decided"] else None), name
        if s["decided"]:
            assert s["interval"][0] >= 0.4
        else:
            assert s["interval"][0] < 0.4 <= s["interval"][1]
    assert "class 2: above its threshold, decided after 8 of 20 in round 1" in run.out
    assert "interrupted: partial results" in run.out


# The floor goes to scan() too: it is what each class's sequence decides against.
PLUGIN_TESTS = f"""
import pytest

MODEL = {str(DIGITS / "model.pt2")!r}
DATA = {str(DIGITS / "test.npz")!r}
FAST = dict(eps=0.2, attacks="pgd", finish="none", steps=3, per_class=20, runtime_check=False,
            device="cpu")


@pytest.mark.parametrize("floor", [0.1, 0.5])
def test_floor(robaudit, floor):
    full = robaudit.scan(MODEL, data=DATA, min_class_robust=floor, **FAST)
    audit = robaudit.scan(MODEL, data=DATA, min_class_robust=floor, sequential=True, **FAST)
    assert audit.flagged == full.flagged
    assert audit.doc["sequential"]["attacked"] < audit.doc["sequential"]["of"] == 198
    audit.assert_passes(min_class_robust=floor)
"""


def test_the_pytest_plugins_sequential_keyword_gives_the_full_scans_outcome(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # One subprocess, as a user runs it (torch cannot register its operators twice in one).
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    pytester.makepyfile(test_user=PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*robaudit: 2 of 10 classes failed the robustness policy*",
        "*  8: robust accuracy *% is below the floor 50.0%",
        "*  9: robust accuracy *% is below the floor 50.0%",
        "test_user.py:15: Failed",  # assert_passes, after the same flagged classes as in full
        "FAILED test_user.py::test_floor?0.5? - *",  # (fnmatch reads [] as a set)
    ])


def _narrowing_svg(html: str) -> ET.Element:
    start = html.index('<svg class="chart narrowing"')
    return ET.fromstring(html[start:html.index("</svg>", start) + len("</svg>")])


def test_the_html_draws_how_the_weakest_classes_intervals_narrowed(scans: Any) -> None:
    _, doc = scans["sequential"]
    svg = _narrowing_svg(render_html(doc))
    groups = [g for g in svg.iter("g") if g.find("path") is not None]
    # The four weakest, weakest first; each outline runs through every round's upper end and
    # back through its lower ends (8 and 1 were decided in 3 rounds, 9 and 3 in 4).
    assert [g.findtext("title") for g in groups] == [
        "8: below after 18 of 28", "9: below after 27 of 28", "1: above after 27 of 30",
        "3: above after 18 of 29"]
    vertices = [len(g.find("path").get("d", "").split("L")) for g in groups]  # type: ignore[union-attr]
    assert vertices == [6, 8, 8, 6]
    rounds = [[line.findtext("title") for line in g.iter("line")] for g in groups]
    assert [len(r) for r in rounds] == [3, 4, 4, 3]
    assert rounds[0][-1] == "8, round 3: 13.3%–43.3% after 18 of 28 attacked"
    # One threshold, the floor of 0.5: half way down the plot (y from 14 to 280).
    thresholds = [line for line in svg.iter("line") if line.get("class") == "threshold"]
    assert [(t.get("y1"), t.findtext("title")) for t in thresholds] == [
        ("147.0", "threshold 50.0%: 8, 9, 1, 3")]
    # A full scan has no rounds to draw.
    assert '<svg class="chart narrowing"' not in render_html(scans["full"][1])
