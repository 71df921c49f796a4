"""The terminal's tables laid out for a width: which columns and rows fit, figures in short form.

CI logs are 80 columns wide. A row that wraps in two, or a figure cut to ``91.7->91…``, misreads,
so a table too wide folds whole columns, the least needed first, and a long table shows the rows
that decide the verdict and says how many it hides. Plain text in and out: ``terminal.py`` draws
it with rich (the only reports module that may import it), passing rich's measure of a cell.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from robaudit.metrics import WORST

#: Between two columns: a space of padding each side of the rule.
GAP = 3
#: Past this many classes a table shows the flagged ones and the least robust ones (-v: all).
MANY = 30
#: How many of the least robust classes a folded table shows besides the flagged ones.
LEAST = 10
#: A class name is cut (never a figure) only when the figures leave it less than this.
MIN_NAME = 8


@dataclass
class Column:
    header: str
    cells: list[str]
    right: bool = True
    #: Folded before columns of a higher rank when the table is too wide; None: always shown.
    fold: int | None = None

    def width(self, measure: Callable[[str], int]) -> int:
        return max(measure(text) for text in (self.header, *self.cells))


def table_width(columns: Sequence[Column], measure: Callable[[str], int] = len) -> int:
    return sum(c.width(measure) for c in columns) + GAP * (len(columns) - 1)


def fit(columns: Sequence[Column], width: int,
        measure: Callable[[str], int] = len) -> tuple[list[Column], list[str]]:
    """The columns that fit in ``width``, folding by rank; and the folded columns' headers."""
    kept = list(columns)
    folded = []
    for column in sorted((c for c in columns if c.fold is not None), key=lambda c: c.fold or 0):
        if table_width(kept, measure) <= width:
            break
        kept.remove(column)
        folded.append(column.header)
    return kept, folded


def pct(value: float | None) -> str:
    """A table's percentage: ``5.8%``, ``100%``; five characters at most."""
    if value is None:
        return "-"
    text = f"{value * 100:.1f}"
    return "100%" if text == "100.0" else f"{text}%"


def points(value: float | None) -> str:
    """A table's figure without its % (the header or title says it): ``91.7``, ``100``."""
    return "-" if value is None else pct(value).rstrip("%")


def rows_shown(count: int, flagged: Sequence[bool], weakness: Sequence[float],
               everything: bool) -> list[int]:
    """Indices of the rows a table shows, in order: every row up to :data:`MANY` (or with
    ``everything``), else the flagged ones and the :data:`LEAST` weakest (lowest ``weakness``)."""
    if everything or count <= MANY:
        return list(range(count))
    weakest = sorted(range(count), key=lambda i: weakness[i])[:LEAST]
    return sorted({i for i in range(count) if flagged[i]} | set(weakest))


def hidden_note(hidden: int,
                why: str = f"passed, not among the {LEAST} least robust") -> str | None:
    if not hidden:
        return None
    return f"{hidden} class{'es' if hidden != 1 else ''} not shown ({why}); -v shows all"


def folded_note(folded: Sequence[str], width: int) -> str | None:
    if not folded:
        return None
    return f"not shown at {width} columns: {', '.join(folded)} (see the JSON or HTML report)"


def _acc(rate: dict[str, Any] | None) -> float | None:
    return None if rate is None else rate.get("acc")


def scan_columns(doc: dict[str, Any], classes: Sequence[dict[str, Any]], verbose: bool,
                 status: Callable[[dict[str, Any]], str]) -> list[Column]:
    """The scan table's columns. Folded first: the interval (last with -v), then the attacks
    the gate does not judge from the right, onnxruntime's figure, clean, n."""
    on = doc["verdict"]["gate"]["on"]
    attacks = [a["name"] for a in doc["attacks"]]
    runtime = any(c["runtime_robust"] for c in doc["classes"])
    optional = [name for name in reversed(attacks) if name != on]
    sequential = doc.get("sequential")
    # A class attacked in part is bounded by its confidence sequence, not a Wilson interval.
    interval = "interval" if sequential else "95% CI"
    order = [*optional, interval] if verbose else [interval, *optional]
    order += ["decided", "ORT", "clean", "n"]

    def column(header: str, cells: list[str], right: bool = True) -> Column:
        return Column(header, cells, right, order.index(header) if header in order else None)

    def ci(c: dict[str, Any]) -> str:
        worst = c["robust"][WORST]
        if worst is None or worst["acc"] is None:
            return "-"
        return interval_text(worst["ci95"])

    columns = [column("class", [c["name"] for c in classes], right=False),
               column("n", [str(c["n"]) for c in classes]),
               column("clean", [pct(_acc(c["clean"])) for c in classes])]
    columns += [column(name, [pct(_acc(c["robust"].get(name))) for c in classes])
                for name in attacks]
    columns.append(column("worst", [pct(_acc(c["robust"][WORST])) for c in classes]))
    columns.append(column(interval, [ci(c) for c in classes]))
    if sequential:
        columns.append(column("decided", [decided(c) for c in classes]))
    if runtime:
        columns.append(column("ORT", [pct(_acc(c["runtime_robust"])) for c in classes]))
    columns.append(column("verdict", [status(c["verdict"]) for c in classes], right=False))
    return columns


def harden_columns(attacks: Sequence[str], classes: Sequence[dict[str, Any]]) -> list[Column]:
    """Harden's before -> after table: ``94.4->92.6`` cells; the attacks fold from the right,
    never the worst case nor the change."""

    def pair(b: float | None, a: float | None) -> str:
        return f"{points(b)}->{points(a)}"

    def change(c: dict[str, Any]) -> str:
        b, a = c["before"]["robust"][WORST], c["after"]["robust"][WORST]
        return "-" if a is None or b is None else f"{(a - b) * 100:+.1f} pp"

    columns = [Column("class", [c["name"] for c in classes], right=False),
               Column("clean", [pair(c["before"]["clean"], c["after"]["clean"])
                                for c in classes], fold=len(attacks))]
    columns += [Column(name, [pair(c["before"]["robust"].get(name), c["after"]["robust"].get(name))
                              for c in classes], fold=len(attacks) - 1 - i)
                for i, name in enumerate(attacks)]
    columns.append(Column("worst", [pair(c["before"]["robust"][WORST],
                                         c["after"]["robust"][WORST]) for c in classes]))
    columns.append(Column("change", [change(c) for c in classes]))
    columns.append(Column("verdict", [f"{_verdict(c['before'])}->{_verdict(c['after'])}"
                                      for c in classes], right=False))
    return columns


def _verdict(side: dict[str, Any]) -> str:
    return status_text(side.get("verdict"))


def status_text(status: str | None) -> str:
    """A verdict as the tables print it: passed, FLAGGED, UNRELIABLE (- when unknown)."""
    return "-" if not status else status if status == "passed" else status.upper()


def interval_text(interval: Sequence[float]) -> str:
    """A 95% interval as the terminal prints it: ``52-86%``."""
    low, high = interval
    return f"{low * 100:.0f}-{high * 100:.0f}%"


def compare_columns(classes: Sequence[dict[str, Any]], gated: bool) -> list[Column]:
    """``compare``'s table: the figure in each report and the change in percentage points."""
    columns = [Column("class", [c["name"] for c in classes], right=False),
               Column("n", [str(c["n"]) for c in classes], fold=0),
               Column("baseline", [pct(c["baseline"]) for c in classes]),
               Column("report", [pct(c["current"]) for c in classes]),
               Column("delta", [f"{c['delta'] * 100:+.1f} pp" for c in classes])]
    if gated:
        columns.append(Column("verdict", ["passed" if c["passed"] else "DROPPED"
                                          for c in classes], right=False))
    return columns


def weakness(acc: float | None) -> float:
    """A class's place in "least robust first"; a class without a figure comes last."""
    return 2.0 if acc is None else acc


def is_gated(doc: dict[str, Any]) -> bool:
    """Whether a policy judged the scan (reports before ``verdict.gated`` say it in the gate)."""
    gated = doc["verdict"].get("gated")
    if gated is not None:
        return bool(gated)
    gate = doc["verdict"]["gate"]
    return any(gate.get(k) is not None
               for k in ("min_class_robust", "min_ratio", "max_gap", "max_drop"))


def attack_label(attack: dict[str, Any]) -> str:
    """``tpgd (T=0.1,0.5)``, ``then dlr-t (5 targets)``, ``escalation square (1000 queries)``."""
    details = []
    if "temperatures" in attack:
        details.append(f"T={','.join(f'{t:g}' for t in attack['temperatures'])}")
    if "targets" in attack:
        details.append(f"{attack['targets']} targets")
    if "queries" in attack:
        details.append(f"{attack['queries']} queries")
    stage = attack.get("stage", "scan")
    prefix = {"finish": "then ", "escalation": "escalation "}.get(stage, "")
    return prefix + attack["name"] + (f" ({', '.join(details)})" if details else "")


def decided(c: dict[str, Any]) -> str:
    """``8/29``: a sequential scan decided the class after attacking 8 of its 29 examples;
    ``-`` when it was not decided (an interrupted scan)."""
    s = c.get("sequential")
    if s is None or not (s["decided"] or s["exhausted"]):
        return "-"
    return f"{s['attacked']}/{s['of']}"


def sequential_lines(doc: dict[str, Any], every: bool) -> list[str]:
    """What a sequential scan attacked; with ``every``, each class decided early."""
    s = doc.get("sequential")
    if not s:
        return []
    share = f" ({s['attacked'] / s['of']:.0%})" if s["of"] else ""
    lines = [f"sequential at {s['confidence']:.0%} confidence: {s['attacked']} of {s['of']} "
             f"clean-correct examples attacked{share} in {s['rounds']} "
             f"round{'' if s['rounds'] == 1 else 's'}; interval: the {s['confidence']:.0%} "
             "confidence sequence of a class attacked in part, else the 95% Wilson interval"]
    for c in doc["classes"] if every else ():
        mine = c.get("sequential")
        if mine and mine["decided"] and not mine["exhausted"]:
            lines.append(f"class {c['name']}: {mine['decided']} its threshold, decided after "
                         f"{mine['attacked']} of {mine['of']} in round {mine['round']}")
    return lines


def eps_line(doc: dict[str, Any]) -> str:
    """``0.1, 0.2 (L-inf, pixels in [0,1]), gated at 0.2``, each ε as the user wrote it."""
    config = doc["config"]
    norm = {"l2": "L2"}.get(config.get("norm", "linf"), "L-inf")
    sweep = [e.get("eps_text", f"{e['eps']:g}") for e in doc.get("sweep") or []]
    if len(sweep) < 2:
        return f"{config['eps_text']} ({norm}, pixels in [0,1])"
    return f"{', '.join(sweep)} ({norm}, pixels in [0,1]), gated at {config['eps_text']}"


def sweep_lines(doc: dict[str, Any]) -> list[str]:
    """One line per ε of a sweep: the class mean and the weakest class, worst case."""
    sweep = doc.get("sweep") or []
    if len(sweep) < 2:
        return []
    lines = []
    for entry in sweep:
        text = entry.get("eps_text", f"{entry['eps']:g}")
        figures = [(c["robust"][WORST], c["name"]) for c in entry["classes"]
                   if c.get("n", 1) > 0 and c["robust"].get(WORST) is not None]
        line = (f"eps {text}: class mean "
                f"{_long_pct((entry.get('mean_class_robust') or {}).get(WORST))} (worst case)")
        if figures:
            acc, name = min(figures, key=lambda f: f[0])
            line += f", weakest class {name} at {_long_pct(acc)}"
        lines.append(line + (" (gated)" if text == doc["config"]["eps_text"] else ""))
    return lines


def _long_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def compare_figure_line(doc: dict[str, Any]) -> str:
    figure = "worst case" if doc["figure"] == WORST else doc["figure"]
    line = f"robust accuracy ({figure}), eps {doc['eps_text']}; "
    if doc.get("max_drop") is None:
        return line + "no --max-drop: nothing gated"
    return (line + f"allowed drop {doc['max_drop'] * 100:.1f} pp"
            + (" (95% CI upper bound)" if doc["significance"] else ""))


def compare_closing(doc: dict[str, Any]) -> str:
    classes = len(doc["classes"])
    if doc.get("max_drop") is None:
        return f"no --max-drop: {classes} class{'es' if classes != 1 else ''} compared, none gated"
    allowed = f"{doc['max_drop'] * 100:.1f} pp"
    dropped = len(doc["flagged"])
    parts = [f"{dropped} class{'es' if dropped != 1 else ''} dropped more than {allowed}"
             ] if dropped else []
    parts.append(f"{classes - dropped} within {allowed}")
    return ", ".join(parts)


def ranking_line(doc: dict[str, Any]) -> str:
    """Whether the two reports agree on the weak classes: Spearman and the biggest moves."""
    rho = doc["rank_correlation"]
    if rho is None:
        return "class ranking: no rank correlation (one report has every class at one figure)"
    line = f"class ranking: Spearman {rho:+.2f} from the baseline to the report"
    moves = doc.get("rank_moved_most") or []
    if moves:
        line += "; moved most (place 1 = least robust): " + ", ".join(
            f"{m['name']} ({m['baseline']:g} -> {m['current']:g})" for m in moves)
    return line
