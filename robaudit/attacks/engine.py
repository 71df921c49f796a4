"""The attack engine: continuous batching with a per-example early stop.

The engine keeps a working batch of ``batch_size`` rows. Each row holds one *job*: one example
under one attack (at one ε). Every iteration is a single forward and backward pass over the rows
in use; each row has its own step counter, loss, ε and step size. A job leaves the batch as soon
as its iterate is misclassified, or once it has used all its steps, restarts and losses, and the
caller refills the freed row at once, so the device never runs half-empty batches while work is
waiting.

With ``amp`` the passes run under bf16 autocast (CUDA, or a CPU with bf16 instructions); the
verdicts do not: an iterate counts as broken only if a full-precision pass agrees, and the logits
reported are full-precision ones.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from robaudit.attacks.base import AttackOutcome, Loss, Model, fill_uniform_noise
from robaudit.attacks.losses import margin
from robaudit.attacks.pgd import PGD
from robaudit.errors import ModelOutputError

#: The working batch when none is given, for inputs of 2**19 / 256 = 2048 values or more.
DEFAULT_BATCH = 256


def auto_batch_size(numel: int) -> int:
    """The working batch for inputs of ``numel`` values when the user sets none.

    About 2 MiB of float32 input, between 256 and 4096 rows: a small model's passes cost several
    times less per example in batches of thousands than of hundreds (on the CPU as on a GPU),
    and inputs of at most 2048 values (32x32 greyscale, 8x8 colour) rarely feed large models.
    """
    return max(DEFAULT_BATCH, min(4096, (1 << 19) // max(1, numel)))


# Bits of an engine row's flags.
_BAD = 1  # some step had a zero or non-finite input gradient
_REDUCED = 2  # the last checkpoint halved the step size


@dataclass(frozen=True)
class Job:
    """One example under one attack."""

    key: Hashable
    x: torch.Tensor  # CHW, in [0, 1]
    y: int
    seed: int
    attack: PGD


@dataclass(slots=True)
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
    :meth:`step` until :attr:`busy` is false.

    The jobs in flight occupy the first :attr:`n` rows of every state tensor, so a step works on
    slices, not on gathered copies; a job that ends leaves a hole that the last row fills. The
    per-job scalars live in two small matrices (floats and integers) so that moving a row is a
    handful of tensor operations, whatever the number of fields.
    """

    def __init__(self, model: Model, batch_size: int | None, *, amp: bool = False) -> None:
        self.model = model
        # None: chosen from the first job's input size (auto_batch_size).
        self.batch_size = batch_size or DEFAULT_BATCH
        self._auto = batch_size is None
        self.amp = amp
        #: Rows in use: the jobs in flight are rows ``0 .. n-1``.
        self.n = 0
        self.jobs: list[Job] = []
        self.run: list[int] = []  # per row: which run (random start, loss) of its attack
        self._row_loss: list[int] = []  # per row: the number of the loss it ascends
        self._shape: tuple[int, ...] | None = None
        # Losses and attacks seen so far, numbered, so that per-row choices are tensors.
        self._loss_ids: dict[int, int] = {}
        self._loss_fns: list[Loss] = []
        self._attacks: list[PGD] = []
        # Per attack (by number): at each step that is an APGD checkpoint, the steps since the
        # previous one (0 elsewhere, and everywhere for fixed-step attacks).
        self._checkpoints = torch.zeros((0, 1), dtype=torch.long)
        self._halving = False
        self._names: Counter[str] = Counter()  # jobs in flight per attack name
        #: Seconds spent per attack name (forward, backward and update, shared by row count).
        self.seconds: dict[str, float] = {}

    # -- row state ----------------------------------------------------------------------------

    def _allocate(self, x: torch.Tensor) -> None:
        if self._auto:
            self.batch_size = auto_batch_size(x.numel())
        b, shape, device = self.batch_size, tuple(x.shape), x.device
        self._shape = shape
        self.cur = torch.zeros((b, *shape), device=device)  # the current iterate
        self.lo = torch.zeros_like(self.cur)  # the ε-ball within the pixel box [0, 1]
        self.hi = torch.zeros_like(self.cur)
        self.best_x = torch.zeros_like(self.cur)  # the lowest-margin iterate so far
        self.best_loss_x = torch.zeros_like(self.cur)  # the highest-loss iterate of this run
        self.best_logits: torch.Tensor | None = None
        self._f = torch.zeros((b, 6), device=device)
        (self.best_margin, self.eps, self.alpha, self.best_loss, self.last_loss,
         self.checkpoint_best) = self._f.unbind(1)
        self._l = torch.zeros((b, 8), dtype=torch.long, device=device)
        # ``gains``: steps since the last checkpoint that raised the loss (APGD's schedule);
        # ``_flags``: the bits _BAD and _REDUCED. ``step_no`` and ``forwards`` are neighbours:
        # one operation on ``_counters`` advances both.
        (self.y, self.step_no, self.forwards, self.steps, self.loss_id, self.attack_id,
         self.gains, self._flags) = self._l.unbind(1)
        self._counters = self._l[:, 1:3]

    @property
    def free(self) -> int:
        return self.batch_size - self.n

    @property
    def busy(self) -> bool:
        return self.n > 0

    def add(self, job: Job) -> None:
        """Put a job in a free row; it starts at its first run's starting point."""
        self.add_many([job])

    def add_many(self, jobs: Sequence[Job]) -> None:
        """Put several jobs in free rows at once (one tensor write per field, not per job)."""
        if not jobs:
            return
        if self._shape is None:
            self._allocate(jobs[0].x)
        if len(jobs) > self.free:
            raise ValueError(f"{len(jobs)} jobs for {self.free} free rows")
        for job in jobs:
            if tuple(job.x.shape) != self._shape:
                raise ValueError(f"job input shape {tuple(job.x.shape)} != {self._shape}")
            if not any(job.attack is a for a in self._attacks):
                self._register(job.attack)
        device = self.cur.device
        rows = slice(self.n, self.n + len(jobs))
        x = torch.stack([job.x for job in jobs]).to(device)
        eps = torch.tensor([float(job.attack.eps) for job in jobs], device=device)
        view = (-1,) + (1,) * (x.dim() - 1)
        self.lo[rows] = (x - eps.view(view)).clamp(min=0.0)
        self.hi[rows] = (x + eps.view(view)).clamp(max=1.0)
        self._f[rows] = 0.0
        self._l[rows] = 0
        self.eps[rows] = eps
        self.best_margin[rows] = float("inf")
        self.y[rows] = torch.tensor([job.y for job in jobs], device=device)
        self.steps[rows] = torch.tensor([job.attack.steps for job in jobs], device=device)
        self.attack_id[rows] = torch.tensor(
            [next(k for k, a in enumerate(self._attacks) if a is job.attack) for job in jobs],
            device=device)
        first = self.n
        self.n += len(jobs)
        self.jobs.extend(jobs)
        self._names.update(job.attack.name for job in jobs)
        self.run.extend([0] * len(jobs))
        self._row_loss.extend([0] * len(jobs))
        self._start_runs(list(range(first, self.n)), x)

    def _register(self, attack: PGD) -> None:
        self._attacks.append(attack)
        self._halving = self._halving or attack.schedule == "halving"
        width = max(a.steps for a in self._attacks) + 1
        table = torch.zeros((len(self._attacks), width), dtype=torch.long)
        for k, a in enumerate(self._attacks):
            if a.schedule == "halving":
                for step in range(a.steps + 1):
                    table[k, step] = a.checkpoint_interval(step) or 0
        self._checkpoints = table.to(self.cur.device)

    def _start_runs(self, rows: list[int], x: torch.Tensor | None = None) -> None:
        """Each row's current run begins: a random start (or the clean input), a fresh step.

        ``x`` are the rows' clean inputs when the caller has them on the device already.
        """
        device = self.cur.device
        jobs = [self.jobs[i] for i in rows]
        if x is None:
            x = torch.stack([job.x for job in jobs]).to(device)
        starts = x.clone()
        noisy = [j for j, job in enumerate(jobs) if job.attack.random_start]
        if noisy:
            # Each attack draws its own starts: a union of attacks from one shared start per
            # example would explore less than independent ones (and be measurably weaker).
            noise = fill_uniform_noise(
                torch.empty((len(noisy), *starts.shape[1:])),
                [(jobs[j].seed, jobs[j].attack.stream + self.run[rows[j]]) for j in noisy],
            ).to(device)
            eps = self.eps[torch.tensor(rows, device=device)[noisy]]
            eps = eps.view((-1,) + (1,) * (noise.dim() - 1))
            starts[noisy] = (starts[noisy] + eps * noise).clamp(0.0, 1.0)
        at = torch.tensor(rows, device=device)
        self.cur[at] = starts
        self.best_loss_x[at] = starts
        ids, alphas = [], []
        for row, job in zip(rows, jobs, strict=True):
            loss_fn = job.attack.loss_of_run(self.run[row])
            if id(loss_fn) not in self._loss_ids:
                self._loss_ids[id(loss_fn)] = len(self._loss_fns)
                self._loss_fns.append(loss_fn)
            ids.append(self._loss_ids[id(loss_fn)])
            self._row_loss[row] = ids[-1]
            alphas.append(job.attack.initial_step_size)
        self.loss_id[at] = torch.tensor(ids, device=device)
        self.alpha[at] = torch.tensor(alphas, device=device, dtype=self.alpha.dtype)
        self.step_no[at] = 0
        self.gains[at] = 0
        self._flags[at] &= ~_REDUCED
        for field in (self.best_loss, self.last_loss, self.checkpoint_best):
            field[at] = -float("inf")

    # -- one iteration ------------------------------------------------------------------------

    def step(self) -> list[Finished]:
        """One forward and backward pass over the rows in use; returns the jobs that ended."""
        if not self.busy:
            return []
        started = time.perf_counter()
        n = self.n
        names = +self._names  # a copy, without zero counts
        y = self.y[:n]
        at_end = self.step_no[:n] >= self.steps[:n]
        # When every row only has its last iterate to check, no gradient is needed.
        stepping = not bool(at_end.all())
        xa = self.cur[:n].clone().requires_grad_(stepping)
        autocast = (torch.autocast(xa.device.type, dtype=torch.bfloat16) if self.amp
                    else nullcontext())
        with self._amp_guard(), torch.set_grad_enabled(stepping), autocast:
            logits = self.model(xa)
        logits = logits.float()
        if self.best_logits is None:
            self.best_logits = logits.new_zeros((self.batch_size, logits.shape[1]))

        detached = logits.detach()
        wrong = detached.argmax(dim=1) != y
        if self.amp and bool(wrong.any()):
            wrong, detached = self._confirm(xa.detach(), detached, wrong, y)
        margins = margin(detached, y)
        better = margins < self.best_margin[:n]
        view = (-1,) + (1,) * (xa.dim() - 1)
        torch.where(better, margins, self.best_margin[:n], out=self.best_margin[:n])
        torch.where(better.view(view), xa.detach(), self.best_x[:n], out=self.best_x[:n])
        torch.where(better[:, None], detached, self.best_logits[:n], out=self.best_logits[:n])

        ended = wrong | at_end
        if stepping and not bool(ended.all()):
            with self._amp_guard():
                self._update(xa, logits, y, ~ended)
        self._counters[:n] += 1  # a forward pass each, and a step for those that went on
        finished = self._end(ended, wrong, xa.detach(), detached) if bool(ended.any()) else []
        self._account(names, time.perf_counter() - started)
        return finished

    @contextmanager
    def _amp_guard(self) -> Iterator[None]:
        """Under autocast, an operation without a bf16 kernel is the user's to fix: say so."""
        try:
            yield
        except RuntimeError as exc:
            if not self.amp:
                raise
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()),
                         type(exc).__name__)
            raise ModelOutputError(
                f"the model does not run under --amp (bf16 autocast on {self.cur.device.type}): "
                f"{first.rstrip('.')}; run without --amp"
            ) from exc

    def _confirm(self, x: torch.Tensor, logits: torch.Tensor, wrong: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Under autocast, a row counts as broken only if full precision agrees."""
        rows = wrong.nonzero().squeeze(1)
        exact = self._exact(x[rows])
        wrong = wrong.clone()
        wrong[rows] = exact.argmax(dim=1) != y[rows]
        logits = logits.clone()
        logits[rows] = exact
        return wrong, logits

    def _exact(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x).float()

    def _update(self, xa: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                moving: torch.Tensor) -> None:
        """The signed-gradient step of every row, each with its own loss and step size.

        Rows that end this step are stepped too (it costs nothing extra, the backward pass covers
        the whole batch), and their new iterate is never used.
        """
        n = xa.shape[0]
        kinds = set(self._row_loss)
        losses = self._loss_fns[self._row_loss[0]](logits, y).float()
        if len(kinds) > 1:
            loss_id = self.loss_id[:n]
            for lid in kinds - {self._row_loss[0]}:
                losses = torch.where(loss_id == lid, self._loss_fns[lid](logits, y).float(),
                                     losses)
        (grad,) = torch.autograd.grad(losses.sum(), xa)
        peak = grad.flatten(1).abs().amax(dim=1)  # NaN and inf carry through
        healthy = (peak > 0) & (peak < float("inf"))  # false for NaN too
        if not bool(healthy.all()):
            self._flags[:n] |= (~healthy & moving).long() * _BAD
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        direction = grad.float().sign()

        x_now = xa.detach()
        view = (-1,) + (1,) * (x_now.dim() - 1)
        start = x_now
        if self._halving:
            back_to_best = self._schedule(n, x_now, losses.detach())
            if back_to_best is not None:
                start = torch.where(back_to_best.view(view), self.best_loss_x[:n], x_now)
        moved = torch.addcmul(start, self.alpha[:n].view(view), direction)
        torch.clamp(moved, self.lo[:n], self.hi[:n], out=self.cur[:n])

    def _schedule(self, n: int, x_now: torch.Tensor, loss_now: torch.Tensor) -> torch.Tensor | None:
        """Track the best loss; at APGD's checkpoints halve a stalled step size.

        Returns which rows go back to their best point before stepping (those just halved), or
        None when no row is at a checkpoint.
        """
        self.gains[:n] += (loss_now > self.last_loss[:n]).long()
        self.last_loss[:n] = loss_now
        improved = loss_now > self.best_loss[:n]
        self.best_loss[:n] = torch.where(improved, loss_now, self.best_loss[:n])
        self.best_loss_x[:n][improved] = x_now[improved]
        interval = self._checkpoints[self.attack_id[:n], self.step_no[:n]]
        at_checkpoint = interval > 0
        if not bool(at_checkpoint.any()):
            return None
        # Halve when fewer than 75% of the steps since the last checkpoint raised the loss, or
        # when the last checkpoint did not halve and the best loss has not moved since.
        stalled = self.gains[:n] < 0.75 * interval
        reduced = (self._flags[:n] & _REDUCED) > 0
        flat = ~reduced & (self.best_loss[:n] <= self.checkpoint_best[:n])
        reduce = at_checkpoint & (stalled | flat)
        self.alpha[:n] = torch.where(reduce, self.alpha[:n] / 2, self.alpha[:n])
        reduced = torch.where(at_checkpoint, reduce, reduced)
        self._flags[:n] = (self._flags[:n] & ~_REDUCED) | reduced.long() * _REDUCED
        self.checkpoint_best[:n] = torch.where(at_checkpoint, self.best_loss[:n],
                                               self.checkpoint_best[:n])
        self.gains[:n] = torch.where(at_checkpoint, 0, self.gains[:n])
        return reduce

    def _end(self, ended: torch.Tensor, wrong: torch.Tensor, x: torch.Tensor,
             logits: torch.Tensor) -> list[Finished]:
        """Finish the rows that broke or ran out of runs; start the next run of the others."""
        rows = ended.nonzero().squeeze(1).tolist()
        broken_flags = wrong[rows].tolist()
        broken, robust, restarting = [], [], []
        for row, is_broken in zip(rows, broken_flags, strict=True):
            if is_broken:
                broken.append(row)
            elif self.run[row] + 1 < self.jobs[row].attack.runs:
                self.run[row] += 1
                restarting.append(row)
            else:
                robust.append(row)
        finished: list[Finished] = []
        for group, is_broken in ((broken, True), (robust, False)):
            if not group:
                continue
            at = torch.tensor(group, device=x.device)
            if is_broken:
                xs, zs = x[at], logits[at]
            else:
                assert self.best_logits is not None
                xs = self.best_x[at]
                zs = self._exact(xs) if self.amp else self.best_logits[at]
            counts = self.forwards[at].tolist()
            bad = ((self._flags[at] & _BAD) > 0).tolist()
            finished.extend(
                Finished(self.jobs[row].key, x_adv, z, is_broken, count, was_bad)
                for row, x_adv, z, count, was_bad in zip(group, xs.unbind(), zs.unbind(), counts,
                                                         bad, strict=True))
        if restarting:
            self._start_runs(restarting)
        self._remove(broken + robust)
        return finished

    def _remove(self, rows: list[int]) -> None:
        """Free ``rows``: the rows in use past the new end move into the holes below it."""
        if not rows:
            return
        self._names.subtract(self.jobs[row].attack.name for row in rows)
        gone = set(rows)
        end = self.n - len(rows)
        holes = sorted(r for r in gone if r < end)
        movers = [r for r in range(end, self.n) if r not in gone]
        if holes:
            device = self.cur.device
            to, source = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
            assert self.best_logits is not None
            for state in (self.cur, self.lo, self.hi, self.best_x, self.best_loss_x,
                          self.best_logits, self._f, self._l):
                state[to] = state[source]
            for values in (self.jobs, self.run, self._row_loss):
                for hole, mover in zip(holes, movers, strict=True):
                    values[hole] = values[mover]  # type: ignore[index]
        del self.jobs[end:], self.run[end:], self._row_loss[end:]
        self.n = end

    def _account(self, names: Counter[str], seconds: float) -> None:
        total = sum(names.values())
        for name, count in names.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds * count / total


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
    batch_size: int | None,
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
            with torch.no_grad():  # full precision even with amp: it decides what is attacked
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
