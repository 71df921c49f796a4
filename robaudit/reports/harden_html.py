"""The harden HTML report: one self-contained before/after page from a harden JSON document.

Both scans (the input model's and the hardened model's) side by side: the headline figures before
→ after, the per-class change as paired bars (before grey, after coloured, per class, weakest
first), the per-class table of every figure before and after, what validation chose and why (the
budget, the epochs within it, the kept one), and each scan's facts and warnings. It reuses the
scan report's templates folder, style sheet and escaping (:mod:`robaudit.reports.html`); the page
has no script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from markupsafe import Markup

from robaudit.reports import atomic_write
from robaudit.reports.html import template_environment
from robaudit.reports.html_charts import WORST, short

BEFORE_COLOUR = "#c3cbd5"
AFTER_COLOUR = "#4e79a7"
LOST_COLOUR = "#e15759"


def render_harden_html(doc: dict[str, Any]) -> str:
    """The before/after page for a harden report document (``robaudit.harden.to_dict``)."""
    env = template_environment()
    style = env.get_template("report.css").render()
    return env.get_template("harden.html.j2").render(
        doc=doc, view=harden_view(doc), style=Markup(style))


def write_harden_html(path: str | Path, doc: dict[str, Any]) -> None:
    """Write the before/after page atomically."""
    atomic_write(path, render_harden_html(doc).encode("utf-8"))


def harden_view(doc: dict[str, Any]) -> dict[str, Any]:
    """Plain data for the template: figures, per-class rows weakest first, bar geometry."""
    before, after = doc["before"], doc["after"]
    attacks = [a["name"] for a in after["attacks"]]
    rows = []
    for c, b_cls, a_cls in zip(doc["classes"], before["classes"], after["classes"], strict=True):
        if c["n"] == 0:
            continue
        b, a = c["before"]["robust"][WORST], c["after"]["robust"][WORST]
        rows.append({
            "name": c["name"], "n": c["n"], "before": c["before"], "after": c["after"],
            "worst_before": b, "worst_after": a,
            "change": None if a is None or b is None else a - b,
            "ci_before": _interval(c["before"].get("ci95")),
            "ci_after": _interval(c["after"].get("ci95")),
            "passed_before": b_cls["verdict"]["passed"], "passed_after": a_cls["verdict"]["passed"],
        })
    rows.sort(key=lambda r: (2.0 if r["worst_before"] is None else r["worst_before"]))
    sb, sa = before["summary"], after["summary"]
    kept = doc["kept"]
    return {
        "attacks": attacks,
        "rows": rows,
        "bars": _change_bars(rows),
        "headline": [
            _pair("weakest class", sb["worst_class"]["robust_acc"],
                  sa["worst_class"]["robust_acc"],
                  f"{sb['worst_class']['name']} → {sa['worst_class']['name']}"),
            _pair("class mean robust", sb["mean_class_robust"][WORST],
                  sa["mean_class_robust"][WORST], "worst case over the attacks"),
            _pair("clean accuracy", sb["clean_acc"], sa["clean_acc"],
                  f"{sa['n']} examples"),
        ],
        "epochs": [_epoch_row(h, kept) for h in doc["history"]],
        "state": "failed" if doc["verdict"]["exit_code"] else "passed",
    }


def _pair(label: str, b: float | None, a: float | None, note: str) -> dict[str, Any]:
    change = None if a is None or b is None else (a - b) * 100
    return {"label": label, "before": b, "after": a, "note": note,
            "change": None if change is None else f"{change:+.1f} pp",
            "bad": change is not None and change < 0}


def _epoch_row(h: dict[str, Any], kept: dict[str, Any]) -> dict[str, Any]:
    v = h.get("averaged_validation") or h["validation"]
    worst = v["robust"].index(v["worst_robust"]) if "ci95" in v else None
    return {"epoch": h["epoch"], "clean": v["clean_acc"], "mean": v["mean_robust"],
            "mean_ci": _interval(v.get("mean_ci95")),
            "worst": v["worst_robust"], "worst_class": v["worst_class"],
            "worst_ci": "" if worst is None else _interval(v["ci95"][worst]),
            "gain": _gain(h),
            "refused": "; ".join(h.get("refused") or []),
            "averaged": "averaged_validation" in h or bool(h.get("ema")),
            "within": bool(h.get("within_budget")), "kept": h["epoch"] == kept["epoch"]}


def _gain(h: dict[str, Any]) -> str | None:
    """An epoch's worst-class gain over the input model and its noise, and the class mean's
    where the two were paired."""
    if "gain" not in h:
        return None
    text = f"{h['gain'] * 100:+.1f} pp (noise {h['noise'] * 100:.1f} pp)"
    if h.get("mean_noise") is not None:
        text += f"; mean {h['mean_gain'] * 100:+.1f} pp (noise {h['mean_noise'] * 100:.1f} pp)"
    return text


def _interval(ci: list[float] | None) -> str:
    """A 95% interval as the page prints it, e.g. ``[52%, 86%]``; empty when unknown."""
    return "" if ci is None else f"[{ci[0] * 100:.0f}%, {ci[1] * 100:.0f}%]"


def _change_bars(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per class, the worst-case robust accuracy before (grey) and after (blue), side by side."""
    width, left, right, top, bottom_pad = 1080, 46, 20, 14, 30
    group = (width - left - right) / max(1, len(rows))
    rotate = max((len(short(r["name"])) for r in rows), default=0) * 7 > group * 0.9
    bottom_pad = 84 if rotate else bottom_pad
    height = 220 + bottom_pad
    plot_h = height - top - bottom_pad
    bar = min(18.0, group * 0.8 / 2)

    def y(v: float) -> float:
        return round(top + plot_h * (1 - v), 1)

    groups = []
    for g, r in enumerate(rows):
        x0 = left + g * group + (group - 2 * bar) / 2
        bars = []
        for s, (key, colour) in enumerate((("worst_before", BEFORE_COLOUR),
                                           ("worst_after", AFTER_COLOUR))):
            v = r[key]
            if v is None:
                continue
            if key == "worst_after" and r["change"] is not None and r["change"] < 0:
                colour = LOST_COLOUR
            bars.append({"x": round(x0 + s * bar, 1), "y": y(v), "w": round(bar - 1, 1),
                         "h": round(plot_h * v, 1), "colour": colour,
                         "title": f"{r['name']} · {'before' if s == 0 else 'after'}: "
                                  f"{v * 100:.1f}%"})
        change = r["change"]
        groups.append({"name": r["name"], "label": short(r["name"]),
                       "cx": round(left + (g + 0.5) * group, 1), "bars": bars,
                       "change": "" if change is None else f"{change * 100:+.0f}",
                       "change_y": y(max(r["worst_before"] or 0, r["worst_after"] or 0)) - 4})
    return {"width": width, "height": height, "left": left, "right": width - right, "top": top,
            "bottom": top + plot_h, "groups": groups, "rotate": rotate,
            "ticks": [{"y": y(t / 4), "label": f"{t * 25}%"} for t in range(5)],
            "series": [("before", BEFORE_COLOUR), ("after", AFTER_COLOUR),
                       ("after, lower than before", LOST_COLOUR)]}
