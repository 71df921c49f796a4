"""pytest plugin: robustness checks inside a user's own test suite.

A ``robaudit`` fixture and a ``robustness`` marker::

    def test_model_is_fair(robaudit):
        robaudit.scan("model.onnx", data="val.npz", eps="8/255").assert_passes(min_class_robust=0.3)

Loaded in every pytest run of an environment that has robaudit installed (the ``pytest11`` entry
point), so this module imports nothing heavy: torch and the scan pipeline load inside the fixture.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from robaudit.audit import ScanResult
    from robaudit.gate import Verdict

MARKER = "robustness"
#: Past this many classes a failure shows only the failing ones: 1000 ImageNet rows help nobody.
MAX_TABLE_ROWS = 20


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("robaudit", "class-wise adversarial robustness (robaudit)")
    group.addoption(
        "--robaudit-json", metavar="DIR", default=None,
        help="Write the JSON report of each robaudit scan in a test to DIR/<test id>.json.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: an adversarial robustness test (tests using the robaudit fixture get it "
        "automatically; deselect them with -m 'not robustness')",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Robustness tests are slow: let `-m "not robustness"` skip them without users marking each.
    for item in items:
        if "robaudit" in getattr(item, "fixturenames", ()) and not item.get_closest_marker(MARKER):
            item.add_marker(MARKER)


@pytest.fixture
def robaudit(request: pytest.FixtureRequest) -> Auditor:
    """Runs robaudit scans in a test: ``robaudit.scan(model, data=..., eps=...)``."""
    return Auditor(request)


class Auditor:
    """What the ``robaudit`` fixture gives a test."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._scans = 0

    def scan(self, model: str | Path, data: str | Path | None = None, *,
             config: str | Path | None = None, **options: Any) -> Audit:
        """Scan ``model`` on ``data``; ``options`` are :class:`robaudit.config.ScanConfig` fields.

        Values may be given as on the command line (``eps="8/255"``, a sweep ``eps="0.1,0.2"``
        with ``gate_eps=``, ``attacks="pgd,tpgd"``) or typed (``eps=0.03``,
        ``attacks=["pgd"]``); they are resolved as the command line's are
        (:func:`robaudit.config.resolve_config`). ``config`` names a robaudit.toml or
        pyproject.toml to start from (keywords override it); without it no config file is read,
        so a test does not depend on the working directory. Relative paths that exist under
        pytest's rootdir are taken from there.
        """
        __tracebackhide__ = True
        from robaudit.audit import scan as run_scan
        from robaudit.errors import RobauditError

        problem = None
        try:
            settings = self._config(model, data, config, options)
            json_path = self._json_path(settings, config)
            result = run_scan(settings)
        except RobauditError as e:
            problem = str(e)
        if problem is not None:
            # A setup mistake (missing file, bad option): its message says it all. Failing
            # outside the except block keeps robaudit's exception out of the report.
            pytest.fail(f"robaudit could not scan: {problem}", pytrace=False)
        audit = Audit(result)
        self._save(audit, json_path)
        return audit

    def _config(self, model: str | Path, data: str | Path | None, config: str | Path | None,
                options: dict[str, Any]) -> Any:
        from robaudit.config import INPUT_PATHS, resolve_config
        from robaudit.errors import MissingSetting

        given = {"model": self._path(model), "data": data, **options}
        for key, value in given.items():
            if key.replace("-", "_") in INPUT_PATHS and isinstance(value, (str, Path)):
                given[key] = self._path(value)
        try:
            return resolve_config(given, config_file=None if config is None else self._path(config),
                                  find_file=False, source="pytest")
        except MissingSetting as e:
            if e.key != "data":
                raise
            raise MissingSetting("robaudit.scan() needs data=: a .npz file, a folder or a name "
                                 "(or a config= file that names one)", key="data") from None

    def _path(self, value: str | Path) -> str | Path:
        rooted = self._request.config.rootpath / value
        return rooted if not Path(value).is_absolute() and rooted.exists() else value

    def _json_path(self, settings: Any, config: str | Path | None) -> Path | None:
        """Where --robaudit-json puts this scan's report, refused before the scan if it would
        replace one of the scan's inputs."""
        folder = self._request.config.getoption("robaudit_json")
        if folder is None:
            return None
        from robaudit.reports import check_outputs, scan_inputs

        self._scans += 1
        stem = re.sub(r"[^\w.-]+", "_", self._request.node.nodeid).strip("_")
        suffix = f"-{self._scans}" if self._scans > 1 else ""
        path = Path(folder) / f"{stem}{suffix}.json"
        config_file = None if config is None else self._path(config)
        check_outputs([("--robaudit-json", path)], scan_inputs(settings, config_file),
                      "this scan reads")
        return path

    def _save(self, audit: Audit, path: Path | None) -> None:
        if path is None:
            return
        from robaudit.reports.json import write_json

        write_json(path, audit.doc)
        audit.json_path = path
        # Shows up in pytest's JUnit XML as a property of the test case.
        self._request.node.user_properties.append(("robaudit_json", str(path)))


class Audit:
    """One scan's result, with assertions that fail with a per-class table."""

    def __init__(self, result: ScanResult) -> None:
        self.result = result
        self.json_path: Path | None = None
        self._doc: dict[str, Any] | None = None

    @property
    def doc(self) -> dict[str, Any]:
        """The JSON report document (as written by ``robaudit scan --json``)."""
        if self._doc is None:
            from robaudit.reports.json import to_dict

            self._doc = to_dict(self.result)
        return self._doc

    @property
    def flagged(self) -> list[str]:
        """Names of the classes the scan's own gate flagged (``result.flagged`` has verdicts)."""
        return [v.name for v in self.result.flagged]

    def robust_acc(self, name: str) -> float:
        """A class's robust accuracy on the gated figure (worst case over attacks by default)."""
        for s in self.result.stats:
            if s.name == name:
                return s.robust[self.result.config.gate_on].acc
        raise KeyError(f"no class {name!r}; classes: {', '.join(self.result.class_names)}")

    def assert_passes(
        self,
        *,
        min_class_robust: float | None = None,
        min_ratio: float | None = None,
        max_gap: float | None = None,
        max_drop: float | None = None,
        significance: bool | None = None,
        allow_unreliable: bool | None = None,
    ) -> Audit:
        """Fail the test when a class fails the policy, showing the classes and their figures.

        With no thresholds the gate the scan was configured with decides, exactly as
        ``robaudit scan`` exits; thresholds given here replace it and are judged the way the
        scan judges: a class whose figure is masked (unreliable) fails unless
        ``allow_unreliable`` (default: the scan's). ``significance`` defaults to the scan's;
        ``max_drop`` needs the scan's ``baseline``.
        """
        __tracebackhide__ = True
        verdicts = self._verdicts(
            {"min_class_robust": min_class_robust, "min_ratio": min_ratio, "max_gap": max_gap,
             "max_drop": max_drop}, significance, allow_unreliable)
        if any(not v.passed for v in verdicts):
            pytest.fail(self._failure_text(verdicts), pytrace=True)
        return self

    def _verdicts(self, given: dict[str, float | None], significance: bool | None,
                  allow_unreliable: bool | None) -> list[Verdict]:
        """The scan's own verdicts, or the scan's figures judged by the policy given here."""
        from dataclasses import replace

        from robaudit.gate import GatePolicy

        config = self.result.config
        if all(v is None for v in given.values()):
            policy = config.gate_policy()
        else:
            policy = GatePolicy(**given, significance=config.significance, on=config.gate_on)
        if significance is not None:
            policy = replace(policy, significance=significance)
        if not policy.active:
            raise ValueError("assert_passes() needs a policy: pass min_class_robust=, "
                             "min_ratio=, max_gap= or max_drop=, or set one in the scan")
        if policy.max_drop is not None and self.result.baseline is None:
            raise ValueError("max_drop= needs a baseline: scan(..., baseline='report.json')")
        if policy == config.gate_policy() and allow_unreliable in (None, config.allow_unreliable):
            return self.result.verdicts
        return self.result.judged_by(policy, allow_unreliable=allow_unreliable).verdicts

    def _failure_text(self, verdicts: list[Verdict]) -> str:
        result = self.result
        config = result.config
        failed = [v for v in verdicts if not v.passed]
        stats = {s.index: s for s in result.stats}
        figure = "worst case over " + ",".join(result.attack_names) \
            if config.gate_on == "worst" else config.gate_on
        present = [v for v in verdicts if stats[v.index].n > 0]
        shown = present if len(present) <= MAX_TABLE_ROWS else failed
        rows = [("class", "n", "clean", "robust (95% CI)", "verdict")]
        for v in shown:
            s = stats[v.index]
            rate = s.robust[config.gate_on]
            rows.append((s.name, str(s.n), f"{s.clean.acc:.1%}",
                         f"{rate.acc:.1%} ({rate.low:.0%}-{rate.high:.0%})",
                         "FLAGGED" if not v.passed else "passed"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            f"robaudit: {len(failed)} of {len(present)} classes failed the robustness policy "
            f"({figure}; eps {config.eps_text()}; {result.data['audited']} examples)",
        ]
        for i, row in enumerate(rows):
            cells = [c.ljust(w) if j in (0, 4) else c.rjust(w)
                     for j, (c, w) in enumerate(zip(row, widths, strict=True))]
            lines.append("  " + " | ".join(cells).rstrip())
            if i == 0:
                lines.append("  " + "-+-".join("-" * w for w in widths))
        if len(shown) < len(present):
            lines.append(f"  ({len(present) - len(shown)} passing classes not shown)")
        for v in failed:
            for failure in v.failures:
                lines.append(f"  {v.name}: {failure.message}")
        if self.json_path is not None:
            lines.append(f"  JSON report: {self.json_path}")
        return "\n".join(lines)
