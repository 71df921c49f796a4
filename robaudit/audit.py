"""The scan pipeline: load -> attack -> measure -> judge, returning a :class:`ScanResult`.

What the CLI, ``harden`` and the pytest plugin all call. It prints nothing and never exits; progress
goes to an optional callback, problems that do not stop the scan go to ``ScanResult.warnings``.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import numpy as np
import torch

from robaudit import __version__
from robaudit.attacks import AttackSettings, build_attacks
from robaudit.attacks.engine import BatchAudit, audit_batch
from robaudit.attacks.losses import margin
from robaudit.config import ScanConfig
from robaudit.data import DataSource, iter_batches, load_data, select_indices
from robaudit.errors import ConfigError, DataError, ModelOutputError, NothingToAudit
from robaudit.gate import GatePolicy, Verdict, judge
from robaudit.metrics import ClassStats, Records, Summary, class_stats, confusion, summarize
from robaudit.models import LoadedModel, load_model, verify_runtime

#: Examples beyond which a single disagreement between torch and onnxruntime is only a warning.
RUNTIME_AGREEMENT_WARN = 0.01


@dataclass(frozen=True)
class Progress:
    """A progress report: ``done`` of ``total`` examples audited, and what is happening."""

    stage: str
    done: int
    total: int


@dataclass
class ScanResult:
    """Everything a scan found. Reports are rendered from its JSON form."""

    config: ScanConfig
    class_names: list[str]
    stats: list[ClassStats]
    summary: Summary
    verdicts: list[Verdict]
    #: Adversarial confusion per attack: row = true class, column = predicted class.
    confusion: dict[str, list[list[int]]]
    model: dict[str, Any]
    data: dict[str, Any]
    environment: dict[str, Any]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    #: True when the scan was interrupted: figures cover the examples audited so far.
    partial: bool = False
    created: str = ""

    @property
    def flagged(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.passed]


def resolve_device(name: str) -> torch.device:
    """``auto`` means the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; "
                          "use --device cpu or auto")
    return device


def scan(
    config: ScanConfig, *, progress: Callable[[Progress], None] | None = None
) -> ScanResult:
    """Audit ``config.model`` on ``config.data``.

    Ctrl-C (``KeyboardInterrupt``) during the attacks does not lose the work done: the result
    covers the batches finished so far and has ``partial=True``.
    """
    started = time.perf_counter()
    report = progress or (lambda _p: None)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)

    report(Progress("loading data", 0, 0))
    source = load_data(
        config.data, root=config.data_root, download=config.download, split=config.split,
        class_names_file=config.class_names, image_size=config.image_size,
    )
    indices = _select(source, config)
    report(Progress("loading model", 0, len(indices)))
    model = load_model(
        config.model, arch=config.arch, num_classes=config.num_classes,
        mean=config.mean, std=config.std, device=device,
    )
    loaded = time.perf_counter()

    settings = AttackSettings(
        eps=config.eps, steps=config.steps, step_size=config.step_size,
        restarts=config.restarts, temperatures=config.temperatures,
    )
    attacks = build_attacks(config.attacks, settings)
    records = Records(attack_names=list(config.attacks))
    warnings: list[str] = []
    attack_seconds = dict.fromkeys(config.attacks, 0.0)
    runtime_diff: float | None = None
    partial = False
    checked = False
    module = model.module
    was_training = module.training
    module.eval()
    try:
        for x, y, idx in iter_batches(source, indices, config.batch_size):
            x, y = x.to(device), y.to(device)
            if not checked:
                _check_outputs(module, x, len(source.class_names), warnings)
                if config.runtime_check:
                    runtime_diff = verify_runtime(model, x.cpu())
                checked = True
            seeds = idx.to(torch.int64) + config.seed * (1 << 32)
            batch = audit_batch(module, attacks, x, y, seeds, seconds=attack_seconds)
            _record(records, batch, idx, model if config.runtime_check else None)
            report(Progress("attacking", len(records), len(indices)))
    except KeyboardInterrupt:
        partial = True
    finally:
        module.train(was_training)
    finished = time.perf_counter()

    if len(records) == 0:
        if partial:
            raise KeyboardInterrupt
        raise NothingToAudit("nothing to audit: no examples were selected")
    stats = class_stats(records, source.class_names)
    summary = summarize(records, stats)
    policy = GatePolicy(
        min_class_robust=config.min_class_robust, min_ratio=config.min_ratio,
        max_gap=config.max_gap, significance=config.significance, on=config.gate_on,
    )
    verdicts = judge(stats, policy)
    warnings.extend(_sanity_warnings(summary, config))
    return ScanResult(
        config=config,
        class_names=list(source.class_names),
        stats=stats,
        summary=summary,
        verdicts=verdicts,
        confusion={a: confusion(records, len(source.class_names), a) for a in config.attacks},
        model={
            "path": str(model.path),
            "format": model.format,
            "description": model.description,
            "runtime_max_abs_diff": runtime_diff,
        },
        data={
            "spec": config.data,
            "description": source.description,
            "size": len(source.targets),
            "selected": len(indices),
            "audited": len(records),
        },
        environment=environment(device),
        timings={
            "load_s": loaded - started,
            "attack_s": finished - loaded,
            "total_s": time.perf_counter() - started,
            **{f"{a}_s": s for a, s in attack_seconds.items()},
        },
        warnings=warnings,
        partial=partial,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _select(source: DataSource, config: ScanConfig) -> np.ndarray:
    targets = np.asarray(source.targets)
    if config.classes:
        unknown = [c for c in config.classes if c not in source.class_names]
        if unknown:
            raise ConfigError(
                f"--classes names {', '.join(unknown)}, which the data set does not have; "
                f"its classes are: {', '.join(source.class_names[:20])}"
            )
        wanted = [source.class_names.index(c) for c in config.classes]
        keep = np.flatnonzero(np.isin(targets, wanted))
        if keep.size == 0:
            raise NothingToAudit(
                f"nothing to audit: the data set has no examples of {', '.join(config.classes)}"
            )
        chosen = select_indices(targets[keep], per_class=config.per_class,
                                limit=config.limit, seed=config.seed)
        return keep[chosen]
    return select_indices(targets, per_class=config.per_class, limit=config.limit,
                          seed=config.seed)


def _check_outputs(module: torch.nn.Module, x: torch.Tensor, num_classes: int,
                   warnings: list[str]) -> None:
    """Refuse outputs that cannot be audited; warn about probabilities (attacks want logits)."""
    try:
        with torch.no_grad():
            out = module(x)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"the model cannot run on the data's inputs of shape {tuple(x.shape[1:])}: {first}. "
            "Check --image-size, the channel count, and that the model matches the data set"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelOutputError(
            f"the model's output has shape {shape}; robaudit needs logits of shape "
            "(batch, classes). Export the model so it returns one logits tensor"
        )
    if out.shape[1] != num_classes:
        raise ModelOutputError(
            f"the model outputs {out.shape[1]} classes but the data set has {num_classes}; "
            "pass the matching data set or --class-names"
        )
    if not torch.isfinite(out).all():
        raise ModelOutputError(
            "the model's outputs contain NaN or inf on real inputs; check the model and "
            "the input range (robaudit feeds pixels in [0, 1]: use --mean/--std to normalise)"
        )
    if bool((out >= 0).all()) and torch.allclose(out.sum(dim=1), torch.ones(out.shape[0],
                                                                             device=out.device),
                                                 atol=1e-3):
        warnings.append(
            "the model's outputs look like probabilities (non-negative rows summing to 1); "
            "attacks need logits, so robust accuracy may be overestimated: export the model "
            "without its final softmax"
        )


def _record(records: Records, batch: BatchAudit, idx: torch.Tensor,
            model: LoadedModel | None) -> None:
    y = batch.y
    records.index.append(idx.numpy())
    records.y.append(y.cpu().numpy())
    records.clean_pred.append(batch.clean_logits.argmax(dim=1).cpu().numpy())
    records.clean_margin.append(margin(batch.clean_logits, y).cpu().numpy())
    for name, outcome in batch.outcomes.items():
        records.adv_pred.setdefault(name, []).append(outcome.pred.cpu().numpy())
        records.adv_margin.setdefault(name, []).append(outcome.margin(y).cpu().numpy())
        records.forwards.setdefault(name, []).append(outcome.forwards.cpu().numpy())
        records.bad_gradient.setdefault(name, []).append(outcome.bad_gradient.cpu().numpy())
    if model is not None and model.runtime is not None:
        # The deployed runtime sees the same adversarial inputs: does it agree they break?
        # x_adv of an example that was not attacked is its clean input.
        records.runtime_clean_pred.append(model.runtime(batch.x.cpu()).argmax(dim=1).numpy())
        for name, outcome in batch.outcomes.items():
            pred = model.runtime(outcome.x_adv.cpu()).argmax(dim=1).numpy()
            records.runtime_pred.setdefault(name, []).append(pred)


def _sanity_warnings(summary: Summary, config: ScanConfig) -> list[str]:
    warnings = []
    for name, share in summary.bad_gradient_share.items():
        if share > 0.05:
            warnings.append(
                f"{name}: {share:.0%} of attacked examples had zero or non-finite input "
                "gradients at some step, a sign of gradient masking; robust accuracy may be "
                "overestimated"
            )
    if summary.runtime_robust_acc is not None:
        gap = abs(summary.runtime_robust_acc - summary.robust_acc["worst"])
        if gap > RUNTIME_AGREEMENT_WARN:
            warnings.append(
                f"onnxruntime confirms a worst-case robust accuracy of "
                f"{summary.runtime_robust_acc:.1%} against {summary.robust_acc['worst']:.1%} "
                "in torch: the converted model and the runtime disagree near the decision boundary"
            )
    return warnings


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, for the report's provenance."""

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    onnxruntime = version("onnxruntime-gpu") or version("onnxruntime")
    return {
        "robaudit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "onnx": version("onnx"),
        "onnx2torch": version("onnx2torch"),
        "onnxruntime": onnxruntime,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine()
        ),
        "threads": torch.get_num_threads(),
    }
