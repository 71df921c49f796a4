"""JSON, JUnit XML and the terminal table, rendered from a real scan of the example."""

from __future__ import annotations

import json
import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import xmlschema
from conftest import DIGITS
from rich.console import Console

from robaudit.audit import scan
from robaudit.config import ScanConfig
from robaudit.reports import atomic_write, temporary_beside
from robaudit.reports.json import SCHEMA_VERSION, dumps, read_json, to_dict, write_json
from robaudit.reports.junit import render_junit
from robaudit.reports.terminal import TerminalReporter

SCHEMA = xmlschema.XMLSchema(Path(__file__).parent / "schemas" / "junit.xsd")
HOSTILE = ["<script>alert(1)</script>", 'a&b "quoted"', "bell\x07char", "it's", "ünïcødé",
           "]]>", "five", "six", "seven", "eight"]


@pytest.fixture(scope="module")
def hostile_doc(tmp_path_factory) -> dict:
    names = tmp_path_factory.mktemp("names") / "names.txt"
    names.write_text("\n".join(HOSTILE), encoding="utf-8")
    config = ScanConfig(model=str(DIGITS / "model.pt2"), data=str(DIGITS / "test.npz"),
                        class_names=str(names), eps=0.2, steps=5, per_class=8,
                        min_class_robust=0.4)
    return to_dict(scan(config))


def test_json_round_trips_and_carries_provenance(hostile_doc, tmp_path):
    path = tmp_path / "r.json"
    write_json(path, hostile_doc)
    doc = read_json(path)
    assert doc == json.loads(dumps(hostile_doc))
    assert doc["schema_version"] == SCHEMA_VERSION
    assert [c["name"] for c in doc["classes"]] == HOSTILE
    assert doc["environment"]["torch"] and doc["environment"]["robaudit"]
    assert doc["environment"]["working_batch"] == 4096  # no --batch-size, 8x8 inputs
    assert doc["config"]["eps"] == 0.2 and doc["config"]["eps_text"] == "0.2"
    assert [(a["name"], a["stage"]) for a in doc["attacks"]] == [
        ("pgd", "scan"), ("tpgd", "scan"), ("dlr-t", "finish")]
    assert doc["attacks"][2]["targets"] == 5
    assert sum(c["n"] for c in doc["classes"]) == doc["data"]["audited"] == 80
    for c in doc["classes"]:
        worst = c["robust"]["worst"]
        assert worst["correct"] <= min(c["robust"]["pgd"]["correct"],
                                       c["robust"]["tpgd"]["correct"])
        # The finish ran on the survivors of both: its column is the worst case.
        assert c["robust"]["dlr-t"]["correct"] == worst["correct"]
        assert worst["ci95"][0] <= worst["acc"] <= worst["ci95"][1]
        assert sum(c["confusion_row"]) == c["clean"]["correct"] - worst["correct"]
    assert len(doc["confusion"]["pgd"]) == 10


def test_a_class_without_examples_is_null_in_json_not_nan(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(str(i) for i in range(10)))
    config = ScanConfig(model=str(DIGITS / "model.pt2"), data=str(DIGITS / "test.npz"),
                        class_names=str(names), classes=("3",), steps=2, per_class=4)
    doc = json.loads(dumps(to_dict(scan(config))))
    assert doc["classes"][3]["n"] == 4
    assert doc["classes"][0]["n"] == 0 and doc["classes"][0]["robust"]["worst"]["acc"] is None


def test_junit_is_valid_against_the_junit_schema(hostile_doc):
    xml = render_junit(hostile_doc)
    SCHEMA.validate(xml.decode("utf-8"))
    root = ET.fromstring(xml)
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["robaudit.gate"]
    cases = suites[0].findall("testcase")
    assert len(cases) == 10 == int(suites[0].get("tests")) == int(root.get("tests"))
    assert int(suites[0].get("failures")) == len(suites[0].findall("testcase/failure"))


def test_junit_fails_each_flagged_class_once_and_carries_every_figure(hostile_doc):
    root = ET.fromstring(render_junit(hostile_doc))
    cases = root.findall("testsuite/testcase")
    failed = [case.get("name") for case in cases if case.find("failure") is not None]
    assert failed == hostile_doc["verdict"]["flagged"]  # once each, in class order
    assert failed  # the example always has classes below 40%
    assert int(root.get("failures")) == len(failed)
    case = next(c for c in cases if c.find("failure") is not None)
    assert "below the floor 40.0%" in case.find("failure").get("message")
    out = case.find("system-out").text
    for figure in ("pgd", "tpgd", "dlr-t", "worst"):  # each attack's figure, not a test each
        assert f" {figure} " in out, out
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["gate_on"] == "worst" and props["policy.min_class_robust"] == "0.4"


def test_hostile_class_names_are_escaped_in_junit(hostile_doc):
    xml = render_junit(hostile_doc)
    assert b"<script>" not in xml
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in xml
    assert b"\x07" not in xml  # XML 1.0 cannot hold it at all
    names = [c.get("name") for c in ET.fromstring(xml).find("testsuite").findall("testcase")]
    assert names[:2] == HOSTILE[:2]
    assert names[2] == "bell\ufffdchar"
    assert names[4:6] == HOSTILE[4:6]


def test_terminal_table_shows_every_class_and_the_verdict(hostile_doc):
    console = Console(record=True, width=160, force_terminal=False, color_system=None)
    TerminalReporter(console=console).render(hostile_doc)
    text = console.export_text()
    for name in ("<script>alert(1)</script>", 'a&b "quoted"', "ünïcødé"):
        assert name in text
    flagged = len(hostile_doc["verdict"]["flagged"])
    assert f"{flagged} class" in text and "flagged" in text
    assert "+" in text or "|" in text  # plain ASCII table off a TTY


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")

    with pytest.raises(TypeError):
        atomic_write(target, object())  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_reports_and_checkpoints_keep_the_users_umask(hostile_doc, tmp_path, umask, mode):
    from robaudit.harden.checkpoint import save_checkpoint
    from robaudit.reports.html import write_html
    from robaudit.reports.junit import write_junit

    (tmp_path / "old.json").write_text("old")
    (tmp_path / "old.json").chmod(0o600)
    previous = os.umask(umask)
    try:
        write_json(tmp_path / "r.json", hostile_doc)
        write_json(tmp_path / "old.json", hostile_doc)  # replaced: the new file's mode
        write_junit(tmp_path / "r.xml", hostile_doc)
        write_html(tmp_path / "r.html", hostile_doc)
        save_checkpoint(tmp_path / "sub" / "r.ckpt", {"epoch": 1})
        tmp = temporary_beside(tmp_path / "model.onnx", ".onnx")
    finally:
        os.umask(previous)
    files = ["r.json", "old.json", "r.xml", "r.html", "sub/r.ckpt", tmp.name]
    assert {f: stat.S_IMODE((tmp_path / f).stat().st_mode) for f in files} == \
        dict.fromkeys(files, mode)
    assert tmp.name.startswith(".model.onnx.") and tmp.suffix == ".onnx"
    assert read_json(tmp_path / "old.json") == json.loads(dumps(hostile_doc))


def test_a_sweep_reaches_junit_and_its_json_entries_carry_intervals():
    config = ScanConfig(model=str(DIGITS / "model.pt2"), data=str(DIGITS / "test.npz"),
                        eps=0.2, eps_sweep=(0.1, 0.2), steps=3, per_class=4,
                        min_class_robust=0.4,
                        finish=())
    doc = json.loads(dumps(to_dict(scan(config))))
    assert [e["eps_text"] for e in doc["sweep"]] == ["0.1", "0.2"]
    for entry in doc["sweep"]:
        for row in entry["classes"]:
            for figure, acc in row["robust"].items():
                low, high = row["ci95"][figure]
                assert low <= acc <= high and row["n"] == 4
    root = ET.fromstring(render_junit(doc))
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert {"robust_acc.worst@eps=0.1", "robust_acc.worst@eps=0.2"} <= set(props)
    out = root.find("testsuite/testcase/system-out").text
    assert "at eps 0.1: pgd " in out and "at eps 0.2: pgd " in out
