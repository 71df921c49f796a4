"""A few adversarial examples of each flagged class, as PNG data URIs for the HTML report.

Random starts are seeded per example, so attacking a chosen example again reproduces the
adversarial example the audit found: nothing has to be kept in memory during the scan.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from robaudit.attacks.base import Attack, example_seed
from robaudit.attacks.jobs import Job
from robaudit.attacks.stream import run_jobs
from robaudit.data import DataSource
from robaudit.metrics import Records

#: Examples per flagged class, and flagged classes shown (the least robust first).
PER_CLASS = 8
MAX_CLASSES = 10
#: Small images are enlarged (nearest neighbour) to at least this many pixels a side.
MIN_SIDE = 64


def encode_png(image: np.ndarray) -> bytes:
    """A PNG file of an 8-bit grey (H, W) or RGB (H, W, 3) array; zlib is all PNG needs."""
    height, width = image.shape[:2]
    colour = 2 if image.ndim == 3 else 0
    rows = b"".join(b"\x00" + image[r].tobytes() for r in range(height))  # filter type 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def _png(image: torch.Tensor) -> str:
    """A CHW image in [0, 1] as a data URI, small images enlarged to stay visible."""
    img = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    side = min(img.shape[-2:])
    if side < MIN_SIDE:
        factor = -(-MIN_SIDE // side)
        img = img.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    array = img[0].numpy() if img.shape[0] == 1 else img[:3].permute(1, 2, 0).contiguous().numpy()
    return "data:image/png;base64," + base64.b64encode(encode_png(array)).decode("ascii")


def make_gallery(
    model: torch.nn.Module,
    source: DataSource,
    records: Records,
    flagged: Sequence[int],
    attacks: Sequence[Attack],
    *,
    seed: int,
    device: torch.device,
) -> dict[str, list[dict[str, Any]]]:
    """Up to PER_CLASS broken examples of each of the MAX_CLASSES least robust flagged classes."""
    if not flagged or len(records) == 0:
        return {}
    y = records.labels()
    index = records.array("index").astype(np.int64)
    broken = records.clean_correct() & ~records.robust_under([a.name for a in attacks])
    by_class = {c: np.sort(index[broken & (y == c)])[:PER_CLASS] for c in flagged}
    order = sorted(flagged, key=lambda c: (broken & (y == c)).sum() / max(1, (y == c).sum()),
                   reverse=True)[:MAX_CLASSES]
    chosen = [(c, int(i)) for c in order for i in by_class[c]]
    if not chosen:
        return {}
    xs = {i: source.dataset[i][0].to(device) for _, i in chosen}
    # Each example reruns only the first attack that broke it in the scan.
    position = {int(i): p for p, i in enumerate(index)}
    first = {i: next(a for a in attacks
                     if records.array("adv_pred", a.name)[position[i]] != y[position[i]])
             for _, i in chosen}
    jobs = [Job((i, first[i].name), xs[i], c, example_seed(i, seed), first[i])
            for c, i in chosen]
    was_training = model.training
    model.eval()
    try:
        results = run_jobs(model, jobs, max(1, min(256, len(jobs))))
    finally:
        model.train(was_training)
    names = source.class_names
    gallery: dict[str, list[dict[str, Any]]] = {}
    for c, i in chosen:
        attack = first[i]
        hit = results[(i, attack.name)]
        if not hit.broken:  # not reproduced (floating-point ties): show only what did break
            continue
        probs = torch.softmax(hit.logits.float(), dim=0)
        pred = int(probs.argmax())
        delta = hit.x_adv - xs[i]
        gallery.setdefault(names[c], []).append({
            "index": i,
            "true": names[c],
            "pred": names[pred],
            "confidence": float(probs[pred]),
            "attack": attack.name,
            "clean": _png(xs[i]),
            "adversarial": _png(hit.x_adv),
            # Scaled so the full ±eps range (L2: the largest change) spans black to white.
            "perturbation": _png(0.5 + delta / (2 * _scale(attack, delta))),
        })
    return gallery


def _scale(attack: Attack, delta: torch.Tensor) -> float:
    if attack.norm == "linf":
        return attack.eps
    return float(delta.abs().max()) or 1.0
