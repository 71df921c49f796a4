"""docs/make_findings.py: the page's tables and verdicts, built from tiny hand-made reports.

The full regeneration (``make findings``) runs minutes of attacks; these tests check only that the
figures on the page are the reports' figures, with known answers.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("make_findings", ROOT / "docs" / "make_findings.py")
assert spec is not None and spec.loader is not None
findings = importlib.util.module_from_spec(spec)
sys.modules["make_findings"] = findings
spec.loader.exec_module(findings)

ATTACKS = ("fgsm", "pgd", "tpgd", "cw")


def rate(acc: float) -> dict[str, Any]:
    return {"acc": acc}


def scan(robust: dict[str, list[float]], confusion: list[list[int]] | None = None,
         n: int = 10) -> dict[str, Any]:
    """A report of three classes a, b, c with the given robust accuracies per attack."""
    names = ["a", "b", "c"]
    worst = [min(robust[a][i] for a in ATTACKS) for i in range(3)]
    confusion = confusion or [[0, 1, 2], [3, 0, 0], [1, 1, 0]]
    return {
        "config": {"eps_text": "0.2", "temperatures": [0.1, 0.5]},
        "attacks": [{"name": a} for a in ATTACKS],
        "class_names": names,
        "classes": [
            {"name": name, "n": n, "clean": rate(1.0), "confusion_row": confusion[i],
             "robust": {**{a: rate(robust[a][i]) for a in ATTACKS}, "worst": rate(worst[i])}}
            for i, name in enumerate(names)
        ],
        "summary": {
            "clean_acc": 1.0,
            "robust_acc": {a: sum(robust[a]) / 3 for a in ATTACKS} | {"worst": sum(worst) / 3},
            "rank_correlation": {"fgsm~pgd": 1.0, "fgsm~tpgd": 0.5, "fgsm~cw": 1.0,
                                 "pgd~tpgd": 0.5, "pgd~cw": 1.0, "tpgd~cw": None},
            "gain_split": {"weakest": "fgsm", "strongest": "tpgd", "total_broken": 8,
                           "per_class": [6, 2, 0], "vulnerable_half_share": 0.75},
        },
    }


BASE = scan({"fgsm": [0.6, 0.8, 0.9], "pgd": [0.2, 0.6, 0.9],
             "tpgd": [0.1, 0.6, 0.9], "cw": [0.2, 0.7, 0.9]})


def harden(before: dict[str, Any], after: dict[str, Any], epoch: int) -> dict[str, Any]:
    return {"kept": {"epoch": epoch}, "before": before, "after": after, "calibration": None}


def reports() -> dict[str, dict[str, Any]]:
    trades = scan({a: [0.5, 0.3, 0.8] for a in ATTACKS})
    lifted = scan({a: [0.4, 0.5, 0.8] for a in ATTACKS})
    return {
        "scan": BASE, "trades": trades, "fixed": BASE,
        "compare": {"rank_correlation": 0.5, "rank_moved_most": [
            {"name": "a", "baseline": 1.0, "current": 2.0, "moved": 1.0},
            {"name": "b", "baseline": 2.0, "current": 1.0, "moved": -1.0}]},
        "harden": harden(BASE, lifted, 3), "calibrate": harden(BASE, BASE, 0),
    }


def test_figures_from_one_report():
    s = findings.spread(BASE)
    # Worst case: a 0.1, b 0.6, c 0.9.
    assert (s["best"], s["worst"]) == ("c", "a")
    assert s["gap"] == pytest.approx(0.8)
    assert s["mean"] == pytest.approx(1.6 / 3)
    assert s["std"] == pytest.approx(((0.1 - 1.6 / 3) ** 2 + (0.6 - 1.6 / 3) ** 2
                                      + (0.9 - 1.6 / 3) ** 2) ** 0.5 / 3 ** 0.5)
    agreement = findings.attack_agreement(BASE)
    assert (agreement["min"], agreement["max"]) == (0.5, 1.0)
    assert agreement["pairs"]["tpgd vs cw"] is None
    # Class a broke 3 times (1 to b, 2 to c): its top two take all; b sent all 3 to a.
    assert findings.destinations(BASE) == [
        {"name": "a", "broken": 3, "to": [("c", 2 / 3), ("b", 1 / 3)], "share": 1.0},
        {"name": "b", "broken": 3, "to": [("a", 1.0)], "share": 1.0},
        {"name": "c", "broken": 2, "to": [("a", 0.5), ("b", 0.5)], "share": 1.0},
    ]
    pgd = findings.attack_figures(BASE)["pgd"]
    assert pgd["acc"] == pytest.approx(1.7 / 3) and pgd["worst"] == pytest.approx(0.2)


def test_class_table_has_every_figure():
    assert findings.class_table(BASE).splitlines() == [
        "| class | n | clean | fgsm | pgd | tpgd | cw | worst |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| a | 10 | 100.0% | 60.0% | 20.0% | 10.0% | 20.0% | 10.0% |",
        "| b | 10 | 100.0% | 80.0% | 60.0% | 60.0% | 70.0% | 60.0% |",
        "| c | 10 | 100.0% | 90.0% | 90.0% | 90.0% | 90.0% | 90.0% |",
    ]


def test_the_page_states_the_reports_figures_and_verdicts():
    docs = {"digits": reports(), "mnist": reports()}
    page = findings.render(docs)
    assert page.startswith("# The paper's six findings, reproduced with robaudit")
    # Finding 1: gap 80 points on both data sets; std of (0.1, 0.6, 0.9) is 33.0 points.
    assert "| UCI digits | 53.3% | c: 90.0% | a: 10.0% | 80.0% | 33.0% |" in page
    # Finding 2: attacks down to 0.50, defences 0.50: neither reaches 0.7.
    assert "| MNIST (5k) | 1.00 | 0.50 | 1.00 | 0.50 | 1.00 | – |" in page
    assert "| UCI digits | a / b | 53.3% | 0.50 | a (1 → 2), b (2 → 1) |" in page
    assert "**Verdict: across attacks does not reproduce, across defences does not reproduce**" \
        in page
    # Finding 3: 75% of the gain on the weaker half.
    assert "| UCI digits | fgsm → tpgd | 8 | 75% | 1 |" in page
    # Finding 4: every class sends all of its broken examples to two classes (even: 2/2).
    assert "| UCI digits | 100% | 100% | a → c 67%, b 33%; b → a 100%; c → a 50%, b 50% |" in page
    # Finding 5: T-PGD 53.3% against PGD 56.7%.
    assert "| UCI digits | fixed 2.5·ε/steps (the paper's PGD) | 56.7% | 53.3% | -3.3 pp |" \
        " 20.0% / 10.0% |" in page
    # Finding 6: fine-tuning lifts class a from 10% to 40%; the calibration changes nothing.
    assert ("| 3 | 100.0% → 100.0% | 53.3% → 56.7% | a: 10.0% → 40.0% | a: 40.0% |") in page
    assert "| – | 100.0% → 100.0% | 53.3% → 53.3% | a: 10.0% → 10.0% | a: 10.0% |" in page
    verdicts = [line for line in page.splitlines() if line.startswith("**Verdict")]
    assert [v.split("**")[1] for v in verdicts] == [
        "Verdict: reproduces", "Verdict: across attacks does not reproduce, across defences "
        "does not reproduce", "Verdict: reproduces", "Verdict: reproduces",
        "Verdict: reproduces", "Verdict: does not reproduce"]
    # The commands on the page are the ones the script runs.
    assert ("robaudit compare out/findings/digits/scan.json out/findings/digits/trades.json "
            "--max-drop 1 --json out/findings/digits/compare.json") in page


def test_a_verdict_follows_its_figures():
    docs = {"digits": reports(), "mnist": reports()}
    docs["mnist"]["compare"] = {**docs["mnist"]["compare"], "rank_correlation": 0.9}
    docs["digits"]["compare"] = {**docs["digits"]["compare"], "rank_correlation": 0.9}
    assert "across defences reproduces" in findings.finding2(docs)
    docs["digits"]["compare"] = {**docs["digits"]["compare"], "rank_correlation": None}
    assert "across defences does not reproduce" in findings.finding2(docs)


def test_the_mnist_example_is_what_its_readme_says():
    np = pytest.importorskip("numpy")
    ort = pytest.importorskip("onnxruntime")
    folder = ROOT / "examples" / "mnist"
    train, test = np.load(folder / "train.npz"), np.load(folder / "test.npz")
    assert train["x"].shape == (4000, 1, 28, 28) and test["x"].shape == (1000, 1, 28, 28)
    assert train["x"].dtype == np.uint8 and test["y"].dtype == np.int64
    assert np.bincount(test["y"]).tolist() == [100] * 10
    assert np.bincount(train["y"]).tolist() == [400] * 10
    x = test["x"].astype(np.float32) / 255
    for name in ("model.onnx", "trades.onnx"):
        session = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"image": x})
        assert (logits.argmax(1) == test["y"]).mean() > 0.9  # clean accuracy
