"""The HTML report's charts: their geometry worked out as plain numbers and strings.

Each function turns part of the JSON report document into the data one chart of
``templates/report.html.j2`` draws (SVG coordinates, colours, labels, tooltips). The template writes
every string, so class names still pass through the escaper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

WORST = "worst"  # the worst case over attacks, as the JSON report names it
#: Up to this many audited classes, every chart and the table show every class.
FULL = 30
#: Beyond ``FULL``, the charts expand the ``TOP_K`` least robust classes (ImageNet has 1000).
TOP_K = 20
SWEEP_LINES = 10
#: A sequential scan's narrowing chart shows this many of the weakest classes' intervals.
NARROWING_LINES = 4
# Colour-blind-safe categorical colours (Tableau 10); clean is grey, worst case dark slate.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7",
           "#9c755f", "#e15759", "#bab0ac")
CLEAN_COLOUR = "#c3cbd5"
WORST_COLOUR = "#2f3b4c"


def pct(value: float | None, digits: int = 1) -> str:
    """A rate as a percentage, "—" for a missing figure (also the templates' ``pct`` filter)."""
    return "—" if value is None else f"{value * 100:.{digits}f}%"


def short(name: str, limit: int = 18) -> str:
    """A class name cut to ``limit`` characters for an axis label (the tooltip keeps it whole)."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _rate_title(name: str, figure: str, rate: dict[str, Any] | None) -> str:
    if rate is None or rate.get("acc") is None:
        return f"{name} · {figure}: no figure"
    low, high = rate["ci95"]
    return (f"{name} · {figure}: {pct(rate['acc'])} ({rate['correct']}/{rate['n']}), "
            f"95% CI {pct(low)}–{pct(high)}")


def bars(focus: list[dict[str, Any]], attacks: list[str], on: str,
         thresholds: list[dict[str, Any]]) -> dict[str, Any]:
    """Grouped vertical bars per class: clean, each attack, worst case, with 95% whiskers."""
    series = [("clean", CLEAN_COLOUR)]
    series += [(a, PALETTE[i % len(PALETTE)]) for i, a in enumerate(attacks)]
    series.append((WORST, WORST_COLOUR))
    width, left, right, top = 1080, 46, 92, 14
    group = (width - left - right) / max(1, len(focus))
    # Long names are turned to fit under their group; short ones stay level and need less room.
    rotate = max((len(short(c["name"])) for c in focus), default=0) * 7 > group * 0.9
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
            "name": c["name"], "label": short(c["name"]), "flagged": c["flagged"],
            "x": round(left + g * group, 1), "w": round(group, 1),
            "cx": round(left + (g + 0.5) * group, 1), "bars": bars,
        })
    return {
        "width": width, "height": height, "left": left, "right": width - right, "top": top,
        "bottom": top + plot_h, "groups": groups, "series": series, "on": on, "rotate": rotate,
        "ticks": [{"y": y(t / 4), "label": f"{t * 25}%"} for t in range(5)],
        "thresholds": [{**t, "y": y(t["value"]), "text": f"{t['label']} {pct(t['value'], 0)}"}
                       for t in thresholds],
    }


def _heat_colour(t: float) -> str:
    """White to deep red; the square root lifts small shares into view."""
    t = math.sqrt(max(0.0, min(1.0, t)))
    low, high = (255, 255, 255), (165, 28, 48)
    r, g, b = (round(a + (b_ - a) * t) for a, b_ in zip(low, high, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmaps(doc: dict[str, Any], rows: list[dict[str, Any]], present: list[dict[str, Any]],
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
    longest = max([len(short(names[j], 14)) for j in columns] + [5 if other else 0])
    rotate = longest * 7 > cell - 4
    top = round(24 + longest * 5.2) if rotate else 26
    left = max(150, min(170, 24 + 7 * max((len(short(c["name"], 20)) for c in rows), default=0)))
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
                          f"({pct(share)}); {pct(count / broken if broken else None)} "
                          f"of its {broken} broken"),
            })
        out_rows.append({
            "name": c["name"], "label": short(c["name"], 20), "flagged": c["flagged"],
            "y": round(top + r * cell, 1), "cells": cells,
            "total": f"{broken} of {c['n']}",
        })
    labels = [{"name": names[j], "label": short(names[j], 14)} for j in columns]
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


def sweep(doc: dict[str, Any], weakest_first: list[dict[str, Any]], on: str,
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
    lines = _sweep_lines(chosen, entries, by_eps, x, y)
    _spread([line["points"][-1]["y"] for line in lines], lines, top, top + plot_h)
    mean = [{"x": x(e["eps"]), "y": y(v),
             "title": f"class mean at ε = {e.get('eps_text', e['eps'])}: {pct(v)}"}
            for e in entries if (v := (e.get("mean_class_robust") or {}).get(figure)) is not None]
    # The gate judges config["eps"]; gate_eps, when written, names it explicitly.
    config = doc.get("config", {})
    gate_eps = config.get("gate_eps", config.get("eps"))
    floor = gate.get("min_class_robust")
    table = _sweep_table(entries, by_eps, figure, gate_eps, floor)
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


def _sweep_lines(chosen: list[dict[str, Any]], entries: list[dict[str, Any]],
                 by_eps: list[dict[str, float | None]], x: Callable[[float], float],
                 y: Callable[[float], float]) -> list[dict[str, Any]]:
    """One line per chosen class through its robust accuracy at each ε it has a figure for."""
    lines = []
    for i, c in enumerate(chosen):
        points = [{"x": x(e["eps"]), "y": y(v), "title":
                   f"{c['name']} at ε = {e.get('eps_text', e['eps'])}: {pct(v)}"}
                  for e, values in zip(entries, by_eps, strict=True)
                  if (v := values.get(c["name"])) is not None]
        if points:
            lines.append({"name": c["name"], "label": short(c["name"], 22),
                          "flagged": c["flagged"], "colour": PALETTE[i % len(PALETTE)],
                          "points": points,
                          "path": " ".join(f"{p['x']},{p['y']}" for p in points)})
    return lines


def _sweep_table(entries: list[dict[str, Any]], by_eps: list[dict[str, float | None]],
                 figure: str, gate_eps: float | None,
                 floor: float | None) -> list[dict[str, Any]]:
    """One row per ε: overall and class-mean robust accuracy, the weakest class, how many below."""
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
    return table


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


def gains(doc: dict[str, Any], present: list[dict[str, Any]]) -> dict[str, Any] | None:
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
    rotate = labels and max(len(short(b["label"], 16)) for b in bins) * 7 > 1000 / len(bins)
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


def narrowing(doc: dict[str, Any], weakest_first: list[dict[str, Any]],
              on: str) -> dict[str, Any] | None:
    """A sequential scan's weakest classes: the interval on each one's robust accuracy after
    every round, against the examples attacked, with the threshold it was decided against."""
    states = {c["name"]: c.get("sequential") or {} for c in doc["classes"]}
    chosen = [c for c in weakest_first if states[c["name"]].get("history")][:NARROWING_LINES]
    if not chosen:
        return None
    width, left, right, top, bottom = 1080, 46, 200, 14, 40
    height = 320
    plot_w, plot_h = width - left - right, height - top - bottom
    most = max(states[c["name"]]["of"] for c in chosen) or 1

    def x(attacked: float) -> float:
        return round(left + plot_w * attacked / most, 1)

    def y(v: float) -> float:
        return round(top + plot_h * (1 - v), 1)

    bands = [_band(c, states[c["name"]], PALETTE[i % len(PALETTE)], x, y)
             for i, c in enumerate(chosen)]
    _spread([b["end_y"] for b in bands], bands, top, top + plot_h)
    lines: dict[float, list[str]] = {}
    for c in chosen:
        if (t := _threshold(doc, c["name"], on)) is not None:
            lines.setdefault(t, []).append(c["name"])
    attacked = sorted({a for c in chosen for a, _, _ in states[c["name"]]["history"]})
    return {
        "width": width, "height": height, "left": left, "right": width - right, "top": top,
        "bottom": top + plot_h, "bands": bands,
        "thresholds": [{"y": y(t), "label": f"threshold {pct(t)}", "title":
                        f"threshold {pct(t)}: {', '.join(names)}"} for t, names in lines.items()],
        "ticks_y": [{"y": y(t / 4), "label": f"{t * 25}%"} for t in range(5)],
        "ticks_x": [{"x": x(a), "label": str(a)} for a in [0, *attacked]],
    }


def _band(c: dict[str, Any], state: dict[str, Any], colour: str, x: Callable[[float], float],
          y: Callable[[float], float]) -> dict[str, Any]:
    """One class's intervals as a closed outline: the upper ends left to right, then the lower
    ends back; a round's whisker carries its figures."""
    history = state["history"]
    upper = [f"{x(a)},{y(hi)}" for a, _, hi in history]
    lower = [f"{x(a)},{y(lo)}" for a, lo, _ in reversed(history)]
    decided = state.get("decided") or "undecided"
    return {"name": c["name"], "label": short(c["name"], 22), "colour": colour,
            "flagged": c["flagged"], "path": "M" + " L".join(upper + lower) + " Z",
            "end_y": (y(history[-1][1]) + y(history[-1][2])) / 2,
            "rounds": [{"x": x(a), "lo": y(lo), "hi": y(hi),
                        "title": f"{c['name']}, round {k}: {pct(lo)}–{pct(hi)} after {a} of "
                                 f"{state['of']} attacked"}
                       for k, (a, lo, hi) in enumerate(history, start=1)],
            "title": f"{c['name']}: {decided} after {state['attacked']} of {state['of']}"}


def _threshold(doc: dict[str, Any], name: str, on: str) -> float | None:
    """The robust accuracy a class needed: the floor, or its baseline's figure less the
    allowed drop, whichever is higher (as robaudit/rounds.py decides)."""
    gate = doc["verdict"]["gate"]
    known = [gate.get("min_class_robust")]
    baseline = (doc.get("baseline") or {}).get("robust", {}).get(on, {})
    if gate.get("max_drop") is not None and name in baseline:
        known.append(baseline[name] - gate["max_drop"])
    found = [t for t in known if t is not None]
    return max(found) if found else None
