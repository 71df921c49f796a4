"""Build robaudit's bundled digits example: data split, PGD adversarial training, export.

Loads the UCI hand-written digits from scikit-learn, writes a fixed stratified train/test split
as ``train.npz`` / ``test.npz``, trains a small CNN with PGD adversarial training (Madry et al.),
exports it as ``model.onnx`` and ``model.pt2``, and prints per-class clean and PGD robust accuracy
on the test split.

Re-run with ``pip install scikit-learn`` and then ``python examples/digits/train.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
NUM_CLASSES = 10
SPLIT_RANDOM_STATE = 0
TEST_SIZE = 0.3


class DigitsCNN(nn.Module):
    """Small CNN for 1x8x8 inputs in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (N, 10)."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.pool(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def make_split(out_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load the digits, split them (fixed, stratified) and save uint8 NCHW .npz files."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images / 16.0 * 255.0).astype(np.uint8)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=TEST_SIZE,
        stratify=labels,
        random_state=SPLIT_RANDOM_STATE,
    )
    np.savez_compressed(out_dir / "train.npz", x=x_train, y=y_train)
    np.savez_compressed(out_dir / "test.npz", x=x_test, y=y_test)
    return x_train, y_train, x_test, y_test


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """Convert uint8 images in 0..255 to float32 in [0, 1]."""
    return torch.from_numpy(x).float() / 255.0


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L-inf PGD with a random start and step 2.5*eps/steps.

    Returns the last iterate and a mask of examples that stayed correctly classified at every
    iterate (an example counts as broken as soon as any iterate is misclassified).
    """
    alpha = 2.5 * eps / steps
    delta = (torch.rand(x.shape, generator=generator) * 2.0 - 1.0) * eps
    x_adv = (x + delta).clamp(0.0, 1.0)
    robust = torch.ones_like(y, dtype=torch.bool)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        robust &= logits.argmax(1) == y
        loss = F.cross_entropy(logits, y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    with torch.no_grad():
        robust &= model(x_adv).argmax(1) == y
    return x_adv.detach(), robust


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    generator: torch.Generator,
) -> None:
    """PGD adversarial training (Madry et al.) on the whole training split."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n = x.shape[0]
    steps_per_epoch = (n + args.batch_size - 1) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch
    )
    for epoch in range(args.epochs):
        # Ramp eps up over the first epochs: training at full eps from scratch can stall.
        eps = args.eps * min(1.0, (epoch + 1) / max(1, args.warmup_epochs))
        order = torch.randperm(n, generator=generator)
        total_loss = 0.0
        correct = 0
        for start in range(0, n, args.batch_size):
            idx = order[start : start + args.batch_size]
            xb, yb = x[idx], y[idx]
            model.eval()
            x_adv, _ = pgd(model, xb, yb, eps, args.train_steps, generator)
            model.train()
            logits = model(x_adv)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        if (epoch + 1) % 5 == 0 or epoch == 0:
            print(
                f"epoch {epoch + 1:3d}  eps {eps:.3f}  adv loss {total_loss / n:.3f}  "
                f"adv acc {correct / n:.3f}"
            )
    model.eval()


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return per-example clean-correct and PGD-robust masks (only clean-correct are attacked)."""
    model.eval()
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    robust = torch.zeros_like(clean)
    idx = clean.nonzero().flatten()
    _, still = pgd(model, x[idx], y[idx], eps, steps, generator)
    robust[idx] = still
    return clean, robust


def print_table(y: torch.Tensor, clean: torch.Tensor, robust: torch.Tensor, eps: float) -> None:
    """Print per-class clean and robust accuracy as a Markdown table."""
    print(f"\nTest split, PGD-20 (1 restart), eps={eps:g}")
    print("| class | n | clean | robust |")
    print("|---:|---:|---:|---:|")
    rob_per_class = []
    for k in range(NUM_CLASSES):
        mask = y == k
        n_k = int(mask.sum())
        c = float(clean[mask].float().mean())
        r = float(robust[mask].float().mean())
        rob_per_class.append(r)
        print(f"| {k} | {n_k} | {c:.3f} | {r:.3f} |")
    clean_all = float(clean.float().mean())
    robust_all = float(robust.float().mean())
    print(f"| all | {len(y)} | {clean_all:.3f} | {robust_all:.3f} |")
    mean_class = sum(rob_per_class) / NUM_CLASSES
    print(
        f"mean class robust {mean_class:.3f}, best {max(rob_per_class):.3f}, "
        f"worst {min(rob_per_class):.3f} (class {rob_per_class.index(min(rob_per_class))})"
    )


ONNX_OPSET = 18


def export(model: nn.Module, out_dir: Path) -> None:
    """Export the model as ONNX (dynamo exporter, single file) and as a torch.export program.

    Both have a dynamic batch axis. The ONNX graph has the input "image" and the output "logits"
    and uses only Conv, Relu, MaxPool, Reshape and Gemm.
    """
    example = torch.rand(4, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, out_dir / "model.pt2")

    onnx_program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
        external_data=False,
        verbose=False,
    )
    onnx_program.save(str(out_dir / "model.onnx"), external_data=False)


def check_exports(model: nn.Module, out_dir: Path, x: torch.Tensor) -> None:
    """Check that the exported files give the same logits as the trained model."""
    with torch.no_grad():
        expected = model(x)
        loaded = torch.export.load(out_dir / "model.pt2").module()
        diff = (loaded(x) - expected).abs().max().item()
    print(f"model.pt2 max |logit diff| {diff:.2e}")
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed: model.onnx not checked")
        return
    session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 37, len(x)):
        (logits,) = session.run(["logits"], {"image": x[:batch].numpy()})
        diff = float(np.abs(logits - expected[:batch].numpy()).max())
        print(f"model.onnx batch {batch:3d} max |logit diff| {diff:.2e}")


def parse_args() -> argparse.Namespace:
    """Parse command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--eps", type=float, default=0.2, help="L-inf radius in [0, 1] pixels")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--warmup-epochs", type=int, default=10, help="epochs of eps ramp-up")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--train-steps", type=int, default=7, help="PGD steps in training")
    parser.add_argument("--eval-steps", type=int, default=20, help="PGD steps in evaluation")
    return parser.parse_args()


def main() -> None:
    """Build the split, train, evaluate and export."""
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    x_train, y_train, x_test, y_test = make_split(args.out_dir)
    xtr, ytr = to_tensor(x_train), torch.from_numpy(y_train)
    xte, yte = to_tensor(x_test), torch.from_numpy(y_test)
    print(f"train {len(ytr)} / test {len(yte)} images, eps={args.eps:g}")

    generator = torch.Generator().manual_seed(args.seed)
    model = DigitsCNN()
    start = time.perf_counter()
    train(model, xtr, ytr, args, generator)
    print(f"training took {time.perf_counter() - start:.1f} s")

    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    clean, robust = evaluate(model, xte, yte, args.eps, args.eval_steps, eval_gen)
    print_table(yte, clean, robust, args.eps)

    export(model, args.out_dir)
    check_exports(model, args.out_dir, xte)
    print(f"wrote train.npz, test.npz, model.onnx, model.pt2 to {args.out_dir}")


if __name__ == "__main__":
    main()
