"""JUnit XML: one ``<testsuite>`` (``robaudit.gate``) with one ``<testcase>`` per class and a
``<failure>`` with the figures when the gate failed the class.

A class is judged once, so it is one test: CI dashboards count test cases, and a class flagged
under four attacks is one failing class, not four. Every attack's figure, and each ε of a sweep,
is in the case's ``system-out`` and in the suite's properties.

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

SUITE = "robaudit.gate"


def _text(value: Any) -> str:
    return _ILLEGAL_XML.sub("\ufffd", str(value))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _figure(label: str, rate: dict[str, Any] | None) -> str:
    if rate is None or rate.get("acc") is None:
        return f"{label} n/a"
    low, high = rate["ci95"]
    return f"{label} {_pct(rate['acc'])} (95% CI {_pct(low)}-{_pct(high)})"


def _class_lines(doc: dict[str, Any], c: dict[str, Any]) -> list[str]:
    """The class's figures: clean, each attack and the worst case, then each ε of a sweep."""
    figures = [a["name"] for a in doc["attacks"]] + [WORST]
    lines = [f"class {c['name']!r} (index {c['index']}, n={c['n']}) at eps "
             f"{doc['config']['eps_text']}: clean {_pct(c['clean']['acc'])}; robust "
             + ", ".join(_figure(f, c["robust"].get(f)) for f in figures)]
    for entry in doc.get("sweep") or []:
        row = next((r for r in entry["classes"] if r["name"] == c["name"]), None)
        if row is None:
            continue
        rates = {f: {"acc": acc, "ci95": (row.get("ci95") or {}).get(f, [None, None])}
                 for f, acc in row["robust"].items()}
        lines.append(f"  at eps {entry['eps_text']}: "
                     + ", ".join(_figure(f, rates.get(f)) for f in figures if f in rates))
    s = c.get("sequential")
    if s is not None and s["interval"] is not None:
        low, high = s["interval"]
        when = "" if s["round"] is None else f" (round {s['round']})"
        lines.append(f"  sequential: {s['decided'] or 'undecided'} after {s['attacked']} of "
                     f"{s['of']} attacked{when}, robust between {_pct(low)} and {_pct(high)}")
    return lines


def _properties(suite: ET.Element, doc: dict[str, Any]) -> None:
    props = ET.SubElement(suite, "properties")
    gate = doc["verdict"]["gate"]
    items = [("model", doc["model"]["path"]), ("data", doc["data"]["description"]),
             ("eps", doc["config"]["eps_text"]), ("gate_on", gate["on"]),
             ("partial", str(doc["partial"]).lower())]
    items += [(f"policy.{k}", gate[k]) for k in ("min_class_robust", "min_ratio", "max_gap",
                                                  "max_drop") if gate.get(k) is not None]
    items += [(f"robust_acc.{name}", _pct(acc))
              for name, acc in doc["summary"]["robust_acc"].items()]
    items += [(f"robust_acc.{WORST}@eps={e['eps_text']}", _pct(e["robust_acc"].get(WORST)))
              for e in doc.get("sweep") or []]
    sequential = doc.get("sequential")
    if sequential:
        items += [("sequential.confidence", sequential["confidence"]),
                  ("sequential.attacked", f"{sequential['attacked']} of {sequential['of']}")]
    for key, value in items:
        ET.SubElement(props, "property", name=key, value=_text(value))


def render_junit(doc: dict[str, Any]) -> bytes:
    """The JUnit XML document for a JSON report."""
    total_time = float(doc["timings"].get("attack_s", 0.0))
    n_total = max(1, sum(c["n"] for c in doc["classes"]))
    root = ET.Element("testsuites", name="robaudit")
    suite = ET.SubElement(root, "testsuite", name=SUITE, timestamp=_text(doc["created"]),
                          time=f"{total_time:.3f}")
    _properties(suite, doc)
    failures = 0
    for c in doc["classes"]:
        verdict = c["verdict"]
        case = ET.SubElement(suite, "testcase", classname=SUITE, name=_text(c["name"]),
                             time=f"{total_time * c['n'] / n_total:.3f}")
        lines = _class_lines(doc, c)
        if c["n"] == 0:
            ET.SubElement(case, "skipped", message="no examples of this class were audited")
        elif not verdict["passed"]:
            failures += 1
            messages = [f["message"] for f in verdict["failures"]]
            failure = ET.SubElement(case, "failure", type=f"robaudit.{verdict['status']}",
                                    message=_text("; ".join(messages)))
            failure.text = _text("\n".join(lines + messages))
        ET.SubElement(case, "system-out").text = _text("\n".join(lines))
    skipped = sum(1 for c in doc["classes"] if c["n"] == 0)
    for element in (suite, root):
        element.set("tests", str(len(doc["classes"])))
        element.set("failures", str(failures))
        element.set("errors", "0")
    suite.set("skipped", str(skipped))
    root.set("time", f"{total_time:.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(path: str | Path, doc: dict[str, Any]) -> None:
    atomic_write(path, render_junit(doc))
