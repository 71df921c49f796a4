"""The ``robaudit`` command: a thin click layer over the library.

It builds a config, calls the library, renders, and is the only place that turns results and
exceptions into exit codes. Heavy imports (torch, onnx) wait until a command runs, so ``--help``
answers at once.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from robaudit import __version__, signals
from robaudit.choices import MODES, NORMS, PRESETS, SCHEDULES
from robaudit.config import default_text
from robaudit.errors import ExitCode, RobauditError

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


def _setting(*decls: str, scan_only: bool = False, default_of: str | None = None,
             note: str = "", **attrs: Any) -> tuple[bool, Any]:
    """A scan option. ``default_of`` names the ScanConfig field whose default the help shows
    (read from the dataclass, so the help cannot drift from it); ``note`` says more about it."""
    if default_of is not None:
        attrs["help"] += f"  [default: {default_text(default_of)}{note}]"
    return scan_only, click.option(*decls, **attrs)


#: The scan settings on the command line, declared once, in --help order: each goes to
#: ``resolve_config`` under its ScanConfig field's name (or is --config, -v, -q). ``scan`` takes
#: them all, ``harden`` those not ``scan_only`` (for its before/after scans and its validation;
#: its own --data, --json and --html mean other things). A new setting is one line here.
SETTINGS = [
    _setting("--data", scan_only=True, help="A .npz/.pt file, an image folder, or a data set "
             "name (mnist, fashionmnist, cifar10, cifar100, svhn, stl10, imagenet)."),
    _setting("--data-root", help="Where named data sets live."),
    _setting("--download/--no-download", default=None,
             help="Download a named data set into --data-root if it is missing."),
    _setting("--split", scan_only=True, help="Split of a named data set.", default_of="split"),
    _setting("--class-names", help="Text file with one class name per line."),
    _setting("--image-size", type=int, help="Resize and centre-crop images to this size."),
    _setting("--channels", type=int, help="Image channels the model takes: 1 (greyscale) or 3 "
             "(RGB).  [default: what the model's first layer takes]"),
    _setting("--classes", scan_only=True,
             help="Audit only these classes (comma-separated names)."),
    _setting("--per-class", type=int, help="Seeded stratified sample of N examples per class "
             "(harden: of the training and of the validation data)."),
    _setting("--limit", type=int, help="At most N examples in all, kept balanced (harden: of "
             "the training and of the validation data)."),
    _setting("--arch", help="Architecture for a state dict: torchvision:resnet18 or "
             "package.module:factory (imports and runs that code: trust it)."),
    _setting("--num-classes", type=int, help="Number of classes for --arch."),
    _setting("--mean", help="Per-channel mean the model normalises with, e.g. 0.49,0.48,0.45."),
    _setting("--std", help="Per-channel std the model normalises with."),
    _setting("--runtime-check/--no-runtime-check", default=None,
             help="Check an ONNX model's conversion and adversarial examples against "
             "onnxruntime.", default_of="runtime_check"),
    _setting("--attacks", help="A preset (" + "; ".join(
             f"{name}: {','.join(attacks)}" for name, attacks in PRESETS.items()) + ", "
             "AutoAttack's way: each on the previous ones' survivors, no finish) or "
             "comma-separated attack names, listed by `robaudit attacks` (harden: of the "
             "before/after scans).", default_of="attacks"),
    _setting("--norm", type=click.Choice(NORMS),
             help="Threat model: the L-inf or the L2 ball of radius --eps, in pixel units.",
             default_of="norm"),
    _setting("--queries", type=int, scan_only=True,
             help="Square's queries per example.", default_of="queries", note=", AutoAttack's"),
    _setting("--finish", help="Attacks run after --attacks on the examples none of them broke, "
             "at every eps; none to skip.", default_of="finish",
             note="; none with the standard preset"),
    _setting("--targets", type=int, scan_only=True,
             help="Target classes of the targeted attacks, the most likely wrong ones.  "
             "[default: 5 for dlr-t and ce-t, 9 (AutoAttack's) for apgd-t]"),
    _setting("--escalate/--no-escalate", scan_only=True, default=None,
             help="Where the sanity checks see gradient masking, run DLR and Square on the "
             "survivors of the classes concerned.", default_of="escalate"),
    _setting("--escalation-queries", type=int, scan_only=True,
             help="Square's queries per example when escalating.",
             default_of="escalation_queries"),
    _setting("--allow-unreliable/--no-allow-unreliable", scan_only=True, default=None,
             help="Judge classes whose signs of masking remain after escalation on their "
             "figures alone instead of failing them as unreliable.",
             default_of="allow_unreliable"),
    _setting("--eps", help="Radius of the threat model's ball in pixel units [0,1]; "
             "fractions like 8/255 work; several (2/255,4/255,8/255) run a sweep.",
             default_of="eps"),
    _setting("--gate-eps", scan_only=True, help="With several --eps, the one the gate judges.  "
             "[default: the largest]"),
    _setting("--mode", scan_only=True, type=click.Choice(MODES),
             help="each: every attack on every example (per-attack figures); worst-case: later "
             "attacks only on examples earlier ones did not break (faster).", default_of="mode"),
    _setting("--schedule", scan_only=True, type=click.Choice(SCHEDULES),
             help="Step size: fixed 2.5*eps/steps, or from 2*eps halved when the loss stalls "
             "(APGD).", default_of="schedule"),
    _setting("--steps", type=int, help="Attack iterations (harden: of the scans and the "
             "validation).", default_of="steps"),
    _setting("--step-size", help="Step size (the first one, with halving).  [default: 2*eps "
             "with halving, 2.5*eps/steps with fixed]"),
    _setting("--restarts", type=int, help="Random restarts (only still-robust examples "
             "are attacked again).", default_of="restarts"),
    _setting("--temperatures", scan_only=True, help="T-PGD softmax temperatures; the worst "
             "case over them counts.", default_of="temperatures"),
    _setting("--seed", type=int, help="Seed for sampling, random starts and (harden) the "
             "data order.", default_of="seed"),
    _setting("--batch-size", type=int, help="Examples per batch of a scan.  [default: 256, "
             "up to 4096 for small inputs, lowered to what memory holds]"),
    _setting("--device", help="auto, cpu, cuda or cuda:N.", default_of="device"),
    _setting("--amp/--no-amp", scan_only=True, default=None,
             help="bf16 autocast for the attack passes (CUDA, or a CPU with AVX512-BF16/AMX); "
             "breaks are confirmed in fp32.", default_of="amp"),
    _setting("--strict/--no-strict", scan_only=True, default=None,
             help="For CI: exit 4 when no gate policy is set (before the scan), or when a "
             "sanity check finds signs of gradient masking."),
    _setting("--min-class-robust", help="Flag classes whose robust accuracy is below this."),
    _setting("--min-ratio", help="Flag classes below this fraction of the class mean."),
    _setting("--max-gap", help="Flag classes further than this below the best class."),
    _setting("--significance/--no-significance", default=None,
             help="Flag a class only when its whole 95% Wilson interval fails."),
    _setting("--gate-on", help="The figure the gate judges: worst or an attack's name.",
             default_of="gate_on"),
    _setting("--baseline", scan_only=True, help="A saved JSON report: flag classes whose "
             "robust accuracy dropped more than --max-drop below it."),
    _setting("--max-drop", scan_only=True,
             help="Largest allowed drop per class against --baseline, e.g. 0.03."),
    _setting("--sequential/--no-sequential", scan_only=True, default=None,
             help="Attack in seeded rounds and stop each class once a confidence sequence "
             "decides its verdict (--min-class-robust, --max-drop).", default_of="sequential"),
    _setting("--confidence", scan_only=True, help="How sure --sequential is that "
             "each class's verdict is the full scan's.", default_of="confidence"),
    _setting("--json", scan_only=True, help="Write the JSON report here."),
    _setting("--json-images/--no-json-images", scan_only=True, default=None,
             help="Keep the gallery's adversarial images in the JSON report."),
    _setting("--junit", scan_only=True, help="Write a JUnit XML report here."),
    _setting("--html", scan_only=True,
             help="Write the HTML report here (one self-contained file)."),
    _setting("--config", "config_file", type=click.Path(path_type=Path),
             help="Config file of the scan settings.  [default: ./robaudit.toml or "
             "[tool.robaudit] in ./pyproject.toml]"),
    _setting("-v", "--verbose", count=True, help="More output (every class in the table, "
             "tracebacks on internal errors)."),
    _setting("-q", "--quiet", count=True, help="Only the flagged classes, the verdict line, "
             "warnings and errors."),
]


def _settings(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The decorator that adds ``command``'s share of SETTINGS to it."""
    chosen = [option for scan_only, option in SETTINGS if command == "scan" or not scan_only]

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(chosen):  # click lists options in the order decorators run
            function = option(function)
        return function

    return decorate


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@_settings("scan")
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
@click.option("--epochs", type=int, default=10, show_default=True, help="Fine-tuning epochs "
              "(0 with --calibrate: calibration only).")
@click.option("--objective", type=click.Choice(["pgd-at", "trades"]), default="pgd-at",
              show_default=True, help="Adversarial training objective.")
@click.option("--beta", type=float, default=6.0, show_default=True,
              help="TRADES regularisation weight.")
@click.option("--reweight", type=click.Choice(["frl", "cfa", "inverse", "none"]), default="frl",
              show_default=True, help="Class weighting scheme (see README, Hardening).")
@click.option("--class-eps/--no-class-eps", default=None,
              help="Per-class eps: FRL Remargin with frl; always on with cfa.")
@click.option("--lr", type=float, default=5e-5, show_default=True,
              help="Adam learning rate (cosine decay to a tenth).")
@click.option("--train-batch-size", type=int, default=64, show_default=True)
@click.option("--train-steps", type=int, default=7, show_default=True,
              help="PGD steps when making training examples.")
@click.option("--checkpoint", help="Checkpoint file.  [default: OUT.ckpt]")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option("--calibrate", is_flag=True, help="Append a per-class logit bias tuned on the "
              "validation set to raise the worst class.")
@click.option("--max-mean-drop", type=float, default=0.02, show_default=True,
              help="Budget: keep only epochs whose validation class-mean robust accuracy stays "
              "within this of the input model's.")
@click.option("--max-clean-drop", type=float, default=0.01, show_default=True,
              help="Budget: the same for clean accuracy (and what --calibrate may cost).")
@click.option("--ema-decay", type=float, default=0.95, show_default=True,
              help="Moving average of the weights, per step; each epoch hands it back for "
              "validation (0: off).")
@click.option("--json", "json_path", help="Write the JSON harden report here.")
@click.option("--html", help="Write the HTML before/after report here (both scans, per-class "
              "change).")
@_settings("harden")
def harden(model: Path, train_data: str, val_data: str | None, val_fraction: float | None,
           out: str, epochs: int, objective: str, beta: float, reweight: str,
           class_eps: bool | None, lr: float, train_batch_size: int, train_steps: int,
           checkpoint: str | None, resume: bool, calibrate: bool, max_mean_drop: float,
           max_clean_drop: float, ema_decay: float, json_path: str | None, html: str | None,
           config_file: Path | None, verbose: int, quiet: int, **options: Any) -> int:
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
    # Without --val-data, the scan settings' data is the training set the hold-out comes from.
    options["data"] = val_data or train_data
    scan_config = resolve_config({"model": str(model), **options}, config_file=config_file)
    # The harden report replaces the scan's own report files.
    scan_config = dataclasses.replace(scan_config, json=None, junit=None, html=None)
    config = HardenConfig(
        scan=scan_config, train_data=train_data, out=out, val_fraction=val_fraction,
        epochs=epochs, objective=objective, beta=beta, reweight=reweight, class_eps=class_eps,
        lr=lr, train_batch_size=train_batch_size, train_steps=train_steps,
        checkpoint=checkpoint, resume=resume, calibrate=calibrate, max_mean_drop=max_mean_drop,
        max_clean_drop=max_clean_drop, ema_decay=ema_decay, json=json_path, html=html,
    )
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
    seconds of wall time on a loaded 2-core machine (benchmarks/RESULTS.md, issue 14). Nothing
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
