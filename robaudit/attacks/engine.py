"""The attack engine: continuous batching with a per-example early stop.

The engine keeps a working batch of ``batch_size`` slots. Each slot holds one *job*: one example
under one attack (at one ε). Every iteration is a single forward and backward pass over all
occupied slots; each slot has its own step counter, loss, ε and step size. A job leaves the batch
as soon as its iterate is misclassified, or once it has used all its steps, restarts and losses,
and the caller refills the freed slot at once, so the device never runs half-empty batches while
work is waiting.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from robaudit.attacks.base import AttackOutcome, Loss, Model, uniform_noise
from robaudit.attacks.losses import margin
from robaudit.attacks.pgd import PGD


@dataclass(frozen=True)
class Job:
    """One example under one attack."""

    key: Hashable
    x: torch.Tensor  # CHW, in [0, 1]
    y: int
    seed: int
    attack: PGD


@dataclass(frozen=True)
class Finished:
    """A job's result: the first misclassified iterate, else the lowest-margin one seen."""

    key: Hashable
    x_adv: torch.Tensor
    logits: torch.Tensor
    broken: bool
    forwards: int
    bad_gradient: bool


class Engine:
    """Runs PGD-style jobs in one working batch. Add jobs with :meth:`add`, advance with
    :meth:`step` until :attr:`busy` is false."""

    def __init__(self, model: Model, batch_size: int, *, amp: bool = False) -> None:
        self.model = model
        self.batch_size = batch_size
        self.amp = amp
        self.jobs: list[Job | None] = [None] * batch_size
        self._shape: tuple[int, ...] | None = None
        #: Seconds spent per attack name (forward, backward and update, shared by slot count).
        self.seconds: dict[str, float] = {}

    # -- slot state -------------------------------------------------------------------------

    def _allocate(self, x: torch.Tensor) -> None:
        b, shape, device = self.batch_size, tuple(x.shape), x.device
        self._shape = shape
        self.x0 = torch.zeros((b, *shape), device=device)
        self.cur = torch.zeros_like(self.x0)
        self.best_x = torch.zeros_like(self.x0)
        self.best_logits: torch.Tensor | None = None
        self.best_margin = torch.full((b,), float("inf"), device=device)
        self.y = torch.zeros(b, dtype=torch.long, device=device)
        self.eps = torch.zeros(b, device=device)
        self.alpha = torch.zeros(b, device=device)
        self.step_no = torch.zeros(b, dtype=torch.long, device=device)
        self.steps = torch.zeros(b, dtype=torch.long, device=device)
        self.run = [0] * b
        self.forwards = [0] * b
        self.bad = [False] * b
        # Step-size halving (APGD's schedule): best loss so far and its iterate, and how many
        # steps since the last checkpoint raised the loss.
        self.best_loss = torch.full((b,), -float("inf"), device=device)
        self.best_loss_x = torch.zeros_like(self.x0)
        self.gains = torch.zeros(b, dtype=torch.long, device=device)
        self.last_loss = torch.full((b,), -float("inf"), device=device)
        self.checkpoint_best = torch.full((b,), -float("inf"), device=device)
        self.checkpoint_reduced = torch.zeros(b, dtype=torch.bool, device=device)

    @property
    def free(self) -> int:
        return sum(job is None for job in self.jobs)

    @property
    def busy(self) -> bool:
        return any(job is not None for job in self.jobs)

    def add(self, job: Job) -> None:
        """Put a job in a free slot; it starts at its first run's starting point."""
        slot = self.jobs.index(None)
        if self._shape is None:
            self._allocate(job.x)
        elif tuple(job.x.shape) != self._shape:
            raise ValueError(f"job input shape {tuple(job.x.shape)} != {self._shape}")
        self.jobs[slot] = job
        self.x0[slot] = job.x
        self.y[slot] = job.y
        self.eps[slot] = job.attack.eps
        self.steps[slot] = job.attack.steps
        self.best_margin[slot] = float("inf")
        self.run[slot] = 0
        self.forwards[slot] = 0
        self.bad[slot] = False
        self._start_run(slot)

    def _start_run(self, slot: int) -> None:
        job = self.jobs[slot]
        assert job is not None
        attack = job.attack
        x0 = self.x0[slot]
        if attack.random_start:
            noise = uniform_noise(x0, job.seed, self.run[slot]).to(x0.device)
            self.cur[slot] = (x0 + attack.eps * noise).clamp(0.0, 1.0)
        else:
            self.cur[slot] = x0
        self.step_no[slot] = 0
        self.alpha[slot] = attack.initial_step_size
        self.best_loss[slot] = -float("inf")
        self.best_loss_x[slot] = self.cur[slot]
        self.gains[slot] = 0
        self.last_loss[slot] = -float("inf")
        self.checkpoint_best[slot] = -float("inf")
        self.checkpoint_reduced[slot] = False

    # -- one iteration ------------------------------------------------------------------------

    def step(self) -> list[Finished]:
        """One forward and backward pass over the occupied slots; returns the jobs that ended."""
        occupied = [i for i, job in enumerate(self.jobs) if job is not None]
        if not occupied:
            return []
        started = time.perf_counter()
        slots = torch.tensor(occupied, device=self.x0.device)
        jobs = [self.jobs[i] for i in occupied]
        y = self.y[slots]
        xa = self.cur[slots].detach().requires_grad_(True)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.amp and xa.device.type == "cuda" else nullcontext()
        )
        with torch.enable_grad(), autocast:
            logits = self.model(xa)
        logits = logits.float()
        if self.best_logits is None:
            self.best_logits = logits.new_zeros((self.batch_size, logits.shape[1]))
        for i in occupied:
            self.forwards[i] += 1

        detached = logits.detach()
        margins = margin(detached, y)
        wrong = detached.argmax(dim=1) != y
        better = margins < self.best_margin[slots]
        keep_at = slots[better]
        self.best_margin[keep_at] = margins[better]
        self.best_x[keep_at] = xa.detach()[better]
        self.best_logits[keep_at] = detached[better]

        at_end = self.step_no[slots] >= self.steps[slots]
        moving = ~wrong & ~at_end
        if bool(moving.any()):
            self._update(xa, logits, y, slots, jobs, moving)

        finished: list[Finished] = []
        wrong_list, end_list = wrong.tolist(), at_end.tolist()
        for j, i in enumerate(occupied):
            job = jobs[j]
            assert job is not None
            if wrong_list[j]:
                finished.append(self._finish(i, xa.detach()[j], detached[j], broken=True))
            elif end_list[j]:
                if self.run[i] + 1 < job.attack.runs:
                    self.run[i] += 1
                    self._start_run(i)
                else:
                    assert self.best_logits is not None
                    finished.append(
                        self._finish(i, self.best_x[i].clone(), self.best_logits[i].clone(),
                                     broken=False)
                    )
        self._account(jobs, time.perf_counter() - started)
        return finished

    def _update(self, xa: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                slots: torch.Tensor, jobs: Sequence[Job | None], moving: torch.Tensor) -> None:
        """The signed-gradient step of every slot that goes on, each with its own loss."""
        losses = torch.zeros(len(jobs), device=logits.device)
        by_loss: dict[int, tuple[Loss, list[int]]] = {}
        slot_list = slots.tolist()
        for j, go in enumerate(moving.tolist()):
            job = jobs[j]
            if go and job is not None:
                loss_fn = job.attack.loss_of_run(self.run[slot_list[j]])
                by_loss.setdefault(id(loss_fn), (loss_fn, []))[1].append(j)
        for loss_fn, members in by_loss.values():
            index = torch.tensor(members, device=logits.device)
            losses = losses.index_put((index,), loss_fn(logits[index], y[index]).float())
        (grad,) = torch.autograd.grad(losses.sum(), xa)
        grad = grad.float()

        move = moving.nonzero().squeeze(1)
        at = slots[move]
        g = grad[move]
        flat = g.flatten(1)
        healthy = torch.isfinite(flat).all(dim=1) & (flat.abs().amax(dim=1) > 0)
        for j in (~healthy).nonzero().squeeze(1).tolist():
            self.bad[int(at[j])] = True
        direction = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).sign()

        x_now = xa.detach()[move]
        loss_now = losses.detach()[move]
        back_to_best = self._schedule(at, jobs, move, x_now, loss_now)

        view = (-1,) + (1,) * (x_now.dim() - 1)
        start = torch.where(back_to_best.view(view), self.best_loss_x[at], x_now)
        moved = start + self.alpha[at].view(view) * direction
        x0, eps = self.x0[at], self.eps[at].view(view)
        moved = torch.maximum(torch.minimum(moved, x0 + eps), x0 - eps).clamp(0.0, 1.0)
        self.cur[at] = moved
        self.step_no[at] += 1

    def _schedule(self, at: torch.Tensor, jobs: Sequence[Job | None], move: torch.Tensor,
                  x_now: torch.Tensor, loss_now: torch.Tensor) -> torch.Tensor:
        """Track the best loss; at APGD's checkpoints halve a stalled step size.

        Returns which slots go back to their best point before stepping (those just halved).
        """
        back_to_best = torch.zeros(len(at), dtype=torch.bool, device=at.device)
        halving = [jobs[j] is not None and jobs[j].attack.schedule == "halving"  # type: ignore[union-attr]
                   for j in move.tolist()]
        if not any(halving):
            return back_to_best
        rose = loss_now > self.last_loss[at]
        self.gains[at] += rose.long()
        self.last_loss[at] = loss_now
        improved = loss_now > self.best_loss[at]
        self.best_loss[at] = torch.where(improved, loss_now, self.best_loss[at])
        self.best_loss_x[at[improved]] = x_now[improved]
        for j, i in enumerate(at.tolist()):
            job = jobs[int(move[j])]
            if not halving[j] or job is None:
                continue
            attack = job.attack
            step = int(self.step_no[i])
            interval = attack.checkpoint_interval(step)
            if interval is None:
                continue
            # Halve when fewer than 75% of the steps since the last checkpoint raised the loss,
            # or when the last checkpoint did not halve and the best loss has not moved.
            stalled = int(self.gains[i]) < 0.75 * interval
            flat = (not bool(self.checkpoint_reduced[i])
                    and float(self.best_loss[i]) <= float(self.checkpoint_best[i]))
            reduce = stalled or flat
            if reduce:
                self.alpha[i] = self.alpha[i] / 2
                back_to_best[j] = True
            self.checkpoint_reduced[i] = reduce
            self.checkpoint_best[i] = self.best_loss[i]
            self.gains[i] = 0
        return back_to_best

    def _finish(self, slot: int, x_adv: torch.Tensor, logits: torch.Tensor, *,
                broken: bool) -> Finished:
        job = self.jobs[slot]
        assert job is not None
        self.jobs[slot] = None
        return Finished(job.key, x_adv, logits, broken, self.forwards[slot], self.bad[slot])

    def _account(self, jobs: Sequence[Job | None], seconds: float) -> None:
        share = seconds / len(jobs)
        for job in jobs:
            assert job is not None
            self.seconds[job.attack.name] = self.seconds.get(job.attack.name, 0.0) + share


def run_jobs(model: Model, jobs: Iterable[Job], batch_size: int, *,
             amp: bool = False) -> dict[Hashable, Finished]:
    """Run a fixed set of jobs to completion, keeping the working batch full."""
    engine = Engine(model, batch_size, amp=amp)
    pending = iter(jobs)
    results: dict[Hashable, Finished] = {}
    exhausted = False
    while True:
        while not exhausted and engine.free:
            job = next(pending, None)
            if job is None:
                exhausted = True
                break
            engine.add(job)
        if not engine.busy:
            return results
        for done in engine.step():
            results[done.key] = done


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
        return self.clean_logits.argmax(dim=1) == self.y


def outcome_of(x: torch.Tensor, clean_logits: torch.Tensor,
               results: dict[Hashable, Finished], keys: Sequence[Hashable | None]) -> AttackOutcome:
    """Assemble per-example results (``None`` key: not attacked) into one batch outcome."""
    outcome = AttackOutcome.unbroken(x, clean_logits)
    for i, key in enumerate(keys):
        if key is None:
            continue
        done = results[key]
        outcome.x_adv[i] = done.x_adv
        outcome.logits[i] = done.logits
        outcome.broken[i] = done.broken
        outcome.forwards[i] = done.forwards
        outcome.bad_gradient[i] = done.bad_gradient
    return outcome


def audit_batch(
    model: Model,
    attacks: Sequence[PGD],
    x: torch.Tensor,
    y: torch.Tensor,
    seeds: torch.Tensor,
    *,
    seconds: dict[str, float] | None = None,
) -> BatchAudit:
    """Attack one batch with each attack independently (per-attack and worst-case figures)."""
    with torch.no_grad():
        clean_logits = model(x)
    correct = (clean_logits.argmax(dim=1) == y).tolist()
    seed_list = seeds.tolist()
    jobs = [Job((a.name, i), x[i], int(y[i]), seed_list[i], a)
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
    attack_sets: Sequence[Sequence[PGD]],
    *,
    batch_size: int,
    seed: int = 0,
    worst_case: bool = False,
    amp: bool = False,
    engine: Engine | None = None,
) -> Iterable[list[ExampleResult]]:
    """Attack a stream of ``(x, y, index)`` batches; yield examples as they complete.

    ``attack_sets[e]`` are the attacks at the ``e``-th ε. The clean pass runs on whole data
    batches; the clean-correct examples become jobs for one working batch kept full across data
    batch boundaries.
    """
    engine = engine or Engine(model, batch_size, amp=amp)
    pending: deque[Job] = deque()
    in_flight: dict[int, ExampleResult] = {}
    source = iter(batches)
    exhausted = False
    names = [[a.name for a in attacks] for attacks in attack_sets]

    def first_jobs(example: ExampleResult, seed_of: int) -> list[Job]:
        if worst_case:
            return [Job((example.index, e, 0), example.x, example.y, seed_of, attacks[0])
                    for e, attacks in enumerate(attack_sets)]
        return [Job((example.index, e, k), example.x, example.y, seed_of, attack)
                for e, attacks in enumerate(attack_sets) for k, attack in enumerate(attacks)]

    while True:
        ready: list[ExampleResult] = []
        while not exhausted and len(pending) < engine.free:
            batch = next(source, None)
            if batch is None:
                exhausted = True
                break
            x, y, idx = batch
            autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                        if amp and x.device.type == "cuda" else nullcontext())
            with torch.no_grad(), autocast:
                clean = model(x).float()
            correct = (clean.argmax(dim=1) == y).tolist()
            for i, index in enumerate(idx.tolist()):
                example = ExampleResult(index, x[i], int(y[i]), clean[i], {})
                if not correct[i]:
                    example.outcomes = {(e, n): None for e, ns in enumerate(names) for n in ns}
                    ready.append(example)
                    continue
                jobs = first_jobs(example, index + seed * (1 << 32))
                example.waiting = len(jobs)
                in_flight[index] = example
                pending.extend(jobs)
        while pending and engine.free:
            engine.add(pending.popleft())
        if not engine.busy and not pending:
            if ready:
                yield ready
            if exhausted:
                return
            continue
        for done in engine.step():
            index, e, k = done.key  # type: ignore[misc]
            example = in_flight[index]
            example.outcomes[(e, names[e][k])] = done
            example.waiting -= 1
            if worst_case:
                if not done.broken and k + 1 < len(names[e]):
                    nxt = attack_sets[e][k + 1]
                    pending.append(Job((index, e, k + 1), example.x, example.y,
                                       index + seed * (1 << 32), nxt))
                    example.waiting += 1
                elif done.broken:
                    for later in names[e][k + 1:]:  # cumulative: broken by an earlier attack
                        example.outcomes[(e, later)] = done
            if example.waiting == 0:
                ready.append(in_flight.pop(index))
        if ready:
            yield ready
