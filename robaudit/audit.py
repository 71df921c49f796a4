"""The scan pipeline: load -> attack -> measure -> judge, returning a :class:`ScanResult`.

What the CLI, ``harden`` and the pytest plugin all call. It prints nothing and never exits; progress
goes to an optional callback, problems that do not stop the scan go to ``ScanResult.warnings``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from robaudit import distributed, rounds
from robaudit.attacks import Attack, build_attack, build_attacks, prototype
from robaudit.attacks.memory import memory_errors, plan_batch
from robaudit.attacks.stream import EnginePool, ExampleResult, combine_parts, stream_audit
from robaudit.choices import ESCALATION
from robaudit.compare import Figures, check_comparable, read_figures
from robaudit.config import (
    ScanConfig,
)
from robaudit.data import DataSource, fit_to_model, iter_batches, load_data, select_classes
from robaudit.errors import ConfigError, NothingToAudit, UsageError
from robaudit.gallery import make_gallery
from robaudit.masking import Escalation, class_signs, persisting, survivors, unreliable_classes
from robaudit.metrics import Records, class_stats, confusion, summarize, sweep_figures
from robaudit.models import (
    LoadedModel,
    input_channels,
    load_model,
    output_count,
    verify_runtime,
)
from robaudit.portfolio import attack_settings, attack_stage, describe_attacks
from robaudit.provenance import environment
from robaudit.recording import merge_columns, outcomes, record
from robaudit.result import ScanResult, exit_outcome, judgement_of
from robaudit.sanity import check_outputs, nonfinite_warnings, runtime_warnings, sanity_checks

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
    model: LoadedModel | None = None, gallery: bool = True,
) -> ScanResult:
    """Audit ``config.model`` on ``config.data``: load, attack (escalating where the sanity
    checks see masking), measure, judge.

    ``model``, when given, is audited instead of loading ``config.model`` (harden judges the
    weights it is training this way, with the scan's own attacks and gate); ``gallery=False``
    leaves out the adversarial examples of the flagged classes, when no report will show them.

    Ctrl-C (``KeyboardInterrupt``) during the attacks does not lose the work done: the result
    covers the examples finished so far and has ``partial=True``.
    """
    started = time.perf_counter()
    report = progress or (lambda _p: None)
    loaded = _load(config, report, model)
    return _judge(_attack(config, loaded, report), started, gallery)


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
        channels=config.channels,
    )
    indices = select_classes(np.asarray(source.targets), source.class_names, config.classes,
                             per_class=config.per_class, limit=config.limit, seed=config.seed)
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
    fit_to_model(source, indices, input_channels(model.module),
                 lambda x: output_count(model.module, x.to(device)))
    eps_list = list(config.eps_sweep) or [config.eps]
    gate_e = min(range(len(eps_list)), key=lambda e: abs(eps_list[e] - config.eps))
    settings = [attack_settings(config, eps, classes=len(source.class_names)) for eps in eps_list]
    attack_sets = [build_attacks(config.attacks, s) for s in settings]
    return _Loaded(ctx, device, baseline, source, indices, model, eps_list, gate_e, attack_sets,
                   time.perf_counter() - started)


@dataclass
class _Run:
    """A scan in progress: its settings, what was loaded, and what its stages found so far.

    Every stage takes the run and adds to it (:data:`STAGES`); the records hold the examples
    audited so far, so the stages can as well run on one round of examples at a time.
    """

    config: ScanConfig
    loaded: _Loaded
    report: Callable[[Progress], None]
    pool: EnginePool
    #: Per-example records at each ε.
    records: list[Records]
    warnings: list[str] = field(default_factory=list)
    sanity: list[dict[str, str]] = field(default_factory=list)
    runtime_diff: float | None = None
    partial: bool = False
    #: A stage's failure under torchrun, kept until every rank has heard of it.
    failure: Exception | None = None
    #: Whether the model's outputs (and onnxruntime's) were checked: once per scan, not per round.
    checked: bool = False
    escalation: Escalation = field(default_factory=Escalation)
    seconds: float = 0.0
    #: A sequential scan's rounds and decisions (None for a full scan).
    plan: rounds.Plan | None = None

    @property
    def audited(self) -> bool:
        return len(self.records[self.loaded.gate_e]) > 0


def _attack(config: ScanConfig, loaded: _Loaded, report: Callable[[Progress], None]) -> _Run:
    """The stages in order, each on what the ones before it left robust. A Ctrl-C ends the
    stage it lands in and skips the rest: the figures before it stand, marked partial."""
    started = time.perf_counter()
    module = loaded.model.module
    was_training = module.training
    module.eval()  # the one place: the stages attack the model in eval mode, restored after
    try:
        run = _new_run(config, loaded, report)
        (_sequential if config.sequential else _run_stages)(run)
    finally:
        module.train(was_training)
    if run.failure is not None:
        raise run.failure
    run.warnings += nonfinite_warnings(run.records, len(loaded.source.class_names))
    run.seconds = time.perf_counter() - started
    return run


def _new_run(config: ScanConfig, loaded: _Loaded, report: Callable[[Progress], None]) -> _Run:
    module = loaded.model.module
    first = loaded.source.dataset[int(loaded.indices[0])][0].to(loaded.device)
    size, note = plan_batch(module, first, config.batch_size)  # the data batch's size too
    if config.amp and loaded.device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    return _Run(config, loaded, report, EnginePool(module, size, amp=config.amp),
                [Records(attack_names=list(config.attacks)) for _ in loaded.eps_list],
                warnings=[note] if note else [])


def _run_stages(run: _Run, stages: Sequence[Callable[[_Run], None]] | None = None) -> None:
    for stage in STAGES if stages is None else stages:
        if stage is _share or not (run.partial or run.failure):
            _run_stage(run, stage)


def _sequential(run: _Run) -> None:
    """The clean pass on every example, then rounds of the stages on each undecided class's
    next examples (robaudit/rounds.py); the figures and escalation's findings of all rounds."""
    config, loaded = run.config, run.loaded
    names = loaded.source.class_names
    clean = _part(run, loaded.indices)
    if clean is None:
        return
    baseline = loaded.baseline.robust.get(config.gate_on) if loaded.baseline else None
    run.plan = plan = rounds.plan(clean, names, config.gate_policy(), baseline,
                                  config.confidence, config.seed)
    order = [*config.attacks, *config.finish, *ESCALATION]
    run.records = [rounds.drive(plan, lambda chosen: _part(run, chosen, plan.rounds + 1), order)]
    if run.audited:
        gate = run.records[0]
        signs = class_signs(gate, names, [item["check"] for item in run.sanity], mode=config.mode)
        run.escalation = replace(run.escalation, signs=signs, unreliable=unreliable_classes(
            gate, names, signs, config.escalate))


def _part(run: _Run, indices: np.ndarray, round_: int = 0) -> Records | None:
    """The stages on ``indices`` alone (round 0: the clean pass only), as a run of its own on
    the same engines; its records, None if it was interrupted or failed."""
    attack = round_ > 0
    sets = run.loaded.attack_sets if attack else [[] for _ in run.loaded.eps_list]
    part = _Run(run.config, replace(run.loaded, indices=indices, attack_sets=sets),
                rounds.labelled(run.report, round_),
                run.pool, [Records(attack_names=list(run.config.attacks) if attack else [])],
                checked=attack)  # the clean pass checked the outputs
    _run_stages(part, None if attack else (_stream, _share))
    run.warnings += [w for w in part.warnings if w not in run.warnings]
    run.sanity += [item for item in part.sanity if item not in run.sanity]
    run.runtime_diff = max((d for d in (run.runtime_diff, part.runtime_diff) if d is not None),
                           default=None)
    run.escalation = rounds.joined(run.escalation, part.escalation)
    run.partial, run.failure = part.partial, part.failure
    return None if part.partial or part.failure else part.records[0]


def _run_stage(run: _Run, stage: Callable[[_Run], None]) -> None:
    """The one interrupt handler: a Ctrl-C marks the run partial; running out of memory is the
    user's to fix (a smaller batch); under torchrun a failure waits until the ranks share."""
    try:
        with memory_errors(run.loaded.device, run.pool.batch_size):
            stage(run)
    except KeyboardInterrupt:
        run.partial = True
    except Exception as exc:
        if run.failure is not None or not run.loaded.ctx.active:
            raise
        run.failure = exc


def _stream(run: _Run) -> None:
    """The clean pass and every attack on this rank's examples; records examples as they
    complete (all of them kept on Ctrl-C)."""
    config, loaded = run.config, run.loaded
    runtime = loaded.model.runtime if config.runtime_check else None
    buffered: list[ExampleResult] = []

    def flush() -> None:
        # Every ε's columns before any append: a Ctrl-C during onnxruntime's check leaves the
        # batch unrecorded, and the flush in ``finally`` records it once.
        parts = [outcomes(rec.attack_names, buffered, e, runtime if e == loaded.gate_e else None)
                 for e, rec in enumerate(run.records)]
        for rec, part in zip(run.records, parts, strict=True):
            rec.extend(part)
        buffered.clear()

    done = 0
    try:
        for finished in stream_audit(loaded.model.module, _first_checked(run, runtime),
                                     loaded.attack_sets, batch_size=config.batch_size,
                                     seed=config.seed, worst_case=config.mode == "worst-case",
                                     engine=run.pool):
            # Examples complete a few at a time; record (and run onnxruntime on) them in batches.
            buffered.extend(finished)
            if len(buffered) >= run.pool.batch_size:
                flush()
            done += len(finished)
            run.report(Progress("attacking", done, len(loaded.indices)))
    finally:
        flush()  # on Ctrl-C too: the examples completed before it count


def _first_checked(run: _Run, runtime: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]]:
    """This rank's batches; the first one checks the model's outputs (and onnxruntime's)."""
    loaded = run.loaded
    mine = distributed.shard(loaded.indices, loaded.ctx)
    for x, y, idx in iter_batches(loaded.source, mine, run.pool.batch_size):
        x, y = x.to(loaded.device), y.to(loaded.device)
        if not run.checked:
            run.checked = True
            # onnxruntime first: it tells a conversion that fails from data that does not fit.
            if runtime is not None:
                run.runtime_diff = verify_runtime(loaded.model, x.cpu())
            check_outputs(loaded.model.module, x, len(loaded.source.class_names), run.warnings,
                          run.sanity)
        yield x, y, idx


def _share(run: _Run) -> None:
    """Under torchrun, every rank gets every rank's records (or every rank the first
    failure); it runs after an interruption too, so the partial figures cover every rank."""
    ctx = run.loaded.ctx
    run.records = [distributed.gather(rec, ctx, run.failure) for rec in run.records]
    run.partial = distributed.any_partial(run.partial, ctx)


def _finish(run: _Run) -> None:
    """The finish attacks, at every ε, on the examples of every class that no attack broke."""
    config, names = run.config, run.loaded.source.class_names
    if not config.finish or not run.audited:
        return
    for e, rec in enumerate(run.records):
        settings = attack_settings(config, run.loaded.eps_list[e], classes=len(names))
        _on_survivors(run, e, rec, names, build_attacks(config.finish, settings), "finishing")


def _escalate(run: _Run) -> None:
    """Where the figures show signs of masking, attack the survivors of the classes concerned
    with the scale-invariant loss (unless one ran already), then with the gradient-free search
    where the signs persist; judge what remains (after a Ctrl-C too)."""
    if not run.audited:
        return
    config, started = run.config, time.perf_counter()
    names = run.loaded.source.class_names
    gate = run.records[run.loaded.gate_e]
    signs = class_signs(gate, names, [item["check"] for item in run.sanity],
                        sweep=run.records if len(run.records) > 1 else (), mode=config.mode)
    run.escalation = escalation = Escalation(signs=signs)
    ran = (*config.attacks, *config.finish)
    try:
        if signs and config.escalate:
            loss, search = ESCALATION  # a scale-invariant loss, then a gradient-free search
            if not any(prototype(a).scale_invariant for a in ran):
                _escalate_with(run, loss, list(signs))
            remaining = persisting(gate, names, signs)
            escalation.explained = [name for name in signs if name not in remaining]
            if remaining and all(prototype(a).uses_gradient for a in ran):
                _escalate_with(run, search, remaining)
    finally:
        escalation.unreliable = unreliable_classes(gate, names, signs, config.escalate)
        escalation.seconds = time.perf_counter() - started


#: A scan's stages, in order. ``_share`` runs after an interruption or a failure too.
STAGES: tuple[Callable[[_Run], None], ...] = (_stream, _share, _finish, _escalate)


def _escalate_with(run: _Run, attack: str, classes: list[str]) -> None:
    """One escalation attack at every ε on the survivors of ``classes``."""
    run.escalation.attacks += (attack,)
    k = len(run.loaded.source.class_names)
    for e, rec in enumerate(run.records):
        settings = attack_settings(run.config, run.loaded.eps_list[e], "escalation", k)
        count = _on_survivors(run, e, rec, classes, build_attacks([attack], settings),
                              "escalating")
        if e == run.loaded.gate_e:
            run.escalation.examples = max(run.escalation.examples, count)


def _on_survivors(run: _Run, e: int, rec: Records, classes: Sequence[str],
                  attacks: list[Attack], stage: str) -> int:
    """``attacks`` in turn on the examples of ``classes`` that every attack so far left robust
    at the ``e``-th ε, each one's runs side by side (``parts``); their columns join ``rec``.
    Returns how many examples the first one attacked."""
    config, loaded = run.config, run.loaded
    runtime = loaded.model.runtime if config.runtime_check and e == loaded.gate_e else None
    attacked = []
    for attack in attacks:
        targets = survivors(rec, loaded.source.class_names, classes)
        attacked.append(len(targets))
        mine = distributed.shard(targets, loaded.ctx)
        parts = attack.parts()
        found = Records(attack_names=[attack.name])
        batches = ((x.to(loaded.device), y.to(loaded.device), idx)
                   for x, y, idx in iter_batches(loaded.source, mine, run.pool.batch_size))
        done = 0
        for finished in stream_audit(loaded.model.module, batches, [parts],
                                     batch_size=config.batch_size, seed=config.seed,
                                     engine=run.pool):
            record(found, [combine_parts(ex, 0, attack, parts) for ex in finished], 0, runtime)
            done += len(finished)
            run.report(Progress(stage, done, len(mine)))
        merge_columns(rec, distributed.gather(found, loaded.ctx))
    return attacked[0] if attacked else 0


def _judge(run: _Run, started: float, gallery: bool) -> ScanResult:
    """Figures per class and across classes, the gate's verdicts, the gallery: the result."""
    config, loaded = run.config, run.loaded
    main = run.records[loaded.gate_e]
    if len(main) == 0:
        if run.partial:
            raise KeyboardInterrupt
        raise NothingToAudit("nothing to audit: no examples were selected")
    names = loaded.source.class_names
    stats = class_stats(main, names)
    summary = summarize(main, stats)
    if run.plan is not None:  # figures over every example, a class decided early estimated
        stats = run.plan.scale(stats)
        summary = run.plan.summary(summary, stats)
    baseline = loaded.baseline
    judgement = judgement_of(stats, config.gate_policy(), main.attack_names, baseline,
                           run.escalation, config.allow_unreliable)
    sweep = sweep_figures(run.records, loaded.eps_list, names, config.eps_text)
    sanity = run.sanity + sanity_checks(summary, sweep, config.mode)
    warnings = run.warnings + runtime_warnings(summary) + [item["message"] for item in sanity]
    warnings += run.escalation.warnings() + loaded.source.warnings
    pictures, partial = _gallery(run, [v.index for v in judgement.flagged]) if gallery \
        else ({}, run.partial)
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
        data={"spec": config.data, "description": loaded.source.description,
              "size": len(loaded.source.targets), "selected": len(loaded.indices),
              "audited": len(main)},
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
        gallery=pictures,
        partial=partial,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        baseline=baseline,
        attacks=describe_attacks(config, attacks, len(names)),
        escalation=run.escalation,
        sequential=None if run.plan is None else run.plan.to_dict(config.confidence),
        exit_code=code,
        problem=problem,
        records=main,
    )


def _gallery(run: _Run, flagged: list[int]) -> tuple[dict[str, Any], bool]:
    """Adversarial examples of the flagged classes, and whether the run is partial."""
    config, loaded = run.config, run.loaded
    if run.partial or not loaded.ctx.is_main:  # only rank 0 writes reports
        return {}, run.partial
    main = run.records[loaded.gate_e]
    try:
        return make_gallery(loaded.model.module, loaded.source, main, flagged,
                            _gate_attacks(config, loaded, main.attack_names),
                            seed=config.seed, device=loaded.device), False
    except KeyboardInterrupt:  # every figure is in: keep them, only the pictures are lost
        return {}, True


def _gate_attacks(config: ScanConfig, loaded: _Loaded, ran: Sequence[str]) -> list[Attack]:
    """Every attack that ran at the gate's ε: the scan's, the finish's and escalation's."""
    k = len(loaded.source.class_names)
    later = [build_attack(a, attack_settings(config, config.eps, attack_stage(config, a), k))
             for a in ran if a not in config.attacks]
    return [*loaded.attack_sets[loaded.gate_e], *later]


def _model_info(model: LoadedModel, runtime_diff: float | None) -> dict[str, Any]:
    return {"path": str(model.path), "format": model.format, "description": model.description,
            "runtime_max_abs_diff": runtime_diff}


def _read_baseline(path: str) -> Figures:
    try:
        return read_figures(path)
    except UsageError as e:
        raise UsageError(f"--baseline: {e}") from None
