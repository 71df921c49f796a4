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
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from robaudit.attacks import norms
from robaudit.attacks.base import (
    Attack,
    Model,
    Objective,
    checkpoint_table,
    fill_uniform_noise,
    predict,
    stream_keys,
)
from robaudit.attacks.jobs import DEFAULT_BATCH, Finished, Job, amp_errors, auto_batch_size
from robaudit.attacks.losses import margin

# Bits of an engine row's flags.
_BAD = 1  # some step had a zero or non-finite input gradient
_REDUCED = 2  # the last checkpoint halved the step size



class Engine:
    """Runs attack jobs in one working batch. Add jobs with :meth:`add`, advance with
    :meth:`step` until :attr:`busy` is false.

    The jobs in flight occupy the first :attr:`n` rows of every state tensor, so a step works on
    slices, not on gathered copies; a job that ends leaves a hole that the last row fills. The
    per-job scalars live in two small matrices (floats and integers) so that moving a row is a
    handful of tensor operations, whatever the number of fields.

    A gradient attack's rows step along their input gradient (:mod:`robaudit.attacks.norms`
    gives the direction and the projection of each threat model); a gradient-free attack's rows
    step from their best point so far (its ``propose``). An engine that holds gradient-free rows
    only runs its passes without autograd.
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
        self.run: list[int] = []  # per row: which run (random start, objective) of its attack
        self._row_objective: list[int] = []  # per row: the number of the objective it ascends
        self._shape: tuple[int, ...] | None = None
        # Objectives and attacks seen so far, numbered, so that per-row choices are tensors.
        self._objective_ids: dict[int, int] = {}
        self._objectives: list[Objective] = []
        self._attacks: list[Attack] = []
        # Per attack (by number): at each step that is an APGD checkpoint, the steps since the
        # previous one (0 elsewhere, and everywhere for fixed-step attacks).
        self._checkpoints = torch.zeros((0, 1), dtype=torch.long)
        self._halving = False
        self._norms: set[str] = set()
        self._kinds: set[bool] = set()  # uses_gradient of the attacks seen
        self._names: Counter[str] = Counter()  # jobs in flight per attack (family) name
        #: Seconds spent per attack name (forward, backward and update, shared by row count).
        self.seconds: dict[str, float] = {}

    # -- row state ----------------------------------------------------------------------------

    def _allocate(self, x: torch.Tensor) -> None:
        if self._auto:
            self.batch_size = auto_batch_size(x.numel())
        b, shape, device = self.batch_size, tuple(x.shape), x.device
        self._shape = shape
        self.cur = torch.zeros((b, *shape), device=device)  # the current iterate
        self.x0 = torch.zeros_like(self.cur)  # the clean input
        self.lo = torch.zeros_like(self.cur)  # the L∞ ball within the pixel box [0, 1]
        self.hi = torch.zeros_like(self.cur)
        self.best_x = torch.zeros_like(self.cur)  # the lowest-margin iterate so far
        self.best_loss_x = torch.zeros_like(self.cur)  # the highest-loss iterate of this run
        self.best_logits: torch.Tensor | None = None
        self._f = torch.zeros((b, 6), device=device)
        (self.best_margin, self.eps, self.alpha, self.best_loss, self.last_loss,
         self.checkpoint_best) = self._f.unbind(1)
        self._l = torch.zeros((b, 10), dtype=torch.long, device=device)
        # ``gains``: steps since the last checkpoint that raised the loss (APGD's schedule);
        # ``_flags``: the bits _BAD and _REDUCED; ``target``: a targeted run's class; ``key``:
        # the run's random-stream key (gradient-free attacks). ``step_no`` and ``forwards`` are
        # neighbours: one operation on ``_counters`` advances both.
        (self.y, self.step_no, self.forwards, self.steps, self.objective_id, self.attack_id,
         self.gains, self._flags, self.target, self.key) = self._l.unbind(1)
        self._counters = self._l[:, 1:3]

    def free_for(self, x: torch.Tensor) -> int:
        """Free rows for jobs of inputs like ``x`` (the first such call sizes the batch)."""
        if self._shape is None:
            self._allocate(x)
        return self.free

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
        self.x0[rows] = x
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
        self._names.update(job.attack.family for job in jobs)
        self.run.extend([0] * len(jobs))
        self._row_objective.extend([0] * len(jobs))
        self._start_runs(list(range(first, self.n)), x)

    def _register(self, attack: Attack) -> None:
        self._attacks.append(attack)
        self._kinds.add(attack.uses_gradient)
        self._norms.add(attack.norm)
        self._halving, self._checkpoints = checkpoint_table(self._attacks, self.cur.device)

    def _start_runs(self, rows: list[int], x: torch.Tensor | None = None) -> None:
        """Each row's current run begins: its starting point, a fresh step.

        ``x`` are the rows' clean inputs when the caller has them on the device already.
        """
        device = self.cur.device
        jobs = [self.jobs[i] for i in rows]
        at = torch.tensor(rows, device=device)
        if x is None:
            x = self.x0[at]
        starts = x.clone()
        keys = [(job.seed, job.attack.stream + self.run[row])
                for row, job in zip(rows, jobs, strict=True)]
        # Gradient-free attacks make their own starting points.
        noisy = [j for j, job in enumerate(jobs)
                 if job.attack.random_start and job.attack.uses_gradient]
        if noisy:
            # Each attack draws its own starts: a union of attacks from one shared start per
            # example would explore less than independent ones (and be measurably weaker).
            noise = fill_uniform_noise(torch.empty((len(noisy), *starts.shape[1:])),
                                       [keys[j] for j in noisy]).to(device)
            self._random_starts(starts, noisy, [jobs[j] for j in noisy], at, noise)
        if False in self._kinds:
            self.key[at] = stream_keys(keys, device)
            self._query_starts(starts, jobs, at)
        self.cur[at] = starts
        self.best_loss_x[at] = starts
        self._set_objectives(rows, jobs, at, x)
        self.alpha[at] = torch.tensor([job.attack.initial_step_size
                                       for job in jobs], device=device, dtype=self.alpha.dtype)
        self.step_no[at] = 0
        self.gains[at] = 0
        self._flags[at] &= ~_REDUCED
        for field in (self.best_loss, self.last_loss, self.checkpoint_best):
            field[at] = -float("inf")

    def _random_starts(self, starts: torch.Tensor, noisy: list[int], jobs: list[Job],
                       at: torch.Tensor, noise: torch.Tensor) -> None:
        eps = self.eps[at[noisy]]
        for norm in {job.attack.norm for job in jobs}:
            mine = [k for k, job in enumerate(jobs) if job.attack.norm == norm]
            rows = [noisy[k] for k in mine]
            starts[rows] = norms.random_start(norm, starts[rows], eps[mine], noise[mine])

    def _query_starts(self, starts: torch.Tensor, jobs: list[Job], at: torch.Tensor) -> None:
        for attack in {id(job.attack): job.attack for job in jobs}.values():
            if attack.uses_gradient:
                continue
            mine = [k for k, job in enumerate(jobs) if job.attack is attack]
            rows = at[mine]
            starts[mine] = attack.start(starts[mine], self.eps[rows], self.key[rows])

    def _set_objectives(self, rows: list[int], jobs: list[Job], at: torch.Tensor,
                        x: torch.Tensor) -> None:
        ids, ranks = [], []
        for row, job in zip(rows, jobs, strict=True):
            if not job.attack.uses_gradient:
                ids.append(0)
                ranks.append(0)
                continue
            objective = job.attack.objective_of_run(self.run[row])
            if id(objective) not in self._objective_ids:
                self._objective_ids[id(objective)] = len(self._objectives)
                self._objectives.append(objective)
            ids.append(self._objective_ids[id(objective)])
            ranks.append(objective.target_rank)
            self._row_objective[row] = ids[-1]
        self.objective_id[at] = torch.tensor(ids, device=self.cur.device)
        targeted = [j for j, rank in enumerate(ranks) if rank > 0]
        if targeted:
            self.target[at[targeted]] = self._targets([jobs[j] for j in targeted],
                                                      [ranks[j] for j in targeted], x[targeted])

    def _targets(self, jobs: list[Job], ranks: list[int], x: torch.Tensor) -> torch.Tensor:
        """The class of each targeted run: the ``rank``-th most likely wrong class when clean."""
        if all(job.clean_logits is not None for job in jobs):
            logits = torch.stack([job.clean_logits for job in jobs]).to(x.device)  # type: ignore[misc]
        else:
            logits = self._exact(x)
        order = logits.float().argsort(dim=1, descending=True)
        wrong = max(1, order.shape[1] - 1)
        rank = torch.tensor([1 + (r - 1) % wrong for r in ranks], device=x.device)
        return order.gather(1, rank[:, None]).squeeze(1)

    # -- one iteration ------------------------------------------------------------------------

    def step(self) -> list[Finished]:
        """One forward (and, for gradient attacks, backward) pass over the rows in use; returns
        the jobs that ended."""
        if not self.busy:
            return []
        started = time.perf_counter()
        n = self.n
        names = +self._names  # a copy, without zero counts
        y = self.y[:n]
        at_end = self.step_no[:n] >= self.steps[:n]
        # When every row only has its last iterate to check, no gradient is needed.
        stepping = not bool(at_end.all())
        needs_grad = stepping and True in self._kinds
        xa = self.cur[:n].clone().requires_grad_(needs_grad)
        autocast = (torch.autocast(xa.device.type, dtype=torch.bfloat16) if self.amp
                    else nullcontext())
        with self._amp_guard(), torch.set_grad_enabled(needs_grad), autocast:
            logits = self.model(xa)
        logits = logits.float()
        if self.best_logits is None:
            self.best_logits = logits.new_zeros((self.batch_size, logits.shape[1]))

        detached = logits.detach()
        # A NaN or inf output counts as broken (see predict): the row ends here, so its
        # non-finite gradient is never taken for a sign of masking.
        wrong = predict(detached) != y
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
            if needs_grad:
                with self._amp_guard():
                    self._update(xa, logits, y, ~ended)
            if False in self._kinds:
                self._query_update(n)
        self._counters[:n] += 1  # a forward pass each, and a step for those that went on
        finished = self._end(ended, wrong, xa.detach(), detached) if bool(ended.any()) else []
        self._account(names, time.perf_counter() - started)
        return finished
    def _amp_guard(self) -> AbstractContextManager[None]:
        return amp_errors(self.amp, self.cur.device.type)

    def _confirm(self, x: torch.Tensor, logits: torch.Tensor, wrong: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Under autocast, a row counts as broken only if full precision agrees."""
        rows = wrong.nonzero().squeeze(1)
        exact = self._exact(x[rows])
        wrong = wrong.clone()
        wrong[rows] = predict(exact) != y[rows]
        logits = logits.clone()
        logits[rows] = exact
        return wrong, logits

    def _exact(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x).float()

    def _update(self, xa: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                moving: torch.Tensor) -> None:
        """The gradient step of every row, each with its own objective and step size.

        Rows that end this step are stepped too (it costs nothing extra, the backward pass covers
        the whole batch), and their new iterate is never used.
        """
        n = xa.shape[0]
        losses = self._losses(logits, y, n)
        (grad,) = torch.autograd.grad(losses.sum(), xa)
        peak = grad.flatten(1).abs().amax(dim=1)  # NaN and inf carry through
        healthy = (peak > 0) & (peak < float("inf"))  # false for NaN too
        if not bool(healthy.all()):
            if False in self._kinds:  # gradient-free rows have no gradient to judge
                moving = moving & self._uses_gradient[self.attack_id[:n]]
            self._flags[:n] |= (~healthy & moving).long() * _BAD
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        direction = self._direction(grad.float(), n)

        x_now = xa.detach()
        view = (-1,) + (1,) * (x_now.dim() - 1)
        start = x_now
        if self._halving:
            back_to_best = self._schedule(n, x_now, losses.detach())
            if back_to_best is not None:
                start = torch.where(back_to_best.view(view), self.best_loss_x[:n], x_now)
        moved = torch.addcmul(start, self.alpha[:n].view(view), direction)
        if self._norms == {"linf"}:
            torch.clamp(moved, self.lo[:n], self.hi[:n], out=self.cur[:n])
            return
        for norm in self._norms:
            projected = norms.project(norm, moved, self.x0[:n], self.eps[:n], self.lo[:n],
                                      self.hi[:n], torch.empty_like(moved))
            rows = self._rows_of_norm(norm, n)
            self.cur[:n] = projected if rows is None else torch.where(rows.view(view),
                                                                       projected, self.cur[:n])

    def _losses(self, logits: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
        """Each row's objective at ``logits`` (one pass per objective present)."""
        present = set(self._row_objective)
        first = self._row_objective[0]
        target = self.target[:n]
        losses = self._objectives[first].loss(logits, y, target).float()
        if len(present) > 1:
            objective_id = self.objective_id[:n]
            for oid in present - {first}:
                losses = torch.where(objective_id == oid,
                                     self._objectives[oid].loss(logits, y, target).float(),
                                     losses)
        return losses

    def _direction(self, grad: torch.Tensor, n: int) -> torch.Tensor:
        if len(self._norms) == 1:
            return norms.direction(next(iter(self._norms)), grad)
        l2 = self._rows_of_norm("l2", n)
        assert l2 is not None
        view = (-1,) + (1,) * (grad.dim() - 1)
        return torch.where(l2.view(view), norms.direction("l2", grad),
                           norms.direction("linf", grad))

    def _rows_of_norm(self, norm: str, n: int) -> torch.Tensor | None:
        """Which rows attack under ``norm``; None when all of them do."""
        if self._norms == {norm}:
            return None
        table = torch.tensor([a.norm == norm for a in self._attacks], device=self.cur.device)
        return table[self.attack_id[:n]]

    @property
    def _uses_gradient(self) -> torch.Tensor:
        return torch.tensor([a.uses_gradient for a in self._attacks], device=self.cur.device)

    def _query_update(self, n: int) -> None:
        """Gradient-free rows: the next query, from the best point so far."""
        attack_id = self.attack_id[:n]
        for k, attack in enumerate(self._attacks):
            if attack.uses_gradient:
                continue
            rows = (attack_id == k).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            whole = rows.numel() == n
            at = slice(0, n) if whole else rows
            proposal = attack.propose(self.best_x[at], self.x0[at], self.eps[at], self.lo[at],
                                      self.hi[at], self.step_no[at], self.key[at])
            self.cur[at] = proposal

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
        self._names.subtract(self.jobs[row].attack.family for row in rows)
        gone = set(rows)
        end = self.n - len(rows)
        holes = sorted(r for r in gone if r < end)
        movers = [r for r in range(end, self.n) if r not in gone]
        if holes:
            device = self.cur.device
            to, source = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
            assert self.best_logits is not None
            for state in (self.cur, self.x0, self.lo, self.hi, self.best_x, self.best_loss_x,
                          self.best_logits, self._f, self._l):
                state[to] = state[source]
            for values in (self.jobs, self.run, self._row_objective):
                for hole, mover in zip(holes, movers, strict=True):
                    values[hole] = values[mover]  # type: ignore[index]
        del self.jobs[end:], self.run[end:], self._row_objective[end:]
        self.n = end

    def _account(self, names: Counter[str], seconds: float) -> None:
        total = sum(names.values())
        for name, count in names.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds * count / total
