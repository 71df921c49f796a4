"""Settings: defaults, then a config file, then the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from robaudit.config import ScanConfig, format_eps, parse_fraction, resolve_config
from robaudit.errors import ConfigError


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
