"""The terminal: the per-class table, the verdict line, warnings, errors and progress.

The one module besides the CLI that imports rich. Colour follows rich's detection (``NO_COLOR``,
``FORCE_COLOR``, a TTY or not); off a TTY the table is plain ASCII and there is no progress bar.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from robaudit.metrics import WORST

# C0 and C1 controls, DEL, the line and paragraph separators and the bidirectional marks,
# overrides and isolates: each can move the cursor, clear the screen, retitle the window or
# reorder what the reader sees.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(value: object) -> str:
    """``value`` as text a terminal shows as it is: each control character as its escape
    (``\\x1b``, ``\\n``, ``\\u202e``).

    For every string from data or files (class names, paths, a report's fields, messages that
    quote them). Rich markup needs no escaping: robaudit's consoles read none, and data reaches
    them as ``Text``.
    """
    text = str(value)
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _shown_doc(value: Any) -> Any:
    """A report document with every string in it, keys too, passed through :func:`shown`."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {_shown_doc(k): _shown_doc(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown_doc(v) for v in value]
    return value


def _attack_label(attack: dict[str, Any]) -> str:
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


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _pp(value: float | None) -> str:
    """Percentage points; "-" where no class had examples to measure (null in the report)."""
    return "-" if value is None else f"{value * 100:.1f} pp"


class TerminalReporter:
    """Everything robaudit shows a person. ``verbosity``: -1 quiet, 0 normal, 1 verbose."""

    def __init__(self, verbosity: int = 0, console: Console | None = None) -> None:
        self.verbosity = verbosity
        self.console = console or Console(highlight=False, markup=False)
        self.errors = Console(stderr=True, highlight=False, markup=False)
        self.interactive = self.console.is_terminal and not os.environ.get("CI")

    @contextmanager
    def progress(self) -> Iterator[Callable[[Any], None]]:
        """A callback for ``audit.scan(progress=...)``: a bar on a TTY, nothing elsewhere."""
        if not self.interactive:
            yield self._log_progress if self.verbosity > 0 else (lambda _event: None)
            return
        columns = (TextColumn("{task.description}", markup=False), BarColumn(),
                   MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task("starting", total=None)

            def update(event: Any) -> None:
                bar.update(task, description=event.stage, completed=event.done,
                           total=event.total or None)

            yield update

    def _log_progress(self, event: Any) -> None:
        # Off a TTY (CI logs), -v gives one plain line per stage and per batch instead of a bar.
        counts = f" {event.done}/{event.total}" if event.total else ""
        self.errors.print(f"robaudit: {event.stage}{counts}", soft_wrap=True)

    def warn(self, message: str) -> None:
        self.errors.print(Text(f"warning: {shown(message)}", style="yellow"))

    def error(self, message: str) -> None:
        self.errors.print(Text(f"error: {shown(message)}", style="bold red"))

    def info(self, message: str) -> None:
        if self.verbosity >= 0:
            self.console.print(Text(shown(message)))

    def render(self, doc: dict[str, Any]) -> None:
        """The scan's result: header, table, summary, flagged reasons, warnings, verdict line."""
        doc = _shown_doc(doc)
        if self.verbosity >= 0:
            self._header(doc)
            self.console.print(self._table(doc))
            self._summary(doc)
            self._reasons(doc)
        for warning in doc["warnings"]:
            self.warn(warning)
        self._verdict_line(doc)

    def _header(self, doc: dict[str, Any]) -> None:
        config, env = doc["config"], doc["environment"]
        attacks = ", ".join(_attack_label(a) for a in doc["attacks"])
        self.console.rule(Text("robaudit scan", style="bold"), characters="=")
        for label, value in (
            ("model", doc["model"]["description"]),
            ("data", f"{doc['data']['description']}: {doc['data']['audited']} examples audited"),
            ("attack", f"{attacks}; eps {config['eps_text']} ({_norm(config)}, pixels in [0,1]), "
                       f"{config['steps']} steps, {config['restarts']} restart(s), "
                       f"seed {config['seed']}"),
            ("device", f"{env['device']} ({env['device_name']}), torch {env['torch']}"),
        ):
            self.console.print(Text.assemble((f"{label:>7}: ", "dim"), value))

    def _table(self, doc: dict[str, Any]) -> Table:
        figures = [a["name"] for a in doc["attacks"]]
        runtime = any(c["runtime_robust"] for c in doc["classes"])
        gate_on = doc["verdict"]["gate"]["on"]
        table = Table(box=box.SIMPLE_HEAD if self.console.is_terminal else box.ASCII,
                      show_edge=False, pad_edge=False)
        table.add_column("class")
        table.add_column("n", justify="right")
        table.add_column("clean", justify="right")
        for name in figures:
            table.add_column(name, justify="right")
        table.add_column("worst (95% CI)", justify="right")
        if runtime:
            table.add_column("ORT", justify="right")
        table.add_column("verdict")
        for c in doc["classes"]:
            if c["n"] == 0:  # not in the data, or filtered out with --classes: JSON keeps it
                continue
            worst = c["robust"][WORST]
            ci = "" if worst["acc"] is None else f" ({worst['ci95'][0]:.0%}-{worst['ci95'][1]:.0%})"
            flagged = not c["verdict"]["passed"]
            # Text, not str: a class name like "[/]" is data, never rich markup.
            cells: list[str | Text] = [Text(c["name"]), str(c["n"]), _pct(c["clean"]["acc"])]
            cells += [_pct(c["robust"][name]["acc"]) for name in figures]
            cells.append(_pct(worst["acc"]) + ci)
            if runtime:
                cells.append(_pct((c["runtime_robust"] or {}).get("acc")))
            cells.append(_status(c["verdict"]))
            table.add_row(*cells, style="bold red" if flagged else None)
        notes = []
        if gate_on != WORST:
            notes.append(f"gate on: {gate_on}")
        empty = sum(1 for c in doc["classes"] if c["n"] == 0)
        if empty:
            notes.append(f"{empty} class{'es' if empty != 1 else ''} without examples not shown")
        table.caption = "; ".join(notes) or None
        return table

    def _summary(self, doc: dict[str, Any]) -> None:
        s = doc["summary"]
        self.console.print(
            f"clean accuracy {_pct(s['clean_acc'])}; robust accuracy (worst case) "
            f"{_pct(s['robust_acc'][WORST])}, class mean {_pct(s['mean_class_robust'][WORST])}"
        )
        self.console.print(Text(
            f"worst class {s['worst_class']['name']} {_pct(s['worst_class']['robust_acc'])}, "
            f"best {s['best_class']['name']} {_pct(s['best_class']['robust_acc'])}, "
            f"gap {_pp(s['gap'])}, std {_pp(s['std'])}"
        ))
        for pair, rho in s["rank_correlation"].items():
            rho_text = "undefined" if rho is None else f"{rho:.2f}"
            self.console.print(Text(f"class ranking agreement {pair.replace('~', ' vs ')}: "
                                    f"Spearman {rho_text}"))
        if s["runtime_robust_acc"] is not None:
            self.console.print(
                f"onnxruntime confirms: clean {_pct(s['runtime_clean_acc'])}, robust (worst case) "
                f"{_pct(s['runtime_robust_acc'])}"
            )

    def _reasons(self, doc: dict[str, Any]) -> None:
        for c in doc["classes"]:
            for failure in c["verdict"]["failures"]:
                label = "UNRELIABLE" if failure["policy"] == "unreliable" else "FLAGGED"
                self.console.print(Text(f"{label} {c['name']}: {failure['message']}",
                                        style="red"))

    def _verdict_line(self, doc: dict[str, Any]) -> None:
        flagged = len(doc["verdict"]["flagged"])
        passed = sum(1 for c in doc["classes"] if c["verdict"]["passed"] and c["n"] > 0)
        seconds = doc["timings"]["total_s"]
        parts = []
        unreliable = sum(1 for c in doc["classes"]
                         if c["verdict"].get("status") == "unreliable")
        if flagged - unreliable:
            parts.append(f"{flagged - unreliable} class{'es' if flagged != 1 else ''} flagged")
        if unreliable:
            parts.append(f"{unreliable} unreliable")
        parts.append(f"{passed} passed")
        line = f"{', '.join(parts)} in {seconds:.1f}s"
        if doc["partial"]:
            line = (f"interrupted: partial results over {doc['data']['audited']} of "
                    f"{doc['data']['selected']} examples; {line}")
        style = "bold red" if flagged or doc["partial"] else "bold green"
        self.console.rule(Text(line, style=style), characters="=")

    def render_compare(self, doc: dict[str, Any], *, reasons: bool = True) -> None:
        """Per-class deltas against a baseline (``compare.Comparison.to_dict()``).

        ``reasons=False`` after a scan's own report, which has already named the dropped classes.
        """
        doc = _shown_doc(doc)
        figure = "worst case" if doc["figure"] == WORST else doc["figure"]
        allowed = f"{doc['max_drop'] * 100:.1f} pp"
        if self.verbosity >= 0:
            self.console.rule(Text("robaudit compare", style="bold"), characters="=")
            for label, value in (
                ("baseline", doc["baseline"]),
                ("report", doc["report"]),
                ("figure", f"robust accuracy ({figure}), eps {doc['eps_text']}; "
                           f"allowed drop {allowed}"
                           + (" (95% CI upper bound)" if doc["significance"] else "")),
            ):
                self.console.print(Text.assemble((f"{label:>8}: ", "dim"), value))
            self.console.print(self._compare_table(doc))
            if doc["mean_baseline"] is not None:
                change = (doc["mean_current"] - doc["mean_baseline"]) * 100
                self.console.print(f"class mean {_pct(doc['mean_baseline'])} -> "
                                   f"{_pct(doc['mean_current'])} ({change:+.1f} pp)")
            if "rank_correlation" in doc:
                self.console.print(Text(_ranking_line(doc)))
            if reasons:
                for c in doc["classes"]:
                    for failure in c["failures"]:
                        self.console.print(Text(f"DROPPED {c['name']}: {failure['message']}",
                                                style="red"))
        for warning in doc["warnings"]:
            self.warn(warning)
        dropped = len(doc["flagged"])
        within = len(doc["classes"]) - dropped
        parts = [f"{dropped} class{'es' if dropped != 1 else ''} dropped more than {allowed}"
                 ] if dropped else []
        parts.append(f"{within} within {allowed}")
        self.console.rule(Text(", ".join(parts), style="bold red" if dropped else "bold green"),
                          characters="=")

    def _compare_table(self, doc: dict[str, Any]) -> Table:
        table = Table(box=box.SIMPLE_HEAD if self.console.is_terminal else box.ASCII,
                      show_edge=False, pad_edge=False)
        table.add_column("class")
        table.add_column("n", justify="right")
        for name in ("baseline", "report", "delta"):
            table.add_column(name, justify="right")
        table.add_column("verdict")
        for c in doc["classes"]:
            flagged = not c["passed"]
            table.add_row(Text(c["name"]), str(c["n"]), _pct(c["baseline"]), _pct(c["current"]),
                          f"{c['delta'] * 100:+.1f} pp", "DROPPED" if flagged else "passed",
                          style="bold red" if flagged else None)
        return table

    @contextmanager
    def harden_progress(self) -> Iterator[Callable[[Any], None]]:
        """A callback for ``harden(progress=...)``: a bar of the epoch's batches with the loss
        and the worst class on a TTY; off a TTY with -v, a line per stage and epoch."""
        if not self.interactive:
            yield self._log_harden if self.verbosity > 0 else (lambda _event: None)
            return
        columns = (TextColumn("{task.description}", markup=False), BarColumn(),
                   MofNCompleteColumn(), TimeRemainingColumn())
        worst = {"text": ""}
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task("starting", total=None)

            def update(event: Any) -> None:
                if event.worst_class is not None:
                    worst["text"] = f", worst class {shown(event.worst_class)} " \
                                    f"{_pct(event.worst_robust)}"
                if event.stage == "trained":
                    self.console.print(Text(f"epoch {event.epoch}/{event.epochs}: loss "
                                            f"{event.loss:.3f}{worst['text']}"))
                    return
                label = event.stage
                if event.epochs:
                    label = f"epoch {event.epoch}/{event.epochs} {event.stage}"
                if event.loss is not None:
                    label += f" loss {event.loss:.3f}"
                bar.update(task, description=label + worst["text"], completed=event.batch,
                           total=event.batches or None)

            yield update

    def _log_harden(self, event: Any) -> None:
        parts = [f"robaudit: {event.stage}"]
        if event.epochs:
            parts.append(f"epoch {event.epoch}/{event.epochs}")
        if event.batches:
            parts.append(f"batch {event.batch}/{event.batches}")
        if event.loss is not None:
            parts.append(f"loss {event.loss:.3f}")
        if event.worst_class is not None:
            parts.append(f"worst class {shown(event.worst_class)} {_pct(event.worst_robust)}")
        self.errors.print(" ".join(parts), soft_wrap=True)

    def render_harden(self, doc: dict[str, Any]) -> None:
        """A harden report: the scan of the hardened model, then the per-class before/after
        table, what was kept and where it was written."""
        doc = _shown_doc(doc)
        self.render(doc["after"])
        for warning in doc.get("warnings", []):
            self.warn(warning)
        if self.verbosity < 0:
            return
        attacks = [a["name"] for a in doc["after"]["attacks"]]
        table = Table(box=box.SIMPLE_HEAD if self.console.is_terminal else box.ASCII,
                      show_edge=False, pad_edge=False, title="before -> after (%)")
        for column in ("class", "clean", *attacks, "worst", "change"):
            table.add_column(column, justify="left" if column == "class" else "right")

        def pair(b: float | None, a: float | None) -> str:
            # Compact "94.4->92.6" cells keep the table inside 80 columns.
            shown = ["-" if v is None else f"{v * 100:.1f}" for v in (b, a)]
            return "->".join(shown)

        for c in doc["classes"]:
            if c["n"] == 0:
                continue
            b, a = c["before"], c["after"]
            cells: list[str | Text] = [Text(c["name"]), pair(b["clean"], a["clean"])]
            cells += [pair(b["robust"][n], a["robust"][n]) for n in attacks]
            cells.append(pair(b["robust"][WORST], a["robust"][WORST]))
            cells.append(f"{(a['robust'][WORST] - b['robust'][WORST]) * 100:+.1f} pp")
            table.add_row(*cells, style=None if c["passed"] else "bold red")
        self.console.print(table)
        before, after = doc["before"]["summary"], doc["after"]["summary"]
        self.console.print(Text(
            f"worst class {before['worst_class']['name']} "
            f"{_pct(before['worst_class']['robust_acc'])} -> {after['worst_class']['name']} "
            f"{_pct(after['worst_class']['robust_acc'])}; class mean "
            f"{_pct(before['mean_class_robust'][WORST])} -> "
            f"{_pct(after['mean_class_robust'][WORST])}; clean {_pct(before['clean_acc'])} -> "
            f"{_pct(after['clean_acc'])}"
        ))
        self._harden_selection(doc)
        if doc["calibration"] is not None:
            bias = ", ".join(f"{v:+.2f}" for v in doc["calibration"]["bias"])
            self.console.print(Text(f"calibration: per-class logit bias [{bias}]"))
        model = doc["model"]
        self.console.print(Text(f"hardened model: {model['output']} ({model['format']}); class "
                                f"weights: {model['class_weights']}"))

    def _harden_selection(self, doc: dict[str, Any]) -> None:
        """Where validation came from, the budget, which epochs met it and which was kept."""
        holdout = doc.get("validation", {}).get("holdout")
        if holdout:
            self.console.print(Text(
                f"validation: {holdout['held_out']} examples held out of the training data "
                f"({holdout['fraction']:.0%} of each class, seed {holdout['seed']}), never "
                f"trained on; before/after scans on them: {holdout['file']}"))
        kept = doc["kept"]
        budget, val = kept["budget"], kept["validation"]
        epochs = ", ".join(str(e) for e in kept["within_budget"])
        self.console.print(
            f"budget: class mean >= {_pct(budget['mean_floor'])}, clean >= "
            f"{_pct(budget['clean_floor'])} on validation; epochs within it: {epochs}")
        self.console.print(Text(
            f"kept epoch {kept['epoch']} (highest worst-class robust accuracy within the "
            f"budget: {val['worst_class']} {_pct(val['worst_robust'])}, class mean "
            f"{_pct(val['mean_robust'])}, clean {_pct(val['clean_acc'])})"))

def _ranking_line(doc: dict[str, Any]) -> str:
    """Whether the two reports agree on the weak classes: Spearman and the biggest moves."""
    rho = doc["rank_correlation"]
    if rho is None:
        return "class ranking: no rank correlation (one report has every class at one figure)"
    line = f"class ranking: Spearman {rho:+.2f} from the baseline to the report"
    moves = doc.get("rank_moved_most") or []
    if moves:
        line += "; moved most (place 1 = least robust): " + ", ".join(
            f"{m['name']} ({_place(m['baseline'])} -> {_place(m['current'])})" for m in moves)
    return line


def _place(value: float) -> str:
    return f"{value:g}"



def _norm(config: dict[str, Any]) -> str:
    return {"l2": "L2"}.get(config.get("norm", "linf"), "L-inf")


def _status(verdict: dict[str, Any]) -> str:
    """The verdict column: passed, FLAGGED or UNRELIABLE (signs of masking remain)."""
    status = verdict.get("status") or ("passed" if verdict["passed"] else "flagged")
    return status if status == "passed" else status.upper()
