"""The harden pipeline: scan, fine-tune with class weights, keep the best epoch, calibrate,
write the model back, scan again."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robaudit.attacks.engine import DEFAULT_BATCH
from robaudit.audit import ScanResult, resolve_device, scan
from robaudit.errors import DataError, ModelOutputError
from robaudit.harden.calibrate import Calibration, calibrate
from robaudit.harden.checkpoint import load_checkpoint, save_checkpoint
from robaudit.harden.config import HardenConfig
from robaudit.harden.export import check_exportable, write_model
from robaudit.harden.reweight import Feedback, make_scheme
from robaudit.harden.train import Split, Validation, average_into, load_split, train_epoch, validate
from robaudit.models import load_model
from robaudit.reports import atomic_write
from robaudit.reports.json import exit_code
from robaudit.reports.json import to_dict as scan_to_dict

SCHEMA = "robaudit.harden"
SCHEMA_VERSION = 1
#: The rule by which the kept checkpoint is chosen, as reports state it.
CRITERION = "mean + worst-class PGD robust accuracy on the validation set"


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
class HardenResult:
    """What ``harden`` did: the scans before and after, every epoch, and what was kept."""

    config: HardenConfig
    before: ScanResult
    after: ScanResult
    history: list[dict[str, Any]]
    kept_epoch: int
    kept_validation: dict[str, Any]
    calibration: Calibration | None
    runtime_max_abs_diff: float | None
    timings: dict[str, float]
    resumed_from: int | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="seconds"))

    @property
    def exit_code(self) -> int:
        """0 when the hardened model passes the scan's gate, 1 when classes are still flagged."""
        return int(exit_code(self.after))


def harden(config: HardenConfig, *,
           progress: Callable[[HardenProgress], None] | None = None) -> HardenResult:
    """Fine-tune ``config.scan.model`` so that its weakest classes catch up; see the README."""
    started = time.perf_counter()
    report = progress or (lambda _p: None)
    sc = config.scan
    device = resolve_device(sc.device)
    torch.manual_seed(sc.seed)

    report(HardenProgress("loading"))
    loaded = load_model(sc.model, arch=sc.arch, num_classes=sc.num_classes, mean=sc.mean,
                        std=sc.std, device=device)
    check_exportable(loaded, config.calibrate)
    train = _to(load_split(config.train_data, sc, split="train"), device)
    val = _to(load_split(sc.data, sc, split=sc.split), device)
    _check_fit(loaded.module, train, val)

    report(HardenProgress("scanning the model as given"))
    before = scan(sc)
    scanned = time.perf_counter()

    module = loaded.module
    for p in module.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    scheme = make_scheme(config, len(val.class_names))
    identity = _identity(config)
    path = config.checkpoint_path
    resumed_from: int | None = None
    if config.resume:
        state = load_checkpoint(path, identity)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheme.load_state_dict(state["scheme"])
        torch.set_rng_state(state["rng"])
        average, best, history = state["average"], state["best"], state["history"]
        start = resumed_from = int(state["epoch"])
    else:
        report(HardenProgress("validating the model as given", 0, config.epochs))
        base = validate(module, val, sc)
        scheme.update(Feedback(base.clean, base.robust))
        average = _clone(module.state_dict()) if config.reweight == "cfa" else {}
        best = {"epoch": 0, "score": base.score, "state": _clone(module.state_dict()),
                "validation": base.to_dict()}
        history = [{"epoch": 0, "validation": base.to_dict()}]
        start = 0
        _save(path, identity, 0, module, optimizer, scheme, average, best, history)

    for epoch in range(start + 1, config.epochs + 1):
        record = _run_epoch(config, epoch, module, optimizer, scheme, average, train, val, report)
        candidate = record.pop("_candidate")
        if record["kept_score"] > best["score"]:
            best = {"epoch": epoch, "score": record["kept_score"], "state": candidate,
                    "validation": record["kept_validation"]}
        history.append(record)
        _save(path, identity, epoch, module, optimizer, scheme, average, best, history)
        report(HardenProgress("trained", epoch, config.epochs, loss=record["loss"],
                              worst_class=record["validation"]["worst_class"],
                              worst_robust=record["validation"]["worst_robust"]))
    trained = time.perf_counter()

    module.load_state_dict(best["state"])
    calibration = None
    if config.calibrate:
        report(HardenProgress("calibrating", config.epochs, config.epochs))
        calibration = calibrate(module, val, sc, config.max_clean_drop)
    report(HardenProgress("writing the hardened model"))
    out = Path(config.out)
    diff = write_model(loaded, out, val.x[: sc.batch_size or DEFAULT_BATCH],
                       None if calibration is None else calibration.bias)
    _write_weights(config, history, best["epoch"], calibration, val.class_names)

    report(HardenProgress("scanning the hardened model"))
    after = scan(replace(sc, model=str(out)))
    return HardenResult(
        config=config, before=before, after=after, history=history, kept_epoch=best["epoch"],
        kept_validation=best["validation"], calibration=calibration,
        runtime_max_abs_diff=diff, resumed_from=resumed_from,
        timings={"before_scan_s": scanned - started, "train_s": trained - scanned,
                 "after_s": time.perf_counter() - trained,
                 "total_s": time.perf_counter() - started},
    )


def _run_epoch(config: HardenConfig, epoch: int, module: nn.Module,
               optimizer: torch.optim.Optimizer, scheme: Any, average: dict[str, torch.Tensor],
               train: Split, val: Split,
               report: Callable[[HardenProgress], None]) -> dict[str, Any]:
    sc = config.scan
    settings = scheme.settings()
    # Cosine decay to a tenth, a function of the epoch alone, so resuming needs no scheduler.
    lr = config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs)))
    for group in optimizer.param_groups:
        group["lr"] = lr

    def on_batch(batch: int, batches: int, loss: float) -> None:
        report(HardenProgress("training", epoch, config.epochs, batch, batches, loss))

    stats = train_epoch(module, optimizer, train, settings, objective=config.objective,
                        steps=config.train_steps, batch_size=config.train_batch_size,
                        seed=sc.seed, epoch=epoch, on_batch=on_batch)
    report(HardenProgress("validating", epoch, config.epochs, loss=stats.loss))
    current = validate(module, val, sc)
    record: dict[str, Any] = {"epoch": epoch, "lr": lr, "loss": stats.loss,
                              "settings": settings.to_dict(), "train_robust": stats.train_robust,
                              "validation": current.to_dict()}
    kept: Validation = current
    candidate = _clone(module.state_dict())
    if config.reweight == "cfa":
        # FAWA: only a model whose worst class clears the threshold joins the average, and the
        # average is what CFA hands back, so it is the candidate for keeping.
        joined = current.worst_robust >= config.cfa_threshold
        if joined:
            average_into(average, module, config.cfa_decay)
        own = candidate
        module.load_state_dict(average)
        kept = validate(module, val, sc)
        candidate = _clone(average)
        module.load_state_dict(own)
        record["fawa_joined"] = joined
        record["averaged_validation"] = kept.to_dict()
    scheme.update(Feedback(current.clean, current.robust, stats.train_robust))
    record["kept_score"] = kept.score
    record["kept_validation"] = kept.to_dict()
    record["_candidate"] = candidate
    return record


def _save(path: Path, identity: dict[str, Any], epoch: int, module: nn.Module,
          optimizer: torch.optim.Optimizer, scheme: Any, average: dict[str, torch.Tensor],
          best: dict[str, Any], history: list[dict[str, Any]]) -> None:
    save_checkpoint(path, {
        "identity": identity, "epoch": epoch, "model": module.state_dict(),
        "optimizer": optimizer.state_dict(), "scheme": scheme.state_dict(), "average": average,
        "best": best, "history": history, "rng": torch.get_rng_state(),
    })


def _identity(config: HardenConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one."""
    sc = config.scan
    fields = {k: v for k, v in config.to_dict().items()
              if k not in ("scan", "out", "resume", "checkpoint", "calibrate", "max_clean_drop",
                           "json", "html")}
    for key in ("model", "data", "eps", "steps", "step_size", "restarts", "seed", "per_class",
                "limit", "mean", "std", "batch_size"):
        value = getattr(sc, key)
        fields[f"scan.{key}"] = list(value) if isinstance(value, tuple) else value
    return fields


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _to(split: Split, device: torch.device) -> Split:
    return Split(split.x.to(device), split.y.to(device), split.index, split.class_names)


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


def _write_weights(config: HardenConfig, history: list[dict[str, Any]], kept: int,
                   calibration: Calibration | None, class_names: list[str]) -> None:
    doc = {
        "schema": "robaudit.harden.class_weights",
        "reweight": config.reweight,
        "objective": config.objective,
        "class_names": class_names,
        "kept_epoch": kept,
        "epochs": [{"epoch": h["epoch"], **h["settings"]} for h in history if "settings" in h],
        "calibration_bias": None if calibration is None else calibration.bias,
    }
    atomic_write(config.weights_path, (json.dumps(doc, indent=2) + "\n").encode())


def to_dict(result: HardenResult) -> dict[str, Any]:
    """The harden report (schema ``robaudit.harden`` version 1), with both scan reports."""
    before, after = scan_to_dict(result.before), scan_to_dict(result.after)
    classes = []
    for b, a in zip(before["classes"], after["classes"], strict=True):
        classes.append({
            "name": b["name"], "n": b["n"],
            "before": {"clean": b["clean"]["acc"],
                       "robust": {k: v["acc"] for k, v in b["robust"].items()}},
            "after": {"clean": a["clean"]["acc"],
                      "robust": {k: v["acc"] for k, v in a["robust"].items()}},
            "passed": a["verdict"]["passed"],
        })
    config = result.config
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": result.created,
        "config": config.to_dict(),
        "model": {"input": config.scan.model, "output": config.out,
                  "format": after["model"]["format"], "class_weights": str(config.weights_path),
                  "runtime_max_abs_diff": result.runtime_max_abs_diff},
        "kept": {"epoch": result.kept_epoch, "criterion": CRITERION,
                 "validation": result.kept_validation},
        "resumed_from": result.resumed_from,
        "history": [{k: v for k, v in h.items() if k != "_candidate"} for h in result.history],
        "calibration": None if result.calibration is None else result.calibration.to_dict(),
        "classes": classes,
        "verdict": after["verdict"],
        "timings": result.timings,
        "before": before,
        "after": after,
    }

