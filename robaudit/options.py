"""The command line's options, declared once: the scan settings that ``scan`` and ``harden``
share (each a :class:`robaudit.config.ScanConfig` field, its default read from there) and
harden's own (each a :class:`robaudit.harden.config.HardenConfig` field). ``cli.py`` holds the
commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from robaudit.choices import MODES, NORMS, PRESETS, SCHEDULES
from robaudit.config import default_text


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


def settings(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The decorator that adds ``command``'s share of SETTINGS to it."""
    chosen = [option for scan_only, option in SETTINGS if command == "scan" or not scan_only]

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(chosen):  # click lists options in the order decorators run
            function = option(function)
        return function

    return decorate


#: harden's own options: each is the HardenConfig field of its name, whose default (and choices:
#: the objectives, the weighting schemes' registry) the option takes from there.
HARDEN_OPTIONS = {
    "--epochs": "Fine-tuning epochs (0 with --calibrate: calibration only).",
    "--objective": "Adversarial training objective.",
    "--beta": "TRADES regularisation weight.",
    "--reweight": "Class weighting scheme (see README, Hardening).",
    "--class-eps/--no-class-eps": "Per-class eps: FRL Remargin with frl; always on with cfa.",
    "--lr": "Adam learning rate (cosine decay to a tenth).",
    "--train-batch-size": "Examples per training batch.",
    "--train-steps": "PGD steps when making training examples.",
    "--ema-decay": "Moving average of the weights, per step; each epoch hands it back for "
                   "validation (0: off).",
    "--checkpoint": "Checkpoint file.  [default: OUT.ckpt]",
    "--resume": "Continue an interrupted run from its checkpoint.",
    "--calibrate": "Append a per-class logit bias tuned on the validation set to raise the "
                   "worst class.",
    "--max-mean-drop": "Budget: keep only epochs whose validation class-mean robust accuracy "
                       "stays within this of the input model's.",
    "--max-clean-drop": "Budget: the same for clean accuracy (and what --calibrate may cost).",
}
HARDEN_FIELDS = [flag.split("/")[0][2:].replace("-", "_") for flag in HARDEN_OPTIONS]


def harden_settings(function: Callable[..., Any]) -> Callable[..., Any]:
    """harden's own options, typed and defaulted from HardenConfig."""
    from dataclasses import fields

    from robaudit.harden.config import OBJECTIVES, HardenConfig
    from robaudit.harden.reweight import SCHEMES

    choices = {"objective": OBJECTIVES, "reweight": tuple(SCHEMES)}
    defaults = {f.name: f.default for f in fields(HardenConfig)}
    for flag, name in reversed(list(zip(HARDEN_OPTIONS, HARDEN_FIELDS, strict=True))):
        default = defaults[name]
        attrs: dict[str, Any] = {"default": default, "help": HARDEN_OPTIONS[flag]}
        if name in choices:
            attrs["type"] = click.Choice(choices[name])
        elif isinstance(default, bool):
            attrs["is_flag"] = "/" not in flag
        elif default is not None:
            attrs["type"] = type(default)
        attrs["show_default"] = default is not None and not isinstance(default, bool)
        function = click.option(flag, name, **attrs)(function)
    return function
