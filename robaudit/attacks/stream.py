"""Feeding the engines: a fixed set of jobs (:func:`run_jobs`), one batch under several attacks
(:func:`audit_batch`), and a stream of data batches whose examples leave as soon as every attack
is done with them (:func:`stream_audit`, what a scan runs).

Gradient and gradient-free attacks run in separate engines (:class:`EnginePool`), so rows that
need no backward pass never share a batch with rows that do.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from robaudit.attacks.base import Attack, AttackOutcome, Model, example_seed, predict
from robaudit.attacks.engine import Engine
from robaudit.attacks.jobs import Finished, Job
from robaudit.attacks.losses import margin


def run_jobs(model: Model, jobs: Iterable[Job], batch_size: int, *,
             amp: bool = False) -> dict[Hashable, Finished]:
    """Run a fixed set of jobs to completion, keeping the working batches full."""
    pool = EnginePool(model, batch_size, amp=amp)
    pending = iter(jobs)
    waiting: list[Job] = []
    results: dict[Hashable, Finished] = {}
    exhausted = False
    while True:
        while not exhausted and len(waiting) < pool.free:
            job = next(pending, None)
            if job is None:
                exhausted = True
                break
            waiting.append(job)
        waiting = pool.add_many(waiting)
        if not pool.busy:
            return results
        for done in pool.step():
            results[done.key] = done


class EnginePool:
    """One engine for gradient attacks and one for gradient-free ones, each with its own working
    batch: rows that need no backward pass never share a batch with rows that do."""

    def __init__(self, model: Model, batch_size: int | None, *, amp: bool = False) -> None:
        self.model = model
        self._batch_size = batch_size
        self.amp = amp
        self.engines: dict[bool, Engine] = {}

    def engine(self, gradient: bool) -> Engine:
        if gradient not in self.engines:
            self.engines[gradient] = Engine(self.model, self._batch_size, amp=self.amp)
        return self.engines[gradient]

    @property
    def batch_size(self) -> int:
        """The working batch (of the gradient engine, the first one made)."""
        engines = list(self.engines.values()) or [self.engine(True)]
        return engines[0].batch_size

    @property
    def free(self) -> int:
        return sum(e.free for e in self.engines.values()) if self.engines else self.batch_size

    @property
    def busy(self) -> bool:
        return any(e.busy for e in self.engines.values())

    @property
    def seconds(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for engine in self.engines.values():
            for name, seconds in engine.seconds.items():
                total[name] = total.get(name, 0.0) + seconds
        return total

    def add_many(self, jobs: Sequence[Job]) -> list[Job]:
        """Put as many of ``jobs`` as fit into their engines; returns those that did not fit."""
        left: list[Job] = []
        for gradient in (True, False):
            mine = [job for job in jobs if job.attack.uses_gradient is gradient]
            if not mine:
                continue
            engine = self.engine(gradient)
            free = engine.free_for(mine[0].x)
            engine.add_many(mine[:free])
            left.extend(mine[free:])
        return left

    def step(self) -> list[Finished]:
        finished: list[Finished] = []
        for engine in self.engines.values():
            if engine.busy:
                finished.extend(engine.step())
        return finished


@dataclass
class BatchAudit:
    """Clean logits and each attack's outcome for every example of a batch.

    Examples misclassified when clean are not attacked: their outcome is the clean input.
    """

    x: torch.Tensor
    y: torch.Tensor
    clean_logits: torch.Tensor
    outcomes: dict[str, AttackOutcome]

    @property
    def clean_correct(self) -> torch.Tensor:
        return predict(self.clean_logits) == self.y


def outcome_of(x: torch.Tensor, clean_logits: torch.Tensor,
               results: dict[Hashable, Finished], keys: Sequence[Hashable | None]) -> AttackOutcome:
    """Assemble per-example results (``None`` key: not attacked) into one batch outcome."""
    outcome = AttackOutcome.unbroken(x, clean_logits)
    rows = [i for i, key in enumerate(keys) if key is not None]
    if not rows:
        return outcome
    done = [results[keys[i]] for i in rows]
    at = torch.tensor(rows, device=x.device)
    outcome.x_adv[at] = torch.stack([d.x_adv for d in done]).to(x.device)
    outcome.logits[at] = torch.stack([d.logits for d in done]).to(outcome.logits.device)
    outcome.broken[at] = torch.tensor([d.broken for d in done], device=x.device)
    outcome.forwards[at] = torch.tensor([d.forwards for d in done], device=x.device)
    outcome.bad_gradient[at] = torch.tensor([d.bad_gradient for d in done], device=x.device)
    return outcome


def attack_batch(attack: Attack, model: Model, x: torch.Tensor, y: torch.Tensor,
                 seeds: torch.Tensor) -> AttackOutcome:
    """One attack on every example of a batch (``seeds``: one per example)."""
    seed_list, labels = seeds.tolist(), y.tolist()
    jobs = [Job(i, x[i], labels[i], seed_list[i], attack) for i in range(len(x))]
    results = run_jobs(model, jobs, max(1, len(x)))
    if not results:
        return AttackOutcome.unbroken(x, x.new_zeros((0, 0)))
    k = next(iter(results.values())).logits.shape[0]
    return outcome_of(x, x.new_zeros((len(x), k)), results, list(range(len(x))))


def audit_batch(
    model: Model,
    attacks: Sequence[Attack],
    x: torch.Tensor,
    y: torch.Tensor,
    seeds: torch.Tensor,
) -> BatchAudit:
    """Attack one batch with each attack independently (per-attack and worst-case figures)."""
    with torch.no_grad():
        clean_logits = model(x)
    correct = (predict(clean_logits) == y).tolist()
    seed_list = seeds.tolist()
    jobs = [Job((a.name, i), x[i], int(y[i]), seed_list[i], a, clean_logits[i])
            for a in attacks for i in range(len(x)) if correct[i]]
    engine_results = run_jobs(model, jobs, max(1, len(x)))
    outcomes = {}
    for attack in attacks:
        keys = [(attack.name, i) if correct[i] else None for i in range(len(x))]
        outcomes[attack.name] = outcome_of(x, clean_logits, engine_results, keys)
    return BatchAudit(x, y, clean_logits, outcomes)


@dataclass
class ExampleResult:
    """Every attack's result on one example, once all of them are done.

    ``outcomes[(e, name)]`` is the result of attack ``name`` at the ``e``-th ε, or ``None`` when
    the example was misclassified clean (and so not attacked). In worst-case mode an attack that
    did not run, because an earlier one broke the example, carries that earlier breaking result:
    the figures of each attack are then cumulative.
    """

    index: int
    x: torch.Tensor
    y: int
    clean_logits: torch.Tensor
    outcomes: dict[tuple[int, str], Finished | None]
    waiting: int = 0


def stream_audit(
    model: Model,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    attack_sets: Sequence[Sequence[Attack]],
    *,
    batch_size: int | None,
    seed: int = 0,
    worst_case: bool = False,
    amp: bool = False,
    engine: EnginePool | None = None,
) -> Iterator[list[ExampleResult]]:
    """Attack a stream of ``(x, y, index)`` batches; yield examples as they complete.

    ``attack_sets[e]`` are the attacks at the ``e``-th ε. The clean pass runs on whole data
    batches; the clean-correct examples become jobs for working batches kept full across data
    batch boundaries.
    """
    stream = _Stream(engine or EnginePool(model, batch_size, amp=amp), attack_sets, seed,
                     worst_case)
    source = iter(batches)
    exhausted = False
    while True:
        ready: list[ExampleResult] = []
        while not exhausted and stream.pending < stream.pool.free:
            batch = next(source, None)
            if batch is None:
                exhausted = True
                break
            ready.extend(stream.admit(model, *batch))
        stream.fill()
        if not stream.pool.busy and not stream.pending:
            if ready:
                yield ready
            if exhausted:
                return
            continue
        ready.extend(stream.step())
        if ready:
            yield ready


class _Stream:
    """The bookkeeping of :func:`stream_audit`: examples in flight and the jobs waiting for a
    row, one queue per engine."""

    def __init__(self, pool: EnginePool, attack_sets: Sequence[Sequence[Attack]], seed: int,
                 worst_case: bool) -> None:
        self.pool = pool
        self.attack_sets = attack_sets
        self.seed = seed
        self.worst_case = worst_case
        self.names = [[a.name for a in attacks] for attacks in attack_sets]
        self.queues: dict[bool, deque[Job]] = {True: deque(), False: deque()}
        self.in_flight: dict[int, ExampleResult] = {}

    @property
    def pending(self) -> int:
        return len(self.queues[True]) + len(self.queues[False])

    def admit(self, model: Model, x: torch.Tensor, y: torch.Tensor,
              idx: torch.Tensor) -> list[ExampleResult]:
        """Run the clean pass of a data batch; queue the jobs of its clean-correct examples and
        return the others, which are done."""
        with torch.no_grad():  # full precision even with amp: it decides what is attacked
            clean = model(x).float()
        correct = (predict(clean) == y).tolist()
        done = []
        firsts = [(e, 0) for e, attacks in enumerate(self.attack_sets) if attacks] \
            if self.worst_case else [(e, k) for e, attacks in enumerate(self.attack_sets)
                                     for k in range(len(attacks))]
        for i, index in enumerate(idx.tolist()):
            example = ExampleResult(index, x[i], int(y[i]), clean[i], {})
            if not correct[i] or not firsts:  # no attack to run (a clean pass alone)
                example.outcomes = {(e, n): None for e, ns in enumerate(self.names) for n in ns}
                done.append(example)
                continue
            example.waiting = len(firsts)
            self.in_flight[index] = example
            for e, k in firsts:
                self._queue(example, e, k)
        return done

    def _queue(self, example: ExampleResult, e: int, k: int) -> None:
        attack = self.attack_sets[e][k]
        self.queues[attack.uses_gradient].append(
            Job((example.index, e, k), example.x, example.y,
                example_seed(example.index, self.seed), attack, example.clean_logits))

    def fill(self) -> None:
        for gradient, queue in self.queues.items():
            if queue:
                engine = self.pool.engine(gradient)
                free = engine.free_for(queue[0].x)
                engine.add_many([queue.popleft() for _ in range(min(len(queue), free))])

    def step(self) -> list[ExampleResult]:
        ready = []
        for done in self.pool.step():
            index, e, k = done.key  # type: ignore[misc]
            example = self.in_flight[index]
            example.outcomes[(e, self.names[e][k])] = done
            example.waiting -= 1
            if self.worst_case:
                if not done.broken and k + 1 < len(self.names[e]):
                    self._queue(example, e, k + 1)
                    example.waiting += 1
                elif done.broken:
                    for later in self.names[e][k + 1:]:  # cumulative: broken by an earlier one
                        example.outcomes[(e, later)] = done
            if example.waiting == 0:
                ready.append(self.in_flight.pop(index))
        return ready


def combine_parts(example: ExampleResult, e: int, attack: Attack,
                  parts: Sequence[Attack]) -> ExampleResult:
    """``example`` with its parts' outcomes at the ``e``-th ε (see PGD.parts) replaced by the
    whole attack's: the first part, in run order, that broke it, else the one that left the
    least margin, as running them one after the other would give. Forward passes add up."""
    if list(parts) == [attack]:
        return example
    done = [example.outcomes.pop((e, part.name)) for part in parts]
    if any(d is None for d in done):  # not attacked: misclassified clean
        example.outcomes[(e, attack.name)] = None
        return example
    results = [d for d in done if d is not None]
    broken = [d for d in results if d.broken]
    if broken:
        pick = broken[0]
    else:
        y = torch.tensor([example.y], device=results[0].logits.device)
        pick = min(results, key=lambda d: float(margin(d.logits[None].float(), y)))
    example.outcomes[(e, attack.name)] = Finished(
        pick.key, pick.x_adv, pick.logits, bool(broken), sum(d.forwards for d in results),
        any(d.bad_gradient for d in results))
    return example
