"""The scan pipeline: load -> attack -> measure -> judge, returning a :class:`ScanResult`.

What the CLI, ``harden`` and the pytest plugin all call. It prints nothing and never exits; progress
goes to an optional callback, problems that do not stop the scan go to ``ScanResult.warnings``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from robaudit import distributed
from robaudit.attacks import Attack, build_attack, build_attacks
from robaudit.attacks.memory import is_out_of_memory, memory_errors, out_of_memory, plan_batch
from robaudit.attacks.stream import EnginePool, ExampleResult, combine_parts, stream_audit
from robaudit.compare import Figures, check_comparable, read_figures
from robaudit.config import (
    ScanConfig,
    attack_settings,
    attack_stage,
    describe_attacks,
    format_eps,
)
from robaudit.data import DataSource, iter_batches, load_data, select_indices
from robaudit.errors import ConfigError, NothingToAudit, UsageError
from robaudit.gallery import make_gallery
from robaudit.masking import (
    SCALE_INVARIANT,
    Escalation,
    class_signs,
    persisting,
    survivors,
    unreliable_classes,
)
from robaudit.metrics import Records, class_stats, confusion, summarize
from robaudit.models import LoadedModel, load_model, verify_runtime
from robaudit.provenance import environment
from robaudit.recording import extend, merge_columns, outcomes, record
from robaudit.result import ScanResult, exit_outcome, judgement_of
from robaudit.sanity import check_outputs, runtime_warnings, sanity_checks

__all__ = ["Progress", "ScanResult", "resolve_device", "scan"]


@dataclass(frozen=True)
class Progress:
    """A progress report: ``done`` of ``total`` examples audited, and what is happening."""

    stage: str
    done: int
    total: int


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` means a CUDA device when there is one (under torchrun, the rank's own)."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; "
                          "use --device cpu or auto")
    return device


def scan(
    config: ScanConfig, *, progress: Callable[[Progress], None] | None = None,
    model: LoadedModel | None = None,
) -> ScanResult:
    """Audit ``config.model`` on ``config.data``: load, attack (escalating where the sanity
    checks see masking), measure, judge.

    ``model``, when given, is audited instead of loading ``config.model`` (harden judges the
    weights it is training this way, with the scan's own attacks and gate).

    Ctrl-C (``KeyboardInterrupt``) during the attacks does not lose the work done: the result
    covers the examples finished so far and has ``partial=True``.
    """
    started = time.perf_counter()
    report = progress or (lambda _p: None)
    loaded = _load(config, report, model)
    attacked = _attack(config, loaded, report)
    return _judge(config, loaded, attacked, started)


@dataclass
class _Loaded:
    """The load phase's result: where to run, what to audit, with which attacks."""

    ctx: distributed.Context
    device: torch.device
    baseline: Figures | None
    source: DataSource
    indices: np.ndarray
    model: LoadedModel
    eps_list: list[float]
    #: Which ε of ``eps_list`` the gate judges.
    gate_e: int
    attack_sets: list[list[Attack]]
    seconds: float


@dataclass
class _Attacked:
    """The attack phase's result: per-example records at each ε, and what was seen."""

    records: list[Records]
    warnings: list[str]
    sanity: list[dict[str, str]]
    runtime_diff: float | None
    partial: bool
    pool: EnginePool
    escalation: Escalation
    seconds: float


def _load(config: ScanConfig, report: Callable[[Progress], None],
          given: LoadedModel | None = None) -> _Loaded:
    started = time.perf_counter()
    ctx = distributed.context()
    device = resolve_device(config.device, ctx.local_rank)
    distributed.init(ctx, device)
    torch.manual_seed(config.seed)
    # Read and check the baseline before anything slow: a mismatch is a usage error.
    baseline = _read_baseline(config.baseline) if config.baseline else None
    if baseline is not None:
        check_comparable(baseline, eps=config.eps, attacks=(*config.attacks, *config.finish),
                         audited=None,
                         against="this scan", norm=config.norm)
    report(Progress("loading data", 0, 0))
    source = load_data(
        config.data, root=config.data_root, download=config.download, split=config.split,
        class_names_file=config.class_names, image_size=config.image_size,
    )
    indices = _select(source, config)
    if baseline is not None:
        audited = sorted(set(np.asarray(source.targets)[indices].tolist()))
        check_comparable(baseline, eps=config.eps, attacks=(*config.attacks, *config.finish),
                         audited=[source.class_names[t] for t in audited], against="this scan",
                         norm=config.norm)
    report(Progress("loading model", 0, len(indices)))
    model = given or load_model(
        config.model, arch=config.arch, num_classes=config.num_classes,
        mean=config.mean, std=config.std, device=device,
    )
    eps_list = list(config.eps_sweep) or [config.eps]
    gate_e = min(range(len(eps_list)), key=lambda e: abs(eps_list[e] - config.eps))
    attack_sets = [build_attacks(config.attacks, attack_settings(config, eps))
                   for eps in eps_list]
    return _Loaded(ctx, device, baseline, source, indices, model, eps_list, gate_e, attack_sets,
                   time.perf_counter() - started)


def _attack(config: ScanConfig, loaded: _Loaded, report: Callable[[Progress], None]) -> _Attacked:
    """Every attack on every selected example (this rank's shard), then escalation."""
    started = time.perf_counter()
    module = loaded.model.module
    was_training = module.training
    module.eval()
    first = loaded.source.dataset[int(loaded.indices[0])][0].to(loaded.device)
    size, note = plan_batch(module, first, config.batch_size)  # the data batch's size too
    pool = EnginePool(module, size, amp=config.amp)
    if config.amp and loaded.device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    run = _Attacked([Records(attack_names=list(config.attacks)) for _ in loaded.eps_list],
                    [note] if note else [], [], None, False, pool, Escalation(), 0.0)
    failure: Exception | None = None
    try:
        _stream(config, loaded, run, report)
    except KeyboardInterrupt:
        run.partial = True
    except Exception as exc:  # running out of memory is the user's to fix: a smaller batch
        failure = exc
        if is_out_of_memory(exc):
            failure = out_of_memory(loaded.device, size)
            failure.__cause__ = exc
    finally:
        module.train(was_training)
    ctx = loaded.ctx
    if failure is not None and not ctx.active:
        raise failure
    # Under torchrun: every rank gets every rank's records, or every rank the first failure.
    run.records = [distributed.gather(rec, ctx, failure) for rec in run.records]
    run.partial = distributed.any_partial(run.partial, ctx)
    if not run.partial and len(run.records[loaded.gate_e]):
        with memory_errors(loaded.device, size):
            _finish(config, loaded, run, report)
            _escalate(config, loaded, run, report)
    run.seconds = time.perf_counter() - started
    return run


def _stream(config: ScanConfig, loaded: _Loaded, run: _Attacked,
            report: Callable[[Progress], None]) -> None:
    """The attack loop: records examples as they complete (all of them kept on Ctrl-C)."""
    module, source, device = loaded.model.module, loaded.source, loaded.device
    runtime = loaded.model.runtime if config.runtime_check else None
    data_batch = run.pool.batch_size

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        mine = distributed.shard(loaded.indices, loaded.ctx)
        for i, (x, y, idx) in enumerate(iter_batches(source, mine, data_batch)):
            x, y = x.to(device), y.to(device)
            if i == 0:
                # onnxruntime first: it tells a conversion that fails from data that does not fit.
                if runtime is not None:
                    run.runtime_diff = verify_runtime(loaded.model, x.cpu())
                check_outputs(module, x, len(source.class_names), run.warnings, run.sanity)
            yield x, y, idx

    buffered: list[ExampleResult] = []

    def flush() -> None:
        # Every ε's columns before any append: a Ctrl-C during onnxruntime's check leaves the
        # batch unrecorded, and the flush in ``finally`` records it once.
        parts = [outcomes(rec.attack_names, buffered, e, runtime if e == loaded.gate_e else None)
                 for e, rec in enumerate(run.records)]
        for rec, part in zip(run.records, parts, strict=True):
            extend(rec, part)
        buffered.clear()

    done = 0
    try:
        for finished in stream_audit(module, batches(), loaded.attack_sets,
                                     batch_size=config.batch_size, seed=config.seed,
                                     worst_case=config.mode == "worst-case", engine=run.pool):
            # Examples complete a few at a time; record (and run onnxruntime on) them in batches.
            buffered.extend(finished)
            if len(buffered) >= data_batch:
                flush()
            done += len(finished)
            report(Progress("attacking", done, len(loaded.indices)))
    finally:
        flush()  # on Ctrl-C too: the examples completed before it count


def _finish(config: ScanConfig, loaded: _Loaded, run: _Attacked,
            report: Callable[[Progress], None]) -> None:
    """The finish attacks, at every ε, on the examples of every class that no attack broke."""
    if not config.finish:
        return
    names = loaded.source.class_names
    module = loaded.model.module
    module.eval()
    try:
        for e, rec in enumerate(run.records):
            attacks = build_attacks(config.finish, attack_settings(config, loaded.eps_list[e]))
            _on_survivors(config, loaded, run, e, rec, names, attacks, "finishing", report)
    except KeyboardInterrupt:
        run.partial = True  # the figures before the finish stand; they are marked partial
    finally:
        module.train(False)


def _escalate(config: ScanConfig, loaded: _Loaded, run: _Attacked,
              report: Callable[[Progress], None]) -> None:
    """Where the figures show signs of masking, attack the survivors of the classes concerned
    with the scale-invariant loss (unless one ran already), then with the gradient-free search
    where the signs persist; judge what remains."""
    started = time.perf_counter()
    names = loaded.source.class_names
    gate = run.records[loaded.gate_e]
    signs = class_signs(gate, names, [item["check"] for item in run.sanity],
                        sweep=run.records if len(run.records) > 1 else (), mode=config.mode)
    escalation = Escalation(signs=signs)
    ran = (*config.attacks, *config.finish)
    if signs and config.escalate:
        module = loaded.model.module
        module.eval()
        try:
            if not any(a in ran for a in SCALE_INVARIANT):
                _escalate_stage(config, loaded, run, escalation, "dlr", list(signs), report)
            remaining = persisting(gate, names, signs)
            escalation.explained = [name for name in signs if name not in remaining]
            if remaining and "square" not in ran:
                _escalate_stage(config, loaded, run, escalation, "square", remaining, report)
        except KeyboardInterrupt:
            run.partial = True  # the figures before escalation stand; it is marked partial
        finally:
            module.train(False)
    escalation.unreliable = unreliable_classes(gate, names, signs, config.escalate)
    escalation.seconds = time.perf_counter() - started
    run.escalation = escalation


def _escalate_stage(config: ScanConfig, loaded: _Loaded, run: _Attacked,
                    escalation: Escalation, attack: str, classes: list[str],
                    report: Callable[[Progress], None]) -> None:
    """One escalation attack at every ε on the survivors of ``classes``."""
    escalation.attacks += (attack,)
    for e, rec in enumerate(run.records):
        count = _escalate_at(config, loaded, run, e, rec, classes, [attack], report)
        if e == loaded.gate_e:
            escalation.examples = max(escalation.examples, count)


def _escalate_at(config: ScanConfig, loaded: _Loaded, run: _Attacked, e: int, rec: Records,
                 classes: list[str], extra: list[str],
                 report: Callable[[Progress], None]) -> int:
    settings = attack_settings(config, loaded.eps_list[e], "escalation")
    return _on_survivors(config, loaded, run, e, rec, classes, build_attacks(extra, settings),
                         "escalating", report)


def _on_survivors(config: ScanConfig, loaded: _Loaded, run: _Attacked, e: int, rec: Records,
                  classes: Sequence[str], attacks: list[Attack], stage: str,
                  report: Callable[[Progress], None]) -> int:
    """``attacks`` in turn on the examples of ``classes`` that every attack so far left robust
    at the ``e``-th ε, each one's runs side by side (``parts``); their columns join ``rec``.
    Returns how many examples the first one attacked."""
    data_batch = run.pool.batch_size
    runtime = loaded.model.runtime if config.runtime_check and e == loaded.gate_e else None
    attacked = []
    for attack in attacks:
        targets = survivors(rec, loaded.source.class_names, classes)
        attacked.append(len(targets))
        mine = distributed.shard(targets, loaded.ctx)
        parts = attack.parts() if hasattr(attack, "parts") else [attack]
        found = Records(attack_names=[attack.name])
        batches = ((x.to(loaded.device), y.to(loaded.device), idx)
                   for x, y, idx in iter_batches(loaded.source, mine, data_batch))
        done = 0
        for finished in stream_audit(loaded.model.module, batches, [parts],
                                     batch_size=config.batch_size, seed=config.seed,
                                     engine=run.pool):
            record(found, [combine_parts(ex, 0, attack, parts) for ex in finished], 0, runtime)
            done += len(finished)
            report(Progress(stage, done, len(mine)))
        merge_columns(rec, distributed.gather(found, loaded.ctx))
    return attacked[0] if attacked else 0


def _judge(config: ScanConfig, loaded: _Loaded, run: _Attacked, started: float) -> ScanResult:
    """Figures per class and across classes, the gate's verdicts, the gallery: the result."""
    main = run.records[loaded.gate_e]
    if len(main) == 0:
        if run.partial:
            raise KeyboardInterrupt
        raise NothingToAudit("nothing to audit: no examples were selected")
    names = loaded.source.class_names
    stats = class_stats(main, names)
    summary = summarize(main, stats)
    baseline = loaded.baseline
    judgement = judgement_of(stats, config.gate_policy(), main.attack_names, baseline,
                           run.escalation, config.allow_unreliable)
    sweep = _sweep(run.records, loaded.eps_list, names) if len(run.records) > 1 else []
    sanity = run.sanity + sanity_checks(summary, sweep, config.mode)
    warnings = run.warnings + runtime_warnings(summary) + [item["message"] for item in sanity]
    warnings += run.escalation.warnings()
    gallery, partial = {}, run.partial
    if not partial and loaded.ctx.is_main:  # only rank 0 writes reports
        flagged = [v.index for v in judgement.flagged]
        try:
            gallery = make_gallery(loaded.model.module, loaded.source, main, flagged,
                                   _gate_attacks(config, loaded, main.attack_names),
                                   seed=config.seed, device=loaded.device)
        except KeyboardInterrupt:  # every figure is in: keep them, only the pictures are lost
            partial = True
    attacks = list(main.attack_names)
    code, problem = exit_outcome(config, partial, judgement, sanity)
    return ScanResult(
        config=config,
        class_names=list(names),
        stats=stats,
        summary=summary,
        judgement=judgement,
        confusion={a: confusion(main, len(names), a) for a in attacks},
        model=_model_info(loaded.model, run.runtime_diff),
        data={
            "spec": config.data,
            "description": loaded.source.description,
            "size": len(loaded.source.targets),
            "selected": len(loaded.indices),
            "audited": len(main),
        },
        environment={**environment(loaded.device), "working_batch": run.pool.batch_size},
        timings={
            "load_s": loaded.seconds,
            "attack_s": run.seconds,
            "escalation_s": run.escalation.seconds,
            "total_s": time.perf_counter() - started,
            **{f"{a}_s": run.pool.seconds.get(a, 0.0) for a in attacks},
        },
        warnings=warnings,
        sanity=sanity,
        sweep=sweep,
        gallery=gallery,
        partial=partial,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        baseline=baseline,
        attacks=describe_attacks(config, attacks),
        escalation=run.escalation,
        exit_code=code,
        problem=problem,
    )


def _gate_attacks(config: ScanConfig, loaded: _Loaded, ran: Sequence[str]) -> list[Attack]:
    """Every attack that ran at the gate's ε: the scan's, the finish's and escalation's."""
    later = [name for name in ran if name not in config.attacks]
    return [*loaded.attack_sets[loaded.gate_e],
            *(build_attack(name, attack_settings(config, config.eps, attack_stage(config, name)))
              for name in later)]


def _model_info(model: LoadedModel, runtime_diff: float | None) -> dict[str, Any]:
    return {"path": str(model.path), "format": model.format, "description": model.description,
            "runtime_max_abs_diff": runtime_diff}


def _read_baseline(path: str) -> Figures:
    try:
        return read_figures(path)
    except UsageError as e:
        raise UsageError(f"--baseline: {e}") from None


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


def _sweep(records: list[Records], eps_list: list[float],
           class_names: list[str]) -> list[dict[str, Any]]:
    """Per-class robust accuracy at each ε of a sweep (robustness-vs-ε curves)."""
    entries = []
    for eps, rec in zip(eps_list, records, strict=True):
        if len(rec) == 0:
            continue
        stats = class_stats(rec, class_names)
        summary = summarize(rec, stats)
        entries.append({
            "eps": eps,
            "eps_text": format_eps(eps),
            "robust_acc": summary.robust_acc,
            "mean_class_robust": summary.mean_class_robust,
            "classes": [{"name": s.name, "n": s.n,
                         "robust": {a: r.acc for a, r in s.robust.items()},
                         "ci95": {a: [r.low, r.high] for a, r in s.robust.items()}}
                        for s in stats],
        })
    return entries
