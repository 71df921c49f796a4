"""One verdict, computed once: the command line and the pytest plugin judge a scan alike.

The masked versions of the bundled example are the cases where they once disagreed: the plugin
re-judged the figures without the unreliable classes and passed a model the command line failed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import DIGITS, MASKED_KINDS, ROOT, masked_file

from robaudit.cli import main

pytest_plugins = ["pytester"]

DATA = DIGITS / "test.npz"
FAST = ("--per-class", "2", "--steps", "3", "--escalation-queries", "100", "--device", "cpu",
        "--no-runtime-check")
POLICY = 0.0  # no figure fails a floor of 0: only an unreliable figure can fail


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("masked")
    return {kind: masked_file(folder, kind) for kind in MASKED_KINDS}


def cli_code(model: str, *extra: str) -> int:
    return main(["scan", model, "--data", str(DATA), "--eps", "0.2",
                 "--min-class-robust", str(POLICY), *FAST, *extra])


PLUGIN_TESTS = """
import pytest

MODELS = {models!r}
FAST = dict(per_class=2, steps=3, escalation_queries=100, device="cpu", runtime_check=False)


@pytest.mark.parametrize("allow", [False, True])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_gate(robaudit, kind, allow):
    audit = robaudit.scan(MODELS[kind], data={data!r}, eps=0.2, **FAST)
    audit.assert_passes(min_class_robust={policy!r}, allow_unreliable=allow)
"""


def test_the_plugin_fails_exactly_what_the_command_line_fails(masked, pytester):
    codes = {(kind, allow): cli_code(path, *(["--allow-unreliable"] if allow else []))
             for kind, path in masked.items() for allow in (False, True)}
    # The quantised model has no gradient anywhere: unreliable, so the gate fails it unless the
    # user allows it by name; the saturated ones are explained by the scale-invariant finish.
    assert codes == {("quantised", False): 1, ("quantised", True): 0,
                     ("scaled", False): 0, ("scaled", True): 0,
                     ("softmax", False): 0, ("softmax", True): 0}
    pytester.makepyfile(test_user=PLUGIN_TESTS.format(models=masked, data=str(DATA),
                                                      policy=POLICY))
    run = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    outcomes = {}
    for line in run.stdout.lines:
        for word in ("PASSED", "FAILED"):
            if line.startswith(word + " "):
                node = line.split()[1]
                kind, allow = node[node.index("[") + 1:node.index("]")].split("-")
                outcomes[(kind, allow == "True")] = 0 if word == "PASSED" else 1
    assert outcomes == codes, run.stdout.str()


def test_a_policy_given_to_the_plugin_is_judged_as_the_scan_judges(masked):
    from robaudit.audit import scan
    from robaudit.config import ScanConfig
    from robaudit.gate import GatePolicy

    config = ScanConfig(model=masked["quantised"], data=str(DATA), eps=0.2, per_class=2,
                        steps=3, escalation_queries=100, runtime_check=False,
                        min_class_robust=POLICY)
    result = scan(config)
    assert [v.status for v in result.verdicts] == ["unreliable"] * 10
    judged = result.judged_by(GatePolicy(min_class_robust=0.0))
    assert [v.status for v in judged.verdicts] == ["unreliable"] * 10
    allowed = result.judged_by(GatePolicy(min_class_robust=0.0), allow_unreliable=True)
    assert [v.status for v in allowed.verdicts] == ["passed"] * 10
    assert int(result.exit_code) == 1


def _calls(name: str) -> list[str]:
    """Modules of the package that call ``name`` (as a bare name or an attribute)."""
    found = []
    for path in sorted((ROOT / "robaudit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if called == name:
                    found.append(str(Path(path).relative_to(ROOT)))
    return found


def test_the_gate_judges_a_scan_in_one_place():
    # judge_scan is the only caller of judge for a scan; compare judges its own comparison.
    assert sorted(set(_calls("judge"))) == ["robaudit/compare.py", "robaudit/gate.py"]
    assert _calls("judge").count("robaudit/gate.py") == 1
    assert _calls("judge_scan") == ["robaudit/result.py"]
