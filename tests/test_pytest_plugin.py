"""The pytest plugin, run the way a user runs it: a test file in a fresh pytest session."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import DIGITS

pytest_plugins = ["pytester"]

# Classes 0 and 6 of the example are its most robust, 8 its least (0% at eps 0.2 in 10 examples).
USER_TESTS = f"""
import pytest

MODEL = {str(DIGITS / "model.pt2")!r}
DATA = {str(DIGITS / "test.npz")!r}
FAST = dict(per_class=6, steps=3, runtime_check=False, device="cpu")


@pytest.mark.robustness
def test_robust_classes_pass(robaudit):
    audit = robaudit.scan(MODEL, data=DATA, eps="1/5", classes="0,6", **FAST)
    audit.assert_passes(min_class_robust=0.3)
    assert audit.flagged == []
    assert audit.doc["config"]["eps"] == 0.2


def test_weak_class_fails(robaudit):
    robaudit.scan(MODEL, data=DATA, eps=0.2, classes=["0", "8"], **FAST).assert_passes(
        min_class_robust=0.5)


def test_a_setup_mistake(robaudit):
    robaudit.scan("no-such-model.onnx", data="no-such-data.npz", eps="8/255")


def test_not_a_robustness_test():
    pass
"""


def run(pytester, *args):
    # In a subprocess, as a user runs it: an inline run would unload the torch modules the scan
    # imports, and torch cannot register its operators twice in one process.
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def test_a_passing_and_a_failing_robustness_test(pytester, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    pytester.makepyfile(test_user=USER_TESTS)
    reports = tmp_path / "reports"
    result = run(pytester, "--strict-markers", "--robaudit-json", str(reports))
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*robaudit: 1 of 2 classes failed the robustness policy "
        "(worst case over pgd,tpgd,dlr-t; eps 0.2; 12 examples)",
        "*  class | n |  clean |   robust (95% CI) | verdict",
        "*  ------+---+--------+-------------------+--------",
        "*  0     | 6 | 100.0% | 100.0% (61%-100%) | passed",
        "*  8     | 6 | *% | *% (*%-*%) | FLAGGED",
        "*  8: robust accuracy *% is below the floor 50.0%",
        "*  JSON report: *test_user.py_test_weak_class_fails.json",
        "test_user.py:17: Failed",
    ])
    # The failure names the test line, not robaudit's internals.
    assert "pytest_plugin.py" not in out and "gate.py" not in out
    # A bad path fails with robaudit's message alone.
    result.stdout.fnmatch_lines(["robaudit could not scan: *no-such-*"])
    assert "Traceback" not in out
    assert "robaudit/audit.py" not in out and "robaudit/data" not in out
    saved = sorted(p.name for p in reports.iterdir())
    assert saved == ["test_user.py_test_robust_classes_pass.json",
                     "test_user.py_test_weak_class_fails.json"]
    doc = json.loads((reports / saved[1]).read_text())
    assert doc["schema"] == "robaudit.scan" and doc["data"]["audited"] == 12


def test_the_marker_is_registered_and_given_to_fixture_users(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    result = run(pytester, "--strict-markers", "-m", "not robustness")
    # Only the test that does not use the fixture runs: no scan, so this is fast.
    result.assert_outcomes(passed=1, deselected=3)
    markers = run(pytester, "--markers").stdout.str()
    assert "@pytest.mark.robustness: an adversarial robustness test" in markers


def test_the_plugin_does_not_import_torch_at_start_up():
    # Every pytest run in an environment with robaudit loads the plugin: it must stay light.
    code = "import sys, robaudit.pytest_plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# The two calls: a config file named by a string (or Path), and an eps sweep as on the
# command line. Both go through the CLI's resolver, so the figures are the CLI's.
CONFIG_TESTS = f"""
from pathlib import Path

ONNX = {str(DIGITS / "model.onnx")!r}
DATA = {str(DIGITS / "test.npz")!r}
TOML = {str(DIGITS / "robaudit.toml")!r}
FAST = dict(per_class=3, steps=3, device="cpu")


def test_a_config_file(robaudit):
    audit = robaudit.scan(ONNX, data=DATA, config=TOML, **FAST)
    config = audit.doc["config"]
    # eps, attacks and the floor from the example's robaudit.toml; steps from the keyword.
    assert (config["eps"], config["attacks"], config["min_class_robust"], config["steps"]) == \\
        (0.2, ["pgd", "tpgd"], 0.4, 3)
    assert config["sources"] == ["defaults", TOML, "pytest"]
    assert audit.doc["verdict"]["gate"]["thresholds"] == {{"min_class_robust": 0.4}}
    # As `robaudit scan model.onnx --config robaudit.toml --per-class 3 --steps 3` finds.
    assert audit.flagged == ["8", "9"] and audit.doc["data"]["audited"] == 30
    assert audit.doc["summary"]["robust_acc"]["worst"] == 22 / 30


def test_a_config_path_and_a_sweep(robaudit):
    audit = robaudit.scan(ONNX, data=DATA, config=Path(TOML), eps="0.1,0.2", classes="0,8",
                          runtime_check=False, **FAST)
    assert audit.doc["config"]["eps_sweep"] == [0.1, 0.2] and audit.doc["config"]["eps"] == 0.2
    assert [(e["eps"], e["robust_acc"]["worst"]) for e in audit.doc["sweep"]] == \\
        [(0.1, 1.0), (0.2, 0.5)]
"""


def test_config_files_and_sweeps_as_keywords(pytester, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    pytester.makepyfile(test_config_user=CONFIG_TESTS)
    run(pytester).assert_outcomes(passed=2)
