"""The report schema's name and version, and the reader that checks a saved report.

Below the scan pipeline: ``compare`` (which ``audit`` uses for ``--baseline``) reads saved reports
through here without importing the writer in :mod:`robaudit.reports.json`, which imports
``audit``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from robaudit.errors import UsageError

SCHEMA = "robaudit.scan"
SCHEMA_VERSION = 1


def read_json(path: str | Path) -> dict[str, Any]:
    """A saved report, checked to be one robaudit can render."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read report {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
    _check_complete(doc, path)
    return doc


# What the renderers read: a report cut short or edited by hand must fail here with a message,
# not with a KeyError (an "internal error") halfway through rendering it.
_REPORT_KEYS = {
    "partial": bool, "verdict": dict, "config": dict, "model": dict, "data": dict,
    "environment": dict, "attacks": list, "class_names": list, "classes": list, "summary": dict,
    "timings": dict, "warnings": list,
}
_CLASS_KEYS = ("index", "name", "n", "clean", "robust", "verdict", "verdict_by_figure")


def _check_complete(doc: dict[str, Any], path: Path) -> None:
    def incomplete(what: str) -> UsageError:
        return UsageError(
            f"{path} is an incomplete robaudit report ({what}); pass the file --json wrote, "
            "unedited, or re-run the scan"
        )

    for key, kind in _REPORT_KEYS.items():
        if not isinstance(doc.get(key), kind):
            raise incomplete(f"'{key}' is missing or not a {kind.__name__}")
    for number, entry in enumerate(doc["classes"]):
        missing = [k for k in _CLASS_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise incomplete(f"class entry {number} has no '{missing[0]}'")
