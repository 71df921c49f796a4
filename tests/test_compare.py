"""Comparing reports with a baseline: `robaudit compare` and `scan --baseline`, exit codes exact."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import DIGITS

from robaudit.cli import main
from robaudit.compare import Figures, compare
from robaudit.errors import ExitCode, UsageError
from robaudit.metrics import wilson_interval

SCAN = ["scan", str(DIGITS / "model.pt2"), "--data", str(DIGITS / "test.npz"),
        "--config", str(DIGITS / "robaudit.toml"), "--classes", "0,6,8", "--per-class", "6",
        "--steps", "3", "--no-runtime-check", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real scan of three classes of the example, shared by the tests."""
    path = tmp_path_factory.mktemp("scan") / "report.json"
    assert main([*SCAN, "--json", str(path)]) in (ExitCode.OK, ExitCode.FLAGGED)
    return json.loads(path.read_text())


def write(tmp_path: Path, name: str, doc: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def with_worst(doc: dict[str, Any], name: str, correct: int) -> dict[str, Any]:
    """A copy of ``doc`` in which class ``name`` has ``correct`` robust examples, worst case."""
    doc = copy.deepcopy(doc)
    c = next(c for c in doc["classes"] if c["name"] == name)
    n = c["n"]
    c["robust"]["worst"] = {"acc": correct / n, "correct": correct, "n": n,
                            "ci95": list(wilson_interval(correct, n))}
    return doc


def worst_correct(doc: dict[str, Any], name: str) -> int:
    return next(c for c in doc["classes"] if c["name"] == name)["robust"]["worst"]["correct"]


def test_identical_reports_pass(report, tmp_path, capsys):
    path = write(tmp_path, "r.json", report)
    assert main(["compare", path, path, "--max-drop", "0.03"]) == ExitCode.OK == 0
    out = capsys.readouterr().out
    assert "3 within 3.0 pp" in out and "DROPPED" not in out
    assert "+0.0 pp" in out


def test_a_drop_beyond_the_allowed_fails(report, tmp_path, capsys):
    # Class 0 loses one of its 6 examples: a drop of 16.7 pp.
    base = with_worst(report, "0", 6)
    new = with_worst(report, "0", 5)
    args = ["compare", write(tmp_path, "b.json", base), write(tmp_path, "n.json", new)]
    assert main([*args, "--max-drop", "0.1"]) == ExitCode.FLAGGED == 1
    out = capsys.readouterr().out
    assert "-16.7 pp" in out and "DROPPED" in out
    assert "DROPPED 0: robust accuracy 83.3% dropped 16.7% from the baseline 100.0%" in out
    assert "1 class dropped more than 10.0 pp, 2 within 10.0 pp" in out
    # The same drop is allowed by a looser policy, and a gain never fails.
    assert main([*args, "--max-drop", "0.2"]) == ExitCode.OK
    assert main(["compare", args[2], args[1], "--max-drop", "0"]) == ExitCode.OK


def test_significance_spares_a_drop_within_the_interval(report):
    base = Figures.from_doc(with_worst(report, "0", 6), "b.json")
    new = with_worst(report, "0", 5)
    # 5/6 has a 95% upper bound of 97%: within 0.1 of the baseline's 100%.
    assert compare(base, new, max_drop=0.1, significance=True).flagged == []
    flagged = compare(base, new, max_drop=0.1).flagged
    assert [(c.name, round(c.delta, 4)) for c in flagged] == [("0", -0.1667)]


@pytest.mark.parametrize("change, named", [
    (lambda d: d["config"].update(eps=0.1), "eps (baseline 0.2, "),
    (lambda d: d["config"].update(attacks=["pgd"]), "attacks (baseline pgd,tpgd, "),
    (lambda d: d["classes"][8].update(n=0), "classes (only in the baseline: 8)"),
])
def test_reports_of_different_settings_are_a_usage_error(report, tmp_path, capsys, change,
                                                          named):
    other = copy.deepcopy(report)
    change(other)
    base, new = write(tmp_path, "b.json", report), write(tmp_path, "n.json", other)
    assert main(["compare", base, new, "--max-drop", "0.03"]) == ExitCode.USAGE_ERROR == 4
    err = capsys.readouterr().err
    assert f"cannot compare {new} with the baseline {base}: they differ in {named}" in err


def test_not_a_report_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["compare", str(bad), str(bad), "--max-drop", "0.03"]) == ExitCode.USAGE_ERROR
    assert "not a robaudit scan report" in capsys.readouterr().err


def test_a_weaker_attack_is_compared_with_a_warning(report):
    weaker = copy.deepcopy(report)
    weaker["config"]["steps"] = 1
    result = compare(Figures.from_doc(report, "b.json"), weaker, max_drop=0.03,
                     report_path="n.json")
    assert result.warnings[0].startswith("steps differs (baseline 3, n.json 1)")


def test_scan_with_a_baseline_flags_the_drop_in_one_step(report, tmp_path, capsys):
    # The baseline claims class 8 kept one more example than this scan will.
    base = with_worst(report, "8", worst_correct(report, "8") + 1)
    path = write(tmp_path, "b.json", base)
    out_json = tmp_path / "r.json"
    code = main([*SCAN, "--min-class-robust", "0", "--baseline", path, "--max-drop", "0.1",
                 "--json", str(out_json)])
    assert code == ExitCode.FLAGGED
    doc = json.loads(out_json.read_text())
    assert doc["verdict"]["flagged"] == ["8"]
    assert doc["verdict"]["gate"]["max_drop"] == 0.1
    assert doc["baseline"]["path"] == path
    assert [f["policy"] for f in doc["classes"][8]["verdict"]["failures"]] == ["max_drop"]
    assert "1 class dropped more than 10.0 pp" in capsys.readouterr().out
    # Against itself nothing dropped.
    same = write(tmp_path, "same.json", report)
    assert main([*SCAN, "--min-class-robust", "0", "--baseline", same,
                 "--max-drop", "0"]) == ExitCode.OK


def test_scan_with_a_mismatched_baseline_stops_before_attacking(report, tmp_path, capsys):
    path = write(tmp_path, "b.json", report)
    assert main([*SCAN, "--eps", "0.1", "--baseline", path, "--max-drop", "0.03"]) == 4
    assert "they differ in eps (baseline 0.2, this scan 0.1)" in capsys.readouterr().err
    assert main([*SCAN, "--baseline", path]) == 4
    assert "needs max_drop (--max-drop)" in capsys.readouterr().err


def test_compare_refuses_a_drop_outside_0_1(report):
    with pytest.raises(UsageError, match="max_drop must be between 0 and 1"):
        compare(Figures.from_doc(report, "b.json"), report, max_drop=3)
