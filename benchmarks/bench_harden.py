"""Harden's training epoch against a minimal PGD-AT loop in plain torch, side by side.

``python benchmarks/bench_harden.py [--rounds 7] [--model onnx|pt2] [--json out.json]``
``python benchmarks/bench_harden.py --judge HARDENED [HARDENED ...]``: the quality check instead.

Both sides train the same model (as ``robaudit harden`` loads it), on the same data (the digits
example's ``train.npz``, 1,257 images), with the same batch size (64), PGD steps (7, step
2.5·ε/steps, uniform random start, last iterate), ε (0.2) and optimiser (Adam, lr 5e-5). Each
side has its own copy of the model; rounds alternate the two sides after a warm-up of both, and
the figure is the median over rounds of the paired ratio harden ÷ plain, which the machine's drift
moves less than either time. The per-epoch validation scan (the scan's PGD, 20 steps, on a 10%
hold-out) is timed on its own: it is not part of the training epoch.

``--judge`` measures models on the example's ``test.npz`` with an attack that is not robaudit's:
a plain-torch L∞ PGD (ε 0.2, 20 steps of 2.5·ε/20, uniform random start, 3 restarts; an image
counts as broken when any iterate of any restart is misclassified), and prints each model's clean
accuracy, class-mean and worst-class robust accuracy next to the input model's.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from robaudit.config import ScanConfig  # noqa: E402
from robaudit.harden.holdout import hold_out  # noqa: E402
from robaudit.harden.reweight import ClassSettings  # noqa: E402
from robaudit.harden.train import load_split, train_epoch, validate  # noqa: E402
from robaudit.models import load_model  # noqa: E402

DIGITS = ROOT / "examples" / "digits"
EPS, STEPS, BATCH, LR = 0.2, 7, 64, 5e-5


def plain_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x_all: torch.Tensor,
                y_all: torch.Tensor, gen: torch.Generator) -> float:
    """A minimal PGD-AT epoch (Madry et al.), as one would write it by hand."""
    alpha = 2.5 * EPS / STEPS
    order = torch.randperm(len(y_all), generator=gen)
    total = 0.0
    for begin in range(0, len(order), BATCH):
        pick = order[begin:begin + BATCH]
        x, y = x_all[pick], y_all[pick]
        model.eval()
        x_adv = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * EPS).clamp(0, 1)
        for _ in range(STEPS):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - EPS), x + EPS)
            x_adv = x_adv.clamp(0, 1)
        model.train()
        loss = F.cross_entropy(model(x_adv), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    return total


def independent_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                    steps: int = 20, restarts: int = 3, seed: int = 1) -> torch.Tensor:
    """Per image: still correct after every iterate of every restart (clean-wrong counts as
    broken)."""
    gen = torch.Generator().manual_seed(seed)
    alpha = 2.5 * EPS / steps
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    for _ in range(restarts):
        x_adv = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * EPS).clamp(0, 1)
        for _ in range(steps + 1):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            robust &= (logits.argmax(1) == y).detach()
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - EPS), x + EPS)
            x_adv = x_adv.clamp(0, 1)
    return robust


def judge(paths: list[str]) -> None:
    import numpy as np

    data = np.load(DIGITS / "test.npz")
    x, y = torch.from_numpy(data["x"]).float() / 255, torch.from_numpy(data["y"]).long()
    print("model | clean | PGD class mean | PGD worst class")
    for path in [str(DIGITS / "model.onnx"), *paths]:
        model = load_model(path, device=torch.device("cpu")).module.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            clean = float((model(x).argmax(1) == y).float().mean())
        robust = independent_pgd(model, x, y)
        per_class = [float(robust[y == k].float().mean()) for k in range(10)]
        worst = min(range(10), key=lambda k: per_class[k])
        print(f"{path} | {clean:.1%} | {sum(per_class) / 10:.1%} | "
              f"{per_class[worst]:.1%} ({worst})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model", choices=["onnx", "pt2"], default="onnx")
    parser.add_argument("--json")
    parser.add_argument("--judge", nargs="+", metavar="HARDENED")
    args = parser.parse_args()
    if args.judge:
        judge(args.judge)
        return

    scan = ScanConfig(model=str(DIGITS / f"model.{args.model}"), data=str(DIGITS / "train.npz"),
                      eps=EPS, attacks=("pgd",), device="cpu")
    train, val = hold_out(load_split(str(DIGITS / "train.npz"), scan, split="train"), 0.1, 0)
    base = load_model(scan.model, device=torch.device("cpu")).module
    for p in base.parameters():
        p.requires_grad_(True)
    k = len(train.class_names)
    uniform = ClassSettings([1.0] * k, [1.0] * k, [EPS] * k, [1.0] * k)
    ours, plain = copy.deepcopy(base), copy.deepcopy(base)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=LR)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)

    def run_ours(epoch: int) -> float:
        started = time.perf_counter()
        train_epoch(ours, opt_ours, train, uniform, objective="pgd-at", steps=STEPS,
                    batch_size=BATCH, seed=0, epoch=epoch)
        return time.perf_counter() - started

    def run_plain() -> float:
        started = time.perf_counter()
        plain_epoch(plain, opt_plain, train.x, train.y, gen)
        return time.perf_counter() - started

    run_ours(0), run_plain()  # warm-up
    ours_s, plain_s, ratios = [], [], []
    for r in range(args.rounds):
        if r % 2 == 0:  # alternate which side goes first
            a, b = run_ours(r + 1), run_plain()
        else:
            b, a = run_plain(), run_ours(r + 1)
        ours_s.append(a)
        plain_s.append(b)
        ratios.append(a / b)
    started = time.perf_counter()
    validate(ours, val, scan)
    validate_s = time.perf_counter() - started

    result = {
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "model": scan.model, "train_examples": len(train.y), "val_examples": len(val.y),
        "rounds": args.rounds, "harden_epoch_s": statistics.median(ours_s),
        "plain_epoch_s": statistics.median(plain_s),
        "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
        "validate_s": validate_s,
    }
    print(f"machine: {result['machine']}")
    print(f"training epoch, {len(train.y)} images, batch {BATCH}, {STEPS} PGD steps: harden "
          f"{result['harden_epoch_s']:.2f} s, plain loop {result['plain_epoch_s']:.2f} s "
          f"(medians of {args.rounds})")
    print(f"harden / plain: median {result['ratio_median']:.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"validation scan (PGD, {scan.steps} steps, {len(val.y)} held-out images): "
          f"{validate_s:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
