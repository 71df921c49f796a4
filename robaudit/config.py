"""Scan settings: built-in defaults, then a config file, then the command line.

The config file is ``robaudit.toml`` (top-level keys) or ``[tool.robaudit]`` in ``pyproject.toml``,
found in the working directory, or one named with ``--config``. Keys are the long option names,
with dashes or underscores.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robaudit.choices import FINISH, MODES, NORMS, PRESETS, SCHEDULES
from robaudit.errors import ConfigError, MissingSetting
from robaudit.gate import GatePolicy
from robaudit.values import format_eps, parse_fraction, split_list

if TYPE_CHECKING:
    pass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: A batch this large is a typo: the attack engine allocates per-slot state up front.
MAX_BATCH_SIZE = 1 << 20
#: The largest --image-size: a batch of larger images cannot be allocated.
MAX_IMAGE_SIZE = 4096
#: The least and the most each count may be. Beyond the most it is a typo: a run that never
#: ends, or an integer torch cannot hold.
COUNTS = {"steps": (1, 10**6), "restarts": (1, 10**4), "queries": (1, 10**7),
          "escalation_queries": (1, 10**7), "targets": (1, 10**4), "per_class": (1, None),
          "limit": (1, None), "image_size": (1, MAX_IMAGE_SIZE), "num_classes": (2, 10**6)}
DEVICES = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ScanConfig:
    """Everything a scan needs. Build one with :func:`resolve_config` or directly."""

    model: str
    data: str
    # Data
    data_root: str | None = None
    download: bool = False
    split: str = "test"
    class_names: str | None = None
    image_size: int | None = None
    channels: int | None = None  # None: what the model's first layer takes
    classes: tuple[str, ...] = ()
    per_class: int | None = None
    limit: int | None = None
    # Model
    arch: str | None = None
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    runtime_check: bool = True
    # Attacks
    #: Attack names, or one preset: ``fast`` (PGD + T-PGD) or ``standard`` (AutoAttack's
    #: APGD-CE, APGD-T and Square, each on the survivors of the previous ones).
    attacks: tuple[str, ...] = PRESETS["fast"]
    #: The threat model: ``linf`` or ``l2`` (eps is then the L2 radius in pixel units).
    norm: str = "linf"
    #: Square's queries per example (AutoAttack's 5000 when Square is among the attacks).
    queries: int = 5000
    #: Targeted attacks' target classes (the most likely wrong ones). None: AutoAttack's 9 for
    #: apgd-t, 5 for dlr-t and ce-t (see robaudit.attacks).
    targets: int | None = None
    #: Attacks run after ``attacks`` on the examples none of them broke, at every ε (cumulative
    #: columns). Targeted DLR closes the gap PGD and T-PGD leave to AutoAttack under L2
    #: (benchmarks/RESULTS.md). ``none``: no finish, as in the ``standard`` preset.
    finish: tuple[str, ...] = FINISH
    #: Where the sanity checks see signs of gradient masking, run the scale-invariant DLR loss
    #: and the gradient-free Square on the survivors of the classes concerned.
    escalate: bool = True
    #: Square's queries per example when it runs as escalation.
    escalation_queries: int = 500
    #: Judge classes whose signs of masking remain after escalation on their figures alone,
    #: instead of failing them as unreliable.
    allow_unreliable: bool = False
    #: The ε the gate judges. With a sweep, every ε in ``eps_sweep`` is attacked too.
    eps: float = 8 / 255
    eps_sweep: tuple[float, ...] = ()
    #: ``each``: every attack on every clean-correct example (per-attack figures);
    #: ``worst-case``: each later attack only on examples the earlier ones did not break.
    mode: str = "each"
    #: Step size: ``halving`` (from 2·eps, halved when the loss stalls, as in APGD) or ``fixed``
    #: (2.5·eps/steps). With the default T below, halving lands within 1 pp of AutoAttack on the
    #: example (benchmarks/RESULTS.md).
    schedule: str = "halving"
    steps: int = 20
    step_size: float | None = None
    restarts: int = 1
    temperatures: tuple[float, ...] = (0.1, 0.5)
    seed: int = 0
    #: Examples per batch; None: 256, and a larger working batch for small inputs (see
    #: robaudit.attacks.jobs.auto_batch_size).
    batch_size: int | None = None
    device: str = "auto"
    #: bf16 autocast for the attack passes (CUDA, or a CPU with bf16 instructions); every break
    #: is confirmed in full precision, and the clean pass is always full precision.
    amp: bool = False
    #: Treat the signs of gradient masking (sanity checks) as errors: exit 4.
    strict: bool = False
    # Gate
    min_class_robust: float | None = None
    min_ratio: float | None = None
    max_gap: float | None = None
    significance: bool = False
    gate_on: str = "worst"
    #: A saved JSON report to judge each class's drop against (with ``max_drop``).
    baseline: str | None = None
    #: Largest allowed drop of a class's robust accuracy below the baseline's.
    max_drop: float | None = None
    #: Attack in seeded rounds; stop a class once its confidence sequence decides its verdict.
    sequential: bool = False
    #: How sure a sequential scan is that each class's verdict is the full scan's.
    confidence: float = 0.99
    # Reports
    json: str | None = None
    #: Keep the gallery's images in the JSON report too (they are always in the HTML).
    json_images: bool = False
    junit: str | None = None
    html: str | None = None
    #: Where the settings came from, for the report (not a setting itself).
    sources: tuple[str, ...] = field(default=(), compare=False)
    #: Each eps as the user wrote it (``(0.2, "51/255")``), so reports print ``51/255`` and
    #: not the float's shortest decimal; not a setting: it changes no figure.
    eps_written: tuple[tuple[float, str], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if len(self.attacks) == 1 and self.attacks[0] in PRESETS:
            # A preset is a list of attacks; ``standard`` runs them AutoAttack's way.
            preset = self.attacks[0]
            object.__setattr__(self, "attacks", PRESETS[preset])
            if preset == "standard":
                object.__setattr__(self, "mode", "worst-case")
                object.__setattr__(self, "finish", ())
        if tuple(self.finish) in (("none",), ("",)):
            object.__setattr__(self, "finish", ())
        # An attack the scan runs anyway is not run again as its finish.
        object.__setattr__(self, "finish",
                           tuple(a for a in self.finish if a not in self.attacks))
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("sources")
        out.pop("eps_written")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def gate_policy(self) -> GatePolicy:
        """The fairness policy this scan's gate applies (and its reports record)."""
        return GatePolicy(min_class_robust=self.min_class_robust, min_ratio=self.min_ratio,
                          max_gap=self.max_gap, max_drop=self.max_drop,
                          significance=self.significance, on=self.gate_on)

    def eps_text(self, eps: float | None = None) -> str:
        """``eps`` (default: the gate's) as the user wrote it, else in its shortest form."""
        eps = self.eps if eps is None else eps
        for value, text in self.eps_written:
            if abs(value - eps) < 1e-12:
                return text
        return format_eps(eps)


#: Keys a config file may set (the model comes from the command line or the caller).
FILE_KEYS = tuple(f.name for f in fields(ScanConfig)
                  if f.name not in ("model", "sources", "eps_written"))
#: Not a field: with several ``eps``, the one the gate judges (default: the largest).
GATE_EPS = "gate_eps"
#: Input paths: in a config file they are relative to the file.
INPUT_PATHS = ("data", "data_root", "class_names", "baseline")


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text",
               "tuple[str, ...]": "a list of names", "tuple[float, ...]": "a list of numbers"}


def coerce_value(name: str, value: Any) -> Any:
    """Turn a command-line string or a TOML value into the field's type."""
    kind = {f.name: f.type for f in fields(ScanConfig)}[name]
    if value is None:
        return None
    try:
        if kind in ("float", "float | None"):
            return parse_fraction(value, name)
        if kind in ("int", "int | None"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if kind == "tuple[str, ...]":
            return tuple(str(v) for v in split_list(value))
        if kind in ("tuple[float, ...]", "tuple[float, ...] | None"):
            return tuple(parse_fraction(v, name) for v in split_list(value))
        if kind in ("str", "str | None"):
            if not isinstance(value, (str, Path)):
                raise ValueError
            return str(value)
    except (ValueError, TypeError, OverflowError):
        expected = _KIND_WORDS.get(kind.removesuffix(" | None"), kind)
        raise ConfigError(f"{name} has an invalid value {value!r} (expected {expected})",
                          key=name) from None
    raise AssertionError(f"no coercion for {name}: {kind}")  # a field added without one


def validate(config: ScanConfig) -> None:
    """ConfigError naming the first setting that is out of range (its ``key`` says which)."""
    def check(key: str, ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message, key=key)

    # An L2 radius may exceed 1 (the whole image's perturbation); an L∞ one may not.
    top = 1.0 if config.norm == "linf" else float("inf")
    where = "in (0, 1]" if config.norm == "linf" else "positive"
    check("eps", 0 < config.eps <= top, f"eps must be {where} in pixel units, got "
          f"{config.eps:g}; for 8-bit images write e.g. 8/255")
    check("eps", all(0 < e <= top for e in config.eps_sweep),
          f"every eps must be {where}, got {', '.join(format_eps(e) for e in config.eps_sweep)}")
    check("eps", not config.eps_sweep or any(abs(e - config.eps) < 1e-12
                                             for e in config.eps_sweep),
          f"the gate's eps {format_eps(config.eps)} is not one of the eps swept")
    check("mode", config.mode in MODES,
          f"mode must be 'each' or 'worst-case', got {config.mode!r}")
    check("schedule", config.schedule in SCHEDULES,
          f"schedule must be 'fixed' or 'halving', got {config.schedule!r}")
    check("norm", config.norm in NORMS,
          f"norm must be 'linf' or 'l2', got {config.norm!r}")
    _check_counts(config, check)
    check("batch_size", config.batch_size is None or 1 <= config.batch_size <= MAX_BATCH_SIZE,
          f"batch_size must be between 1 and {MAX_BATCH_SIZE:,}, got {config.batch_size}")
    # Negative seeds are refused by numpy's generator, which samples the data.
    check("seed", 0 <= config.seed < 2**32,
          f"seed must be between 0 and 2**32-1, got {config.seed}")
    check("step_size", config.step_size is None or config.step_size > 0,
          f"step_size must be positive, got {config.step_size}")
    check("temperatures", bool(config.temperatures) and all(t > 0 for t in config.temperatures),
          f"temperatures must be positive numbers, got {list(config.temperatures)}")
    check("channels", config.channels in (None, 1, 3), f"channels is 1 or 3, not {config.channels}")
    for name in ("min_class_robust", "max_gap", "max_drop"):
        value = getattr(config, name)
        check(name, value is None or 0 <= value <= 1,
              f"{name} must be between 0 and 1, got {value}")
    # No default drop: how much noise to allow depends on the class sizes; the user says.
    check("max_drop", config.baseline is None or config.max_drop is not None,
          "a baseline report needs max_drop (--max-drop): the largest drop in a class's "
          "robust accuracy to allow, e.g. 0.03")
    # Without a policy every class "passes"; CI that asks for --strict wants a real gate.
    check("strict", not config.strict or config.gate_policy().active,
          "--strict: no gate policy is set; set --min-class-robust, --min-ratio, --max-gap or "
          "--max-drop (or drop --strict)")
    check("min_ratio", config.min_ratio is None or 0 < config.min_ratio <= 1,
          f"min_ratio must be in (0, 1], got {config.min_ratio}")
    _check_sequential(config, check)
    check("device", bool(DEVICES.match(config.device)),
          f"device must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    _check_attacks(config, check)
    check("gate_on", config.gate_on in ("worst", *config.attacks),
          f"gate_on must be 'worst' or one of the attacks run ({', '.join(config.attacks)}), "
          f"got {config.gate_on!r}")
    _check_normalisation(config, check)
    check("arch", config.arch is None or ":" in config.arch,
          "arch must look like torchvision:resnet18 or package.module:factory, "
          f"got {config.arch!r}")


def default_text(name: str) -> str:
    """A ScanConfig field's default, written as on the command line (for ``--help``)."""
    value = next(f.default for f in fields(ScanConfig) if f.name == name)
    if isinstance(value, bool):
        return "on" if value else "off"
    if name == "eps":
        return format_eps(value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def _check_sequential(config: ScanConfig, check: Callable[[str, bool, str], None]) -> None:
    check("confidence", 0.5 <= config.confidence < 1,
          f"confidence must be at least 0.5 and below 1, got {config.confidence:g}")
    # Both compare a class with the others, whose figures a sequential scan only bounds.
    for key in ("min_ratio", "max_gap"):
        check(key, not config.sequential or getattr(config, key) is None,
              f"--sequential decides each class against its own floor; --{key.replace('_', '-')} "
              "depends on every class's figure: use --min-class-robust or --max-drop, or drop "
              "--sequential")
    check("sequential", not config.sequential or not config.eps_sweep,
          "--sequential judges one eps; a sweep needs every example at every eps: give one "
          "--eps or drop --sequential")


def _check_counts(config: ScanConfig, check: Callable[[str, bool, str], None]) -> None:
    for name, (least, most) in COUNTS.items():
        value = getattr(config, name)
        check(name, value is None or value >= least, f"{name} must be at least {least}, got "
              f"{value}")
        if most is not None:
            check(name, value is None or value <= most, f"{name} must be at most {most:,}, got "
                  f"{value}")


def _check_attacks(config: ScanConfig, check: Callable[[str, bool, str], None]) -> None:
    from robaudit.attacks import AttackSettings, build_attack

    check("attacks", bool(config.attacks), "attacks must name at least one attack")
    for key in ("attacks", "finish"):
        names = getattr(config, key)
        check(key, len(set(names)) == len(names), f"{key} lists an attack twice: {','.join(names)}")
        for name in names:
            try:
                build_attack(name, AttackSettings(config.eps))  # suggests for an unknown name
            except ConfigError as e:
                raise ConfigError(str(e), key=key) from None


def _check_normalisation(config: ScanConfig, check: Callable[[str, bool, str], None]) -> None:
    if config.mean is None and config.std is None:
        return
    check("std" if config.std is None else "mean",
          config.mean is not None and config.std is not None,
          "mean and std go together: give both, one value per channel")
    mean, std = config.mean or (), config.std or ()
    check("std", len(mean) == len(std), f"mean has {len(mean)} values but std has {len(std)}")
    check("std", all(s > 0 for s in std), "std values must be positive")


def find_config_file(cwd: Path) -> Path | None:
    """``robaudit.toml``, else a ``pyproject.toml`` with a ``[tool.robaudit]`` table."""
    candidate = cwd / "robaudit.toml"
    if candidate.is_file():
        return candidate
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file() and "robaudit" in _read_toml(pyproject).get("tool", {}):
        return pyproject
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a config file, keys checked and values coerced to their types."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    doc = _read_toml(path)
    if path.name == "pyproject.toml":
        doc = doc.get("tool", {}).get("robaudit", {})
    _check_keys(doc, (*FILE_KEYS, GATE_EPS), f"in config file {path}")
    try:
        settings = coerce_settings(doc)
    except ConfigError as e:
        raise type(e)(f"{e} in config file {path}", key=e.key) from None
    # Input paths in a config file are relative to the file, as a user sharing one expects.
    for name in INPUT_PATHS:
        value = settings.get(name)
        if value is not None and (path.parent / value).exists() and not Path(value).is_absolute():
            settings[name] = str(path.parent / value)
    return settings


def _check_keys(values: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    for key in values:
        name = key.replace("-", "_")
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{key}' {where}.{hint}", key=name)


def coerce_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Settings by field name (dashes or underscores), each coerced to its field's type.

    Values may be typed (``eps=0.03``, ``attacks=("pgd",)``) or written as on the command line
    (``"8/255"``, ``"pgd,tpgd"``); ``None`` means not given. ``eps`` may be several values, a
    sweep: it becomes the gate's ``eps`` (``gate_eps``, else the largest) and ``eps_sweep``.
    """
    named = {k.replace("-", "_"): v for k, v in values.items() if v is not None}
    split = _split_eps(named)
    written = split.pop("eps_written", None)  # already typed: not a setting users write
    coerced = {k: coerce_value(k, v) for k, v in split.items()}
    return coerced if written is None else {**coerced, "eps_written": written}


def _split_eps(values: dict[str, Any]) -> dict[str, Any]:
    """``eps = "2/255,8/255"`` (or a list) is a sweep; the gate judges ``gate_eps`` or the
    largest."""
    values = dict(values)
    gate_eps = values.pop(GATE_EPS, None)
    chosen = None if gate_eps is None else parse_fraction(gate_eps, GATE_EPS)
    if "eps" not in values:
        if chosen is not None:
            values["eps"] = chosen
        return values
    given = split_list(values["eps"])
    all_eps = [parse_fraction(v, "eps") for v in given]
    if not all_eps:
        raise ConfigError("eps is empty; give a number like 0.03 or 8/255", key="eps")
    values["eps_written"] = tuple(
        (eps, text.strip() if isinstance(text, str) else format_eps(eps))
        for eps, text in zip(all_eps, given, strict=True))
    values["eps"] = chosen = max(all_eps) if chosen is None else chosen
    if len(all_eps) > 1:
        values["eps_sweep"] = tuple(sorted(set(all_eps)))
        if not any(abs(e - chosen) < 1e-12 for e in all_eps):
            raise ConfigError(f"--gate-eps {format_eps(chosen)} is not one of the eps given "
                              f"({', '.join(format_eps(e) for e in sorted(all_eps))})",
                              key=GATE_EPS)
    return values


def resolve_config(
    given: Mapping[str, Any],
    *,
    config_file: str | Path | None = None,
    cwd: Path | None = None,
    find_file: bool = True,
    source: str = "command line",
) -> ScanConfig:
    """The one way to build a :class:`ScanConfig` from what a user wrote: built-in defaults, then
    a config file, then ``given`` (the command line's options or a caller's keywords).

    ``given`` holds ``model`` and any :class:`ScanConfig` field or ``gate_eps``, typed or as on
    the command line (see :func:`coerce_settings`); ``None`` means not given. The config file is
    ``config_file`` (a path), else, with ``find_file``, the one in ``cwd`` (default: the working
    directory). ``source`` names ``given`` in the report's ``sources``. Errors are
    :class:`ConfigError` with the ``key`` they are about; :class:`MissingSetting` when the model
    or the data is given nowhere.
    """
    path = Path(config_file) if config_file is not None else \
        find_config_file(cwd or Path.cwd()) if find_file else None
    from_file = read_config_file(path) if path is not None else {}
    _check_keys(given, ("model", *FILE_KEYS, GATE_EPS), f"({source})")
    named = {k.replace("-", "_"): v for k, v in given.items() if v is not None}
    model = named.pop("model", None)
    if model is None:
        raise MissingSetting("no model given", key="model")
    values = coerce_settings(named)
    if "eps" in named:  # a new eps (or sweep) replaces the file's sweep; gate_eps alone does not
        from_file.pop("eps_sweep", None)
        from_file.pop("eps_written", None)
    merged = {**from_file, **values}
    if "data" not in merged:
        raise MissingSetting("no data set given: pass --data (a .npz file, a folder or a name)",
                             key="data")
    sources = ("defaults", *([str(path)] if path else []), *([source] if values else []))
    try:
        return ScanConfig(**merged, model=str(model), sources=sources)
    except ConfigError as e:
        if path is not None and e.key in from_file and e.key not in values:
            raise type(e)(f"{e} (set in config file {path})", key=e.key) from None
        raise
