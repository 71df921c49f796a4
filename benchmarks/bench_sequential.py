"""The sequential gate against the full scan, side by side in one run: on each bundled example at
floors 0.3, 0.4 and 0.5, the per-class verdicts of both, the share of clean-correct examples the
sequential scan attacked and its share of the full scan's attack time; AutoAttack's time on the
same examples where torchattacks is installed; a masked model (logits x 1e4) must still exit 1.

    python benchmarks/bench_sequential.py [--quick] [--device cpu]
    python benchmarks/bench_sequential.py --simulate   # the prior and the rounds, no model

--quick: the digits example only, 10 attack steps. Without it, the MNIST example's 400 training
images per class (--per-class 200: "about 200 images per class") are scanned too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from robaudit.audit import scan  # noqa: E402
from robaudit.config import ScanConfig  # noqa: E402
from robaudit.errors import ExitCode  # noqa: E402
from robaudit.models import load_model  # noqa: E402

#: (name, model, data, eps, per class): the bundled examples at their own radius.
CASES = (
    ("digits", "examples/digits/model.pt2", "examples/digits/test.npz", 0.2, None),
    ("mnist-200", "examples/mnist/model.pt2", "examples/mnist/train.npz", 0.3, 200),
)
FLOORS = (0.3, 0.4, 0.5)


def _scan(model: str, data: str, eps: float, per_class: int | None, floor: float,
          sequential: bool, steps: int, device: str) -> Any:
    config = ScanConfig(model=str(ROOT / model), data=str(ROOT / data), eps=eps,
                        attacks=("pgd", "tpgd"), steps=steps, per_class=per_class,
                        min_class_robust=floor, sequential=sequential, device=device)
    return scan(config)


def _autoattack_seconds(model: str, data: str, eps: float, per_class: int | None,
                        device: str) -> float | None:
    try:
        import torchattacks
    except ImportError:
        return None
    import numpy as np

    arrays = np.load(ROOT / data)
    x = torch.from_numpy(arrays["x"]).float() / 255
    y = torch.from_numpy(arrays["y"]).long()
    if per_class is not None:
        keep = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in y.unique()])
        x, y = x[keep], y[keep]
    # robaudit's loader: an exported program refuses eval(), which torchattacks calls; the
    # loaded module's train()/eval() only record the flag (the program was exported in eval).
    net = load_model(str(ROOT / model)).module.to(device)
    attack = torchattacks.AutoAttack(net, norm="Linf", eps=eps, version="standard",
                                     n_classes=10, seed=0)
    started = time.perf_counter()
    attack(x.to(device), y.to(device))
    return time.perf_counter() - started


def _row(name: str, floor: float, full: Any, seq: Any, autoattack: float | None) -> str:
    same = [v.passed for v in full.verdicts] == [v.passed for v in seq.verdicts]
    s = seq.sequential
    time_share = seq.timings["attack_s"] / full.timings["attack_s"]
    aa = "-" if autoattack is None else f"{autoattack:.1f}"
    return (f"| {name} | {floor:.1f} | {'yes' if same else 'NO'} | {len(full.flagged)} | "
            f"{s['attacked']}/{s['of']} ({s['attacked'] / s['of']:.0%}) | {s['rounds']} | "
            f"{full.timings['attack_s']:.1f} | {seq.timings['attack_s']:.1f} "
            f"({time_share:.0%}) | {aa} |")


def _masked_exit(device: str, steps: int) -> ExitCode:
    """The digits model with its logits x 1e4, scanned sequentially at floor 0.3."""
    class Scaled(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x) * 1e4

    base = load_model(str(ROOT / "examples/digits/model.pt2")).module.eval()
    program = torch.export.export(Scaled(base).eval(), (torch.rand(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scaled.pt2"
        torch.export.save(program, path)
        result = _scan(str(path), "examples/digits/test.npz", 0.2, None, 0.3, True, steps,
                       device)
    return result.exit_code


def simulate(trials: int = 8) -> None:
    """Share of examples attacked and rounds on simulated classes of 200 (an AT model's spread
    of class figures), for two priors and three round schedules; the wrong decisions."""
    import numpy as np

    from robaudit.sequential import decide, needed

    rates = (0.1, 0.2, 0.45, 0.55, 0.6, 0.7, 0.75, 0.85, 0.9, 0.95)
    size, alpha, rng = 200, 0.01, np.random.default_rng(0)

    def growing(first: int, growth: float) -> list[int]:
        points, n = [], first
        while n < size:
            points.append(n)
            n = max(n + 1, int(n * growth))
        return [*points, size]

    schedules = {"8 each": [*range(8, size, 8), size], "8, x1.5": growing(8, 1.5),
                 "8, x2": growing(8, 2.0)}
    print("| floor | prior | rounds | attacked | rounds (max over classes) | wrong |")
    print("|---|---|---|---|---|---|")
    for floor in FLOORS:
        for prior_name, prior in (("uniform", (1.0, 1.0)),
                                  ("centred", (4 * floor, 4 * (1 - floor)))):
            for name, points in schedules.items():
                attacked = wrong = rounds = 0
                for _ in range(trials):
                    deepest = 0
                    for p in rates:
                        robust = rng.permutation(np.arange(size) < round(p * size)).cumsum()
                        need = needed(floor, size)
                        for n in points:
                            d = decide(int(robust[n - 1]), n, size, need, alpha, prior)
                            if d.status or n == size:
                                break
                        deepest = max(deepest, points.index(n) + 1)
                        attacked += n
                        wrong += d.status is not None and (d.status == "above") != (
                            round(p * size) >= need)
                    rounds += deepest
                print(f"| {floor} | {prior_name} | {name} | "
                      f"{attacked / (trials * size * len(rates)):.0%} | {rounds / trials:.1f} | "
                      f"{wrong} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--simulate", action="store_true")
    args = parser.parse_args()
    if args.simulate:
        simulate()
        return
    steps = 10 if args.quick else 20
    print("| data | floor | same verdicts | flagged | attacked | rounds | full attack s | "
          "sequential attack s | AutoAttack s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model, data, eps, per_class in CASES[:1] if args.quick else CASES:
        autoattack = _autoattack_seconds(model, data, eps, per_class, args.device)
        for floor in FLOORS:
            full = _scan(model, data, eps, per_class, floor, False, steps, args.device)
            seq = _scan(model, data, eps, per_class, floor, True, steps, args.device)
            print(_row(name, floor, full, seq, autoattack), flush=True)
    code = _masked_exit(args.device, steps)
    print(f"masked (logits x 1e4), sequential, floor 0.3: exit {int(code)}")


if __name__ == "__main__":
    main()
