"""The command line: exit codes exactly as DESIGN.md, and what a user sees."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DIGITS, interrupt_scan

from robaudit.cli import cli, main
from robaudit.errors import ExitCode

FAST = ["--steps", "5", "--per-class", "10"]


def scan_args(*extra: str, model: str = "model.pt2") -> list[str]:
    return ["scan", str(DIGITS / model), "--data", str(DIGITS / "test.npz"),
            "--config", str(DIGITS / "robaudit.toml"), *extra]


def test_exit_0_when_every_class_passes(tmp_path, capsys):
    # Classes 0 and 6 are the example's most robust (above 90%); the floor is 40%.
    code = main(scan_args(*FAST, "--classes", "0,6", "--json", str(tmp_path / "r.json")))
    out = capsys.readouterr().out
    assert code == ExitCode.OK == 0
    assert "2 passed" in out and "flagged" not in out
    assert json.loads((tmp_path / "r.json").read_text())["verdict"]["exit_code"] == 0


def test_exit_1_when_a_class_is_flagged(tmp_path, capsys):
    code = main(scan_args(*FAST, "--json", str(tmp_path / "r.json")))
    out = capsys.readouterr().out
    assert code == ExitCode.FLAGGED == 1
    doc = json.loads((tmp_path / "r.json").read_text())
    assert "8" in doc["verdict"]["flagged"]
    assert "FLAGGED 8: robust accuracy" in out


def test_exit_2_and_a_partial_report_when_interrupted(tmp_path):
    report = tmp_path / "r.json"
    # Many steps and a working batch of 8: the first examples finish after 200 passes, the
    # whole scan takes about 27,000, so the scan is still attacking when the signal arrives.
    run = interrupt_scan(scan_args("--steps", "200", "--batch-size", "8", "--json", str(report)),
                         signal.SIGINT, tmp_path)
    assert run.code == ExitCode.INTERRUPTED == 2, run.err
    doc = json.loads(report.read_text())
    assert doc["partial"] is True and doc["verdict"]["exit_code"] == 2
    assert 1 <= doc["data"]["audited"] < 540
    assert "interrupted: partial results" in run.out
    assert "Traceback" not in run.err
    # The machine's speed cancels out: answering Ctrl-C takes a small share of the time the
    # scan took to start (2-3% measured, idle or with two CPU burners; 28-35% while the
    # interpreter's teardown still ran after the reports).
    assert run.exit_s < run.startup_s / 5, (run.exit_s, run.startup_s)


def test_an_interrupted_run_exits_without_the_interpreters_teardown(tmp_path):
    # Tearing down the modules torch imports took 1 s of CPU, 5-7 s on a loaded machine, after
    # the partial reports were written (issue 14). Other exits keep the usual teardown.
    script = ("import atexit, robaudit.cli as cli; atexit.register(print, 'teardown'); "
              "cli.main = lambda: {code}; print('reports', flush=False); cli.entry_point()")
    for code, teardown in ((2, False), (1, True)):
        proc = subprocess.run([sys.executable, "-c", script.format(code=code)],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == code, proc.stderr
        assert proc.stdout.split() == ["reports", "teardown"][: 2 if teardown else 1]


def test_exit_3_on_an_internal_error(monkeypatch, capsys):
    import robaudit.audit

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(robaudit.audit, "scan", broken)
    assert main(scan_args()) == ExitCode.INTERNAL_ERROR == 3
    err = capsys.readouterr().err
    assert "this is a bug, please report it" in err and "ZeroDivisionError: a bug" in err
    assert "Traceback" not in err
    assert main([*scan_args(), "-v"]) == 3
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--eps", "-0.1"], "eps must be in (0, 1]"),
        (["--eps", "eight"], "eps must be a number like 0.03 or 8/255"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--attacks", "pgd,pdg2"], "unknown attack 'pdg2'"),
        (["--attacks", "tpdg"], "Did you mean 'tpgd'?"),
        (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N"),
        (["--batch-size", "x"], "'x' is not a valid integer"),
    ],
)
def test_exit_4_on_bad_options(args, words, capsys):
    assert main(scan_args(*args)) == ExitCode.USAGE_ERROR == 4
    captured = capsys.readouterr()
    assert words in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_exit_4_on_a_missing_model(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "nope.onnx"), "--data", str(DIGITS / "test.npz")]) == 4
    assert "nope.onnx" in capsys.readouterr().err


def test_exit_4_before_scanning_when_a_report_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(scan_args("--json", str(blocker / "r.json"))) == 4
    assert "cannot write report" in capsys.readouterr().err


def test_exit_5_when_nothing_is_left_to_audit(tmp_path, capsys):
    data = np.load(DIGITS / "test.npz")
    keep = data["y"] != 9
    np.savez(tmp_path / "no9.npz", x=data["x"][keep], y=data["y"][keep])
    names = tmp_path / "names.txt"
    names.write_text("\n".join(str(i) for i in range(10)))
    code = main(["scan", str(DIGITS / "model.pt2"), "--data", str(tmp_path / "no9.npz"),
                 "--class-names", str(names), "--classes", "9"])
    assert code == ExitCode.NO_DATA == 5
    assert "nothing to audit" in capsys.readouterr().err


def test_help_is_instant_and_lists_the_options():
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "robaudit", "scan", "--help"],
                          capture_output=True, text=True, check=True)
    assert time.perf_counter() - started < 5
    for option in ("--eps", "--attacks", "--min-class-robust", "--junit", "--per-class"):
        assert option in proc.stdout
    assert "import torch" not in proc.stderr


def test_the_command_line_overrides_the_config_file(tmp_path):
    report = tmp_path / "r.json"
    assert main(scan_args(*FAST, "--eps", "8/255", "--json", str(report), "-q")) in (0, 1)
    config = json.loads(report.read_text())["config"]
    assert config["eps_text"] == "8/255" and config["steps"] == 5
    assert config["min_class_robust"] == 0.4  # from the example's robaudit.toml
    assert config["sources"] == ["defaults", str(DIGITS / "robaudit.toml"), "command line"]


def test_report_renders_a_saved_json_again(tmp_path, capsys):
    report = tmp_path / "r.json"
    main(scan_args(*FAST, "--json", str(report)))
    first = capsys.readouterr().out
    code = main(["report", str(report), "--junit", str(tmp_path / "j.xml")])
    again = capsys.readouterr().out
    assert code == 1
    assert (tmp_path / "j.xml").read_bytes().startswith(b"<?xml")
    table = [line for line in first.splitlines() if line.startswith("8 ")]
    assert table and table[0] in again


def test_report_refuses_a_file_that_is_not_a_report(tmp_path, capsys):
    other = tmp_path / "x.json"
    other.write_text("{}")
    assert main(["report", str(other)]) == 4
    assert "not a robaudit scan report" in capsys.readouterr().err


def test_no_module_but_the_cli_and_terminal_imports_click_or_rich():
    allowed = {Path("robaudit/cli.py"), Path("robaudit/options.py"),
               Path("robaudit/reports/terminal.py")}
    root = DIGITS.parent.parent
    for path in sorted((root / "robaudit").rglob("*.py")):
        rel = path.relative_to(root)
        if rel in allowed:
            continue
        text = path.read_text()
        for lib in ("click", "rich"):
            assert f"import {lib}" not in text and f"from {lib}" not in text, rel


def test_scan_settings_are_declared_once_and_shared_with_harden():
    from robaudit.cli import harden, scan
    from robaudit.config import FILE_KEYS, GATE_EPS

    def options(command):
        return {p.name: p for p in command.params if p.param_type_name == "option"}

    scan_options, harden_options = options(scan), options(harden)
    # Every scan option is a setting resolve_config knows (or --config, -v, -q).
    assert set(scan_options) - {*FILE_KEYS, GATE_EPS} == {"config_file", "verbose", "quiet"}
    shared = {"data_root", "per_class", "limit", "eps", "steps", "seed", "batch_size", "device",
              "min_class_robust", "gate_on", "config_file", "verbose", "quiet"}
    assert shared <= set(harden_options)
    for name in shared:  # the same declaration: same flags, same help
        assert harden_options[name].opts == scan_options[name].opts
        assert harden_options[name].help == scan_options[name].help
    # harden's --data is its training set, its --json and --html its own reports.
    assert "--val-data" in harden_options["val_data"].opts
    assert "--json" in harden_options["json_path"].opts and "json_images" not in harden_options


def test_help_shows_the_configs_own_defaults_and_choices():
    from dataclasses import fields

    from robaudit.choices import MODES, NORMS, SCHEDULES
    from robaudit.config import ScanConfig

    defaults = {f.name: f.default for f in fields(ScanConfig)}
    text = " ".join(CliRunner().invoke(cli, ["scan", "--help"], terminal_width=200).output.split())
    assert f"[default: {defaults['steps']}]" in text
    assert f"[default: {defaults['escalation_queries']}]" in text
    assert f"[default: {','.join(defaults['attacks'])}]" in text
    assert "[default: 8/255]" in text and defaults["eps"] == 8 / 255
    for choices in (NORMS, SCHEDULES, MODES):
        assert "[" + "|".join(choices) + "]" in text


def test_robaudit_attacks_lists_the_registry_with_traits(capsys):
    from robaudit.attacks import ATTACKS
    from robaudit.choices import PRESETS

    assert main(["attacks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [*ATTACKS, *PRESETS]
    by_name = {line.split()[0]: line for line in lines}
    assert by_name["square"].endswith("[queries only]")
    assert by_name["dlr-t"].endswith("[gradient, scale-invariant, targeted]")
    assert by_name["fgsm"].endswith("[gradient, one step]")


def test_hardens_options_take_their_defaults_and_choices_from_harden_config():
    from dataclasses import fields

    from robaudit.cli import harden
    from robaudit.harden.config import OBJECTIVES, HardenConfig
    from robaudit.harden.reweight import SCHEMES
    from robaudit.options import HARDEN_FIELDS

    defaults = {f.name: f.default for f in fields(HardenConfig)}
    params = {p.name: p for p in harden.params}
    for name in HARDEN_FIELDS:
        assert params[name].default == defaults[name], name
    assert tuple(params["reweight"].type.choices) == tuple(SCHEMES)
    assert tuple(params["objective"].type.choices) == OBJECTIVES
