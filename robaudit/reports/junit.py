"""JUnit XML: one ``<testsuite>`` per attack plus one for the worst case, one ``<testcase>`` per
class, and a ``<failure>`` with the figures when the class is flagged under that figure.

Written with the standard library's ElementTree, which escapes markup; characters XML 1.0 cannot
hold at all (control characters in a class name, say) are replaced first.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from robaudit.metrics import WORST
from robaudit.reports import atomic_write

# Characters outside XML 1.0's Char production.
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _text(value: Any) -> str:
    return _ILLEGAL_XML.sub("\ufffd", str(value))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def render_junit(doc: dict[str, Any]) -> bytes:
    """The JUnit XML document for a JSON report."""
    figures = [a["name"] for a in doc["attacks"]] + [WORST]
    total_time = float(doc["timings"].get("attack_s", 0.0))
    n_total = max(1, sum(c["n"] for c in doc["classes"]))
    root = ET.Element("testsuites", name="robaudit")
    tests = failures = 0
    for figure in figures:
        seconds = float(doc["timings"].get(f"{figure}_s", total_time))
        suite = ET.SubElement(root, "testsuite", name=_text(f"robaudit.{figure}"),
                              timestamp=_text(doc["created"]), time=f"{seconds:.3f}")
        props = ET.SubElement(suite, "properties")
        for key, value in (
            ("model", doc["model"]["path"]),
            ("data", doc["data"]["description"]),
            ("eps", doc["config"]["eps_text"]),
            ("attack", figure),
            ("partial", str(doc["partial"]).lower()),
        ):
            ET.SubElement(props, "property", name=key, value=_text(value))
        suite_failures = 0
        for c in doc["classes"]:
            rate = c["robust"][figure]
            verdict = c["verdict_by_figure"][figure]
            case = ET.SubElement(
                suite, "testcase", classname=_text(f"robaudit.{figure}"), name=_text(c["name"]),
                time=f"{seconds * c['n'] / n_total:.3f}",
            )
            lines = [
                f"class {c['name']!r} (index {c['index']}, n={c['n']}): "
                f"clean {_pct(c['clean']['acc'])}, robust under {figure} {_pct(rate['acc'])} "
                f"(95% CI {_pct(rate['ci95'][0])}-{_pct(rate['ci95'][1])})",
            ]
            if c["n"] == 0:
                ET.SubElement(case, "skipped", message="no examples of this class were audited")
            elif not verdict["passed"]:
                suite_failures += 1
                messages = [f["message"] for f in verdict["failures"]]
                kind = verdict.get("status", "flagged")
                failure = ET.SubElement(case, "failure", type=f"robaudit.{kind}",
                                        message=_text("; ".join(messages)))
                failure.text = _text("\n".join(lines + messages))
            out = ET.SubElement(case, "system-out")
            out.text = _text(lines[0])
        suite.set("tests", str(len(doc["classes"])))
        suite.set("failures", str(suite_failures))
        suite.set("errors", "0")
        suite.set("skipped", str(sum(1 for c in doc["classes"] if c["n"] == 0)))
        tests += len(doc["classes"])
        failures += suite_failures
    root.set("tests", str(tests))
    root.set("failures", str(failures))
    root.set("errors", "0")
    root.set("time", f"{total_time:.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(path: str | Path, doc: dict[str, Any]) -> None:
    atomic_write(path, render_junit(doc))
