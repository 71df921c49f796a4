"""Settings: defaults, then a config file, then the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from robaudit.config import ScanConfig, format_eps, parse_fraction, resolve_config
from robaudit.errors import ConfigError, MissingSetting
from robaudit.gate import GatePolicy


def test_eps_accepts_fractions_and_prints_them_back():
    assert parse_fraction("8/255") == pytest.approx(0.0313725490)
    assert parse_fraction(" 0.25 ") == 0.25
    assert format_eps(8 / 255) == "8/255"
    assert format_eps(0.2) == "0.2"
    with pytest.raises(ConfigError, match="8/255"):
        parse_fraction("1/0")


def test_defaults():
    config = resolve_config({"model": "m.onnx", "data": "d.npz"}, cwd=Path("/"))
    assert config.attacks == ("pgd", "tpgd") and config.eps == pytest.approx(8 / 255)
    assert config.steps == 20 and config.restarts == 1 and config.seed == 0
    assert config.sources == ("defaults", "command line")


def test_robaudit_toml_then_command_line(tmp_path):
    (tmp_path / "robaudit.toml").write_text('eps = "4/255"\nsteps = 7\nattacks = "pgd,cw"\n'
                                            "min-class-robust = 0.3\n")
    config = resolve_config({"model": "m", "data": "d.npz", "steps": 9}, cwd=tmp_path)
    assert config.eps == pytest.approx(4 / 255)
    assert config.steps == 9
    assert config.attacks == ("pgd", "cw")
    assert config.min_class_robust == 0.3


def test_pyproject_tool_table(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n[tool.robaudit]\nrestarts = 3\n")
    assert resolve_config({"model": "m", "data": "d"}, cwd=tmp_path).restarts == 3


def test_paths_in_a_config_file_are_relative_to_it(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.npz").write_bytes(b"")
    (tmp_path / "sub" / "robaudit.toml").write_text('data = "d.npz"\n')
    config = resolve_config({"model": "m"}, config_file=tmp_path / "sub" / "robaudit.toml")
    assert config.data == str(tmp_path / "sub" / "d.npz")


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("stpes = 3", "unknown key 'stpes' in config file"),
        ("stpes = 3", "Did you mean 'steps'?"),
        ('steps = "many"', "steps has an invalid value 'many'"),
        ("steps = 2.5", "steps has an invalid value 2.5 (expected an integer)"),
        ('batch_size = "big"', "batch_size has an invalid value 'big' (expected an integer)"),
        ("download = 3", "download has an invalid value 3 (expected true or false)"),
        ("eps = true", "eps must be a number"),
        ("steps = [", "is not valid TOML"),
        ("eps = 2", "eps must be in (0, 1]"),
    ],
)
def test_bad_config_files_name_the_key_and_the_file(tmp_path, toml, words):
    path = tmp_path / "robaudit.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as info:
        resolve_config({"model": "m", "data": "d"}, cwd=tmp_path)
    assert words in str(info.value)
    if "unknown" in words or "invalid" in words:
        assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("eps", 0.0, "eps must be in (0, 1]"),
        ("restarts", 0, "restarts must be at least 1"),
        ("temperatures", (0.0,), "temperatures must be positive"),
        ("min_ratio", 1.5, "min_ratio must be in (0, 1]"),
        ("gate_on", "cw", "gate_on must be 'worst' or one of the attacks run"),
        ("mean", (0.5,), "mean and std go together"),
        ("attacks", ("pgd", "pgd"), "lists an attack twice"),
    ],
)
def test_out_of_range_settings(field, value, words):
    with pytest.raises(ConfigError, match=None) as info:
        ScanConfig(model="m", data="d", **{field: value})
    assert words in str(info.value)


def test_missing_config_file_named_on_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config({"model": "m", "data": "d"}, config_file=tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.5/255", 0.5 / 255), ("8/255", 8 / 255), (" 1e-3 / 2 ", 0.0005), ("-2/255", -2 / 255)],
)
def test_eps_is_any_fraction_of_two_numbers(text: str, expected: float) -> None:
    assert parse_fraction(text) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("text", ["1/2/3", "/255", "8/", "0.5/0", "a/255", "nan/2", "8/inf"])
def test_eps_fraction_refuses_anything_else(text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_fraction(text)
    assert str(excinfo.value) == f"eps must be a number like 0.03 or 8/255, not {text!r}"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"eps": "8/255"}, {"eps": 8 / 255, "eps_sweep": ()}),
        ({"eps": 0.1}, {"eps": 0.1, "eps_sweep": ()}),
        ({"eps": "0.1,0.2"}, {"eps": 0.2, "eps_sweep": (0.1, 0.2)}),
        ({"eps": [0.2, "1/10"]}, {"eps": 0.2, "eps_sweep": (0.1, 0.2)}),
        ({"eps": (0.1, 0.2), "gate_eps": "0.1"}, {"eps": 0.1, "eps_sweep": (0.1, 0.2)}),
        ({"attacks": "pgd, fgsm"}, {"attacks": ("pgd", "fgsm")}),
        ({"attacks": ["pgd"], "gate-on": "pgd"}, {"attacks": ("pgd",), "gate_on": "pgd"}),
        ({"classes": [0, 8], "temperatures": "0.5"}, {"classes": ("0", "8"),
                                                      "temperatures": (0.5,)}),
        ({"mean": "0.5,0.5,0.5", "std": (0.25, 0.25, 0.25)},
         {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}),
        ({"steps": "7", "amp": "true", "min_class_robust": "1/4", "data": Path("x.npz")},
         {"steps": 7, "amp": True, "min_class_robust": 0.25, "data": "x.npz"}),
    ],
)
def test_every_command_line_form_works_as_a_keyword(given, expected):
    config = resolve_config({"model": Path("m.onnx"), "data": "d.npz", **given},
                            find_file=False, source="pytest")
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.model == "m.onnx" and config.sources == ("defaults", "pytest")


def test_a_config_file_named_by_a_string_and_overridden_by_keywords(tmp_path):
    (tmp_path / "robaudit.toml").write_text('eps = "0.1,0.2"\nsteps = 20\nmin_class_robust = 0.4\n')
    path = str(tmp_path / "robaudit.toml")
    config = resolve_config({"model": "m", "data": "d", "steps": 3}, config_file=path)
    assert (config.eps, config.eps_sweep, config.steps, config.min_class_robust) == \
        (0.2, (0.1, 0.2), 3, 0.4)
    assert config.sources == ("defaults", path, "command line")
    # gate_eps alone picks the gate's eps in the file's sweep; a new eps replaces the sweep.
    assert resolve_config({"model": "m", "data": "d", "gate_eps": "0.1"},
                          config_file=path).eps_sweep == (0.1, 0.2)
    assert resolve_config({"model": "m", "data": "d", "eps": "8/255"},
                          config_file=path).eps_sweep == ()
    # No file is looked for without find_file (the pytest plugin's case).
    assert resolve_config({"model": "m", "data": "d"}, cwd=tmp_path, find_file=False).steps == 20


@pytest.mark.parametrize(
    ("given", "key", "words"),
    [
        ({"steps": "many"}, "steps", "steps has an invalid value 'many'"),
        ({"eps": "eight"}, "eps", "eps must be a number"),
        ({"eps": "0.1,0.2", "gate_eps": "0.3"}, "gate_eps", "is not one of the eps given"),
        ({"eps": 2}, "eps", "eps must be in (0, 1]"),
        ({"attacks": "pgd,pdg2"}, "attacks", "unknown attack 'pdg2'"),
        ({"mean": "0.5"}, "std", "mean and std go together"),
        ({"stpes": 3}, "stpes", "Did you mean 'steps'?"),
        ({"baseline": "b.json"}, "max_drop", "a baseline report needs max_drop"),
    ],
)
def test_errors_carry_the_key_they_are_about(given, key, words):
    with pytest.raises(ConfigError) as info:
        resolve_config({"model": "m", "data": "d", **given}, find_file=False)
    assert info.value.key == key
    assert words in str(info.value)


def test_a_bad_value_from_the_file_says_so_and_keeps_its_key(tmp_path):
    (tmp_path / "robaudit.toml").write_text("steps = 0\n")
    with pytest.raises(ConfigError) as info:
        resolve_config({"model": "m", "data": "d"}, cwd=tmp_path)
    assert info.value.key == "steps"
    assert str(info.value) == (f"steps must be at least 1, got 0 (set in config file "
                               f"{tmp_path / 'robaudit.toml'})")


def test_missing_data_is_a_missing_setting():
    with pytest.raises(MissingSetting) as info:
        resolve_config({"model": "m"}, find_file=False)
    assert info.value.key == "data" and "no data set given" in str(info.value)


def test_the_gate_policy_comes_from_the_config():
    config = ScanConfig(model="m", data="d", attacks=("pgd",), min_ratio=0.5, max_gap=0.2,
                        significance=True, gate_on="pgd")
    assert config.gate_policy() == GatePolicy(min_ratio=0.5, max_gap=0.2, significance=True,
                                              on="pgd")
