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
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from robaudit.reports import atomic_write
from robaudit.reports.baseline_view import baseline_view

WORST = "worst"  # the worst case over attacks, as the JSON report names it
#: Up to this many audited classes, every chart and the table show every class.
FULL = 30
#: Beyond ``FULL``, the charts expand the ``TOP_K`` least robust classes (ImageNet has 1000).
TOP_K = 20
SWEEP_LINES = 10
GALLERY_PER_CLASS = 8
#: Bytes of gallery images at most: keeps a 1000-class page well under 5 MB.
GALLERY_BUDGET = 3_000_000
IMAGE_PREFIXES = ("data:image/png;base64,", "data:image/jpeg;base64,", "data:image/webp;base64,")
# Colour-blind-safe categorical colours (Tableau 10); clean is grey, worst case dark slate.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7",
           "#9c755f", "#e15759", "#bab0ac")
CLEAN_COLOUR = "#c3cbd5"
WORST_COLOUR = "#2f3b4c"


def _template_dirs() -> list[Path]:
    """The wheel's ``robaudit/templates``, else a checkout's top-level ``templates``."""
    package = Path(__file__).resolve().parent.parent
    candidates = [package / "templates", package.parent / "templates"]
    return [p for p in candidates if (p / "report.html.j2").is_file()]


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
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
    env.filters["pct"] = _pct
    env.filters["num"] = _num
    return env


def load_templates() -> None:
    """Compile the scan report's templates now. The CLI calls it before a scan: compiling is
    most of the page's time, and after a Ctrl-C the partial report is wanted at once."""
    env = _environment()
    for name in ("report.html.j2", "charts.html.j2", "baseline.html.j2", "report.js",
                 "report.css"):
        env.get_template(name)


def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f}%"


def _num(value: float | None) -> str:
    """A sort key for ``data-v``: empty for a missing figure, so the script sorts it last."""
    return "" if value is None else f"{value:.6g}"


def render_html(doc: dict[str, Any]) -> str:
    """The HTML page for a JSON report document (``to_dict`` or ``read_json``)."""
    env = _environment()
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
        "bars": _bars(focus, attacks, on, thresholds),
        "heatmaps": _heatmaps(doc, focus if many else present, present, attacks),
        "sweep": _sweep(doc, weakest_first, on, gate),
        "correlations": _correlations(doc),
        "gains": _gains(doc, present),
        "gallery": _gallery(doc, weakest_first),
        "baseline": baseline_view(doc, on),
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


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _policy(gate: dict[str, Any]) -> list[str]:
    """The gate policy in words, one line per policy."""
    lines = []
    if gate.get("min_class_robust") is not None:
        lines.append(f"robust accuracy ≥ {_pct(gate['min_class_robust'])} (floor)")
    if gate.get("min_ratio") is not None:
        lines.append(f"robust accuracy ≥ {gate['min_ratio']:g} × the class mean")
    if gate.get("max_gap") is not None:
        lines.append(f"at most {_pct(gate['max_gap'])} below the best class")
    if gate.get("max_drop") is not None:
        lines.append(f"at most {_pct(gate['max_drop'])} drop against the baseline")
    if not lines:
        return ["no policy set: no class can be flagged"]
    if gate.get("significance"):
        lines.append("flagged only when the whole 95% interval fails")
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


def _rate_title(name: str, figure: str, rate: dict[str, Any] | None) -> str:
    if rate is None or rate.get("acc") is None:
        return f"{name} · {figure}: no figure"
    low, high = rate["ci95"]
    return (f"{name} · {figure}: {_pct(rate['acc'])} ({rate['correct']}/{rate['n']}), "
            f"95% CI {_pct(low)}–{_pct(high)}")


def _bars(focus: list[dict[str, Any]], attacks: list[str], on: str,
          thresholds: list[dict[str, Any]]) -> dict[str, Any]:
    """Grouped vertical bars per class: clean, each attack, worst case, with 95% whiskers."""
    series = [("clean", CLEAN_COLOUR)]
    series += [(a, PALETTE[i % len(PALETTE)]) for i, a in enumerate(attacks)]
    series.append((WORST, WORST_COLOUR))
    width, left, right, top = 1080, 46, 92, 14
    group = (width - left - right) / max(1, len(focus))
    # Long names are turned to fit under their group; short ones stay level and need less room.
    rotate = max((len(_short(c["name"])) for c in focus), default=0) * 7 > group * 0.9
    bottom = 84 if rotate else 30
    height = 220 + bottom
    plot_h = height - top - bottom
    bar = min(16.0, group * 0.78 / len(series))

    def y(v: float) -> float:
        return round(top + plot_h * (1 - v), 1)

    groups = []
    for g, c in enumerate(focus):
        x0 = left + g * group + (group - bar * len(series)) / 2
        bars = []
        for s, (figure, colour) in enumerate(series):
            rate = c["clean"] if figure == "clean" else c["robust"].get(figure)
            if rate is None or rate.get("acc") is None:
                continue
            bars.append({
                "x": round(x0 + s * bar, 1), "y": y(rate["acc"]), "w": round(bar - 1, 1),
                "h": round(plot_h * rate["acc"], 1), "colour": colour,
                "lo": y(rate["ci95"][0]), "hi": y(rate["ci95"][1]),
                "mid": round(x0 + s * bar + (bar - 1) / 2, 1),
                "title": _rate_title(c["name"], figure, rate),
            })
        groups.append({
            "name": c["name"], "label": _short(c["name"]), "flagged": c["flagged"],
            "x": round(left + g * group, 1), "w": round(group, 1),
            "cx": round(left + (g + 0.5) * group, 1), "bars": bars,
        })
    return {
        "width": width, "height": height, "left": left, "right": width - right, "top": top,
        "bottom": top + plot_h, "groups": groups, "series": series, "on": on, "rotate": rotate,
        "ticks": [{"y": y(t / 4), "label": f"{t * 25}%"} for t in range(5)],
        "thresholds": [{**t, "y": y(t["value"]), "text": f"{t['label']} {_pct(t['value'], 0)}"}
                       for t in thresholds],
    }


def _heat_colour(t: float) -> str:
    """White to deep red; the square root lifts small shares into view."""
    t = math.sqrt(max(0.0, min(1.0, t)))
    low, high = (255, 255, 255), (165, 28, 48)
    r, g, b = (round(a + (b_ - a) * t) for a, b_ in zip(low, high, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def _heatmaps(doc: dict[str, Any], rows: list[dict[str, Any]], present: list[dict[str, Any]],
              attacks: list[str]) -> list[dict[str, Any]]:
    """The adversarial confusion per figure: row = true class, column = where it went."""
    names = doc["class_names"] if "class_names" in doc else [c["name"] for c in doc["classes"]]
    matrices: list[tuple[str, list[list[int]]]] = [
        (WORST, [c.get("confusion_row") or [] for c in doc["classes"]])
    ]
    confusion = doc.get("confusion") or {}
    matrices += [(a, confusion[a]) for a in attacks if confusion.get(a)]
    many = len(present) > FULL
    if not many:
        rows = sorted(rows, key=lambda c: c["index"])
    out = []
    for figure, matrix in matrices:
        if many:
            inflow: dict[int, int] = {}
            for c in rows:
                for j, count in enumerate(matrix[c["index"]]):
                    if count:
                        inflow[j] = inflow.get(j, 0) + count
            top = sorted(inflow, key=lambda j: (-inflow[j], j))[:TOP_K]
            columns = sorted(top)
        else:
            columns = [c["index"] for c in present]
        out.append(_heatmap(figure, rows, matrix, columns, names, other=many))
    return out


def _heatmap(figure: str, rows: list[dict[str, Any]], matrix: list[list[int]],
             columns: list[int], names: Sequence[str], other: bool) -> dict[str, Any]:
    ncols = len(columns) + (1 if other else 0)
    cell = max(18.0, min(44.0, 620 / max(1, ncols)))
    longest = max([len(_short(names[j], 14)) for j in columns] + [5 if other else 0])
    rotate = longest * 7 > cell - 4
    top = round(24 + longest * 5.2) if rotate else 26
    left = max(150, min(170, 24 + 7 * max((len(_short(c["name"], 20)) for c in rows), default=0)))
    width = round(left + cell * ncols + 96)
    height = round(top + cell * len(rows) + 8)
    grid = []
    largest = 0.0
    for c in rows:
        counts = matrix[c["index"]] if c["index"] < len(matrix) else []
        broken = sum(counts)
        values = [counts[j] if j < len(counts) else 0 for j in columns]
        if other:
            values.append(broken - sum(values))
        shares = [v / c["n"] if c["n"] else 0.0 for v in values]
        largest = max(largest, *shares, 0.0)
        grid.append((c, values, shares, broken))
    out_rows = []
    for r, (c, values, shares, broken) in enumerate(grid):
        cells = []
        for k, (count, share) in enumerate(zip(values, shares, strict=True)):
            target = names[columns[k]] if k < len(columns) else "other classes"
            diagonal = k < len(columns) and columns[k] == c["index"]
            t = share / largest if largest else 0.0
            cells.append({
                "x": round(left + k * cell, 1), "count": count, "diagonal": diagonal,
                "fill": "#eef1f5" if diagonal else _heat_colour(t),
                "ink": "#ffffff" if t > 0.45 else "#1f2933",
                "title": (f"{c['name']} (true class)" if diagonal else
                          f"{c['name']} → {target}: {count} of {c['n']} examples "
                          f"({_pct(share)}); {_pct(count / broken if broken else None)} "
                          f"of its {broken} broken"),
            })
        out_rows.append({
            "name": c["name"], "label": _short(c["name"], 20), "flagged": c["flagged"],
            "y": round(top + r * cell, 1), "cells": cells,
            "total": f"{broken} of {c['n']}",
        })
    labels = [{"name": names[j], "label": _short(names[j], 14)} for j in columns]
    if other:
        labels.append({"name": "all other classes", "label": "other"})
    return {
        "figure": figure, "width": width, "height": height, "left": left, "top": top,
        "cell": round(cell, 1), "rows": out_rows,
        "columns": [{**lab, "x": round(left + (k + 0.5) * cell, 1)}
                    for k, lab in enumerate(labels)],
        "right": round(left + cell * ncols, 1), "largest": largest, "text": cell >= 24,
        "other": other, "rotate": rotate,
    }


def _sweep(doc: dict[str, Any], weakest_first: list[dict[str, Any]], on: str,
           gate: dict[str, Any]) -> dict[str, Any] | None:
    """Robust accuracy against ε per class, when the scan ran several ε."""
    entries = sorted(doc.get("sweep") or [], key=lambda e: e["eps"])
    if len(entries) < 2:
        return None
    figure = on if all(on in e.get("robust_acc", {}) for e in entries) else WORST
    width, left, right, top, bottom = 1080, 46, 200, 14, 40
    height = 320
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, hi = entries[0]["eps"], entries[-1]["eps"]
    span = (hi - lo) or 1.0

    def x(eps: float) -> float:
        return round(left + plot_w * (eps - lo) / span, 1)

    def y(v: float) -> float:
        return round(top + plot_h * (1 - v), 1)

    by_eps = [{c["name"]: (c.get("robust") or {}).get(figure) for c in e.get("classes", [])}
              for e in entries]
    chosen = weakest_first[:SWEEP_LINES]
    lines = []
    for i, c in enumerate(chosen):
        points = [{"x": x(e["eps"]), "y": y(v), "title":
                   f"{c['name']} at ε = {e.get('eps_text', e['eps'])}: {_pct(v)}"}
                  for e, values in zip(entries, by_eps, strict=True)
                  if (v := values.get(c["name"])) is not None]
        if points:
            lines.append({"name": c["name"], "label": _short(c["name"], 22),
                          "flagged": c["flagged"], "colour": PALETTE[i % len(PALETTE)],
                          "points": points,
                          "path": " ".join(f"{p['x']},{p['y']}" for p in points)})
    _spread([line["points"][-1]["y"] for line in lines], lines, top, top + plot_h)
    mean = [{"x": x(e["eps"]), "y": y(v),
             "title": f"class mean at ε = {e.get('eps_text', e['eps'])}: {_pct(v)}"}
            for e in entries if (v := (e.get("mean_class_robust") or {}).get(figure)) is not None]
    # The gate judges config["eps"]; gate_eps, when written, names it explicitly.
    config = doc.get("config", {})
    gate_eps = config.get("gate_eps", config.get("eps"))
    floor = gate.get("min_class_robust")
    table = []
    for e, values in zip(entries, by_eps, strict=True):
        known = {k: v for k, v in values.items() if v is not None}
        weakest = min(known, key=lambda k: known[k]) if known else None
        table.append({
            "eps_text": e.get("eps_text", f"{e['eps']:g}"),
            "gate": gate_eps is not None and math.isclose(e["eps"], gate_eps),
            "robust": (e.get("robust_acc") or {}).get(figure),
            "mean": (e.get("mean_class_robust") or {}).get(figure),
            "weakest": weakest, "weakest_acc": known.get(weakest) if weakest else None,
            "below": None if floor is None else sum(1 for v in known.values() if v < floor),
        })
    return {
        "figure": figure, "width": width, "height": height, "left": left,
        "right": width - right, "top": top, "bottom": top + plot_h, "lines": lines,
        "mean": mean, "mean_path": " ".join(f"{p['x']},{p['y']}" for p in mean),
        "ticks_y": [{"y": y(t / 4), "label": f"{t * 25}%"} for t in range(5)],
        "ticks_x": [{"x": x(e["eps"]), "label": e.get("eps_text", f"{e['eps']:g}")}
                    for e in entries],
        "gate_x": x(gate_eps) if gate_eps is not None and lo <= gate_eps <= hi else None,
        "floor_y": y(floor) if floor is not None else None, "table": table,
        "hidden": max(0, len(weakest_first) - len(chosen)),
    }


def _spread(ys: list[float], lines: list[dict[str, Any]], low: float, high: float,
            gap: float = 13.0) -> None:
    """Give each line a label height ``label_y`` near its end, at least ``gap`` apart."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    placed: list[float] = []
    for i in order:
        placed.append(max(ys[i], placed[-1] + gap) if placed else max(ys[i], low))
    overflow = (placed[-1] - high) if placed else 0.0
    if overflow > 0:  # pushed past the bottom: shift up, keeping the spacing
        placed = [max(low, v - overflow) for v in placed]
    for i, v in zip(order, placed, strict=True):
        lines[i]["label_y"] = round(v, 1)


def _correlations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pairs = doc["summary"].get("rank_correlation") or {}
    return [{"a": key.split("~")[0], "b": key.split("~")[-1], "rho": rho}
            for key, rho in pairs.items()]


def _gains(doc: dict[str, Any], present: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Where the strongest attack's extra breaks fall, classes ordered least robust first."""
    split = doc["summary"].get("gain_split")
    if not split or len(split.get("per_class", [])) != len(present):
        return None
    weakest = split["weakest"]
    pairs = sorted(zip(present, split["per_class"], strict=True),
                   key=lambda p: (p[0]["robust"][weakest]["acc"] is None,
                                  p[0]["robust"][weakest]["acc"] or 0.0, p[0]["index"]))
    half = max(1, len(pairs) // 2)
    # Bins of consecutive classes keep the chart readable (and small) for 1000 classes.
    size = max(1, math.ceil(len(pairs) / 50))
    bins = []
    for start in range(0, len(pairs), size):
        chunk = pairs[start:start + size]
        label = chunk[0][0]["name"] if size == 1 else f"{start + 1}–{start + len(chunk)}"
        bins.append({"label": label, "gain": sum(g for _, g in chunk),
                     "vulnerable": start < half,
                     "title": (f"{chunk[0][0]['name']}: " if size == 1 else
                               f"classes ranked {start + 1}–{start + len(chunk)}: ")
                     + f"{sum(g for _, g in chunk)} more broken by {split['strongest']}"})
    labels = size == 1 and len(bins) <= FULL
    rotate = labels and max(len(_short(b["label"], 16)) for b in bins) * 7 > 1000 / len(bins)
    width, left, top = 1080, 46, 8
    height = 150 + (84 if rotate else 30)
    plot_w, plot_h = width - left - 20, 150 - top
    scale = max([abs(b["gain"]) for b in bins] + [1])
    has_negative = any(b["gain"] < 0 for b in bins)
    zero = top + (plot_h / 2 if has_negative else plot_h)
    unit = (plot_h / 2 if has_negative else plot_h) / scale
    step = plot_w / len(bins)
    for k, b in enumerate(bins):
        h = abs(b["gain"]) * unit
        b.update({"x": round(left + k * step + step * 0.15, 1), "w": round(step * 0.7, 1),
                  "y": round(zero - h if b["gain"] >= 0 else zero, 1), "h": round(h, 1),
                  "cx": round(left + (k + 0.5) * step, 1)})
    return {
        **split, "bins": bins, "width": width, "height": height, "zero": round(zero, 1),
        "left": left, "right": width - 20, "top": top, "bottom": top + plot_h,
        "half_x": round(left + step * math.ceil(half / size), 1), "half": half,
        "labels": labels, "rotate": rotate, "scale": scale, "negative": has_negative,
    }


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
