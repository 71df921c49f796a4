"""One epoch of class-weighted adversarial fine-tuning, and the scan's PGD on held data (what
calibration's trials measure; the epochs themselves are judged by robaudit.harden.judge).

Training examples come from PGD run to the last iterate (no early stop: training wants the
strongest example in the ball, where an audit only wants to know whether one breaks), each
example in its own class's ε-ball:

- ``pgd-at`` (Madry et al. 2018): uniform random start, ascend cross-entropy; the loss is
  ``Σ w_y CE(f(x'), y) / Σ w_y`` with ``w_y`` the mean of the class's natural and boundary weights
  (PGD-AT has one term, and the robust error is the clean plus the boundary error).
- ``trades`` (Zhang et al. 2019): start at ``x + 0.001·N(0, 1)``, ascend ``KL(f(x) ‖ f(x'))``;
  the loss of an example is ``(w_nat,y CE(f(x), y) + β_y w_bndy,y KL) / (1 + β_y)``, summed and
  divided by the batch's mean weight ``Σ (w_nat,y + w_bndy,y) / 2``.

Step size 2.5·ε_y/steps. Examples are made in eval mode and the update runs in train mode (the
mode is restored afterwards). Randomness (data order, random starts) comes from generators seeded
by (seed, epoch), so an epoch's result depends only on the state it starts from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robaudit.attacks import build_attack, example_seed
from robaudit.attacks.losses import margin
from robaudit.attacks.memory import plan_batch
from robaudit.attacks.stream import BatchAudit, audit_batch
from robaudit.config import ScanConfig
from robaudit.data import iter_batches, load_data, select_indices
from robaudit.errors import UsageError
from robaudit.harden.reweight import ClassSettings, average_into
from robaudit.metrics import Records, class_stats, summarize, wilson_interval
from robaudit.portfolio import attack_settings


@dataclass
class Split:
    """A data set held in memory: pixels in [0, 1], labels, data set indices."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    class_names: list[str]
    #: A hold-out's examples' indices in the data set it was taken from.
    source_index: torch.Tensor | None = None


def load_split(spec: str, scan: ScanConfig, *, split: str) -> Split:
    """Load and select (``per_class``/``limit``/``seed`` of the scan) a data set into memory."""
    source = load_data(spec, root=scan.data_root, download=scan.download, split=split,
                       class_names_file=scan.class_names, image_size=scan.image_size)
    indices = select_indices(np.asarray(source.targets), per_class=scan.per_class,
                             limit=scan.limit, seed=scan.seed)
    xs, ys, idx = [], [], []
    for x, y, i in iter_batches(source, indices, 1024):
        xs.append(x)
        ys.append(y)
        idx.append(i)
    return Split(torch.cat(xs), torch.cat(ys).long(), torch.cat(idx), list(source.class_names))


class Diverged(UsageError):
    """Training reached a non-finite loss or weight: its message says where."""

    def __init__(self, epoch: int, batch: int, what: str) -> None:
        super().__init__(f"training diverged at epoch {epoch}, batch {batch}: {what}")
        self.epoch = epoch


@dataclass
class EpochStats:
    """What one epoch of training measured."""

    loss: float
    #: Per class: robust accuracy on the epoch's own training examples (CFA's t_k).
    train_robust: list[float]


def generator(seed: int, epoch: int, stream: int,
              device: torch.device | None = None) -> torch.Generator:
    """A generator for one purpose of one epoch (stream 0: data order, 1: random starts), on
    ``device`` (default CPU) so that random starts are drawn where the images are."""
    gen = torch.Generator() if device is None else torch.Generator(device=device)
    return gen.manual_seed((seed * 1_000_003 + epoch * 101 + stream) % (2**63 - 1))


def make_adversarial(module: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                     steps: int, objective: str, gen: torch.Generator) -> torch.Tensor:
    """The last PGD iterate in each example's ε-ball (``eps`` has one value per example)."""
    eps_b = eps.view(-1, *([1] * (x.dim() - 1)))
    step = 2.5 * eps_b / steps
    lower, upper = (x - eps_b).clamp(min=0.0), (x + eps_b).clamp(max=1.0)
    if objective == "trades":
        with torch.no_grad():
            target = F.softmax(module(x), dim=1)
        noise = 0.001 * torch.randn(x.shape, generator=gen, device=x.device)
    else:
        noise = (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * eps_b
    x_adv = torch.maximum(torch.minimum(x + noise, upper), lower)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        logits = module(x_adv)
        if objective == "trades":
            loss = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum")
        else:
            loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.maximum(torch.minimum(x_adv.detach() + step * grad.sign(), upper), lower)
    return x_adv.detach()


def train_epoch(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Split,
    settings: ClassSettings,
    *,
    objective: str,
    steps: int,
    batch_size: int,
    seed: int,
    epoch: int,
    on_batch: Callable[[int, int, float], None] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
    ema_decay: float = 0.0,
) -> EpochStats:
    """Fine-tune ``module`` for one epoch on ``data`` with the classes' settings; ``ema``, when
    given, follows the weights after every step (``ema ← decay·ema + (1 − decay)·θ``)."""
    device = data.x.device
    nat, bndy, eps, beta = (torch.tensor(v, device=device) for v in (
        settings.nat_weight, settings.bndy_weight, settings.eps, settings.beta))
    k = len(settings.eps)
    order = torch.randperm(len(data.y), generator=generator(seed, epoch, 0))
    starts = generator(seed, epoch, 1, device)
    # Tallies stay on the device: the loop waits for it only when progress is reported.
    correct = torch.zeros(k, dtype=torch.long, device=device)
    seen = torch.zeros(k, dtype=torch.long, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    batches = (len(order) + batch_size - 1) // batch_size
    was_training = module.training
    try:
        for b, begin in enumerate(range(0, len(order), batch_size)):
            pick = order[begin:begin + batch_size].to(device)
            x, y = data.x[pick], data.y[pick]
            module.eval()
            x_adv = make_adversarial(module, x, y, eps[y], steps, objective, starts)
            module.train()
            adv_logits = module(x_adv)
            loss = _weighted_loss(module, x, y, adv_logits, objective, nat[y], bndy[y], beta[y])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _check_finite(module, loss, epoch, b + 1)
            if ema is not None:
                average_into(ema, module, ema_decay)
            correct += torch.bincount(y[adv_logits.detach().argmax(dim=1) == y], minlength=k)
            seen += torch.bincount(y, minlength=k)
            total += loss.detach().double() * len(y)
            count += len(y)
            if on_batch is not None:
                on_batch(b + 1, batches, float(total) / count)
    finally:
        module.train(was_training)
    robust = [c / n if n else 1.0
              for c, n in zip(correct.tolist(), seen.tolist(), strict=True)]
    return EpochStats(float(total) / max(count, 1), robust)


def _weighted_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   adv_logits: torch.Tensor, objective: str, nat: torch.Tensor,
                   bndy: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The batch's loss with each example's class weights (see the module's docstring)."""
    if objective == "trades":
        clean_logits = module(x)
        kl = F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(clean_logits, dim=1),
                      reduction="none").sum(dim=1)
        ce = F.cross_entropy(clean_logits, y, reduction="none")
        per_example = (nat * ce + beta * bndy * kl) / (1 + beta)
        return per_example.sum() / ((nat + bndy) / 2).sum()
    w = (nat + bndy) / 2
    return (w * F.cross_entropy(adv_logits, y, reduction="none")).sum() / w.sum()


def _check_finite(module: nn.Module, loss: torch.Tensor, epoch: int, batch: int) -> None:
    """Diverged at the first non-finite loss or weight: later epochs could only spread it."""
    if not torch.isfinite(loss):
        raise Diverged(epoch, batch, f"the loss became {float(loss.detach())}")
    params = list(module.parameters())
    finite = torch.stack([p.detach().isfinite().all() for p in params]) if params else None
    if finite is not None and not bool(finite.all()):
        name = next(n for (n, p), ok in zip(module.named_parameters(), finite.tolist(),
                                            strict=True) if not ok)
        raise Diverged(epoch, batch, f"the weights became non-finite ({name})")


@dataclass
class Validation:
    """Per-class clean and robust accuracy on the validation set, and the gate's verdicts.

    Harden's epochs are judged by the scan itself (robaudit.harden.judge): ``robust`` is the
    worst case over the scan's attacks, as the gate judges it. Calibration's trials measure the
    scan's PGD alone and leave ``n``, ``correct`` and ``verdicts`` empty.
    """

    clean: list[float]
    robust: list[float]
    clean_acc: float
    mean_robust: float
    worst_robust: float
    worst_class: str
    #: Per class: examples, and how many stayed robust (the interval's inputs).
    n: list[int] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    #: Per class: the gate's status on the validation set (``passed``, ``flagged``, ...).
    verdicts: list[str] = field(default_factory=list)
    #: Per class: the robust accuracy the gate's policy asked of it (None: no policy line).
    bars: list[float | None] = field(default_factory=list)
    #: Per class: each example's outcome in data set order, "1" robust, "0" not (how two
    #: models judged on the same examples are compared pairwise; empty when unknown).
    outcomes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> list[bool]:
        return [v == "passed" for v in self.verdicts]

    def class_interval(self, k: int) -> tuple[float, float]:
        """95% Wilson interval of class ``k``'s robust accuracy."""
        return wilson_interval(self.correct[k], self.n[k]) if self.n[k] else (1.0, 1.0)

    def class_se(self, k: int) -> float:
        """Standard error of class ``k``'s robust accuracy, with one robust and one broken
        example added (Agresti-Caffo) so that 0 of n is not taken as certain."""
        p = (self.correct[k] + 1) / (self.n[k] + 2)
        return math.sqrt(p * (1 - p) / (self.n[k] + 2))

    @property
    def worst_index(self) -> int:
        return min(range(len(self.robust)), key=lambda k: self.robust[k])

    def mean_interval(self) -> tuple[float, float]:
        """95% normal interval of the class mean (classes independent)."""
        measured = [k for k, n in enumerate(self.n) if n]
        se = math.sqrt(sum(self.class_se(k) ** 2 for k in measured)) / max(len(self.n), 1)
        return self.mean_robust - 1.96 * se, self.mean_robust + 1.96 * se

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "clean": self.clean, "robust": self.robust, "clean_acc": self.clean_acc,
            "mean_robust": self.mean_robust, "worst_robust": self.worst_robust,
            "worst_class": self.worst_class}
        if self.n:
            doc.update(n=self.n, correct=self.correct, verdicts=self.verdicts, bars=self.bars,
                       outcomes=self.outcomes,
                       ci95=[list(self.class_interval(k)) for k in range(len(self.n))],
                       mean_ci95=list(self.mean_interval()))
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Validation:
        return cls(list(doc["clean"]), list(doc["robust"]), float(doc["clean_acc"]),
                   float(doc["mean_robust"]), float(doc["worst_robust"]), str(doc["worst_class"]),
                   list(doc.get("n", [])), list(doc.get("correct", [])),
                   list(doc.get("verdicts", [])), list(doc.get("bars", [])),
                   list(doc.get("outcomes", [])))


def pgd_batches(module: nn.Module, data: Split, scan: ScanConfig,
                bias: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor,
                                                                     BatchAudit]]:
    """The scan's first attack (PGD by default: its ε, steps, step size, restarts, per-example
    seeds) over ``data`` in eval mode, batch by batch: ``(index, y, audit)``, the outcome under
    ``scan.attacks[0]``. ``bias`` is added to the logits."""
    model = module if bias is None else nn.Sequential(module, LogitBias(bias))
    attack = build_attack(scan.attacks[0], attack_settings(scan, scan.eps))
    was_training = module.training
    module.eval()
    try:
        size, _warning = plan_batch(model, data.x[0], scan.batch_size)  # the scan warned
        for begin in range(0, len(data.y), size):
            x = data.x[begin:begin + size]
            y = data.y[begin:begin + size]
            idx = data.index[begin:begin + size]
            seeds = example_seed(idx.to(torch.int64), scan.seed)
            yield idx, y, audit_batch(model, [attack], x, y, seeds)
    finally:
        module.train(was_training)


def validate(module: nn.Module, data: Split, scan: ScanConfig,
             bias: torch.Tensor | None = None) -> Validation:
    """The scan's first attack (see :func:`pgd_batches`) on ``data``.

    ``bias``, when given, is added to the logits (the calibration layer under trial).
    """
    name = scan.attacks[0]
    records = Records(attack_names=[name])
    for idx, y, batch in pgd_batches(module, data, scan, bias):
        outcome = batch.outcomes[name]
        records.index.append(idx.numpy())
        records.y.append(y.cpu().numpy())
        records.clean_pred.append(batch.clean_logits.argmax(dim=1).cpu().numpy())
        records.clean_margin.append(margin(batch.clean_logits, y).cpu().numpy())
        records.adv_pred.setdefault(name, []).append(outcome.pred.cpu().numpy())
        records.adv_margin.setdefault(name, []).append(outcome.margin(y).cpu().numpy())
        records.forwards.setdefault(name, []).append(outcome.forwards.cpu().numpy())
        records.bad_gradient.setdefault(name, []).append(outcome.bad_gradient.cpu().numpy())
    stats = class_stats(records, data.class_names)
    summary = summarize(records, stats)
    # A class without validation examples has nothing to fix: it counts as fully robust.
    clean = [s.clean.acc if s.n else 1.0 for s in stats]
    robust = [s.robust[name].acc if s.n else 1.0 for s in stats]
    return Validation(clean, robust, summary.clean_acc, summary.mean_class_robust[name],
                      summary.worst_class_robust, summary.worst_class)


class LogitBias(nn.Module):
    """Adds a fixed per-class bias to the logits: the calibration layer."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bias", bias.detach().clone().float())

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.bias
