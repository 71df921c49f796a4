"""Attack engine benchmarks: cost, speed against torchattacks, strength against AutoAttack, memory.

Run with ``make bench`` (or ``python benchmarks/bench_attacks.py [P1 P2 P3 MEM]``). Every figure
is a ratio of two things measured side by side in this one run, on this machine. torchattacks is
a benchmark-only dependency (``pip install torchattacks``), never a runtime one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
EPS = 0.2
STEPS = 20


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, "
            f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")


def digits() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    # The shipped weights in their plain nn.Module (torchattacks toggles eval(), which an
    # exported program refuses).
    sys.path.insert(0, str(DIGITS))
    from train import DigitsCNN

    model = DigitsCNN().eval()
    model.load_state_dict(torch.export.load(DIGITS / "model.pt2").module().state_dict())
    data = np.load(DIGITS / "test.npz")
    return model, torch.from_numpy(data["x"]).float() / 255, torch.from_numpy(data["y"]).long()


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    """Best of ``repeat`` runs (the least disturbed by the machine's other work)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def side_by_side(a, b, rounds: int = 5) -> tuple[float, float, float, object, object]:
    """Run ``a`` and ``b`` alternately: their median seconds, and the median over rounds of the
    ratio ``b / a`` within a round. The paired ratio is the steadier figure: a change in the
    machine's speed during the run (this one is a shared VM) falls on both runs of a round."""
    times_a, times_b, out_a, out_b = [], [], None, None
    for _ in range(rounds):
        t, out_a = timed(a, repeat=1)
        times_a.append(t)
        t, out_b = timed(b, repeat=1)
        times_b.append(t)
    ratio = float(np.median(np.array(times_b) / np.array(times_a)))
    return float(np.median(times_a)), float(np.median(times_b)), ratio, out_a, out_b


# -- P1: overhead of the engine over bare forward+backward passes ------------------------------

def p1_overhead() -> dict[str, float]:
    from torchvision.models import resnet18

    from robaudit.attacks.pgd import PGD

    torch.manual_seed(0)
    cases = {"digits CNN, 540 x 1x8x8": digits()[:2]}
    net = resnet18(num_classes=10).eval()
    cases["ResNet-18, 64 x 3x32x32"] = (net, torch.rand(64, 3, 32, 32))
    results = {}
    for name, (model, x) in cases.items():
        with torch.no_grad():
            y = model(x).argmax(1)  # every example correct, and eps tiny: nothing breaks

        def bare(model=model, x=x, y=y) -> None:
            for _ in range(STEPS):
                xa = x.clone().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
            with torch.no_grad():
                model(x)  # the final check of the last iterate, which PGD also pays

        attack = PGD(1e-6, steps=STEPS)
        seeds = torch.arange(len(x))
        t_bare, t_pgd, ratio, _, out = side_by_side(
            bare, lambda a=attack, m=model, x=x, y=y, s=seeds: a(m, x, y, s), rounds=11)
        assert not bool(out.broken.any())
        results[name] = ratio
        results[f"{name} (ratio of medians)"] = t_pgd / t_bare
        print(f"P1 {name}: PGD-{STEPS} {t_pgd:.3f}s vs {STEPS} fwd+bwd {t_bare:.3f}s "
              f"(medians of 11 alternating rounds) -> paired ratio {ratio:.3f} (target <= 1.10; "
              f"ratio of the medians {t_pgd / t_bare:.3f})")
    return results


# -- P2: the default audit against torchattacks' PGD and T-PGD ----------------------------------

class Tempered(torch.nn.Module):
    """Logits divided by T: torchattacks' PGD on it is Temperature-PGD."""

    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


def audit(**overrides) -> dict:
    """The example audit with robaudit's defaults (ε and steps of the example)."""
    from robaudit.audit import scan
    from robaudit.config import ScanConfig
    from robaudit.reports.json import to_dict

    config = ScanConfig(model=str(DIGITS / "model.pt2"), data=str(DIGITS / "test.npz"), eps=EPS,
                        steps=STEPS, **overrides)
    return to_dict(scan(config))


def model_passes(doc: dict) -> float:
    """Forward passes of a scan's attacks: mean passes per attacked example, times those."""
    attacked = round(doc["summary"]["n"] * doc["summary"]["clean_acc"])
    return attacked * sum(doc["summary"]["mean_forwards"].values())


def p2_torchattacks(rounds: int = 7) -> dict[str, float]:
    import torchattacks

    model, x, y = digits()
    alpha = 2.5 * EPS / STEPS

    from robaudit.config import ScanConfig

    temperatures = ScanConfig(model="", data="").temperatures

    def reference(seed: int) -> float:
        torch.manual_seed(seed)
        robust = model(x).argmax(1) == y
        for net in (model, *(Tempered(model, t) for t in temperatures)):
            attack = torchattacks.PGD(net, eps=EPS, alpha=alpha, steps=STEPS, random_start=True)
            x_adv = attack(x, y)
            with torch.no_grad():
                robust &= model(x_adv).argmax(1) == y
        return float(robust.float().mean())

    reference(0), audit()  # warm both up: first calls pay one-off costs (imports, caches)
    # Alternating rounds, one seed each: times are medians, robust accuracies means over seeds.
    t_ref, t_ours, t_wc, t_amp, acc_ref, acc_ours, acc_fixed, acc_amp, passes = (
        [] for _ in range(9))
    for seed in range(rounds):
        t, acc = timed(lambda s=seed: reference(s), repeat=1)
        t_ref.append(t)
        acc_ref.append(acc)
        t, doc = timed(lambda s=seed: audit(seed=s), repeat=1)
        t_ours.append(t)
        acc_ours.append(doc["summary"]["robust_acc"]["worst"])
        passes.append(model_passes(doc))
        t, _ = timed(lambda s=seed: audit(seed=s, mode="worst-case"), repeat=1)
        t_wc.append(t)
        t, doc = timed(lambda s=seed: audit(seed=s, amp=True), repeat=1)
        t_amp.append(t)
        acc_amp.append(doc["summary"]["robust_acc"]["worst"])
        acc_fixed.append(audit(seed=seed, schedule="fixed")["summary"]["robust_acc"]["worst"])
    ref_s, ours_s, wc_s, amp_s = (float(np.median(t)) for t in (t_ref, t_ours, t_wc, t_amp))
    ref_acc, ours_acc = float(np.mean(acc_ref)), float(np.mean(acc_ours))
    print(f"P2 default audit (pgd+tpgd, each mode, per-class outputs, whole scan incl. loading): "
          f"robaudit {ours_s:.2f}s robust {ours_acc:.1%}; torchattacks PGD + T-PGD (attacks "
          f"only) {ref_s:.2f}s robust {ref_acc:.1%} -> time ratio {ours_s / ref_s:.2f} "
          f"(target <= 0.5), difference {(ours_acc - ref_acc) * 100:+.1f} pp (target within 1; "
          f"means over {rounds} seeds)")
    print(f"P2 same audit in worst-case mode: {wc_s:.2f}s -> time ratio {wc_s / ref_s:.2f}")
    amp_acc = float(np.mean(acc_amp))
    print(f"P2 same audit with --amp (bf16 passes, fp32 verdicts): {amp_s:.2f}s robust "
          f"{amp_acc:.1%} -> time ratio {amp_s / ref_s:.2f}")
    # Forward passes (each with its backward, but for the last check): exact, unlike times.
    ours_passes, ref_passes = float(np.mean(passes)), float(len(temperatures) + 1) * STEPS * len(x)
    robust_floor = float(np.mean(acc_ours)) * len(x) * (len(temperatures) + 1) * (STEPS + 1)
    print(f"P2 model passes: robaudit {ours_passes:,.0f} (the clean pass not counted), "
          f"torchattacks {ref_passes:,.0f} -> ratio {ours_passes / ref_passes:.3f}; the examples "
          f"that stay robust alone need {robust_floor:,.0f} "
          f"({robust_floor / ref_passes:.3f}) under any early stop")
    fixed_acc = float(np.mean(acc_fixed))
    print(f"P2 with torchattacks' own step rule (--schedule fixed, 2.5*eps/steps): robust "
          f"{fixed_acc:.1%} vs {ref_acc:.1%} -> difference {(fixed_acc - ref_acc) * 100:+.1f} pp "
          f"(target within 1)")
    return {"time_ratio": ours_s / ref_s, "acc_diff_pp": (ours_acc - ref_acc) * 100,
            "time_ratio_worst_case": wc_s / ref_s, "time_ratio_amp": amp_s / ref_s,
            "amp_acc_diff_pp": (amp_acc - ref_acc) * 100, "robaudit_s": ours_s,
            "torchattacks_s": ref_s, "fixed_acc_diff_pp": (fixed_acc - ref_acc) * 100,
            "pass_ratio": ours_passes / ref_passes, "robust_floor": robust_floor / ref_passes}


# -- P3: strength against AutoAttack ------------------------------------------------------------

def p3_autoattack() -> dict[str, float]:
    import torchattacks

    model, x, y = digits()
    attack = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="standard",
                                     n_classes=10, seed=0)
    started = time.perf_counter()
    x_adv = attack(x, y)
    t_aa = time.perf_counter() - started
    with torch.no_grad():
        acc_aa = float(((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).float().mean())
    rows = {}
    for label, overrides in (("default", {}),
                             ("halving + cw", {"schedule": "halving",
                                               "attacks": ("pgd", "tpgd", "cw")}),
                             ("halving + cw, 3 restarts", {"schedule": "halving",
                                                           "attacks": ("pgd", "tpgd", "cw"),
                                                           "restarts": 3,
                                                           "mode": "worst-case"})):
        runs = [timed(lambda s=seed, o=overrides: audit(seed=s, **o), repeat=1)
                for seed in range(3)]
        t = float(np.median([r[0] for r in runs]))
        acc = float(np.mean([r[1]["summary"]["robust_acc"]["worst"] for r in runs]))
        rows[label] = (t, acc)
        print(f"P3 robaudit {label} (mean of 3 seeds): {t:.2f}s robust {acc:.1%}; "
              f"AutoAttack standard {t_aa:.1f}s robust {acc_aa:.1%} -> excess "
              f"{(acc - acc_aa) * 100:+.1f} pp "
              f"(target <= +1), time ratio {t / t_aa:.3f} (target <= 0.1)")
    t, acc = rows["default"]
    return {"excess_pp": (acc - acc_aa) * 100, "time_ratio": t / t_aa, "autoattack_acc": acc_aa,
            "autoattack_s": t_aa}


# -- Memory: streaming ----------------------------------------------------------------------------

def _folder(root: Path, copies: int) -> Path:
    from PIL import Image

    data = np.load(DIGITS / "test.npz")
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for k in range(copies):
        for i, (img, label) in enumerate(zip(data["x"], data["y"], strict=True)):
            Image.fromarray(img[0]).save(root / str(label) / f"{k}_{i}.png")
    return root


def _rss_mb(folder: Path) -> tuple[float, float]:
    """Resident memory of a scan of ``folder`` in a fresh process: (before the scan, with torch,
    robaudit and the model loaded; peak), in MB."""
    code = (
        "import sys, torch; from robaudit.cli import main; from robaudit.models import load_model; "
        f"load_model({str(DIGITS / 'model.pt2')!r}); "
        "vm = lambda key: next(int(l.split()[1]) for l in open('/proc/self/status') "
        "if l.startswith(key)); before = vm('VmRSS:'); "
        f"main(['scan', {str(DIGITS / 'model.pt2')!r}, '--data', {str(folder)!r}, "
        "'--eps', '0.2', '--steps', '5', '-q']); "
        "print(before, vm('VmHWM:'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, peak = (int(v) / 1024 for v in out.stdout.strip().splitlines()[-1].split())
    return before, peak


def memory() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        small = _folder(Path(tmp) / "x1", 1)
        large = _folder(Path(tmp) / "x10", 10)
        (base_small, rss_small), (base_large, rss_large) = _rss_mb(small), _rss_mb(large)
    ratio = rss_large / rss_small
    growth_small, growth_large = rss_small - base_small, rss_large - base_large
    print(f"MEM peak RSS: 540 images {rss_small:.0f} MB, 5400 images {rss_large:.0f} MB "
          f"-> ratio {ratio:.3f} (target <= 1.2); above the {base_small:.0f} MB of torch, "
          f"robaudit and the model: {growth_small:.0f} MB vs {growth_large:.0f} MB "
          f"-> ratio {growth_large / max(growth_small, 1e-9):.2f}")
    return {"ratio": ratio, "small_mb": rss_small, "large_mb": rss_large,
            "growth_small_mb": growth_small, "growth_large_mb": growth_large}


# -- Distributed: torchrun with 2 gloo ranks against one process --------------------------------

def distributed() -> dict[str, float]:
    common = ["-m", "robaudit", "scan", str(DIGITS / "model.onnx"), "--data",
              str(DIGITS / "test.npz"), "--config", str(DIGITS / "robaudit.toml"), "-q"]
    runs = {"1 process": [sys.executable, *common],
            "2 gloo ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", *common]}
    seconds = {}
    for label, command in runs.items():
        threads = "2" if label == "1 process" else "1"  # the same 2 cores in all
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        started = time.perf_counter()
        subprocess.run(command, env=env, capture_output=True, check=False)
        seconds[label] = time.perf_counter() - started
    ratio = seconds["2 gloo ranks"] / seconds["1 process"]
    print(f"DIST example scan wall time: 1 process {seconds['1 process']:.1f}s, 2 gloo ranks "
          f"{seconds['2 gloo ranks']:.1f}s -> ratio {ratio:.2f} (same 2 cores, start-up included)")
    return {"ratio": ratio, **seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("which", nargs="*", default=["P1", "P2", "P3", "MEM", "DIST"])
    parser.add_argument("--json", help="Write the figures here.")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {machine()}")
    benches = {"P1": p1_overhead, "P2": p2_torchattacks, "P3": p3_autoattack, "MEM": memory,
               "DIST": distributed}
    figures = {name: benches[name]() for name in args.which}
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), **figures}, indent=2))


if __name__ == "__main__":
    main()
