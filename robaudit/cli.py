"""The ``robaudit`` command: a thin click layer over the library.

It builds a config, calls the library, renders, and is the only place that turns results and
exceptions into exit codes. Heavy imports (torch, onnx) wait until a command runs, so ``--help``
answers at once.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from robaudit import __version__, signals
from robaudit.errors import ExitCode, RobauditError
from robaudit.options import HARDEN_FIELDS, harden_settings, settings

ISSUES_URL = "https://github.com/robaudit/robaudit/issues"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="robaudit")
def cli() -> None:
    """Audit the class-wise adversarial robustness of image classifiers.

    Exit codes: 0 all classes passed, 1 classes flagged, 2 interrupted, 3 internal error,
    4 usage error, 5 nothing to audit.
    """


def _verbosity(verbose: int, quiet: int) -> int:
    return max(-1, min(1, verbose - quiet))


def _reporter_for(*outputs: str | None, verbose: int, quiet: int) -> Any:
    """The terminal reporter, once every output file is known to be writable: a long run must
    not fail at its end on a path it could have refused at its start."""
    from robaudit.reports import check_writable
    from robaudit.reports.terminal import TerminalReporter

    for path in outputs:
        if path is not None:
            check_writable(path)
    _show_log(_verbosity(verbose, quiet) > 0)
    return TerminalReporter(_verbosity(verbose, quiet))


def _config_file_read(given: Path | None) -> Path | None:
    """The config file ``resolve_config`` read the settings from: ``given``, else the working
    directory's (an input no report may replace)."""
    from robaudit.config import find_config_file

    return given or find_config_file(Path.cwd())


def _show_log(show: bool) -> None:
    """-v: robaudit's log on stderr (e.g. third-party warnings while converting an ONNX model)."""
    import logging

    logger = logging.getLogger("robaudit")
    for handler in [h for h in logger.handlers if getattr(h, "robaudit_cli", False)]:
        logger.removeHandler(handler)  # an earlier command's, on an earlier stderr
    logger.setLevel(logging.INFO if show else logging.NOTSET)
    if show:
        handler = logging.StreamHandler()  # the current sys.stderr
        handler.setFormatter(logging.Formatter("robaudit: %(message)s"))
        handler.robaudit_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@settings("scan")
def scan(model: Path, config_file: Path | None, verbose: int, quiet: int, **options: Any) -> int:
    """Attack MODEL on a data set and judge each class's robust accuracy."""
    from robaudit.audit import scan as run_scan
    from robaudit.config import resolve_config
    from robaudit.distributed import is_main_process
    from robaudit.reports import check_outputs, scan_inputs
    from robaudit.reports.json import to_dict, without_images, write_json
    from robaudit.reports.junit import write_junit

    config = resolve_config({"model": model, **options}, config_file=config_file)
    # Every rank refuses alike, before any work: a rank that stopped alone would hang the rest.
    check_outputs([("--json", config.json), ("--junit", config.junit), ("--html", config.html)],
                  scan_inputs(config, _config_file_read(config_file)), "this scan reads")
    if not is_main_process():
        # Under torchrun the other ranks attack their shards and stay silent: rank 0 reports.
        return run_scan(config).exit_code
    reporter = _reporter_for(config.json, config.junit, config.html, verbose=verbose, quiet=quiet)
    if config.html:
        from robaudit.reports.html import load_templates, write_html

        load_templates()  # before the scan: after a Ctrl-C the page is only rendered
    with reporter.progress() as progress:
        result = run_scan(config, progress=progress)
    doc = to_dict(result)
    if config.json:
        write_json(config.json, doc if config.json_images else without_images(doc))
    if config.junit:
        write_junit(config.junit, doc)
    if config.html:
        write_html(config.html, doc)
    signals.settle()
    reporter.render(doc)
    if result.baseline is not None and config.max_drop is not None:
        from robaudit.compare import compare as compare_reports

        comparison = compare_reports(result.baseline, doc, max_drop=config.max_drop,
                                     report_path="this scan")
        reporter.render_compare(comparison.to_dict(), reasons=False)
    for label, path in (("JSON", config.json), ("JUnit XML", config.junit),
                        ("HTML", config.html)):
        if path:
            reporter.info(f"{label} report: {path}")
    if result.problem is not None:
        from robaudit.errors import UsageError

        raise UsageError(result.problem)
    return result.exit_code


@cli.command(context_settings=CONTEXT)
@click.argument("report", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--junit", help="Write a JUnit XML report here.")
@click.option("--html", help="Write the HTML report here.")
@click.option("-v", "--verbose", count=True, help="Every class in the table (past 30 classes it "
              "shows the flagged and the least robust).")
@click.option("-q", "--quiet", count=True, help="Only the flagged classes and the verdict line.")
def report(report: Path, junit: str | None, html: str | None, verbose: int, quiet: int) -> int:
    """Render a saved JSON REPORT again: the terminal table, JUnit XML with --junit, HTML
    with --html."""
    from robaudit.reports import check_outputs
    from robaudit.reports.json import read_json
    from robaudit.reports.junit import write_junit
    from robaudit.reports.terminal import TerminalReporter

    check_outputs([("--junit", junit), ("--html", html)], [("report", report)],
                  "this command reads")
    doc = read_json(report)
    if junit:
        write_junit(junit, doc)
    if html:
        from robaudit.reports.html import write_html

        write_html(html, doc)
    TerminalReporter(_verbosity(verbose, quiet)).render(doc)
    return int(doc["verdict"]["exit_code"])


@cli.command(context_settings=CONTEXT)
def attacks() -> int:
    """List the attacks --attacks and --finish take, with what each one is."""
    from robaudit.attacks import catalogue

    for line in catalogue():
        click.echo(line)
    return ExitCode.OK


@cli.command(context_settings=CONTEXT)
@click.argument("baseline", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("report", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--max-drop", help="Largest allowed drop of a class's robust accuracy, e.g. 0.03 "
              "(3 percentage points).  [default: none; the deltas are shown, nothing is gated]")
@click.option("--gate-on", help="The figure compared: worst or an attack's name.  "
              "[default: the report's gate]")
@click.option("--significance/--no-significance", default=None,
              help="Flag a drop only when even the 95% Wilson upper bound dropped too far.  "
              "[default: the report's setting]")
@click.option("--json", "json_path", help="Write the comparison here as JSON: per-class "
              "deltas, verdicts and the rank correlation of the two class rankings.")
@click.option("-v", "--verbose", count=True, help="Every class in the table (past 30 classes it "
              "shows the dropped and the largest drops).")
@click.option("-q", "--quiet", count=True, help="Only the dropped classes, the verdict line "
              "and warnings.")
def compare(baseline: Path, report: Path, max_drop: str | None, gate_on: str | None,
            significance: bool | None, json_path: str | None, verbose: int, quiet: int) -> int:
    """Compare REPORT with a BASELINE report, class by class; with --max-drop, exit 1 when a
    class dropped more than that. Both must be made with the same eps, attacks and classes
    (else exit 4). Also prints how far the two agree on which classes are weak (Spearman's
    rank correlation)."""
    from robaudit.compare import compare as compare_reports
    from robaudit.compare import read_figures
    from robaudit.config import parse_fraction
    from robaudit.reports import check_outputs
    from robaudit.reports.json import read_json

    check_outputs([("--json", json_path)], [("baseline report", baseline), ("report", report)],
                  "this comparison reads")
    reporter = _reporter_for(json_path, verbose=verbose, quiet=quiet)
    comparison = compare_reports(
        read_figures(baseline), read_json(report),
        max_drop=None if max_drop is None else parse_fraction(max_drop, "max_drop"),
        report_path=str(report), figure=gate_on, significance=significance,
    )
    doc = comparison.to_dict()
    if json_path:
        import json

        from robaudit.reports import atomic_write

        atomic_write(json_path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))
    reporter.render_compare(doc)
    if json_path:
        reporter.info(f"JSON comparison: {json_path}")
    return ExitCode.FLAGGED if comparison.flagged else ExitCode.OK


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--data", "train_data", required=True,
              help="Training data: a .npz/.pt file, an image folder, or a data set name.")
@click.option("--val-data", help="Validation data, scanned every epoch and before/after "
              "(the same forms).  [default: a hold-out of --data, see --val-fraction]")
@click.option("--val-fraction", type=float, help="Without --val-data: the fraction of each "
              "class of --data held out (seeded) for validation, never trained on.  "
              "[default: 0.1]")
@click.option("--out", required=True, help="Where to write the hardened model (same format "
              "and suffix as MODEL).")
@harden_settings
@click.option("--json", "json_path", help="Write the JSON harden report here.")
@click.option("--html", help="Write the HTML before/after report here (both scans, per-class "
              "change).")
@settings("harden")
def harden(model: Path, train_data: str, val_data: str | None, val_fraction: float | None,
           out: str, json_path: str | None, html: str | None, config_file: Path | None,
           verbose: int, quiet: int, **options: Any) -> int:
    """Fine-tune MODEL so that its weakest classes catch up; exit 0 when the hardened model
    passes the scan's gate, 1 when classes are still flagged."""
    import dataclasses

    from robaudit.config import resolve_config
    from robaudit.errors import ConfigError
    from robaudit.harden import HardenConfig, to_dict
    from robaudit.harden import harden as run_harden
    from robaudit.harden.run import check_paths
    from robaudit.reports.json import write_json

    if val_data is not None and val_fraction is not None:
        raise ConfigError("--val-fraction holds out part of --data; it does not apply with "
                          "--val-data")
    if val_data is None:  # a hold-out of the training data; a config file's data is not used
        val_fraction = 0.1 if val_fraction is None else val_fraction
    own = {name: options.pop(name) for name in HARDEN_FIELDS}
    # Without --val-data, the scan settings' data is the training set the hold-out comes from.
    options["data"] = val_data or train_data
    scan_config = resolve_config({"model": str(model), **options}, config_file=config_file)
    # The harden report replaces the scan's own report files.
    scan_config = dataclasses.replace(scan_config, json=None, junit=None, html=None)
    config = HardenConfig(scan=scan_config, train_data=train_data, out=out,
                          val_fraction=val_fraction, json=json_path, html=html, **own)
    check_paths(config, _config_file_read(config_file))
    reporter = _reporter_for(out, json_path, html, verbose=verbose, quiet=quiet)
    with reporter.harden_progress() as progress:
        result = run_harden(config, progress=progress)
    doc = to_dict(result)
    if json_path:
        write_json(json_path, doc)
    if html:
        from robaudit.reports.harden_html import write_harden_html

        write_harden_html(html, doc)
    signals.settle()
    reporter.render_harden(doc)
    for label, path in (("JSON", json_path), ("HTML", html)):
        if path:
            reporter.info(f"{label} report: {path}")
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code; the one place exceptions become exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Under PYTHONIOENCODING=ascii or a C locale, a class name or a table's ellipsis must not
    # end the run: what the stream cannot encode is written as a backslash escape instead.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    signals.take()
    try:
        code = cli.main(args=args, prog_name="robaudit", standalone_mode=False)
        return int(code) if isinstance(code, int) else ExitCode.OK
    except click.exceptions.Exit as e:  # --help, --version
        return int(e.exit_code)
    except click.ClickException as e:  # bad option: click's own usage errors
        e.show()
        return ExitCode.USAGE_ERROR
    except (click.exceptions.Abort, KeyboardInterrupt):
        # Before the scan had a result, or a second signal while the reports were written.
        click.echo("robaudit: interrupted; any report already written is complete, the others "
                   "were not written", err=True)
        return ExitCode.INTERRUPTED
    except RobauditError as e:
        from robaudit.reports.terminal import shown  # a message may quote a file's content

        click.secho(f"error: {shown(e)}", err=True, fg="red", bold=True)
        return e.exit_code
    except Exception:
        click.secho(
            f"internal error: robaudit crashed; this is a bug, please report it at {ISSUES_URL} "
            "with the output of the same command run with -v", err=True, fg="red", bold=True,
        )
        if "-v" in args or "--verbose" in args or any(a.startswith("-vv") for a in args):
            traceback.print_exc()
        else:
            exc = sys.exc_info()[1]
            from robaudit.reports.terminal import shown

            click.echo(f"  {type(exc).__name__}: {shown(exc)}", err=True)
        return ExitCode.INTERNAL_ERROR
    finally:
        signals.release()


def entry_point() -> None:
    """The console script: main(), then the end of the process with its exit code."""
    signals.process_ends_after_main()
    code = main()
    if code == ExitCode.INTERRUPTED:
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown.

    After Ctrl-C or SIGTERM the reports are written and someone is waiting for the exit; tearing
    down the modules torch, onnx and onnxruntime import takes a second of CPU, five to seven
    seconds of wall time on a loaded 2-core machine (benchmarks/RESULTS.md). Nothing
    is left to clean up: reports are renamed into place as they are written; only buffered
    output needs flushing.
    """
    import contextlib
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing can reach it
            stream.flush()
    os._exit(code)
