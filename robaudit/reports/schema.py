"""The report schema's name and version, and the reader that checks a saved report.

Below the scan pipeline: ``compare`` (which ``audit`` uses for ``--baseline``) reads saved reports
through here without importing the writer in :mod:`robaudit.reports.json`, which imports
``audit``.

A report cut short or edited by hand must fail here, with one line naming the JSON path of the
first bad field, not with a KeyError or a TypeError (an "internal error") halfway through
rendering or comparing it. So every field that ``report``, ``compare``, JUnit and the HTML page
read is checked: its presence, its type and its range.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robaudit.errors import UsageError
from robaudit.metrics import WORST

SCHEMA = "robaudit.scan"
SCHEMA_VERSION = 1


def read_json(path: str | Path) -> dict[str, Any]:
    """A saved report, checked to be one robaudit can render."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read report {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UsageError(
            f"{path} is not a JSON file ({e}); pass a report written by --json"
        ) from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UsageError(f"{path} is not a robaudit scan report; pass a file written by --json")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(
            f"{path} has report schema version {doc.get('schema_version')}, this robaudit reads "
            f"version {SCHEMA_VERSION}; re-run the scan with this version"
        )
    try:
        _REPORT(doc, "")
        _check_consistent(doc)
    except Invalid as e:
        raise UsageError(f"{path}: {e}; pass the file --json wrote, unedited, or re-run the "
                         "scan") from None
    return doc


class Invalid(Exception):
    """One field of a report is missing or wrong; the message starts with its JSON path."""


Check = Callable[[Any, str], None]


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fail(at: str, value: Any, expected: str) -> Invalid:
    return Invalid(f"{at} is {_brief(value)}, not {expected}")


def _number(lo: float, hi: float, expected: str, *, whole: bool = False) -> Check:
    def check(value: Any, at: str) -> None:
        # JSON's NaN and Infinity parse as floats: a range check alone would let NaN through.
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value) and lo <= value <= hi and \
            (not whole or isinstance(value, int))
        if not ok:
            raise _fail(at, value, expected)

    return check


FRACTION = _number(0, 1, "a fraction in [0, 1]")
NUMBER = _number(-math.inf, math.inf, "a finite number")
SECONDS = _number(0, math.inf, "a number of seconds >= 0")
COUNT = _number(0, math.inf, "a count (a whole number >= 0)", whole=True)
INTEGER = _number(-math.inf, math.inf, "a whole number", whole=True)


def _kind(kind: type, expected: str) -> Check:
    def check(value: Any, at: str) -> None:
        if not isinstance(value, kind):
            raise _fail(at, value, expected)

    return check


TEXT = _kind(str, "text")
BOOL = _kind(bool, "true or false")


def ANY(value: Any, at: str) -> None:
    """Shown as it is, whatever it is."""


def nullable(check: Check) -> Check:
    return lambda value, at: None if value is None else check(value, at)


def list_of(item: Check, length: int | None = None) -> Check:
    def check(value: Any, at: str) -> None:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            raise _fail(at, value, "a list" if length is None else f"a list of {length}")
        for i, v in enumerate(value):
            item(v, f"{at}[{i}]")

    return check


def map_of(item: Check) -> Check:
    def check(value: Any, at: str) -> None:
        if not isinstance(value, dict):
            raise _fail(at, value, "an object")
        for key, v in value.items():
            item(v, f"{at}.{key}")

    return check


def obj(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    """An object with ``required`` keys (and ``optional`` ones, checked when present)."""
    def check(value: Any, at: str) -> None:
        if not isinstance(value, dict):
            raise _fail(at, value, "an object")
        for key, item in required.items():
            if key not in value:
                raise Invalid(f"{_join(at, key)} is missing")
            item(value[key], _join(at, key))
        for key, item in (optional or {}).items():
            if key in value:
                item(value[key], _join(at, key))

    return check


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


RATE = obj({"acc": nullable(FRACTION), "correct": COUNT, "n": COUNT,
            "ci95": list_of(FRACTION, 2)})
FAILURE = obj({"policy": TEXT, "message": TEXT},
              {"value": nullable(NUMBER), "threshold": nullable(NUMBER)})
VERDICT = obj({"passed": BOOL, "failures": list_of(FAILURE)},
              {"status": nullable(TEXT), "unreliable": ANY})
#: What a sequential scan's confidence sequence did for one class (robaudit/rounds.py).
SEQUENTIAL_CLASS = obj(
    {"attacked": COUNT, "of": COUNT, "round": nullable(COUNT), "decided": nullable(TEXT),
     "interval": nullable(list_of(FRACTION, 2))},
    {"exhausted": BOOL, "history": list_of(list_of(NUMBER, 3))},
)
CLASS = obj(
    {"index": COUNT, "name": TEXT, "n": COUNT, "clean": nullable(RATE),
     "robust": map_of(nullable(RATE)), "runtime_robust": nullable(RATE), "verdict": VERDICT,
     "verdict_by_figure": map_of(VERDICT)},
    {"confusion_row": list_of(COUNT), "mean_clean_margin": nullable(NUMBER),
     "mean_adv_margin": nullable(NUMBER), "sequential": SEQUENTIAL_CLASS},
)
ATTACK = obj({"name": TEXT}, {
    "description": TEXT, "stage": TEXT, "escalation": BOOL, "eps": NUMBER, "norm": TEXT,
    "steps": COUNT, "step_size": NUMBER, "restarts": COUNT, "schedule": TEXT,
    "targets": COUNT, "queries": COUNT, "temperatures": list_of(NUMBER),
})
GATE = obj({"on": TEXT}, {
    "min_class_robust": nullable(FRACTION), "min_ratio": nullable(FRACTION),
    "max_gap": nullable(FRACTION), "max_drop": nullable(FRACTION), "significance": BOOL,
    "thresholds": map_of(nullable(NUMBER)),
})
NAMED_FIGURE = obj({"name": nullable(TEXT), "robust_acc": nullable(FRACTION)})
SUMMARY = obj(
    {"clean_acc": nullable(FRACTION), "robust_acc": map_of(nullable(FRACTION)),
     "mean_class_robust": map_of(nullable(FRACTION)), "worst_class": NAMED_FIGURE,
     "best_class": NAMED_FIGURE, "gap": nullable(FRACTION), "std": nullable(NUMBER),
     # Spearman's rho, with room for the last bit of floating-point rounding.
     "rank_correlation": map_of(nullable(_number(-1 - 1e-9, 1 + 1e-9,
                                                 "a correlation in [-1, 1]"))),
     "runtime_clean_acc": nullable(FRACTION), "runtime_robust_acc": nullable(FRACTION)},
    {"n": COUNT, "gain_split": nullable(obj(
        {"weakest": TEXT, "strongest": TEXT, "per_class": list_of(INTEGER)},
        {"total_broken": INTEGER, "vulnerable_half_share": nullable(FRACTION)}))},
)
SWEEP_ENTRY = obj(
    {"eps": _number(0, math.inf, "a number >= 0"),
     "classes": list_of(obj({"name": TEXT, "robust": map_of(nullable(FRACTION))}))},
    {"eps_text": TEXT, "robust_acc": map_of(nullable(FRACTION)),
     "mean_class_robust": map_of(nullable(FRACTION))},
)
_REPORT = obj(
    {
        "created": TEXT, "partial": BOOL,
        "verdict": obj({"passed": BOOL, "exit_code": _number(0, 5, "an exit code 0-5",
                                                            whole=True),
                        "flagged": list_of(TEXT), "gate": GATE},
                       {"unreliable": list_of(TEXT)}),
        "config": obj({"eps": _number(0, math.inf, "a number >= 0"), "eps_text": TEXT,
                       "attacks": list_of(TEXT)},
                      {"finish": list_of(TEXT), "norm": TEXT, "seed": INTEGER}),
        "model": obj({"description": TEXT, "path": TEXT}, {"format": TEXT}),
        "data": obj({"description": TEXT, "audited": COUNT, "selected": COUNT}),
        "environment": map_of(ANY),
        "attacks": list_of(ATTACK), "class_names": list_of(TEXT), "classes": list_of(CLASS),
        "summary": SUMMARY, "timings": obj({"total_s": SECONDS}, {}), "warnings": list_of(TEXT),
    },
    {
        "baseline": nullable(obj({"robust": map_of(map_of(FRACTION))},
                                 {"path": TEXT, "created": TEXT})),
        "confusion": map_of(list_of(list_of(COUNT))), "sweep": list_of(SWEEP_ENTRY),
        "gallery": nullable(map_of(list_of(map_of(ANY)))),
        "sequential": nullable(obj({"confidence": FRACTION, "rounds": COUNT,
                                    "attacked": COUNT, "of": COUNT})),
    },
)


def _check_consistent(doc: dict[str, Any]) -> None:
    """What no single field says: figures every renderer looks up, indices within range."""
    for key, value in doc["timings"].items():
        SECONDS(value, f"timings.{key}")
    for at in ("environment.device", "environment.device_name", "environment.torch"):
        value = doc["environment"].get(at.split(".")[1])
        if not isinstance(value, str):
            raise _fail(at, value, "text")
    for i, attack in enumerate(doc["attacks"]):
        if "queries" not in attack:  # a gradient attack: the HTML shows its steps
            obj({"steps": COUNT, "step_size": NUMBER, "restarts": COUNT})(attack, f"attacks[{i}]")
    config = doc["config"]
    figures = {a["name"] for a in doc["attacks"]} | set(config["attacks"])
    figures |= {*config.get("finish", ()), WORST}
    k = len(doc["class_names"])
    if len(doc["classes"]) != k:
        raise Invalid(f"classes has {len(doc['classes'])} entries but class_names has {k}")
    for i, c in enumerate(doc["classes"]):
        _check_class(c, f"classes[{i}]", i, k, figures)
    if WORST not in doc["summary"]["robust_acc"] or \
            WORST not in doc["summary"]["mean_class_robust"]:
        raise Invalid(f"summary.robust_acc or summary.mean_class_robust has no '{WORST}'")
    for name, matrix in (doc.get("confusion") or {}).items():
        if len(matrix) != k or any(len(row) != k for row in matrix):
            raise Invalid(f"confusion.{name} is not a {k} x {k} matrix (one row and column "
                          "per class)")


def _check_class(c: dict[str, Any], at: str, index: int, k: int, figures: set[str]) -> None:
    if c["index"] != index:
        raise _fail(f"{at}.index", c["index"], f"{index} (its place in classes)")
    if "confusion_row" in c and len(c["confusion_row"]) != k:
        raise Invalid(f"{at}.confusion_row has {len(c['confusion_row'])} counts, not {k}")
    for kind, rate in (("clean", c["clean"]), *c["robust"].items()):
        where = f"{at}.{kind}" if kind == "clean" else f"{at}.robust.{kind}"
        if rate is not None:
            _check_rate(rate, where)
    if c["n"] == 0:
        return
    for figure in sorted(figures):
        if c["robust"].get(figure) is None:
            raise Invalid(f"{at}.robust.{figure} is missing or null: a class with examples has "
                          "a figure for every attack")


def _check_rate(rate: dict[str, Any], at: str) -> None:
    """acc is correct / n: the terminal shows acc, compare's significance uses the counts."""
    correct, n, acc = rate["correct"], rate["n"], rate["acc"]
    if correct > n:
        raise Invalid(f"{at}.correct is {correct}, more than {at}.n ({n})")
    expected = correct / n if n else None
    if (acc is None) != (expected is None) or (acc is not None and abs(acc - expected) > 1e-9):
        raise Invalid(f"{at}.acc is {_brief(acc)}, but {at}.correct / {at}.n is {correct}/{n}")
