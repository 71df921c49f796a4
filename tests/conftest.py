from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import pytest
import torch
from torch import nn

if TYPE_CHECKING:  # robaudit loads when a test calls harden_config
    from robaudit.harden import HardenConfig

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"


def harden_config(**overrides: object) -> HardenConfig:
    """A HardenConfig on the digits example (ε 0.2) with ``overrides``: for the schemes' and the
    budget's unit tests, which run nothing."""
    from robaudit.config import ScanConfig
    from robaudit.harden import HardenConfig

    scan = ScanConfig(model=str(DIGITS / "model.onnx"), data=str(DIGITS / "test.npz"), eps=0.2)
    values: dict[str, object] = {"scan": scan, "train_data": str(DIGITS / "train.npz"),
                                 "out": "hardened.onnx", **overrides}
    return HardenConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    # CI has 2 cores; more threads than that only adds contention.
    torch.set_num_threads(2)


@pytest.fixture
def digits() -> Path:
    return DIGITS


class Linear(nn.Module):
    """``z = W x + b`` on flattened input: the case whose optimal L∞ attack is known."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


class Constant(nn.Module):
    """Ignores its input: no perturbation can change its prediction."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


@dataclass
class Interrupted:
    """What :func:`interrupt_scan` saw: the exit code and output, the seconds from the start to
    the first progress line, and from the signal to the exit."""

    code: int
    out: str
    err: str
    startup_s: float
    exit_s: float


#: Only against a hang: a busy machine is slow, never this slow.
HANG_S = 900


def interrupt_scan(args: list[str], sig: signal.Signals, cwd: Path,
                   after: str = "robaudit: attacking ") -> Interrupted:
    """Run ``python -m robaudit ARGS -v`` and send ``sig`` once it reports attacked examples
    (its first progress line that starts with ``after``).

    Off a TTY, -v logs a progress line whenever examples finish, so the signal arrives while the
    scan attacks however slow the machine is: no deadline decides when to send it.
    """
    started = time.monotonic()
    with open(cwd / "stdout.txt", "w+") as out:
        # A runner started in the background (`cmd &` in a script) ignores SIGINT, and its
        # children inherit that: the scan gets the default handler back, as from a terminal.
        proc = subprocess.Popen([sys.executable, "-m", "robaudit", *args, "-v"], stdout=out,
                                stderr=subprocess.PIPE, text=True, cwd=cwd,
                                env={**os.environ, "CI": "true"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert proc.stderr is not None
        lines: list[str] = []
        attacking = threading.Event()

        def read(stream: IO[str]) -> None:
            for line in stream:  # drained to the end: a full pipe would stall the scan
                lines.append(line)
                if line.startswith(after):
                    attacking.set()
            attacking.set()  # the scan ended without attacking: the asserts will say so

        reader = threading.Thread(target=read, args=(proc.stderr,), daemon=True)
        reader.start()
        try:
            if not attacking.wait(HANG_S):
                raise AssertionError(f"no progress within {HANG_S} s:\n{''.join(lines)}")
            sent = time.monotonic()
            proc.send_signal(sig)
            proc.wait(HANG_S)
            exited = time.monotonic()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(HANG_S)
        out.seek(0)
        return Interrupted(proc.returncode, out.read(), "".join(lines), sent - started,
                           exited - sent)


class _Masked(nn.Module):
    """The bundled example's model with its gradients masked, every decision kept."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "scaled":  # the softmax saturates: cross-entropy gradients underflow
            return self.model(x) * 1e4
        if self.kind == "quantised":  # the data's own 1/16 grid: zero gradient almost everywhere
            return self.model(torch.round(x * 16) / 16)
        return torch.softmax(self.model(x), dim=1)  # probabilities instead of logits


#: The masked versions of the bundled example: ``masked_file(folder, kind)`` writes one.
MASKED_KINDS = ("scaled", "quantised", "softmax")


def masked_file(folder: Path, kind: str) -> str:
    """The bundled example's model, masked as ``kind``, saved as a torch.export archive."""
    from robaudit.models import load_model

    model = load_model(str(DIGITS / "model.pt2")).module.eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(_Masked(model, kind).eval(), (torch.rand(2, 1, 8, 8),),
                                  dynamic_shapes=({0: batch},))
    path = folder / f"{kind}.pt2"
    torch.export.save(program, path)
    return str(path)
