"""Harden settings: the scan they are judged by, plus how to fine-tune and calibrate."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from robaudit.config import ScanConfig
from robaudit.errors import ConfigError
from robaudit.harden.reweight import SCHEMES

OBJECTIVES = ("pgd-at", "trades")


@dataclass(frozen=True)
class HardenConfig:
    """Everything ``harden`` needs.

    ``scan`` is the audit the model is judged by: its ``model`` is the model to harden, its
    ``data`` the validation set (unless ``val_fraction`` holds out part of the training data
    instead), and its ε, attack strength, selection (``per_class``, ``limit``), seed, device and
    gate are used for the before/after scans and the per-epoch validation.
    """

    scan: ScanConfig
    #: Training data spec (the same forms as ``--data``).
    train_data: str
    #: Where the hardened model goes; its format follows the input model's.
    out: str
    #: When set, validation is this fraction of ``train_data`` (seeded, stratified), held out
    #: and never trained on; ``scan.data`` is then not used.
    val_fraction: float | None = None
    epochs: int = 10
    objective: str = "pgd-at"
    #: TRADES regularisation weight (``objective="trades"``).
    beta: float = 6.0
    reweight: str = "gate"
    #: Per-class ε: FRL Remargin with ``frl``; always on with ``cfa`` (its calibrated margin).
    class_eps: bool | None = None
    lr: float = 5e-5
    train_batch_size: int = 64
    #: PGD iterations when making training examples (step 2.5·ε/steps).
    train_steps: int = 7
    #: FRL: fairness tolerance τ (for both the clean and the boundary error) and update rate α.
    frl_tau: float = 0.05
    frl_rate: float = 0.5
    #: FRL: the multipliers are projected onto ``sum <= frl_limit`` (< 1 keeps weights positive).
    frl_limit: float = 0.8
    #: gate: how far above its bar each class is aimed (the gate's policy line plus this).
    gate_margin: float = 0.05
    #: CFA: base perturbation budget λ1 (None: 0.5 for PGD-AT, 0.3 for TRADES) and λ2 for β.
    cfa_lambda1: float | None = None
    cfa_lambda2: float = 0.5
    #: CFA: weight-average decay and the worst-class robust accuracy a model needs to join it
    #: (None: the input model's, on the validation set).
    cfa_decay: float = 0.85
    cfa_threshold: float | None = None
    #: Decay per training step of the exponential moving average of the weights, which is what
    #: each epoch hands back for validation (0: off; ``cfa`` averages its own way instead).
    ema_decay: float = 0.95
    #: Checkpoint file (default: ``<out>.ckpt``); ``resume`` continues from it.
    checkpoint: str | None = None
    resume: bool = False
    calibrate: bool = False
    #: The budget: an epoch can be kept only if its validation class-mean robust accuracy and
    #: clean accuracy stay within these of the input model's (``max_clean_drop`` also caps
    #: what calibration may cost).
    max_mean_drop: float = 0.02
    max_clean_drop: float = 0.01
    json: str | None = None
    html: str | None = None

    def __post_init__(self) -> None:
        validate(self)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(f"{self.out}.ckpt")

    @property
    def weights_path(self) -> Path:
        """Where the class weights used are written (JSON)."""
        out = Path(self.out)
        return out.with_name(out.stem + ".class-weights.json")

    @property
    def uses_class_eps(self) -> bool:
        always = SCHEMES[self.reweight].class_eps
        return bool(self.class_eps) if always is None else always

    @property
    def lambda1(self) -> float:
        if self.cfa_lambda1 is not None:
            return self.cfa_lambda1
        return 0.3 if self.objective == "trades" else 0.5  # the CFA paper's choices

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scan"] = self.scan.to_dict()
        return out


def validate(config: HardenConfig) -> None:
    """ConfigError naming the first setting that is out of range."""

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    check(config.objective in OBJECTIVES,
          f"objective must be one of {', '.join(OBJECTIVES)}, got {config.objective!r}")
    check(config.reweight in SCHEMES,
          f"reweight must be one of {', '.join(SCHEMES)}, got {config.reweight!r}")
    check(config.epochs >= 0, f"epochs must be 0 or more, got {config.epochs}")
    check(config.epochs > 0 or config.calibrate,
          "--epochs 0 does nothing without --calibrate; give epochs or --calibrate")
    check(config.beta > 0, f"beta must be positive, got {config.beta}")
    check(config.lr > 0, f"lr must be positive, got {config.lr}")
    check(config.train_batch_size >= 1,
          f"train batch size must be at least 1, got {config.train_batch_size}")
    check(config.train_steps >= 1, f"train steps must be at least 1, got {config.train_steps}")
    class_eps = SCHEMES[config.reweight].class_eps
    check(not (config.class_eps and class_eps is False),
          f"--class-eps applies to frl (Remargin) and cfa, not to {config.reweight}")
    check(config.class_eps is not False or class_eps is not True,
          f"{config.reweight} always calibrates each class's eps; drop --no-class-eps or choose "
          "another scheme")
    check(0 < config.frl_limit < 1, f"frl limit must be in (0, 1), got {config.frl_limit}")
    check(config.frl_rate > 0 and config.frl_tau >= 0,
          "frl rate must be positive and frl tau non-negative")
    check(0 <= config.gate_margin <= 1,
          f"gate margin must be in [0, 1], got {config.gate_margin}")
    check(0 <= config.cfa_decay < 1, f"cfa decay must be in [0, 1), got {config.cfa_decay}")
    check(0 <= config.ema_decay < 1, f"ema decay must be in [0, 1), got {config.ema_decay}")
    check(config.cfa_threshold is None or 0 <= config.cfa_threshold <= 1,
          f"cfa threshold must be in [0, 1], got {config.cfa_threshold}")
    check(0 <= config.max_clean_drop <= 1,
          f"max clean drop must be in [0, 1], got {config.max_clean_drop}")
    check(0 <= config.max_mean_drop <= 1,
          f"max mean drop must be in [0, 1], got {config.max_mean_drop}")
    check(config.val_fraction is None or 0 < config.val_fraction < 1,
          f"val fraction must be in (0, 1), got {config.val_fraction}")
    check(Path(config.out).resolve() != Path(config.scan.model).resolve(),
          "--out names the input model; write the hardened model to another file")
    check(Path(config.out).suffix.lower() == Path(config.scan.model).suffix.lower(),
          f"--out {config.out} must keep the input's format and suffix "
          f"({Path(config.scan.model).suffix or 'none'})")
