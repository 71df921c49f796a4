"""No command writes over what it reads or over another of its outputs, and a signal that lands
once the outcome is decided does not change the exit code.

Each refusal runs the real CLI on copies of the digits example in ``tmp_path`` and checks the
exit code, the one-line message and that the input's bytes are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from conftest import DIGITS, ROOT

from robaudit.cli import main
from robaudit.errors import ExitCode

pytest_plugins = ["pytester"]

FAST = ["--per-class", "4", "--steps", "2", "--device", "cpu"]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding copies of the example's model and data (never the
    originals: a failing case must not destroy them)."""
    for name in ("model.onnx", "test.npz"):
        shutil.copy(DIGITS / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(args: list[str], kept: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, check that it refused with exit 4 and one line and left ``kept`` as it
    was; the line without its ``error: `` prefix."""
    before = digest(kept)
    assert main(args) == ExitCode.USAGE_ERROR == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert digest(kept) == before
    return err.strip().removeprefix("error: ")


def scan(*extra: str) -> list[str]:
    return ["scan", "model.onnx", "--data", "test.npz", *FAST, *extra]


def harden(*extra: str) -> list[str]:
    return ["harden", "model.onnx", "--data", "test.npz", "--out", "h.onnx", "--epochs", "1",
            *FAST, *extra]


def saved_report(path: Path) -> Path:
    # The commands refuse before they read, so any bytes stand in for a report.
    path.write_text('{"schema": "robaudit.scan"}\n')
    return path


def test_scan_json_over_the_model(work, capsys):
    assert refused(scan("--json", "model.onnx"), work / "model.onnx", capsys) == (
        "--json model.onnx is the model file this scan reads; choose another path")


def test_scan_junit_over_the_data(work, capsys):
    assert refused(scan("--junit", "test.npz"), work / "test.npz", capsys) == (
        "--junit test.npz is the data file this scan reads; choose another path")


def test_scan_json_and_html_on_one_path(work, capsys):
    (work / "r").write_text("an older report\n")
    assert refused(scan("--json", "r", "--html", "r"), work / "r", capsys) == (
        "--html r names the same file as --json r; choose another path for one of them")


def test_the_same_output_spelt_two_ways(work, capsys):
    (work / "r.json").write_text("an older report\n")
    message = refused(scan("--json", "./r.json", "--html", "r.json"), work / "r.json", capsys)
    assert message == ("--html r.json names the same file as --json ./r.json; choose another "
                       "path for one of them")


def test_an_output_that_is_a_symbolic_link_to_the_model(work, capsys):
    (work / "link.json").symlink_to("model.onnx")
    assert refused(scan("--json", "link.json"), work / "model.onnx", capsys) == (
        "--json link.json is the model file model.onnx this scan reads; choose another path")


def test_an_output_that_is_a_hard_link_to_the_data(work, capsys):
    os.link(work / "test.npz", work / "copy.xml")
    assert refused(scan("--junit", "copy.xml"), work / "test.npz", capsys) == (
        "--junit copy.xml is the data file test.npz this scan reads; choose another path")


def test_an_output_inside_the_data_folder(work, capsys):
    folder = work / "images" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"not looked at")
    message = refused(["scan", "model.onnx", "--data", "images", "--html", "images/cat/r.html"],
                      folder / "a.png", capsys)
    assert message == ("--html images/cat/r.html is inside the data folder images this scan "
                       "reads; choose another path")
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"]


@pytest.mark.parametrize(
    ("extra", "text", "noun"),
    [(["--class-names", "in.txt"], "zero\none\n", "class names"),
     (["--baseline", "in.txt", "--max-drop", "0.03"], '{"schema": "robaudit.scan"}\n',
      "baseline report"),
     (["--config", "in.txt"], "steps = 2\n", "config")],
)
def test_scan_outputs_over_its_other_inputs(work, capsys, extra, text, noun):
    (work / "in.txt").write_text(text)
    assert refused(scan(*extra, "--junit", "in.txt"), work / "in.txt", capsys) == (
        f"--junit in.txt is the {noun} file this scan reads; choose another path")


def test_the_config_file_found_in_the_working_directory(work, capsys):
    (work / "robaudit.toml").write_text("steps = 2\n")
    assert refused(scan("--json", "robaudit.toml"), work / "robaudit.toml", capsys) == (
        "--json robaudit.toml is the config file this scan reads; choose another path")


def test_an_onnx_models_external_data_file(work, capsys):
    proto = onnx.load(str(work / "model.onnx"))
    onnx.save_model(proto, str(work / "big.onnx"), save_as_external_data=True,
                    location="big.weights", size_threshold=0)
    message = refused(["scan", "big.onnx", "--data", "test.npz", "--json", "big.weights"],
                      work / "big.weights", capsys)
    assert message == ("--json big.weights is the model's external data file this scan reads; "
                       "choose another path")


def test_report_html_over_its_source(work, capsys):
    report = saved_report(work / "r.json")
    assert refused(["report", "r.json", "--html", "r.json"], report, capsys) == (
        "--html r.json is the report file this command reads; choose another path")


def test_compare_json_over_the_baseline(work, capsys):
    saved_report(work / "r.json")
    baseline = saved_report(work / "b.json")
    message = refused(["compare", "b.json", "r.json", "--max-drop", "0.03", "--json", "b.json"],
                      baseline, capsys)
    assert message == ("--json b.json is the baseline report file this comparison reads; "
                       "choose another path")


def test_harden_checkpoint_over_the_model(work, capsys):
    assert refused(harden("--checkpoint", "model.onnx"), work / "model.onnx", capsys) == (
        "--checkpoint model.onnx is the model file this harden run reads; choose another path")
    assert not (work / "h.onnx").exists() and not (work / "h.holdout.pt").exists()


def test_harden_report_over_the_default_checkpoint(work, capsys):
    (work / "h.onnx.ckpt").write_bytes(b"an interrupted run's checkpoint")
    message = refused(harden("--json", "h.onnx.ckpt", "--resume"), work / "h.onnx.ckpt", capsys)
    assert message == ("--json h.onnx.ckpt names the same file as the checkpoint h.onnx.ckpt; "
                       "choose another path for one of them")


def test_harden_over_its_validation_data(work, capsys):
    shutil.copy(work / "test.npz", work / "val.npz")
    message = refused(harden("--val-data", "val.npz", "--html", "val.npz"), work / "val.npz",
                      capsys)
    assert message == ("--html val.npz is the validation data file this harden run reads; "
                       "choose another path")


def test_harden_training_data_where_its_hold_out_goes(work, capsys):
    shutil.copy(work / "test.npz", work / "h.holdout.pt")
    message = refused(["harden", "model.onnx", "--data", "h.holdout.pt", "--out", "h.onnx"],
                      work / "h.holdout.pt", capsys)
    assert message == ("the hold-out file h.holdout.pt is the training data file this harden "
                       "run reads; choose another path")


def test_the_library_harden_refuses_too(work):
    from robaudit.config import resolve_config
    from robaudit.errors import UsageError
    from robaudit.harden import HardenConfig
    from robaudit.harden import harden as run_harden

    scan_config = resolve_config({"model": "model.onnx", "data": "test.npz"}, find_file=False)
    config = HardenConfig(scan=scan_config, train_data="test.npz", out="h.onnx",
                          checkpoint="test.npz")
    before = digest(work / "test.npz")
    with pytest.raises(UsageError, match=r"^--checkpoint test\.npz is the training data file"):
        run_harden(config)
    assert digest(work / "test.npz") == before


def test_distinct_paths_are_written_and_main_hands_back_the_signal_handlers(work):
    # Only collisions are refused; and once the reports are written main() ignores signals
    # until it returns, then restores the handlers it found.
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    assert main(scan("--json", "r.json", "--html", "r.html")) == ExitCode.OK
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert json.loads((work / "r.json").read_text())["verdict"]["exit_code"] == 0
    assert (work / "r.html").stat().st_size > 0


def test_the_pytest_plugins_report_over_an_input(pytester, monkeypatch):
    # The report of test_user.py::test_scan goes to reports/test_user.py_test_scan.json: here
    # that is the scan's class names file.
    names = pytester.path / "reports" / "test_user.py_test_scan.json"
    names.parent.mkdir()
    names.write_text("".join(f"{k}\n" for k in range(10)))
    before = digest(names)
    pytester.makepyfile(test_user=f"""
def test_scan(robaudit):
    robaudit.scan({str(DIGITS / "model.pt2")!r}, data={str(DIGITS / "test.npz")!r},
                  class_names="reports/test_user.py_test_scan.json", device="cpu")
""")
    # In a subprocess: torch cannot register its operators twice in one process.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's robaudit, not an installed one
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--robaudit-json",
                                           str(names.parent))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"robaudit could not scan: --robaudit-json {names} is the class "
                                 "names file this scan reads; choose another path"])
    assert digest(names) == before


# A script that runs the console script and then holds the process in the interpreter's
# teardown (the object is deleted with ``__main__``'s globals, after Python has stopped
# handling signals), until the test writes a byte to its stdin.
HELD_IN_TEARDOWN = """
import os

class Hold:
    def __del__(self):
        os.write(1, b"teardown\\n")
        os.read(0, 1)

hold = Hold()
from robaudit.cli import entry_point
entry_point()
"""


def test_signals_after_the_last_report_line_keep_the_scans_exit_code(tmp_path):
    report = tmp_path / "r.json"
    args = ["scan", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "test.npz"), *FAST,
            "--json", str(report)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "1000"}
    proc = subprocess.Popen([sys.executable, "-c", HELD_IN_TEARDOWN, *args], cwd=tmp_path,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:  # stops at the end of output too, should the process die
        seen.append(line.strip())
        if line.startswith("JSON report:"):  # the last line of the scan's output
            proc.send_signal(signal.SIGINT)
        if line == "teardown\n":
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdin.write("x")
    proc.stdin.close()
    code, err = proc.wait(timeout=600), proc.stderr.read()
    assert seen[-2:] == [f"JSON report: {report}", "teardown"], (seen, err)
    assert code == json.loads(report.read_text())["verdict"]["exit_code"] == ExitCode.OK, err
    assert "interrupted" not in err and "Traceback" not in err

