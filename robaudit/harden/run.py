"""The harden pipeline: scan, fine-tune with class weights, keep the best epoch within the
budget, calibrate, write the model back, scan again."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robaudit.attacks.jobs import DEFAULT_BATCH
from robaudit.audit import ScanResult, resolve_device, scan
from robaudit.config import ScanConfig
from robaudit.errors import DataError, ModelOutputError, UsageError
from robaudit.harden.calibrate import Calibration, calibrate
from robaudit.harden.checkpoint import load_checkpoint, model_sha256, save_checkpoint
from robaudit.harden.config import HardenConfig
from robaudit.harden.export import check_exportable, write_model
from robaudit.harden.holdout import hold_out, holdout_path, minimum_per_class, write_holdout
from robaudit.harden.judge import from_scan, judge_weights
from robaudit.harden.reweight import Feedback, Scheme, make_scheme
from robaudit.harden.state import CRITERION, Budget, Candidate, RunState, mean_noise, noise
from robaudit.harden.train import (
    Diverged,
    Split,
    Validation,
    load_split,
    train_epoch,
)
from robaudit.models import LoadedModel, load_model
from robaudit.reports import atomic_write, check_outputs
from robaudit.reports.json import to_dict as scan_to_dict

SCHEMA = "robaudit.harden"
SCHEMA_VERSION = 3

Report = Callable[["HardenProgress"], None]
#: Judges the weights the module holds now, as the gate judges (robaudit.harden.judge).
Assess = Callable[[], Validation]


@dataclass(frozen=True)
class HardenProgress:
    """A progress report: what is happening, and during training where and how it goes."""

    stage: str
    epoch: int = 0
    epochs: int = 0
    batch: int = 0
    batches: int = 0
    loss: float | None = None
    worst_class: str | None = None
    worst_robust: float | None = None


@dataclass
class Prepared:
    """The data of a run: what it trains on, what it validates on, and the scan settings of the
    before/after scans (on the hold-out file when harden holds out its own validation set)."""

    train: Split
    val: Split
    scan: ScanConfig
    holdout: dict[str, Any] | None = None


@dataclass
class HardenResult:
    """What ``harden`` did: the scans before and after, every epoch, and what was kept."""

    config: HardenConfig
    before: ScanResult
    after: ScanResult
    run: RunState
    calibration: Calibration | None
    runtime_max_abs_diff: float | None
    timings: dict[str, float]
    holdout: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    resumed_from: int | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="seconds"))

    @property
    def kept_epoch(self) -> int:
        return self.run.best.epoch

    @property
    def exit_code(self) -> int:
        """0 when the hardened model passes the scan's gate, 1 when classes are still flagged."""
        return int(self.after.exit_code)


def harden(config: HardenConfig, *, progress: Report | None = None) -> HardenResult:
    """Fine-tune ``config.scan.model`` so that its weakest classes catch up; see the README."""
    started = time.perf_counter()
    report = progress or (lambda _p: None)
    sc = config.scan
    check_paths(config)
    device = resolve_device(sc.device)
    torch.manual_seed(sc.seed)

    report(HardenProgress("loading"))
    loaded = load_model(sc.model, arch=sc.arch, num_classes=sc.num_classes, mean=sc.mean,
                        std=sc.std, device=device)
    check_exportable(loaded, config.calibrate)
    data = _prepare(config, device)
    _check_fit(loaded.module, data.train, data.val)
    # A checkpoint that cannot be resumed is refused before the scan, not after it.
    resumed = (load_checkpoint(config.checkpoint_path, _identity(config),
                               loaded.module.state_dict()) if config.resume else None)

    report(HardenProgress("scanning the model as given"))
    before = scan(data.scan)
    scanned = time.perf_counter()

    module = loaded.module
    for p in module.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    scheme = make_scheme(config, len(data.val.class_names))
    run, resumed_from = _start(config, resumed, module, optimizer, scheme, before)
    assess = partial(judge_weights, loaded, module, data.scan)
    for epoch in range(run.epoch + 1, config.epochs + 1):
        try:
            _run_epoch(config, epoch, module, optimizer, scheme, run, data.train, assess,
                       report)
        except Diverged as exc:
            raise _diverged(config, loaded, run, data.val, exc) from None
        _save(config, module, optimizer, scheme, run)
    trained = time.perf_counter()

    module.load_state_dict(run.best.state)
    calibration = None
    if config.calibrate:
        report(HardenProgress("calibrating", config.epochs, config.epochs))
        calibration = calibrate(module, data.val, sc, config.max_clean_drop)
    report(HardenProgress("writing the hardened model"))
    out = Path(config.out)
    diff = write_model(loaded, out, data.val.x[: sc.batch_size or DEFAULT_BATCH],
                       None if calibration is None else calibration.bias)
    _write_weights(config, run, calibration, data.val.class_names)

    report(HardenProgress("scanning the hardened model"))
    after = scan(replace(data.scan, model=str(out)))
    timings = {"before_scan_s": scanned - started, "fit_s": trained - scanned,
               **_epoch_seconds(run), "after_s": time.perf_counter() - trained,
               "total_s": time.perf_counter() - started}
    return HardenResult(config=config, before=before, after=after, run=run,
                        calibration=calibration, runtime_max_abs_diff=diff, timings=timings,
                        holdout=data.holdout, warnings=_warnings(config, run),
                        resumed_from=resumed_from)


def check_paths(config: HardenConfig, config_file: str | Path | None = None) -> None:
    """UsageError, before any work, when a file the run writes would replace one it reads
    (``config_file``: the scan settings' file, if any) or another file it writes."""
    sc = config.scan
    holdout = None if config.val_fraction is None else holdout_path(config.out)
    outputs = [("--out", config.out),
               ("--checkpoint" if config.checkpoint else "the checkpoint", config.checkpoint_path),
               ("the class weights file", config.weights_path), ("the hold-out file", holdout),
               ("--json", config.json), ("--html", config.html)]
    validation = sc.data if config.val_fraction is None else None
    inputs = [("model", sc.model), ("training data", config.train_data),
              ("validation data", validation), ("class names", sc.class_names),
              ("config", config_file)]
    check_outputs(outputs, inputs, "this harden run reads")


def _prepare(config: HardenConfig, device: torch.device) -> Prepared:
    sc = config.scan
    train = load_split(config.train_data, sc, split="train")
    if config.val_fraction is None:
        val = load_split(sc.data, sc, split=sc.split)
        return Prepared(_to(train, device), _to(val, device), sc)
    minimum = minimum_per_class(len(train.class_names), config.max_mean_drop)
    train, val = hold_out(train, config.val_fraction, sc.seed, minimum)
    if len(val.y) == 0:
        raise DataError(f"{config.train_data} has too few examples per class to hold any out "
                        "for validation; pass --val-data")
    path = holdout_path(config.out)
    write_holdout(path, val)
    # The hold-out file holds exactly the selected, resized examples: the scans take them all.
    scan_config = replace(sc, data=str(path), per_class=None, limit=None, image_size=None,
                          class_names=None)
    info = {"fraction": config.val_fraction, "minimum_per_class": min(minimum, 2**31 - 1),
            "seed": sc.seed, "file": str(path), "held_out": len(val.y),
            "trained_on": len(train.y)}
    return Prepared(_to(train, device), _to(val, device), scan_config, info)


def _start(config: HardenConfig, state: dict[str, Any] | None, module: nn.Module,
           optimizer: torch.optim.Optimizer, scheme: Scheme,
           before: ScanResult) -> tuple[RunState, int | None]:
    """The run state: read back from the checkpoint ``state`` (``--resume``), else epoch 0 (the
    input model, whose scan on the validation data sets the budget)."""
    if state is not None:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheme.load_state_dict(state["scheme"])
        torch.set_rng_state(state["rng"])
        run = RunState.from_checkpoint(state)
        return run, run.epoch
    base = from_scan(before)
    scheme.update(Feedback(base.clean, base.robust, bars=base.bars, passed=base.passed))
    names = list(before.class_names)
    budget = Budget.around(base, config.max_mean_drop, config.max_clean_drop, names)
    run = RunState(0, budget, Candidate(0, _clone(module.state_dict()), base),
                   [{"epoch": 0, "validation": base.to_dict(), "within_budget": True}], names)
    if config.ema_decay > 0 and not scheme.averages:
        run.ema = _clone(module.state_dict())  # the average starts at the input model
    _save(config, module, optimizer, scheme, run)
    return run, None


def _run_epoch(config: HardenConfig, epoch: int, module: nn.Module,
               optimizer: torch.optim.Optimizer, scheme: Scheme, run: RunState, train: Split,
               assess: Assess, report: Report) -> None:
    sc = config.scan
    settings = scheme.settings()
    # Cosine decay to a tenth, a function of the epoch alone, so resuming needs no scheduler.
    lr = config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs)))
    for group in optimizer.param_groups:
        group["lr"] = lr

    def on_batch(batch: int, batches: int, loss: float) -> None:
        report(HardenProgress("training", epoch, config.epochs, batch, batches, loss))

    began = time.perf_counter()
    stats = train_epoch(module, optimizer, train, settings, objective=config.objective,
                        steps=config.train_steps, batch_size=config.train_batch_size,
                        seed=sc.seed, epoch=epoch, on_batch=on_batch, ema=run.ema or None,
                        ema_decay=config.ema_decay)
    fitted = time.perf_counter()
    report(HardenProgress("validating", epoch, config.epochs, loss=stats.loss))
    candidate, current, notes = _judge_epoch(epoch, module, scheme, run, assess)
    scheme.update(Feedback(current.clean, current.robust, stats.train_robust, current.bars,
                             current.passed))
    base = run.base
    refused = run.budget.refusals(candidate.validation, run.class_names, base)
    within = run.offer(candidate, refused)
    run.history.append({
        "epoch": epoch, "lr": lr, "loss": stats.loss, "settings": settings.to_dict(),
        "train_robust": stats.train_robust, "validation": current.to_dict(), **notes,
        "within_budget": within, "refused": refused,
        **_against_input(candidate.validation, base),
        "train_s": fitted - began,
        "validate_s": time.perf_counter() - fitted,
    })
    run.epoch = epoch
    report(HardenProgress("trained", epoch, config.epochs, loss=stats.loss,
                          worst_class=current.worst_class, worst_robust=current.worst_robust))


def _judge_epoch(epoch: int, module: nn.Module, scheme: Scheme, run: RunState,
                 assess: Assess) -> tuple[Candidate, Validation, dict[str, Any]]:
    """The epoch's candidate, the figures the scheme learns from, and the notes for its record:
    the moving average of the weights when it is on, else the module's own weights or the
    scheme's average of them (cfa)."""
    if run.ema:
        current = _judge_state(module, run.ema, assess)
        return Candidate(epoch, _clone(run.ema), current), current, {"ema": True}
    current = assess()
    notes = scheme.hand_back(module, current.worst_robust)
    averaged = notes.pop("averaged", None)
    candidate = Candidate(epoch, _clone(module.state_dict()), current)
    if averaged is not None:  # the scheme hands back averaged weights: they are the candidate
        candidate = Candidate(epoch, _clone(averaged), _judge_state(module, averaged, assess))
        notes["averaged_validation"] = candidate.validation.to_dict()
    return candidate, current, notes


def _diverged(config: HardenConfig, loaded: LoadedModel, run: RunState, val: Split,
              exc: Diverged) -> UsageError:
    """Stop a run whose training diverged: write the best epoch before it, if one was kept
    (the checkpoint stays at the last finished epoch)."""
    cause = f"{exc} with --lr {config.lr:g}; pass a smaller --lr"
    if run.best.epoch == 0:
        return UsageError(f"{cause}; no epoch before it was kept, so {config.out} was not "
                          "written")
    loaded.module.load_state_dict(run.best.state)
    write_model(loaded, Path(config.out), val.x[: config.scan.batch_size or DEFAULT_BATCH], None)
    return UsageError(f"{cause}; the best epoch before it (epoch {run.best.epoch}) was written "
                      f"to {config.out}")


def _judge_state(module: nn.Module, state: dict[str, torch.Tensor],
                 assess: Assess) -> Validation:
    """Judge other weights in ``module``, then put its own back."""
    own = _clone(module.state_dict())
    module.load_state_dict(state)
    try:
        return assess()
    finally:
        module.load_state_dict(own)


def _epoch_seconds(run: RunState) -> dict[str, float]:
    """Training and validation time of the epochs, apart (resumed epochs included)."""
    epochs = [h for h in run.history if "train_s" in h]
    return {"train_s": sum(h["train_s"] for h in epochs),
            "validate_s": sum(h["validate_s"] for h in epochs)}


def _warnings(config: HardenConfig, run: RunState) -> list[str]:
    """What a user should know about a run that changed less than asked."""
    found = []
    if config.epochs > 0 and run.best.epoch == 0:
        found.append(f"the input model is kept: {_why_kept(run)}; {_what_next(config, run)}")
        if config.reweight == "cfa":
            found.append(
                "cfa gives the least robust classes the smallest eps (its calibrated margin) and "
                "averages the weights of epochs: in a short fine-tune of a model that is already "
                "adversarially trained this seldom lifts the weakest class; gate and frl weight "
                "it up"
            )
    joined = [h for h in run.history if h.get("fawa_joined")]
    if config.reweight == "cfa" and config.epochs > 0 and not joined:
        threshold = run.history[-1].get("fawa_threshold", 0.0)
        found.append(
            f"cfa: no epoch's worst validation class reached {threshold:.1%}, so its weight "
            "averaging (FAWA) never started; each epoch's own weights were judged"
        )
    return found


def _what_next(config: HardenConfig, run: RunState) -> str:
    """Which way to turn --lr: up when no epoch left the noise, down when every one broke the
    budget."""
    epochs = run.history[1:]
    if epochs and not any(h.get("refused") for h in epochs):
        return (f"the model moved too little: a larger --lr (this run: {config.lr:g}) or more "
                "--epochs may move it beyond the noise")
    if epochs and all(h.get("refused") for h in epochs):
        return (f"every epoch broke the budget: a smaller --lr (this run: {config.lr:g}) may "
                "keep within it")
    return "more --epochs, another --lr or a larger budget may find one"


def _why_kept(run: RunState) -> str:
    """Why no epoch displaced the input model: each epoch's refusal, or its gain against the
    noise."""
    reasons = []
    for h in run.history[1:]:
        if h.get("refused"):
            reasons.append(f"epoch {h['epoch']}: {'; '.join(h['refused'])}")
        else:
            reasons.append(f"epoch {h['epoch']}: worst class {h['gain'] * 100:+.1f} pp"
                           f"{_mean_part(h)}, not beyond the noise ({h['noise'] * 100:.1f} pp)")
    return "no epoch lifted the weakest validation class beyond the noise within the budget " \
        f"({'; '.join(reasons) or 'no epoch ran'})"


def _mean_part(h: dict[str, Any]) -> str:
    """The class mean's gain and noise, where the epoch was paired with the input model."""
    if h.get("mean_noise") is None:
        return ""
    return f", class mean {h['mean_gain'] * 100:+.1f} pp ({h['mean_noise'] * 100:.1f} pp)"


def _against_input(v: Validation, base: Validation) -> dict[str, float | None]:
    """An epoch's gains over the input model on validation and their noise (paired over the
    examples when both carry their outcomes; the class mean's noise is None otherwise)."""
    spread = mean_noise(v, base)
    return {"gain": v.worst_robust - base.worst_robust, "noise": noise(v, base),
            "mean_gain": v.mean_robust - base.mean_robust,
            "mean_noise": None if math.isinf(spread) else spread}


def _save(config: HardenConfig, module: nn.Module, optimizer: torch.optim.Optimizer,
          scheme: Scheme, run: RunState) -> None:
    save_checkpoint(config.checkpoint_path, {
        "identity": _identity(config), "model": module.state_dict(),
        "optimizer": optimizer.state_dict(), "scheme": scheme.state_dict(),
        "rng": torch.get_rng_state(), **run.to_checkpoint(),
    })


def _identity(config: HardenConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one."""
    sc = config.scan
    fields = {k: v for k, v in config.to_dict().items()
              if k not in ("scan", "out", "resume", "checkpoint", "calibrate", "json", "html")}
    for key in ("model", "data", "eps", "steps", "step_size", "restarts", "seed", "per_class",
                "limit", "mean", "std", "batch_size"):
        value = getattr(sc, key)
        fields[f"scan.{key}"] = list(value) if isinstance(value, tuple) else value
    fields["model_sha256"] = model_sha256(sc.model)
    return fields


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _to(split: Split, device: torch.device) -> Split:
    return replace(split, x=split.x.to(device), y=split.y.to(device))


def _check_fit(module: nn.Module, train: Split, val: Split) -> None:
    if train.class_names != val.class_names:
        raise DataError(
            f"the training data has classes {train.class_names[:10]} but the validation data "
            f"has {val.class_names[:10]}; use data sets with the same classes"
        )
    if train.x.shape[1:] != val.x.shape[1:]:
        raise DataError(f"training images are {tuple(train.x.shape[1:])} but validation images "
                        f"are {tuple(val.x.shape[1:])}; pass --image-size")
    with torch.no_grad():
        out = module(val.x[:2])
    if out.ndim != 2 or out.shape[1] != len(val.class_names):
        raise ModelOutputError(
            f"the model gives outputs of shape {tuple(out.shape)} for {len(val.class_names)} "
            "classes; harden needs logits of shape (batch, classes)"
        )


def _write_weights(config: HardenConfig, run: RunState, calibration: Calibration | None,
                   class_names: list[str]) -> None:
    doc = {
        "schema": "robaudit.harden.class_weights",
        "reweight": config.reweight,
        "objective": config.objective,
        "class_names": class_names,
        "kept_epoch": run.best.epoch,
        "epochs": [{"epoch": h["epoch"], **h["settings"]} for h in run.history
                   if "settings" in h],
        "calibration_bias": None if calibration is None else calibration.bias,
    }
    atomic_write(config.weights_path, (json.dumps(doc, indent=2) + "\n").encode())


def to_dict(result: HardenResult) -> dict[str, Any]:
    """The harden report (schema ``robaudit.harden`` version 2), with both scan reports."""
    before, after = scan_to_dict(result.before), scan_to_dict(result.after)
    config, run = result.config, result.run
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": result.created,
        "config": config.to_dict(),
        "model": {"input": config.scan.model, "output": config.out,
                  "format": after["model"]["format"], "class_weights": str(config.weights_path),
                  "runtime_max_abs_diff": result.runtime_max_abs_diff},
        "validation": {"data": after["data"]["spec"], "holdout": result.holdout},
        "kept": {"epoch": run.best.epoch, "criterion": CRITERION,
                 "validation": run.best.validation.to_dict(), "budget": run.budget.to_dict(),
                 "within_budget": run.within_budget},
        "resumed_from": result.resumed_from,
        "history": run.history,
        "calibration": None if result.calibration is None else result.calibration.to_dict(),
        "classes": _class_changes(before, after),
        "verdict": after["verdict"],
        "warnings": result.warnings,
        "timings": result.timings,
        "before": before,
        "after": after,
    }


def _class_changes(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """Per class, both scans' figures, the gated figure's interval and the gate's verdict."""
    classes = []
    for b, a in zip(before["classes"], after["classes"], strict=True):
        classes.append({
            "name": b["name"], "n": b["n"],
            "before": _class_side(b), "after": _class_side(a),
            "passed": a["verdict"]["passed"],
        })
    return classes


def _class_side(c: dict[str, Any]) -> dict[str, Any]:
    return {"clean": c["clean"]["acc"], "robust": {k: v["acc"] for k, v in c["robust"].items()},
            "ci95": c["robust"].get("worst", {}).get("ci95"), "verdict": c["verdict"]["status"]}
