"""The working batch sized to memory: what one row costs, what the machine has free, and the
one error that running out of it becomes.

A row's cost is measured, not guessed: one forward pass of one example under autograd's
saved-tensor hooks counts the bytes autograd keeps for the backward pass (the activations, the
part that grows with the input and the model), on the CPU as on CUDA, without running the
backward and without reading the allocator's caches or the process's resident size, which move
with everything else the process holds. The transients of the backward pass and the engine's
own per-row state are added as multiples of the largest activation and of the input.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from robaudit.attacks.base import Model
from robaudit.attacks.jobs import auto_batch_size
from robaudit.errors import ConfigError, ResourceError

#: Sets the memory, in bytes (suffixes K, M, G, T: powers of 1024), that a scan may plan its
#: working batch for, below the free memory (for shared machines, and for tests).
LIMIT_VARIABLE = "ROBAUDIT_MEMORY_LIMIT"
#: The share of the free memory the working batch is planned to fill: the rest absorbs what the
#: estimate leaves out (allocator slack, onnxruntime's check, the reports, other processes).
FREE_SHARE = 0.6
#: Copies of one input a row holds besides the activations: the engine's state (current, clean,
#: two bounds, two best iterates), the input gradient and the step's temporaries, and the data
#: batches whose examples are still in flight.
INPUT_COPIES = 12
#: The backward pass holds gradients of about this many of the largest activation at once.
BACKWARD_COPIES = 2
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# cgroup v2 and v1: a container's limit, which the kernel enforces whatever MemAvailable says.
_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                  "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def memory_limit() -> int | None:
    """The byte count ``ROBAUDIT_MEMORY_LIMIT`` sets, or None when it is unset."""
    text = os.environ.get(LIMIT_VARIABLE, "").strip()
    if not text:
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", text, flags=re.IGNORECASE)
    if found is None or float(found[1]) <= 0:
        raise ConfigError(f"{LIMIT_VARIABLE} must be a positive number of bytes such as 8G or "
                          f"512M, got {text!r}")
    return int(float(found[1]) * _UNITS[found[2].upper()])


def free_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on ``device`` (None when the system does not say)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory torch's caching allocator holds but no tensor uses is free to torch.
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    found = [n for n in (_available_ram(), _cgroup_headroom()) if n is not None]
    return min(found) if found else None


def _available_ram() -> int | None:
    try:
        import psutil  # optional; /proc/meminfo says the same on Linux
    except ImportError:
        try:
            text = Path("/proc/meminfo").read_text()
        except OSError:
            return None
        found = re.search(r"^MemAvailable:\s+(\d+) kB", text, flags=re.MULTILINE)
        return int(found[1]) * 1024 if found else None
    return int(psutil.virtual_memory().available)


def _cgroup_headroom() -> int | None:
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            return max(0, int(limit) - usage)
    return None


def memory_budget(device: torch.device) -> int | None:
    """Bytes the working batch may fill: a share of the free memory, at most the limit set in
    ``ROBAUDIT_MEMORY_LIMIT``; None when neither is known."""
    free, limit = free_memory(device), memory_limit()
    share = None if free is None else int(free * FREE_SHARE)
    known = [n for n in (share, limit) if n is not None]
    return min(known) if known else None


def row_cost(model: Model, x: torch.Tensor) -> int:
    """Bytes one more row of a working batch of inputs like ``x`` (CHW) needs (see the module's
    docstring)."""
    weights: set[int] = set()
    if isinstance(model, nn.Module):
        tensors = [*model.parameters(), *model.buffers()]
        weights = {t.untyped_storage().data_ptr() for t in tensors}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # weights are shared by every row
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    probe = x[None].detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(probe)  # kept alive while counting: saved storages stay distinct
    activations = sum(saved.values()) + BACKWARD_COPIES * max(saved.values(), default=0)
    del logits
    return activations + INPUT_COPIES * x.numel() * x.element_size()


def plan_batch(model: Model, x: torch.Tensor, requested: int | None) -> tuple[int, str | None]:
    """The working batch for inputs like ``x``, and a warning when ``requested`` (the user's
    ``--batch-size``, honoured) will not fit in memory.

    Without a request it is :func:`auto_batch_size`, lowered to what the memory budget holds;
    ResourceError when not even one row fits.
    """
    wanted = requested or auto_batch_size(x.numel())
    budget = memory_budget(x.device)
    if budget is None:
        return wanted, None
    try:
        cost = row_cost(model, x)
    except Exception as exc:  # the first batch's checks name what is wrong with model or data
        if is_out_of_memory(exc):
            raise _no_room(x, None, budget) from exc
        return wanted, None
    fits = budget // cost
    if requested is not None:
        if requested <= fits:
            return requested, None
        return requested, (
            f"--batch-size {requested} may not fit in memory: a row of {_shape(x)} needs about "
            f"{_size(cost)} and {_size(budget)} is available (see {LIMIT_VARIABLE} in the "
            f"README); a --batch-size of {max(1, fits)} or less would fit")
    if fits < 1:
        raise _no_room(x, cost, budget)
    return min(wanted, fits), None


def _no_room(x: torch.Tensor, cost: int | None, budget: int) -> ResourceError:
    need = "more" if cost is None else f"about {_size(cost)}"
    return ResourceError(
        f"not enough memory on {x.device.type}: attacking one example of {_shape(x)} needs "
        f"{need}, and {_size(budget)} is available ({int(FREE_SHARE * 100)}% of the free "
        f"memory, at most {LIMIT_VARIABLE}); free memory or use smaller images, or pass "
        "--batch-size 1 to try anyway")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA's, the CPU allocator's, Python's)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower()
                                              or "can't allocate memory" in text)


@contextmanager
def memory_errors(device: torch.device, batch: int) -> Iterator[None]:
    """Turns an allocation failure into a ResourceError that names ``--batch-size``."""
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory(device, batch) from exc


def out_of_memory(device: torch.device, batch: int) -> ResourceError:
    """What to do when working batches of ``batch`` rows ran out of memory on ``device``."""
    if batch == 1:
        return ResourceError(f"out of memory on {device.type} with a working batch of 1, the "
                             "smallest --batch-size: free memory or use smaller images")
    return ResourceError(
        f"out of memory on {device.type} with a working batch of {batch}: pass a smaller "
        f"--batch-size (e.g. --batch-size {max(1, batch // 4)}), or set {LIMIT_VARIABLE} lower")


def _shape(x: torch.Tensor) -> str:
    return "x".join(str(n) for n in x.shape)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
