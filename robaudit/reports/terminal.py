"""The terminal: the per-class table, the verdict line, warnings, errors and progress.

The one module besides the CLI that imports rich. Colour follows rich's detection (``NO_COLOR``,
``FORCE_COLOR``, a TTY or not); off a TTY the table is plain ASCII and there is no progress bar.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from robaudit.metrics import WORST
from robaudit.reports.terminal_layout import (
    LEAST,
    MIN_NAME,
    Column,
    attack_label,
    compare_closing,
    compare_columns,
    compare_figure_line,
    eps_line,
    fit,
    folded_note,
    harden_columns,
    hidden_note,
    interval_text,
    is_gated,
    ranking_line,
    rows_shown,
    scan_columns,
    sequential_lines,
    status_text,
    sweep_lines,
    table_width,
    weakness,
)

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
        """The scan's result: header, table, summary, flagged reasons, warnings, verdict line.

        -q keeps the reasons, as pytest -q still lists its failures."""
        doc = _shown_doc(doc)
        if self.verbosity >= 0:
            self._header(doc)
            self._scan_table(doc)
            self._summary(doc)
        self._reasons(doc)
        for warning in doc["warnings"]:
            self.warn(warning)
        self._verdict_line(doc)

    def _labelled(self, rows: list[tuple[str, str]]) -> None:
        """``label: value`` lines; a long value wraps at word boundaries, under itself."""
        indent = max(len(label) for label, _ in rows) + 3
        for label, value in rows:
            lines = textwrap.wrap(value, max(20, self.console.width - indent),
                                  break_on_hyphens=False) or [""]
            for i, line in enumerate(lines):
                head = f"{label:>{indent - 2}}: " if i == 0 else " " * indent
                self.console.print(Text.assemble((head, "dim"), line), soft_wrap=True)

    def _header(self, doc: dict[str, Any]) -> None:
        config, env = doc["config"], doc["environment"]
        attacks = ", ".join(attack_label(a) for a in doc["attacks"])
        restarts = f"{config['restarts']} restart{'s' if config['restarts'] != 1 else ''}"
        self.console.rule(Text("robaudit scan", style="bold"), characters="=")
        self._labelled([
            ("model", doc["model"]["description"]),
            ("data", f"{doc['data']['description']}: {doc['data']['audited']} examples audited"),
            ("attack", f"{attacks}; {config['steps']} steps, {restarts}"),
            ("eps", f"{eps_line(doc)}; seed {config['seed']}"),
            ("device", f"{env['device']} ({env['device_name']}), torch {env['torch']}"),
        ])

    def _draw(self, columns: list[Column], styles: list[str | None],
              title: str | None = None) -> list[str]:
        """A table fitted to the console's width (see terminal_layout); the folded headers."""
        width = self.console.width
        kept, folded = fit(columns, width, cell_len)
        table = Table(box=box.SIMPLE_HEAD if self.console.is_terminal else box.ASCII,
                      show_edge=False, pad_edge=False, title=title)
        # Only a class name is ever cut, and only when the figures leave it no room.
        spare = width - table_width(kept, cell_len)
        for i, column in enumerate(kept):
            cut = max(MIN_NAME, column.width(cell_len) + spare) if i == 0 and spare < 0 else None
            table.add_column(column.header, justify="right" if column.right else "left",
                             no_wrap=True, overflow="ellipsis", max_width=cut)
        for row, style in enumerate(styles):
            # Text, not str: a class name like "[/]" is data, never rich markup.
            table.add_row(*(Text(column.cells[row]) for column in kept), style=style)
        self.console.print(table)
        return folded

    def _notes(self, notes: list[str | None]) -> None:
        for note in notes:
            if note:
                self.console.print(Text(note, style="dim"))

    def _scan_table(self, doc: dict[str, Any]) -> None:
        on = doc["verdict"]["gate"]["on"]
        # A class without examples (not in the data, or left out by --classes) stays in the JSON.
        audited = [c for c in doc["classes"] if c["n"] > 0]
        flagged = [not c["verdict"]["passed"] for c in audited]
        rows = rows_shown(len(audited), flagged,
                          [weakness((c["robust"].get(on) or {}).get("acc")) for c in audited],
                          self.verbosity > 0)
        classes = [audited[i] for i in rows]
        folded = self._draw(scan_columns(doc, classes, self.verbosity > 0, _status),
                            [None if c["verdict"]["passed"] else "bold red" for c in classes])
        empty = len(doc["classes"]) - len(audited)
        self._notes([
            f"gate on: {on}" if on != WORST else None,
            f"{empty} class{'es' if empty != 1 else ''} without examples not shown"
            if empty else None,
            hidden_note(len(audited) - len(classes)),
            folded_note(folded, self.console.width),
        ])

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
        for line in [*sweep_lines(doc), *sequential_lines(doc, self.verbosity > 0)]:
            self.console.print(Text(line))
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
        audited = [c for c in doc["classes"] if c["n"] > 0]
        flagged = len(doc["verdict"]["flagged"])
        unreliable = sum(1 for c in audited if c["verdict"].get("status") == "unreliable")
        passed = sum(1 for c in audited if c["verdict"]["passed"])
        parts = []
        if flagged - unreliable:
            parts.append(f"{flagged - unreliable} class{'es' if flagged - unreliable != 1 else ''}"
                         " flagged")
        if unreliable:
            parts.append(f"{unreliable} unreliable")
        gated = is_gated(doc)
        # pytest says "no tests ran", not "passed", when nothing was checked.
        parts.append(f"{passed} passed" if gated else
                     f"no policy: {len(audited)} class{'es' if len(audited) != 1 else ''} "
                     "audited, none gated")
        line = f"{', '.join(parts)} in {doc['timings']['total_s']:.1f}s"
        if doc["partial"]:
            line = (f"interrupted: partial results over {doc['data']['audited']} of "
                    f"{doc['data']['selected']} examples; {line}")
        style = "bold red" if flagged or doc["partial"] else \
            "bold green" if gated else "bold yellow"
        self._closing(line, style)

    def _closing(self, line: str, style: str) -> None:
        """The closing line between rules, like pytest's; a line too long for them is printed
        alone (a rule would cut it)."""
        if cell_len(line) + 4 <= self.console.width:
            self.console.rule(Text(line, style=style), characters="=")
        else:
            self.console.print(Text(line, style=style))

    def render_compare(self, doc: dict[str, Any], *, reasons: bool = True) -> None:
        """Per-class deltas against a baseline (``compare.Comparison.to_dict()``).

        ``reasons=False`` after a scan's own report, which has already named the dropped classes.
        """
        doc = _shown_doc(doc)
        gated = doc.get("max_drop") is not None
        if self.verbosity >= 0:
            self.console.rule(Text("robaudit compare", style="bold"), characters="=")
            self._labelled([("baseline", doc["baseline"]), ("report", doc["report"]),
                            ("figure", compare_figure_line(doc))])
            self._compare_table(doc)
            if doc["mean_baseline"] is not None:
                change = (doc["mean_current"] - doc["mean_baseline"]) * 100
                self.console.print(f"class mean {_pct(doc['mean_baseline'])} -> "
                                   f"{_pct(doc['mean_current'])} ({change:+.1f} pp)")
            if "rank_correlation" in doc:
                self.console.print(Text(ranking_line(doc)))
        if reasons:
            for c in doc["classes"]:
                for failure in c["failures"]:
                    self.console.print(Text(f"DROPPED {c['name']}: {failure['message']}",
                                            style="red"))
        for warning in doc["warnings"]:
            self.warn(warning)
        dropped = len(doc["flagged"])
        style = "bold red" if dropped else "bold green" if gated else "bold yellow"
        self._closing(compare_closing(doc), style)

    def _compare_table(self, doc: dict[str, Any]) -> None:
        flagged = [not c["passed"] for c in doc["classes"]]
        rows = rows_shown(len(flagged), flagged, [c["delta"] for c in doc["classes"]],
                          self.verbosity > 0)
        classes = [doc["classes"][i] for i in rows]
        folded = self._draw(compare_columns(classes, doc.get("max_drop") is not None),
                            [None if c["passed"] else "bold red" for c in classes])
        self._notes([hidden_note(len(flagged) - len(classes),
                                 f"not dropped, not among the {LEAST} largest drops"
                                 if doc.get("max_drop") is not None else
                                 f"not among the {LEAST} largest drops"),
                     folded_note(folded, self.console.width)])

    @contextmanager
    def harden_progress(self) -> Iterator[Callable[[Any], None]]:
        """A callback for ``harden(progress=...)``: a bar of the epoch's batches with the loss
        and the worst class on a TTY; off a TTY (a CI log) a line per stage and per epoch, with
        -v a line per batch too, with -q none: a run of many minutes never goes silent."""
        if not self.interactive:
            yield self._log_harden if self.verbosity >= 0 else (lambda _event: None)
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
        if event.batches and self.verbosity <= 0:  # a training batch: only with -v
            return
        parts = [f"robaudit: {event.stage}"]
        if event.epochs:
            parts.append(f"epoch {event.epoch}/{event.epochs}")
        if event.batches:
            parts.append(f"batch {event.batch}/{event.batches}")
        if event.loss is not None:
            parts.append(f"loss {event.loss:.3f}")
        if event.worst_class is not None:
            parts.append(f"worst class {shown(event.worst_class)} {_pct(event.worst_robust)}")
        # On stdout, where the run's report follows: stderr keeps warnings and the one error line.
        self.console.print(Text(" ".join(parts)), soft_wrap=True)

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
        audited = [c for c in doc["classes"] if c["n"] > 0]
        flagged = [not c["passed"] for c in audited]
        rows = rows_shown(len(audited), flagged,
                          [weakness(c["after"]["robust"][WORST]) for c in audited],
                          self.verbosity > 0)
        classes = [audited[i] for i in rows]
        folded = self._draw(harden_columns(attacks, classes),
                            [None if c["passed"] else "bold red" for c in classes],
                            title="before -> after (%)")
        self._notes([hidden_note(len(audited) - len(classes)),
                     folded_note(folded, self.console.width)])
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
                f"({holdout['fraction']:.0%} of each class{_at_least(holdout)}, seed "
                f"{holdout['seed']}), never trained on here; before/after scans on them: "
                f"{holdout['file']}. If the model was trained on --data, it has seen these "
                "images and its figures on them are optimistic (a class that passes here can "
                "fail on new images): pass --val-data with images it never saw"))
        kept = doc["kept"]
        budget, val = kept["budget"], kept["validation"]
        epochs = ", ".join(str(e) for e in kept["within_budget"])
        self.console.print(
            f"budget: class mean >= {_pct(budget['mean_floor'])}, clean >= "
            f"{_pct(budget['clean_floor'])} on validation; epochs within it: {epochs}")
        ci95 = val.get("ci95")
        worst = ci95[val["robust"].index(val["worst_robust"])] if ci95 else None
        self.console.print(Text(
            f"kept epoch {kept['epoch']} (highest worst-class robust accuracy within the "
            f"budget: {val['worst_class']} {_pct(val['worst_robust'])}{_ci(worst)}, class mean "
            f"{_pct(val['mean_robust'])}{_ci(val.get('mean_ci95'))}, clean "
            f"{_pct(val['clean_acc'])}; 95% intervals on validation)"))


def _status(verdict: dict[str, Any]) -> str:
    """The verdict column: passed, FLAGGED or UNRELIABLE (signs of masking remain)."""
    return status_text(verdict.get("status") or ("passed" if verdict["passed"] else "flagged"))


def _ci(interval: list[float] | None) -> str:
    """`` (52-86%)``, or nothing when the interval is unknown."""
    return f" ({interval_text(interval)})" if interval else ""


def _at_least(holdout: dict[str, Any]) -> str:
    """The hold-out's floor per class, which the budget sets (none when it could not)."""
    minimum = holdout.get("minimum_per_class") or 0
    return f", at least {minimum} (up to half)" if 0 < minimum < 2**31 - 1 else ""
