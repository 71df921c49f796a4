"""Comparing reports with a baseline: `robaudit compare` and `scan --baseline`, exit codes exact."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import DIGITS

from robaudit.cli import main
from robaudit.compare import Figures, compare, rank_agreement
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
    assert "DROPPED 0: robust accuracy 83.3% dropped 16.7 pp from the baseline 100.0%" in out
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
    (lambda d: d["config"].update(attacks=["pgd"]), "attacks (baseline pgd,tpgd,dlr-t, "),
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


def test_a_report_from_before_the_finish_says_how_to_compare_with_it(report, tmp_path, capsys):
    old = copy.deepcopy(report)
    old["config"].pop("finish")  # reports from before the finish have no such key
    base, new = write(tmp_path, "b.json", old), write(tmp_path, "n.json", report)
    assert main(["compare", base, new, "--max-drop", "0.03"]) == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert "attacks (baseline pgd,tpgd, " in err
    assert "a report without the dlr-t finish compares with a scan run with --finish none" in err


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


# --- rank agreement: do the two reports agree on which classes are weak? -----------------------


def test_rank_agreement_known_answers():
    accs = {"cat": 0.2, "dog": 0.4, "car": 0.6, "ship": 0.8}
    same = rank_agreement(accs, dict(accs))
    assert same.spearman == pytest.approx(1.0)
    assert same.moved_most == ()
    assert [(m.name, m.baseline) for m in same.classes] == [
        ("cat", 1.0), ("dog", 2.0), ("car", 3.0), ("ship", 4.0)]
    # Reversed ranking: the most robust class became the least robust, and so on.
    reversed_ = rank_agreement(accs, {"cat": 0.9, "dog": 0.7, "car": 0.5, "ship": 0.3})
    assert reversed_.spearman == pytest.approx(-1.0)
    # Places move by 3 (cat, ship) and 1 (dog, car): the two largest first, in class order.
    assert [(m.name, m.baseline, m.current, m.moved) for m in reversed_.moved_most] == [
        ("cat", 1.0, 4.0, 3.0), ("ship", 4.0, 1.0, -3.0), ("dog", 2.0, 3.0, 1.0)]


def test_rank_agreement_ties_missing_classes_and_no_ranking():
    # One swap among four classes: rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    one_swap = rank_agreement({"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4},
                              {"a": 0.2, "b": 0.1, "c": 0.3, "d": 0.4, "e": 0.0}, top=1)
    assert one_swap.spearman == pytest.approx(0.8)
    assert [m.name for m in one_swap.classes] == ["a", "b", "c", "d"]  # e: not in the baseline
    assert [(m.name, m.moved) for m in one_swap.moved_most] == [("a", 1.0)]
    # Tied classes share their average place.
    tied = rank_agreement({"a": 0.5, "b": 0.5, "c": 0.9}, {"a": 0.1, "b": 0.5, "c": 0.9})
    assert [m.baseline for m in tied.classes] == [1.5, 1.5, 3.0]
    # Ranks (1.5, 1.5, 3) against (1, 2, 3): 1.5 / sqrt(1.5 * 2).
    assert tied.spearman == pytest.approx(3 ** 0.5 / 2)
    # Every class at 100%: nothing to rank.
    assert rank_agreement({"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 1.0}).spearman is None


def reversed_ranking(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two copies of the three-class report whose worst-case rankings are reversed."""
    base = with_worst(with_worst(with_worst(report, "0", 6), "6", 4), "8", 2)
    new = with_worst(with_worst(with_worst(report, "0", 2), "6", 4), "8", 6)
    return base, new


def test_compare_prints_and_writes_the_rank_correlation(report, tmp_path, capsys):
    base, new = reversed_ranking(report)
    b, n = write(tmp_path, "b.json", base), write(tmp_path, "n.json", new)
    out_json = tmp_path / "cmp.json"
    assert main(["compare", b, b, "--max-drop", "1", "--json", str(out_json)]) == ExitCode.OK
    out = " ".join(capsys.readouterr().out.split())  # the terminal wraps long lines
    assert "class ranking: Spearman +1.00 from the baseline to the report" in out
    assert "moved most" not in out
    same = json.loads(out_json.read_text())
    assert same["schema"] == "robaudit.compare" and same["schema_version"] == 1
    assert same["rank_correlation"] == pytest.approx(1.0) and same["rank_moved_most"] == []

    assert main(["compare", b, n, "--max-drop", "1", "--json", str(out_json)]) == ExitCode.OK
    out = " ".join(capsys.readouterr().out.split())
    assert ("class ranking: Spearman -1.00 from the baseline to the report; moved most (place 1 "
            "= least robust): 0 (3 -> 1), 8 (1 -> 3)") in out
    assert f"JSON comparison: {out_json}" in out
    doc = json.loads(out_json.read_text())
    assert doc["rank_correlation"] == pytest.approx(-1.0)
    assert doc["rank_moved_most"] == [
        {"name": "0", "baseline": 3.0, "current": 1.0, "moved": -2.0},
        {"name": "8", "baseline": 1.0, "current": 3.0, "moved": 2.0}]
    assert [(c["name"], c["rank_baseline"], c["rank_current"]) for c in doc["classes"]] == [
        ("0", 3.0, 1.0), ("6", 2.0, 2.0), ("8", 1.0, 3.0)]
    assert [round(c["delta"], 4) for c in doc["classes"]] == [-0.6667, 0.0, 0.6667]


def test_compare_json_to_an_unwritable_path_is_refused_first(report, tmp_path, capsys):
    b = write(tmp_path, "b.json", report)
    assert main(["compare", b, b, "--max-drop", "0", "--json", str(tmp_path)]) == 4
    assert "it is a directory" in capsys.readouterr().err


def test_the_html_of_a_scan_against_a_baseline_shows_the_rank_agreement(report):
    from robaudit.reports.html import render_html

    base, new = reversed_ranking(report)
    doc = copy.deepcopy(new)
    doc["baseline"] = {"path": "<base>.json", "created": "2026-01-01T00:00:00Z",
                       "robust": Figures.from_doc(base, "b.json").robust}
    doc["classes"][0]["verdict"]["failures"] = []  # class 0 dropped 66.7 pp: no gate said so
    page = render_html(doc)
    section = page[page.index('id="baseline"'):page.index('id="confusion"')]
    text = " ".join(section.split())
    assert "Spearman <b>-1.00</b> over 3 classes" in text
    assert "<b>0</b> 3 → 1, <b>8</b> 1 → 3" in text
    assert "&lt;base&gt;.json" in text and "<base>" not in text  # escaped
    # Largest drop first: class 0 (100% -> 33.3%), then 6 (unchanged), then 8 (+66.7 pp).
    rows = [r.split("</td>")[0].split(">")[-1] for r in section.split('<td class="name">')[1:]]
    assert rows == ["0", "6", "8"]
    assert "-66.7 pp" in text and "+66.7 pp" in text
    # A report without a baseline has no such section.
    assert 'id="baseline"' not in render_html(new)
