"""The HTML report's view of a scan judged against a baseline (``scan --baseline``).

Plain data for ``templates/baseline.html.j2``: the per-class change from the baseline report and
whether the two agree on which classes are the weak ones (Spearman's rank correlation, the
classes whose place moved most), from the JSON document alone.
"""

from __future__ import annotations

from typing import Any

from robaudit.compare import rank_agreement

#: Rows of the change table at most: the largest drops first; the JSON has every class.
ROWS = 30


def baseline_view(doc: dict[str, Any], on: str) -> dict[str, Any] | None:
    """None when the scan had no baseline or the baseline has no figure ``on``."""
    baseline = doc.get("baseline")
    before = (baseline or {}).get("robust", {}).get(on)
    if not before:
        return None
    current = {}
    dropped = set()
    for c in doc["classes"]:
        rate = c["robust"].get(on) if c["n"] > 0 else None
        if rate is not None and rate.get("acc") is not None and c["name"] in before:
            current[c["name"]] = rate["acc"]
            if any(f["policy"] == "max_drop" for f in c["verdict"]["failures"]):
                dropped.add(c["name"])
    agreement = rank_agreement(before, current)
    rows = [
        {"name": m.name, "baseline": before[m.name], "current": current[m.name],
         "delta": current[m.name] - before[m.name], "place_before": f"{m.baseline:g}",
         "place_after": f"{m.current:g}", "moved": m.moved, "dropped": m.name in dropped}
        for m in agreement.classes
    ]
    rows.sort(key=lambda r: r["delta"])
    return {
        "path": baseline.get("path", ""),
        "created": baseline.get("created", ""),
        "figure": on,
        "spearman": agreement.spearman,
        "moved_most": [{"name": m.name, "before": f"{m.baseline:g}", "after": f"{m.current:g}"}
                       for m in agreement.moved_most],
        "rows": rows[:ROWS],
        "hidden": max(0, len(rows) - ROWS),
        "classes": len(rows),
    }
