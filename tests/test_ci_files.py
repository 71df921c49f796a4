"""The CI workflow, the scan action and the users' example parse and have what GitHub needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

yaml = pytest.importorskip("yaml")

CI = ROOT / ".github" / "workflows" / "ci.yml"
ACTION = ROOT / ".github" / "actions" / "scan" / "action.yml"
EXAMPLE = ROOT / "examples" / "ci" / "robustness.yml"


def load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict), f"{path} is not a YAML mapping"
    return doc


def triggers(doc: dict[str, Any]) -> Any:
    # YAML 1.1 (PyYAML) reads the bare key `on` as the boolean True; GitHub reads it as "on".
    return doc.get("on", doc.get(True))


def steps(doc: dict[str, Any], job: str) -> list[dict[str, Any]]:
    job_steps = doc["jobs"][job]["steps"]
    for step in job_steps:
        assert ("uses" in step) != ("run" in step), f"a step needs uses or run: {step}"
    return job_steps


def test_the_projects_ci_lints_and_runs_make_test():
    doc = load(CI)
    on = triggers(doc)
    assert "push" in on and "pull_request" in on
    assert set(doc["jobs"]) == {"lint", "test"}
    for job in doc["jobs"].values():
        assert job["runs-on"] == "ubuntu-latest"
        setup = next(s for s in job["steps"]
                     if s.get("uses", "").startswith("actions/setup-python"))
        assert setup["with"]["python-version"] == "3.11"
        assert setup["with"]["cache"] == "pip"
    runs = [s["run"] for s in steps(doc, "lint") if "run" in s]
    assert any(r.startswith("ruff check") for r in runs)
    assert [s["run"] for s in steps(doc, "test") if "run" in s] == ["make test"]


def test_the_scan_action_is_composite_and_uploads_reports_whatever_happened():
    doc = load(ACTION)
    assert {"name", "description", "inputs", "runs"} <= set(doc)
    assert doc["runs"]["using"] == "composite"
    inputs = doc["inputs"]
    assert {"model", "data", "eps", "min-class-robust", "extra-args"} <= set(inputs)
    assert inputs["model"]["required"] is True and inputs["data"]["required"] is True
    assert all("description" in spec for spec in inputs.values())
    assert doc["outputs"]["exit-code"]["value"] == "${{ steps.scan.outputs.exit-code }}"

    action_steps = doc["runs"]["steps"]
    for step in action_steps:
        if "run" in step:
            assert step["shell"] == "bash"  # composite run steps must name their shell
            assert "${{ inputs." not in step["run"]  # inputs go through env, not into the script
    scan = next(s for s in action_steps if s.get("id") == "scan")
    for option in ("--json", "--junit", "--html", "--min-class-robust"):
        assert option in scan["run"]
    upload = next(s for s in action_steps
                  if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    assert action_steps.index(upload) > action_steps.index(scan)
    last = action_steps[-1]
    assert last["if"].startswith("always()") and last["run"] == 'exit "$CODE"'


def test_the_users_example_gates_on_the_exit_code():
    doc = load(EXAMPLE)
    on = triggers(doc)
    assert "pull_request" in on
    job_steps = steps(doc, "robustness")
    scan = next(s for s in job_steps if s.get("id") == "scan")
    # The action copied into the user's repository: pinned by their commits, no placeholder.
    assert scan["uses"] == "./.github/actions/robaudit-scan"
    assert scan["with"]["robaudit-spec"].startswith("robaudit @ git+")
    assert scan["continue-on-error"] is True
    assert {"model", "data", "eps", "min-class-robust"} <= set(scan["with"])
    gate = job_steps[job_steps.index(scan) + 1]
    assert gate["if"] == "always()"
    assert gate["env"]["CODE"] == "${{ steps.scan.outputs.exit-code }}"
    for case in ("0)", "1)", "4)", '"")', "*)"):  # an empty code: the action failed before
        assert case in gate["run"]
    assert (ROOT / "examples" / "ci" / "README.md").is_file()


def test_the_action_needs_no_python_files_in_the_callers_repository():
    setup = next(s for s in load(ACTION)["runs"]["steps"]
                 if s.get("uses", "").startswith("actions/setup-python"))
    # setup-python's pip cache needs a requirements file or pyproject.toml in the caller's
    # repository and fails without one.
    assert "cache" not in setup["with"]


def test_a_copied_action_without_a_spec_says_what_to_set():
    install = next(s for s in load(ACTION)["runs"]["steps"] if s.get("name") == "Install robaudit")
    assert "robaudit-spec" in install["run"] and "exit 4" in install["run"]


def test_the_readme_snippet_never_exits_an_empty_code():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = readme[readme.index("## CI"):readme.index("## Python API")]
    assert 'exit "$CODE"' not in ci.replace('run: exit "$CODE"', "")
    assert "uses: ./.github/actions/robaudit-scan" in ci


@pytest.mark.parametrize(("schema", "path"), [("vendor.github-actions", ACTION),
                                              ("vendor.github-workflows", CI),
                                              ("vendor.github-workflows", EXAMPLE)])
def test_the_yaml_validates_against_githubs_schema(schema, path):
    import subprocess
    import sys

    check = Path(sys.executable).with_name("check-jsonschema")
    if not check.exists():
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]')")
    run = subprocess.run([str(check), "--builtin-schema", schema, str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
