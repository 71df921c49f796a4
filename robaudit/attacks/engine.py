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
        # Free slots as a stack (lowest slot on top): O(1) to take and to give back.
        self._free = list(range(batch_size - 1, -1, -1))
        self._shape: tuple[int, ...] | None = None
        # Losses and attack names seen so far, numbered, so that per-slot choices are tensors.
        self._loss_ids: dict[int, int] = {}
        self._loss_fns: list[Loss] = []
        self._names: list[str] = []
        # Per attack object (by number): steps since the previous APGD checkpoint, at each step
        # that is one (0 elsewhere), so that the schedule is decided for all slots at once.
        self._attacks: list[PGD] = []
        self._checkpoints = torch.zeros((0, 1), dtype=torch.long)
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
        self.loss_id = torch.zeros(b, dtype=torch.long, device=device)
        self.name_id = torch.zeros(b, dtype=torch.long, device=device)
        self.halving = torch.zeros(b, dtype=torch.bool, device=device)
        self.attack_id = torch.zeros(b, dtype=torch.long, device=device)
        self.forwards = torch.zeros(b, dtype=torch.long, device=device)
        self.bad = torch.zeros(b, dtype=torch.bool, device=device)
        self.run = [0] * b
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
        return len(self._free)

    @property
    def busy(self) -> bool:
        return len(self._free) < self.batch_size

    def add(self, job: Job) -> None:
        """Put a job in a free slot; it starts at its first run's starting point."""
        self.add_many([job])

    def add_many(self, jobs: Sequence[Job]) -> None:
        """Put several jobs in free slots at once (one tensor write per field, not per job)."""
        if not jobs:
            return
        if len(jobs) > len(self._free):
            raise ValueError(f"{len(jobs)} jobs for {len(self._free)} free slots")
        if self._shape is None:
            self._allocate(jobs[0].x)
        for job in jobs:
            if tuple(job.x.shape) != self._shape:
                raise ValueError(f"job input shape {tuple(job.x.shape)} != {self._shape}")
        slots = [self._free.pop() for _ in jobs]
        for slot, job in zip(slots, jobs, strict=True):
            self.jobs[slot] = job
            self.run[slot] = 0
            if job.attack.name not in self._names:
                self._names.append(job.attack.name)
            if not any(job.attack is a for a in self._attacks):
                self._register(job.attack)
        at = torch.tensor(slots, device=self.x0.device)
        device = self.x0.device
        self.x0[at] = torch.stack([job.x for job in jobs]).to(device)
        self.y[at] = torch.tensor([job.y for job in jobs], device=device)
        self.eps[at] = torch.tensor([job.attack.eps for job in jobs], device=device)
        self.steps[at] = torch.tensor([job.attack.steps for job in jobs], device=device)
        self.halving[at] = torch.tensor([job.attack.schedule == "halving" for job in jobs],
                                        device=device)
        self.name_id[at] = torch.tensor([self._names.index(job.attack.name) for job in jobs],
                                        device=device)
        self.attack_id[at] = torch.tensor(
            [next(k for k, a in enumerate(self._attacks) if a is job.attack) for job in jobs],
            device=device)
        self.best_margin[at] = float("inf")
        self.forwards[at] = 0
        self.bad[at] = False
        self._start_runs(slots)

    def _register(self, attack: PGD) -> None:
        self._attacks.append(attack)
        width = max(a.steps for a in self._attacks) + 1
        table = torch.zeros((len(self._attacks), width), dtype=torch.long)
        for k, a in enumerate(self._attacks):
            if a.schedule == "halving":
                for step in range(a.steps + 1):
                    table[k, step] = a.checkpoint_interval(step) or 0
        self._checkpoints = table.to(self.x0.device)

    def _start_runs(self, slots: Sequence[int]) -> None:
        """Each slot's current run begins: a random start (or the clean input), a fresh step."""
        device = self.x0.device
        at = torch.tensor(slots, device=device)
        jobs = [self.jobs[i] for i in slots]
        starts = self.x0[at].clone()
        noisy = [j for j, job in enumerate(jobs) if job is not None and job.attack.random_start]
        if noisy:
            # Each attack draws its own starts: a union of attacks from one shared start per
            # example would explore less than independent ones (and be measurably weaker).
            noise = torch.stack([
                uniform_noise(starts[j], jobs[j].seed,  # type: ignore[union-attr]
                              jobs[j].attack.stream + self.run[slots[j]])  # type: ignore[union-attr]
                for j in noisy]).to(device)
            eps = self.eps[at[noisy]].view((-1,) + (1,) * (noise.dim() - 1))
            starts[noisy] = (starts[noisy] + eps * noise).clamp(0.0, 1.0)
        self.cur[at] = starts
        self.best_loss_x[at] = starts
        ids, alphas = [], []
        for slot, job in zip(slots, jobs, strict=True):
            assert job is not None
            loss_fn = job.attack.loss_of_run(self.run[slot])
            if id(loss_fn) not in self._loss_ids:
                self._loss_ids[id(loss_fn)] = len(self._loss_fns)
                self._loss_fns.append(loss_fn)
            ids.append(self._loss_ids[id(loss_fn)])
            alphas.append(job.attack.initial_step_size)
        self.loss_id[at] = torch.tensor(ids, device=device)
        self.alpha[at] = torch.tensor(alphas, device=device, dtype=self.alpha.dtype)
        self.step_no[at] = 0
        self.best_loss[at] = -float("inf")
        self.gains[at] = 0
        self.last_loss[at] = -float("inf")
        self.checkpoint_best[at] = -float("inf")
        self.checkpoint_reduced[at] = False

    # -- one iteration ------------------------------------------------------------------------

    def step(self) -> list[Finished]:
        """One forward and backward pass over the occupied slots; returns the jobs that ended."""
        if not self.busy:
            return []
        started = time.perf_counter()
        free = set(self._free)
        occupied = [i for i in range(self.batch_size) if i not in free]
        slots = torch.tensor(occupied, device=self.x0.device)
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
        self.forwards[slots] += 1

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
            self._update(xa, logits, y, slots, moving)

        finished: list[Finished] = []
        restarting: list[int] = []
        # Only the slots that end (broken, or out of steps) need Python-level work.
        wrong_list = wrong.tolist()
        for j in (wrong | at_end).nonzero().squeeze(1).tolist():
            i = occupied[j]
            job = self.jobs[i]
            assert job is not None
            if wrong_list[j]:
                finished.append(self._finish(i, xa.detach()[j], detached[j], broken=True))
            elif self.run[i] + 1 < job.attack.runs:
                self.run[i] += 1
                restarting.append(i)
            else:
                finished.append(self._finish(i, self.best_x[i].clone(),
                                             self.best_logits[i].clone(), broken=False))
        if restarting:
            self._start_runs(restarting)
        self._account(slots, time.perf_counter() - started)
        return finished

    def _update(self, xa: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                slots: torch.Tensor, moving: torch.Tensor) -> None:
        """The signed-gradient step of every slot that goes on, each with its own loss."""
        move = moving.nonzero().squeeze(1)
        at = slots[move]
        loss_ids = self.loss_id[at]
        losses = torch.zeros(len(slots), device=logits.device)
        for lid in torch.unique(loss_ids).tolist():
            members = move[loss_ids == lid]
            losses = losses.index_put((members,),
                                      self._loss_fns[lid](logits[members], y[members]).float())
        (grad,) = torch.autograd.grad(losses.sum(), xa)
        g = grad[move].float()
        flat = g.flatten(1)
        healthy = torch.isfinite(flat).all(dim=1) & (flat.abs().amax(dim=1) > 0)
        self.bad[at[~healthy]] = True
        direction = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).sign()

        x_now = xa.detach()[move]
        back_to_best = self._schedule(at, x_now, losses.detach()[move])

        view = (-1,) + (1,) * (x_now.dim() - 1)
        start = x_now if back_to_best is None else torch.where(
            back_to_best.view(view), self.best_loss_x[at], x_now)
        moved = start + self.alpha[at].view(view) * direction
        x0, eps = self.x0[at], self.eps[at].view(view)
        moved = torch.maximum(torch.minimum(moved, x0 + eps), x0 - eps).clamp(0.0, 1.0)
        self.cur[at] = moved
        self.step_no[at] += 1

    def _schedule(self, at: torch.Tensor, x_now: torch.Tensor,
                  loss_now: torch.Tensor) -> torch.Tensor | None:
        """Track the best loss; at APGD's checkpoints halve a stalled step size.

        Returns which slots go back to their best point before stepping (those just halved),
        or None when no slot uses the halving schedule.
        """
        halving = self.halving[at]
        if not bool(halving.any()):
            return None
        back_to_best = torch.zeros(len(at), dtype=torch.bool, device=at.device)
        rose = loss_now > self.last_loss[at]
        self.gains[at] += rose.long()
        self.last_loss[at] = loss_now
        improved = loss_now > self.best_loss[at]
        self.best_loss[at] = torch.where(improved, loss_now, self.best_loss[at])
        self.best_loss_x[at[improved]] = x_now[improved]
        interval = self._checkpoints[self.attack_id[at], self.step_no[at]]
        at_checkpoint = halving & (interval > 0)
        if not bool(at_checkpoint.any()):
            return back_to_best
        cp = at[at_checkpoint]
        # Halve when fewer than 75% of the steps since the last checkpoint raised the loss, or
        # when the last checkpoint did not halve and the best loss has not moved since.
        stalled = self.gains[cp] < 0.75 * interval[at_checkpoint]
        flat = ~self.checkpoint_reduced[cp] & (self.best_loss[cp] <= self.checkpoint_best[cp])
        reduce = stalled | flat
        self.alpha[cp] = torch.where(reduce, self.alpha[cp] / 2, self.alpha[cp])
        back_to_best[at_checkpoint] = reduce
        self.checkpoint_reduced[cp] = reduce
        self.checkpoint_best[cp] = self.best_loss[cp]
        self.gains[cp] = 0
        return back_to_best

    def _finish(self, slot: int, x_adv: torch.Tensor, logits: torch.Tensor, *,
                broken: bool) -> Finished:
        job = self.jobs[slot]
        assert job is not None
        self.jobs[slot] = None
        self._free.append(slot)
        return Finished(job.key, x_adv, logits, broken, int(self.forwards[slot]),
                        bool(self.bad[slot]))

    def _account(self, slots: torch.Tensor, seconds: float) -> None:
        counts = torch.bincount(self.name_id[slots], minlength=len(self._names)).tolist()
        for name, count in zip(self._names, counts, strict=True):
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds * count / len(slots)


def run_jobs(model: Model, jobs: Iterable[Job], batch_size: int, *,
             amp: bool = False) -> dict[Hashable, Finished]:
    """Run a fixed set of jobs to completion, keeping the working batch full."""
    engine = Engine(model, batch_size, amp=amp)
    pending = iter(jobs)
    results: dict[Hashable, Finished] = {}
    exhausted = False
    while True:
        batch: list[Job] = []
        while not exhausted and len(batch) < engine.free:
            job = next(pending, None)
            if job is None:
                exhausted = True
                break
            batch.append(job)
        engine.add_many(batch)
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


def audit_batch(
    model: Model,
    attacks: Sequence[PGD],
    x: torch.Tensor,
    y: torch.Tensor,
    seeds: torch.Tensor,
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
        engine.add_many([pending.popleft() for _ in range(min(len(pending), engine.free))])
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
