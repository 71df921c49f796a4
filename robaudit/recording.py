"""Per-example records: the engine's finished examples appended to :class:`Records`, and attack
columns that ran on some examples only (escalation) merged in."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from robaudit.attacks.base import predict
from robaudit.attacks.losses import margin
from robaudit.attacks.stream import ExampleResult
from robaudit.metrics import Records

Runtime = Callable[[torch.Tensor], torch.Tensor]


def record(records: Records, examples: list[ExampleResult], e: int,
           runtime: Runtime | None) -> None:
    """Append finished examples' outcomes at the ``e``-th ε to ``records``."""
    records.extend(outcomes(records.attack_names, examples, e, runtime))


def outcomes(attack_names: Sequence[str], examples: list[ExampleResult], e: int,
             runtime: Runtime | None) -> Records:
    """Finished examples' outcomes at the ``e``-th ε, as records of their own.

    Computed apart and appended with :func:`extend`: a Ctrl-C, which Python raises when
    onnxruntime or torch hands back control, then finds ``records`` with the whole batch or
    none of it, never some columns longer than others.
    """
    part = Records(attack_names=list(attack_names))
    if not examples:
        return part
    y = torch.tensor([ex.y for ex in examples])
    clean = torch.stack([ex.clean_logits.float().cpu() for ex in examples])
    part.index.append(np.array([ex.index for ex in examples], dtype=np.int64))
    part.y.append(y.numpy())
    part.clean_pred.append(predict(clean).numpy())
    part.clean_margin.append(margin(clean, y).numpy())
    adv_x: dict[str, torch.Tensor] = {}
    for name in part.attack_names:
        results = [ex.outcomes[(e, name)] for ex in examples]
        logits = torch.stack([clean[i] if r is None else r.logits.float().cpu()
                              for i, r in enumerate(results)])
        part.adv_pred[name] = [predict(logits).numpy()]
        part.adv_margin[name] = [margin(logits, y).numpy()]
        part.forwards[name] = [
            np.array([0 if r is None else r.forwards for r in results], dtype=np.int64)]
        part.bad_gradient[name] = [
            np.array([False if r is None else r.bad_gradient for r in results])]
        if runtime is not None:
            adv_x[name] = torch.stack([ex.x.cpu() if r is None else r.x_adv.cpu()
                                       for ex, r in zip(examples, results, strict=True)])
    if runtime is not None:
        # The deployed runtime sees the same adversarial inputs: does it agree they break?
        xs = torch.stack([ex.x.cpu() for ex in examples])
        part.runtime_clean_pred.append(predict(runtime(xs)).numpy())
        for name, x_adv in adv_x.items():
            part.runtime_pred[name] = [predict(runtime(x_adv)).numpy()]
    return part


def merge_columns(records: Records, extra: Records) -> None:
    """Add ``extra``'s attack columns to ``records``. ``extra`` ran on some of the examples
    (matched by index); every other example carries the result of its strongest attack so far,
    as in worst-case mode, so the worst case over all columns stays the worst case."""
    index = records.array("index").astype(np.int64)
    carried = records.strongest(records.attack_names)
    rows = np.arange(len(index))
    position = {int(i): p for p, i in enumerate(index)}
    at = np.array([position[int(i)] for i in extra.array("index").astype(np.int64)],
                  dtype=np.int64)
    has_runtime = bool(records.runtime_clean_pred)

    def column(field: str, fill: np.ndarray, name: str) -> list[np.ndarray]:
        values = fill.copy()
        if len(at):
            values[at] = extra.array(field, name)
        return [values]

    for name in extra.attack_names:
        stack = {field: np.stack([records.array(field, a) for a in records.attack_names])
                 for field in ("adv_pred", "adv_margin")}
        records.adv_pred[name] = column("adv_pred", stack["adv_pred"][carried, rows], name)
        records.adv_margin[name] = column("adv_margin", stack["adv_margin"][carried, rows], name)
        records.forwards[name] = column("forwards", np.zeros(len(index), dtype=np.int64), name)
        records.bad_gradient[name] = column("bad_gradient", np.zeros(len(index), dtype=bool),
                                            name)
        if has_runtime:
            runtime = np.stack([records.array("runtime_pred", a) for a in records.attack_names])
            records.runtime_pred[name] = column("runtime_pred", runtime[carried, rows], name)
    records.attack_names.extend(extra.attack_names)
    records.carried.extend(extra.attack_names)
