"""The HTML report: one self-contained page, rendered from the JSON report document.

Jinja2 templates (``templates/`` in a checkout, ``robaudit/templates`` in the wheel) render it with
autoescaping on. Python works out the charts' geometry as plain numbers and strings; the templates
write every string, so each class name passes through the escaper, and no ``Markup`` is built from
report data. Nothing is loaded from the network: a Content-Security-Policy admits only the page's
inline style, its one script (by hash) and ``data:`` images.
"""

from __future__ import annotations

import base64
import hashlib
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from robaudit.reports import atomic_write
from robaudit.reports.baseline_view import baseline_view
from robaudit.reports.html_charts import (
    FULL,
    TOP_K,
    WORST,
    bars,
    gains,
    heatmaps,
    narrowing,
    pct,
    sweep,
)

GALLERY_PER_CLASS = 8
#: Bytes of gallery images at most: keeps a 1000-class page well under 5 MB.
GALLERY_BUDGET = 3_000_000
IMAGE_PREFIXES = ("data:image/png;base64,", "data:image/jpeg;base64,", "data:image/webp;base64,")


def _template_dirs() -> list[Path]:
    """The wheel's ``robaudit/templates``, else a checkout's top-level ``templates``."""
    package = Path(__file__).resolve().parent.parent
    candidates = [package / "templates", package.parent / "templates"]
    return [p for p in candidates if (p / "report.html.j2").is_file()]


@lru_cache(maxsize=1)
def template_environment() -> jinja2.Environment:
    dirs = _template_dirs()
    if not dirs:
        raise FileNotFoundError(
            "robaudit's HTML templates are missing (templates/report.html.j2); reinstall robaudit"
        )
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(dirs[0]),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = pct
    env.filters["num"] = _num
    return env


def load_templates() -> None:
    """Compile the scan report's templates now. The CLI calls it before a scan: compiling is
    most of the page's time, and after a Ctrl-C the partial report is wanted at once."""
    env = template_environment()
    for name in ("report.html.j2", "charts.html.j2", "baseline.html.j2", "report.js",
                 "report.css"):
        env.get_template(name)



def _num(value: float | None) -> str:
    """A sort key for ``data-v``: empty for a missing figure, so the script sorts it last."""
    return "" if value is None else f"{value:.6g}"


def render_html(doc: dict[str, Any]) -> str:
    """The HTML page for a JSON report document (``to_dict`` or ``read_json``)."""
    env = template_environment()
    script = env.get_template("report.js").render()
    style = env.get_template("report.css").render()
    # The policy names the script by hash: markup injected past the escaper still could not run.
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return env.get_template("report.html.j2").render(
        doc=doc, view=build_view(doc), script=Markup(script), style=Markup(style),
        script_hash=f"sha256-{digest}",
    )


def write_html(path: str | Path, doc: dict[str, Any]) -> None:
    """Write the HTML page atomically."""
    atomic_write(path, render_html(doc).encode("utf-8"))


# --- the view: everything the template shows, worked out from the document ---------------------


def build_view(doc: dict[str, Any]) -> dict[str, Any]:
    """Plain data for the template: classes in display order, chart geometry, gallery."""
    attacks = [a["name"] for a in doc["attacks"]]
    figures = [*attacks, WORST]
    gate = doc["verdict"]["gate"]
    on = gate["on"] if gate["on"] in figures else WORST
    classes = [_class_row(c, on) for c in doc["classes"]]
    present = [c for c in classes if c["n"] > 0]
    weakest_first = sorted(present, key=_weakness)
    many = len(present) > FULL
    if many:
        focus = weakest_first[:TOP_K]
        top = {c["index"] for c in focus} | {c["index"] for c in present if c["flagged"]}
        main = [c for c in weakest_first if c["index"] in top]
        rest = [c for c in present if c["index"] not in top]
    else:
        focus, main, rest = weakest_first, present, []
    thresholds = _thresholds(gate)
    return {
        "attacks": attacks,
        # Columns that ran on the earlier attacks' survivors: robust after all of them.
        "cumulative": [a["name"] for a in doc["attacks"] if a.get("stage", "scan") != "scan"],
        "figures": figures,
        "on": on,
        "many": many,
        "top_k": TOP_K,
        "present": len(present),
        "empty": len(classes) - len(present),
        "flagged": [c for c in weakest_first if c["flagged"]],
        "weakest": weakest_first[0] if weakest_first else None,
        "main": main,
        "rest": rest,
        "runtime": any(c["runtime"] is not None for c in present),
        "policy": _policy(gate),
        "bars": bars(focus, attacks, on, thresholds),
        "heatmaps": heatmaps(doc, focus if many else present, present, attacks),
        "sweep": sweep(doc, weakest_first, on, gate),
        "correlations": _correlations(doc),
        "gains": gains(doc, present),
        "gallery": _gallery(doc, weakest_first),
        "baseline": baseline_view(doc, on),
        "sequential": _sequential(doc),
        "narrowing": narrowing(doc, weakest_first, on),
    }


def _class_row(c: dict[str, Any], on: str) -> dict[str, Any]:
    return {
        "index": c["index"],
        "name": c["name"],
        "n": c["n"],
        "clean": c["clean"],
        "robust": c["robust"],
        "runtime": c.get("runtime_robust"),
        "figure": c["robust"][on]["acc"],
        "flagged": not c["verdict"]["passed"],
        "unreliable": c["verdict"].get("status") == "unreliable",
        "reasons": [f["message"] for f in c["verdict"]["failures"]],
    }


def _weakness(c: dict[str, Any]) -> tuple[float, int]:
    return (math.inf if c["figure"] is None else c["figure"], c["index"])


def _policy(gate: dict[str, Any]) -> list[str]:
    """The gate policy in words, one line per policy."""
    lines = []
    if gate.get("min_class_robust") is not None:
        lines.append(f"robust accuracy ≥ {pct(gate['min_class_robust'])} (floor)")
    if gate.get("min_ratio") is not None:
        lines.append(f"robust accuracy ≥ {gate['min_ratio']:g} × the class mean")
    if gate.get("max_gap") is not None:
        lines.append(f"at most {pct(gate['max_gap'])} below the best class")
    if gate.get("max_drop") is not None:
        lines.append(f"at most {pct(gate['max_drop'])} drop against the baseline")
    if not lines:
        return ["no policy set: no class can be flagged"]
    if gate.get("significance"):
        lines.append("flagged only when the whole 95% interval fails")
    return lines


def _sequential(doc: dict[str, Any]) -> list[str]:
    """A sequential scan in words: what it attacked and each class decided early (how the
    weakest classes' intervals narrowed is a chart)."""
    s = doc.get("sequential")
    if not s:
        return []
    lines = [f"{s['attacked']} of {s['of']} clean-correct examples attacked in {s['rounds']} "
             f"rounds, {s['confidence']:.0%} confidence"]
    by_name = {c["name"]: c.get("sequential") for c in doc["classes"]}
    for c in doc["classes"]:
        mine = by_name[c["name"]]
        if mine and mine["decided"] and not mine["exhausted"]:
            lines.append(f"class {c['name']}: {mine['decided']} its threshold, decided after "
                         f"{mine['attacked']} of {mine['of']}")
    return lines


def _thresholds(gate: dict[str, Any]) -> list[dict[str, Any]]:
    """The lines a class had to stay above, as the gate drew them (stored in the report)."""
    # A report from before robaudit stored them has only its floor to show.
    floor = {"min_class_robust": gate.get("min_class_robust")}
    stored = gate.get("thresholds", floor)
    labels = {"min_class_robust": "floor", "min_ratio": f"{gate.get('min_ratio') or 0:g}× mean",
              "max_gap": "best − gap"}
    return [{"value": value, "label": labels[name]} for name, value in stored.items()
            if name in labels and value is not None and 0 <= value <= 1]


def _correlations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pairs = doc["summary"].get("rank_correlation") or {}
    return [{"a": key.split("~")[0], "b": key.split("~")[-1], "rho": rho}
            for key, rho in pairs.items()]


def _gallery(doc: dict[str, Any], weakest_first: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Examples of flagged classes, weakest first, with their images within a byte budget.

    A JSON report saved without its images (the default) still lists the examples, as text.
    """
    gallery = doc.get("gallery")
    if not gallery:
        return None
    budget = GALLERY_BUDGET
    sections, left_out, text_only = [], 0, False
    for c in weakest_first:
        examples = gallery.get(c["name"]) or []
        shown = []
        for e in examples[:GALLERY_PER_CLASS]:
            images = [e.get(k) for k in ("clean", "adversarial", "perturbation")]
            if all(i is None for i in images):
                text_only = True
                shown.append({**_example(e, c["name"]), "images": False})
                continue
            # Only inline images: a URL here would be a network request (and CSP blocks it).
            if not all(isinstance(i, str) and i.startswith(IMAGE_PREFIXES) for i in images):
                continue
            cost = sum(len(i) for i in images)  # type: ignore[arg-type]
            if cost > budget:
                break
            budget -= cost
            shown.append({**_example(e, c["name"]), "images": True,
                          "clean": images[0], "adversarial": images[1],
                          "perturbation": images[2]})
        if shown:
            sections.append({"name": c["name"], "flagged": c["flagged"], "figure": c["figure"],
                             "examples": shown, "total": len(examples)})
        elif examples:
            left_out += 1
    if not sections and not left_out:
        return None
    return {"sections": sections, "left_out": left_out, "text_only": text_only}


def _example(e: dict[str, Any], name: str) -> dict[str, Any]:
    """The caption's fields, with defaults: a missing one must not stop the report."""
    return {"index": e.get("index", "?"), "true": e.get("true", name), "pred": e.get("pred", "?"),
            "confidence": e.get("confidence"), "attack": e.get("attack", "")}
