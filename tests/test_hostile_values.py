"""Hostile values: class names that drive a terminal or read as rich markup, numbers too large
for a float or a run, hand-edited reports, and an ASCII-only output encoding.

Every case runs the real CLI (``main`` or ``python -m robaudit``) on the bundled digits example
and files built here, and checks what a person sees: no raw escape sequence, one error line with
exit 4, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DIGITS, ROOT

from robaudit.cli import main
from robaudit.errors import ExitCode
from robaudit.reports.terminal import shown

MODEL = DIGITS / "model.pt2"
FAST = ("--per-class", "4", "--steps", "2", "--device", "cpu")
USAGE = ExitCode.USAGE_ERROR
#: Clear the screen, retitle the window (OSC ... BEL), a C1 CSI, rich markup that crashes or
#: links, a right-to-left override, and an honest non-ASCII name.
HOSTILE = ["zero\x1b[2J", "one\x1b]0;pwned\x07", "[/]", "[link=https://evil]x[/link]",
           "four\x08", "five\r\nsix", "six\u202e", "ünïcødé", "eight", "nine\x9b31m"]
RAW = ("\x1b", "\x07", "\x08", "\x9b", "\u202e", "\r")


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rich reads COLUMNS: wide enough that no class name is cut with an ellipsis.
    monkeypatch.setenv("COLUMNS", "220")


@pytest.fixture(scope="module")
def hostile_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    arrays = np.load(DIGITS / "test.npz")
    path = tmp_path_factory.mktemp("data") / "hostile.npz"
    np.savez(path, x=arrays["x"], y=arrays["y"], class_names=np.array(HOSTILE, dtype=str))
    return path


@pytest.fixture(scope="module")
def report(hostile_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scan of the hostile data; class "nine..." is below the floor."""
    path = tmp_path_factory.mktemp("scan") / "r.json"
    code = main(["scan", str(MODEL), "--data", str(hostile_npz), *FAST, "--json", str(path),
                 "--min-class-robust", "0.9", "-q"])
    assert code == ExitCode.FLAGGED
    return path


def assert_escaped(text: str) -> None:
    for raw in RAW:
        assert raw not in text, repr(raw)


def assert_names_shown(text: str) -> None:
    assert_escaped(text)
    for escaped in ("zero\\x1b[2J", "one\\x1b]0;pwned\\x07", "[/]", "[link=https://evil]x[/link]",
                    "four\\x08", "five\\r\\nsix", "six\\u202e", "ünïcødé", "nine\\x9b31m"):
        assert escaped in text


def test_shown_escapes_control_characters_and_keeps_the_rest() -> None:
    assert shown("a\x1b[2Jb\x07\t\x7f\x85\u2028\u2066") == \
        "a\\x1b[2Jb\\x07\\t\\x7f\\x85\\u2028\\u2066"
    assert shown("[/] ünïcødé C:\\path") == "[/] ünïcødé C:\\path"
    assert shown(shown("\x1b")) == "\\x1b"  # escaping twice changes nothing more


def test_scan_prints_hostile_class_names_escaped(hostile_npz: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["scan", str(MODEL), "--data", str(hostile_npz), *FAST,
                 "--min-class-robust", "0.9", "--json", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == ExitCode.FLAGGED, err
    assert_names_shown(out)
    assert_escaped(err)
    assert "FLAGGED nine\\x9b31m: robust accuracy 75.0% is below the floor 90.0%" in out
    # The report keeps the names as they are: only the terminal escapes them.
    names = [c["name"] for c in json.loads((tmp_path / "r.json").read_text())["classes"]]
    assert names == HOSTILE


def test_report_prints_hostile_class_names_escaped(report: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(report)]) == ExitCode.FLAGGED
    out, err = capsys.readouterr()
    assert_names_shown(out)
    assert_escaped(err)
    assert "worst class nine\\x9b31m 75.0%" in out


def test_compare_prints_hostile_class_names_literally(report: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(report.read_text())
    for c in doc["classes"]:  # every class drops to 0 of 4 in "the report"
        c["robust"]["worst"].update(acc=0.0, correct=0)
    current = tmp_path / "current.json"
    current.write_text(json.dumps(doc))
    assert main(["compare", str(report), str(current), "--max-drop", "0.1"]) == ExitCode.FLAGGED
    out, err = capsys.readouterr()
    assert_names_shown(out)
    assert "DROPPED [/]: " in out
    assert "DROPPED [link=https://evil]x[/link]: " in out
    assert_escaped(err)


def test_an_error_that_quotes_class_names_is_one_escaped_line(
        report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(report.read_text())
    doc["classes"][0]["name"] = doc["class_names"][0] = "zero"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    assert main(["compare", str(report), str(other), "--max-drop", "0.1"]) == USAGE
    out, err = capsys.readouterr()
    assert_escaped(out + err)
    assert len(err.strip().splitlines()) == 1
    assert "only in the baseline: zero\\x1b[2J; only in" in err


def test_harden_prints_hostile_class_names_escaped(hostile_npz: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["harden", str(MODEL), "--data", str(hostile_npz), "--out",
                 str(tmp_path / "hard.pt2"), "--epochs", "1", "--per-class", "4", "--steps", "1",
                 "--train-steps", "1", "--device", "cpu", "--val-fraction", "0.5"])
    out, err = capsys.readouterr()
    assert code in (ExitCode.OK, ExitCode.FLAGGED), err
    assert "before -> after (%)" in out
    assert_names_shown(out)
    assert_escaped(err)


# ---------------------------------------------------------------------------------------------
# Numbers out of any sane range: exit 4 and one line naming the setting


def error_line(err: str, words: tuple[str, ...]) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], lines[0]


def toml(text: str) -> Any:
    def make(tmp: Path) -> list[str]:
        (tmp / "robaudit.toml").write_text(text)
        return ["--config", str(tmp / "robaudit.toml")]

    return make


@pytest.mark.parametrize(("extra", "words"), [
    (["--eps", "1e309"], ("eps 1e309 is too large for a number",)),
    (["--min-class-robust", "1e999"], ("min_class_robust 1e999 is too large for a number",)),
    (["--step-size", "-1e400"], ("step_size -1e400 is too large for a number",)),
    (["--image-size", "100000"], ("image_size must be at most 4,096, got 100000",)),
    (["--steps", "100000000000000000000000"],
     ("steps must be at most 1,000,000, got 100000000000000000000000",)),
    (["--restarts", "100000000"], ("restarts must be at most 10,000",)),
    (["--num-classes", "99999999999999999999"], ("num_classes must be at most 1,000,000",)),
    (toml("steps = 1e23\n"), ("steps must be at most 1,000,000", "robaudit.toml")),
    (toml("steps = inf\n"), ("steps has an invalid value inf (expected an integer)",)),
    (toml("eps = nan\n"), ("eps must be a finite number", "robaudit.toml")),
    (toml("max_gap = -inf\n"), ("max_gap must be a finite number",)),
], ids=["eps", "min-class-robust", "step-size", "image-size", "steps", "restarts",
        "num-classes", "toml-steps", "toml-steps-inf", "toml-eps-nan", "toml-max-gap"])
def test_numbers_out_of_range_are_usage_errors(extra: Any, words: tuple[str, ...],
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = extra(tmp_path) if callable(extra) else extra
    # No --steps here: a command-line option would hide the config file's.
    code = main(["scan", str(MODEL), "--data", str(DIGITS / "test.npz"), "--device", "cpu",
                 *args])
    assert code == USAGE
    error_line(capsys.readouterr().err, words)


# ---------------------------------------------------------------------------------------------
# Hand-edited reports: report and compare name the bad field's JSON path


def edit(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set (or with ``...``, delete) the field at a JSON path like ``classes[3].n``."""
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    if value is ...:
        del doc[last]
    else:
        doc[int(last) if isinstance(doc, list) else last] = value


EDITS = {
    "negative-acc": ("classes[3].robust.pgd.acc", -5.0,
                     "classes[3].robust.pgd.acc is -5.0, not a fraction in [0, 1]"),
    "nan-acc": ("classes[1].clean.acc", float("nan"),
                "classes[1].clean.acc is nan, not a fraction in [0, 1]"),
    "figure-above-1": ("summary.robust_acc.worst", 1.5,
                       "summary.robust_acc.worst is 1.5, not a fraction in [0, 1]"),
    "text-count": ("classes[2].n", "4", "classes[2].n is '4', not a count"),
    "missing-eps": ("config.eps", ..., "config.eps is missing"),
    "text-eps": ("config.eps", "8/255", "config.eps is '8/255', not a number >= 0"),
    "null-figure": ("classes[4].robust.worst", None,
                    "classes[4].robust.worst is missing or null: a class with examples has a "
                    "figure for every attack"),
    "classes-object": ("classes", {}, "classes is {}, not a list"),
    "ci-text": ("classes[0].robust.worst.ci95", "0.5-1",
                "classes[0].robust.worst.ci95 is '0.5-1', not a list of 2"),
    "acc-not-counts": ("classes[5].robust.worst.acc", 0.5,
                       "classes[5].robust.worst.acc is 0.5, but classes[5].robust.worst.correct "
                       "/ classes[5].robust.worst.n is 4/4"),
    "name-number": ("classes[6].name", 6, "classes[6].name is 6, not text"),
    "gate-missing": ("verdict.gate", ..., "verdict.gate is missing"),
}


@pytest.mark.parametrize("command", ["report", "compare-report", "compare-baseline"])
@pytest.mark.parametrize("case", sorted(EDITS))
def test_a_hand_edited_report_is_refused_with_the_fields_path(
        case: str, command: str, report: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    where, value, message = EDITS[case]
    doc = json.loads(report.read_text())
    edit(doc, where, value)
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(doc))  # NaN goes in as JSON's NaN token, as Python writes it
    args = {"report": ["report", str(bad)],
            "compare-report": ["compare", str(report), str(bad), "--max-drop", "0.1"],
            "compare-baseline": ["compare", str(bad), str(report), "--max-drop", "0.1"]}[command]
    assert main(args) == USAGE
    error_line(capsys.readouterr().err, (f"{bad}: {message}", "re-run the scan"))


def test_the_unedited_report_passes_the_checks(report: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(report.read_text())
    assert main(["compare", str(report), str(report), "--max-drop", "0"]) == ExitCode.OK
    assert "10 within 0.0 pp" in capsys.readouterr().out
    assert doc["classes"][5]["robust"]["worst"]["correct"] == 4  # what acc-not-counts assumes


def test_a_report_without_a_gap_shows_a_dash(report: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(report.read_text())
    doc["summary"]["gap"] = doc["summary"]["std"] = None  # no class measured: NaN, written null
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert main(["report", str(path)]) == ExitCode.FLAGGED
    assert ", gap -, std -" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# An output encoding that cannot hold the names


def run_ascii(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONPATH": str(ROOT), "COLUMNS": "220"}
    return subprocess.run([sys.executable, "-m", "robaudit", *args], capture_output=True,
                          env=env, cwd=cwd, encoding="utf-8", errors="replace", timeout=600)


def test_an_ascii_terminal_gets_escapes_not_a_crash(hostile_npz: Path, tmp_path: Path) -> None:
    scanned = run_ascii("scan", str(MODEL), "--data", str(hostile_npz), *FAST,
                        "--min-class-robust", "0.9", "--json", "r.json", cwd=tmp_path)
    assert scanned.returncode == ExitCode.FLAGGED, scanned.stderr
    assert "\\xfcn\\xefc\\xf8d\\xe9" in scanned.stdout  # ünïcødé, backslash-escaped
    assert "Traceback" not in scanned.stderr and "UnicodeEncodeError" not in scanned.stderr
    shown_again = run_ascii("report", "r.json", cwd=tmp_path)
    assert shown_again.returncode == ExitCode.FLAGGED, shown_again.stderr
    assert "\\xfcn\\xefc\\xf8d\\xe9" in shown_again.stdout
    missing = run_ascii("report", "nö.json", cwd=tmp_path)
    assert missing.returncode == USAGE
    error_line(missing.stderr, ("cannot read report", ".json: No such file"))
