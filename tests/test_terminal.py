"""The terminal at 80 columns (CI logs): no wrapped rows, no cut figures, long tables folded;
the sweep's eps as the user wrote them; a scan without a policy says it gated nothing; -q lists
the flagged classes; compare without --max-drop; the README's sample is the command's output."""

from __future__ import annotations

import copy
import json
import re
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from conftest import DIGITS
from rich.console import Console

from robaudit.cli import main
from robaudit.errors import ExitCode
from robaudit.metrics import WORST, wilson_interval
from robaudit.reports.json import read_json
from robaudit.reports.terminal import TerminalReporter

ROOT = Path(__file__).resolve().parents[1]
README_COMMAND = ("robaudit scan examples/digits/model.onnx --data examples/digits/test.npz "
                  "--eps 0.2 --min-class-robust 0.4")
#: The classes of the 100-class report: names long enough that its table must fold a column.
NAMES = [f"species_{i:03d}" for i in range(100)]
#: Class i of the 100-class report has this many of its 20 examples robust (0..20, shuffled).
ROBUST = [(i * 37) % 21 for i in range(100)]
#: The first class of the 100 with every example robust.
FULL = NAMES[ROBUST.index(20)]


def rate(correct: int, n: int = 20) -> dict[str, Any]:
    low, high = wilson_interval(correct, n)
    return {"acc": correct / n, "correct": correct, "n": n, "ci95": [low, high]}


def short(correct: int, n: int = 20) -> str:
    """A table's figure, written out independently of the code under test."""
    return "100%" if correct == n else f"{100 * correct / n:.1f}%"


def rendered(doc: dict[str, Any], method: str = "render", verbosity: int = 0) -> str:
    out = StringIO()
    console = Console(width=80, file=out, highlight=False, markup=False)
    getattr(TerminalReporter(verbosity, console), method)(doc)
    return out.getvalue()


def assert_fits(text: str) -> None:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "…" not in text and "..." not in text


def row(text: str, name: str) -> list[str]:
    """The cells of the table row of class ``name``."""
    line = next(line for line in text.splitlines() if line.split(" ")[0] == name)
    return [cell.strip() for cell in line.split("|")]


@pytest.fixture(scope="module")
def sweep_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real L2 sweep of the ONNX example (so the ORT column is there too), no policy."""
    path = tmp_path_factory.mktemp("sweep") / "r.json"
    code = main(["scan", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "test.npz"),
                 "--norm", "l2", "--eps", "0.5,1.0", "--per-class", "20", "--steps", "3",
                 "--device", "cpu", "-q", "--json", str(path)])
    assert code == ExitCode.OK
    return read_json(path)


def all_robust(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with every figure at 100% (20 of 20), the widest cells; at eps 1.0 class k of
    the sweep at k/20."""
    doc = copy.deepcopy(doc)
    for c in doc["classes"]:
        c["clean"] = c["runtime_robust"] = rate(20)
        c["robust"] = {name: rate(20) for name in c["robust"]}
    for entry in doc["sweep"]:
        entry["mean_class_robust"][WORST] = 1.0 if entry["eps_text"] == "0.5" else 0.225
        for k, c in enumerate(entry["classes"]):
            c["robust"][WORST] = 1.0 if entry["eps_text"] == "0.5" else k / 20
    return doc


def hundred_classes(doc: dict[str, Any], floor: float | None) -> dict[str, Any]:
    """The 10-class ``doc`` grown to 100 classes (class i robust on ROBUST[i] of 20), judged
    against ``floor`` when one is given; reports/schema.py accepts it."""
    doc = copy.deepcopy(doc)
    classes = []
    for i, name in enumerate(NAMES):
        c = copy.deepcopy(doc["classes"][i % 10])
        failed = floor is not None and ROBUST[i] / 20 < floor
        failures = [{"policy": "min_class_robust", "value": ROBUST[i] / 20, "threshold": floor,
                     "message": f"robust accuracy {short(ROBUST[i])} is below the floor "
                                f"{floor:.1%}"}] if failed else []
        verdict = {"passed": not failed, "status": "flagged" if failed else "passed",
                   "unreliable": None, "failures": failures}
        c.update(index=i, name=name, clean=rate(20), runtime_robust=rate(ROBUST[i]),
                 robust={figure: rate(ROBUST[i]) for figure in c["robust"]}, verdict=verdict,
                 verdict_by_figure={figure: verdict for figure in c["robust"]})
        c.pop("confusion_row", None)
        classes.append(c)
    flagged = [c["name"] for c in classes if not c["verdict"]["passed"]]
    doc.update(classes=classes, class_names=NAMES, confusion={}, gallery={}, sweep=[])
    doc["verdict"].update(flagged=flagged, passed=not flagged, gated=floor is not None,
                          exit_code=1 if flagged else 0)
    doc["verdict"]["gate"]["min_class_robust"] = floor
    return doc


def saved(tmp_path: Path, doc: dict[str, Any], name: str = "r.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    read_json(path)  # the schema accepts it
    return str(path)


def test_readme_sample_is_the_commands_output_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.chdir(ROOT)
    assert main(README_COMMAND.split()[1:]) == ExitCode.FLAGGED
    out = capsys.readouterr().out
    assert_fits(out)
    readme = (ROOT / "README.md").read_text()
    block = readme.split(f"$ {README_COMMAND}\n", 1)[1].split("$ echo $?\n", 1)[0]

    def normal(text: str) -> list[str]:
        # The time and the machine differ from run to run; the closing rule centres the time.
        text = re.sub(r" in \d+\.\ds", " in N.Ns", text)
        text = re.sub(r"device: .*", "device: D", text)
        return [line.strip("= ") if line.startswith("=") else line.rstrip()
                for line in text.splitlines()]

    assert normal(out) == normal(block)
    assert "8     | 52 | 94.2% |  9.6% | 11.5% |  5.8% |  5.8% |  2-16% |  5.8% | FLAGGED" in out


def test_a_sweep_at_100_percent_fits_80_columns_and_prints_a_line_per_eps(sweep_doc):
    doc = all_robust(sweep_doc)
    out = rendered(doc)
    assert_fits(out)
    # Wilson's interval of 20 of 20 is 84-100%: printed whole, not "(84%-10…".
    assert row(out, "0") == ["0", "20", "100%", "100%", "100%", "100%", "100%", "84-100%", "100%",
                             "passed"]
    assert "    eps: 0.5, 1.0 (L2, pixels in [0,1]), gated at 1.0; seed 0" in out
    assert "eps 0.5: class mean 100.0% (worst case), weakest class 0 at 100.0%\n" in out
    assert "eps 1.0: class mean 22.5% (worst case), weakest class 0 at 0.0% (gated)\n" in out
    assert out.splitlines()[-1].strip("= ") == \
        f"no policy: 10 classes audited, none gated in {doc['timings']['total_s']:.1f}s"


def test_a_100_class_table_shows_the_10_least_robust_and_folds_columns_to_fit(sweep_doc):
    doc = hundred_classes(sweep_doc, floor=None)
    out = rendered(doc)
    assert_fits(out)
    least = sorted(range(100), key=lambda i: (ROBUST[i], i))[:10]
    shown = [line.split(" ")[0] for line in out.splitlines() if line.startswith("species_")]
    assert shown == [NAMES[i] for i in sorted(least)]
    i = least[-1]
    low, high = wilson_interval(ROBUST[i], 20)
    assert row(out, NAMES[i]) == [NAMES[i], "20", "100%", *[short(ROBUST[i])] * 4,
                                  f"{100 * low:.0f}-{100 * high:.0f}%", short(ROBUST[i]),
                                  "passed"]
    assert "90 classes not shown (passed, not among the 10 least robust); -v shows all\n" in out
    assert len(out.splitlines()) < 30
    # -v: every class, and the interval of 20 of 20 (84-100%) leaves no room for the attack
    # right of the others, which folds before the interval does.
    everything = rendered(doc, verbosity=1)
    assert_fits(everything)
    assert sum(line.startswith("species_") for line in everything.splitlines()) == 100
    assert "not shown at 80 columns: dlr-t (see the JSON or HTML report)\n" in everything
    assert row(everything, FULL) == [FULL, "20", "100%", "100%", "100%",
                                              "100%", "84-100%", "100%", "passed"]
    # Without -v the interval folds first.
    assert "not shown at 80 columns: 95% CI" in rendered(hundred_classes(sweep_doc, floor=0.99))


def test_quiet_prints_the_flagged_classes_and_the_closing_line_only(sweep_doc, tmp_path, capsys):
    doc = hundred_classes(sweep_doc, floor=0.1)
    flagged = [NAMES[i] for i in range(100) if ROBUST[i] < 2]
    assert main(["report", saved(tmp_path, doc), "-q"]) == ExitCode.FLAGGED
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [f"FLAGGED {name}: robust accuracy {short(ROBUST[NAMES.index(name)])} "
                          "is below the floor 10.0%" for name in flagged]
    assert lines[-1].strip("= ") == \
        f"{len(flagged)} classes flagged, {100 - len(flagged)} passed in " \
        f"{doc['timings']['total_s']:.1f}s"


def test_harden_before_after_table_fits_80_columns(sweep_doc):
    from robaudit.harden.run import _class_changes

    def harden_doc(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        return {"before": before, "after": after, "classes": _class_changes(before, after),
                "warnings": [], "calibration": None, "validation": {},
                "model": {"output": "h.onnx", "format": "onnx", "class_weights": "h.json"},
                "kept": {"epoch": 1, "within_budget": [0, 1],
                         "budget": {"mean_floor": 0.5, "clean_floor": 0.9},
                         "validation": {"worst_class": "3", "worst_robust": 0.5,
                                        "mean_robust": 0.6, "clean_acc": 0.97}}}

    before = sweep_doc
    out = rendered(harden_doc(before, all_robust(before)), "render_harden")
    assert_fits(out)
    table = out.split("before -> after (%)")[1]  # below the hardened model's scan
    c = before["classes"][3]["robust"]
    pairs = [f"{100 * c[name]['acc']:.1f}->100".replace("100.0->", "100->")
             for name in ("pgd", "tpgd", "dlr-t", WORST)]
    change = f"{100 - 100 * c[WORST]['acc']:+.1f} pp"
    # The verdicts before and after stay; the attacks right of PGD fold to make room.
    assert row(table, "3") == ["3", "100->100", pairs[0], pairs[3], change, "passed->passed"]
    assert "not shown at 80 columns: dlr-t, tpgd" in table
    # 100 classes with long names: the attack right of the others folds, the worst case stays.
    wide = hundred_classes(before, floor=None)
    out = rendered(harden_doc(wide, all_robust(wide)), "render_harden")
    assert_fits(out)
    table = out.split("before -> after (%)")[1]
    assert "not shown at 80 columns: dlr-t, tpgd" in table
    assert row(table, NAMES[0]) == [NAMES[0], "100->100", "0.0->100", "0.0->100", "+100.0 pp",
                                  "passed->passed"]


def test_compare_without_max_drop_shows_the_deltas_and_gates_nothing(sweep_doc, tmp_path,
                                                                     capsys):
    base = hundred_classes(sweep_doc, floor=None)
    new = copy.deepcopy(base)
    worse = new["classes"][NAMES.index(FULL)]
    worse["robust"] = {figure: rate(17) for figure in worse["robust"]}
    b, n = saved(tmp_path, base, "b.json"), saved(tmp_path, new, "n.json")
    assert main(["compare", b, n]) == ExitCode.OK
    out = capsys.readouterr().out
    assert_fits(out)
    assert row(out, FULL) == [FULL, "20", "100%", "85.0%", "-15.0 pp"]
    assert "no --max-drop: nothing gated" in out and "DROPPED" not in out
    assert out.splitlines()[-1].strip("= ") == "no --max-drop: 100 classes compared, none gated"
    assert "90 classes not shown (not among the 10 largest drops); -v shows all\n" in out

    assert main(["compare", b, n, "--max-drop", "0.1", "--json", str(tmp_path / "c.json")]) == \
        ExitCode.FLAGGED
    out = capsys.readouterr().out
    assert_fits(out)
    message = ("robust accuracy 85.0% dropped 15.0 pp from the baseline 100.0%; allowed drop "
               "10.0 pp")
    assert f"DROPPED {FULL}: {message}" in " ".join(out.split())  # wrapped at a word
    assert row(out, FULL)[-1] == "DROPPED"
    failure = json.loads((tmp_path / "c.json").read_text())["classes"][NAMES.index(FULL)]
    assert failure["failures"][0]["message"] == message


def test_eps_stay_as_written_in_json_terminal_junit_and_html(tmp_path, capsys):
    report = tmp_path / "r.json"
    args = ["scan", str(DIGITS / "model.pt2"), "--data", str(DIGITS / "test.npz"), "--eps",
            "51/255,0.1", "--per-class", "2", "--steps", "1", "--finish", "none", "--device",
            "cpu", "--json", str(report), "--junit", str(tmp_path / "j.xml"), "--html",
            str(tmp_path / "r.html")]
    assert main(args) == ExitCode.OK  # no policy: nothing fails, and the last line says why
    out = capsys.readouterr().out
    assert_fits(out)
    doc = json.loads(report.read_text())
    assert doc["config"]["eps"] == 0.2 and doc["config"]["eps_text"] == "51/255"
    assert [e["eps_text"] for e in doc["sweep"]] == ["0.1", "51/255"]
    assert "    eps: 0.1, 51/255 (L-inf, pixels in [0,1]), gated at 51/255; seed 0" in out
    assert "\neps 51/255: class mean " in out and " (gated)\n" in out
    assert re.search(r"^=+ no policy: 10 classes audited, none gated in \d+\.\ds =+$", out,
                     re.MULTILINE)
    assert 'name="eps" value="51/255"' in (tmp_path / "j.xml").read_text()
    assert "51/255" in (tmp_path / "r.html").read_text()


def test_strict_without_a_policy_is_a_usage_error_before_the_scan(tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main(["scan", str(DIGITS / "model.pt2"), "--data", str(DIGITS / "test.npz"),
                 "--strict", "--json", str(report)])
    assert code == ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: --strict: no gate policy is set; set --min-class-robust, "
                                "--min-ratio, --max-gap or --max-drop (or drop --strict)"]
    assert not report.exists()


def test_harden_in_a_ci_log_prints_a_line_per_stage_and_epoch(capsys):
    from robaudit.harden.run import HardenProgress
    from robaudit.reports.terminal import TerminalReporter

    events = [HardenProgress("scanning the model as given"),
              HardenProgress("training", 1, 2, 1, 40, 0.9),
              HardenProgress("training", 1, 2, 40, 40, 0.7),
              HardenProgress("validating", 1, 2, loss=0.7),
              HardenProgress("trained", 1, 2, loss=0.7, worst_class="8", worst_robust=0.25)]
    for verbosity, lines in ((0, 3), (1, 5), (-1, 0)):
        with TerminalReporter(verbosity).harden_progress() as progress:
            for event in events:
                progress(event)
        captured = capsys.readouterr()
        out = captured.out.splitlines()
        assert len(out) == lines and captured.err == "", out
        if verbosity == 0:
            assert out[-1] == "robaudit: trained epoch 1/2 loss 0.700 worst class 8 25.0%"
            assert not any("batch" in line for line in out)
