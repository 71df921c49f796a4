"""The sanity checks of a scan: outputs robaudit cannot audit (refused), and the signs of
gradient masking in the figures (reported, and the triggers of escalation, see
:mod:`robaudit.masking`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from robaudit.attacks import one_step_pairs
from robaudit.attacks.memory import is_out_of_memory
from robaudit.errors import DataError, ModelOutputError
from robaudit.metrics import WORST, Records, Summary

#: Examples beyond which a single disagreement between torch and onnxruntime is only a warning.
RUNTIME_AGREEMENT_WARN = 0.01


def check_outputs(module: torch.nn.Module, x: torch.Tensor, num_classes: int,
                  warnings: list[str], sanity: list[dict[str, str]]) -> None:
    """Refuse outputs that cannot be audited; warn about probabilities (attacks want logits)."""
    try:
        with torch.no_grad():
            out = module(x)
    except RuntimeError as e:
        if is_out_of_memory(e):  # not the data's fault: the caller names --batch-size
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # TorchScript's first line only says that something failed; its last line says what.
        first = (lines[-1] if "TorchScript interpreter" in lines[0] else lines[0]) if lines \
            else type(e).__name__
        raise DataError(
            f"the model cannot run on the data's inputs of shape {tuple(x.shape[1:])}: "
            f"{first.rstrip('.')}. "
            "Check --image-size, the channel count, and that the model matches the data set"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelOutputError(
            f"the model's output has shape {shape}; robaudit needs logits of shape "
            "(batch, classes). Export the model so it returns one logits tensor"
        )
    if out.shape[1] == 1:
        # Nothing to audit: no other class exists, so every correct example is trivially robust;
        # and a one-logit binary classifier (sigmoid) would be misread, argmax ignores the sign.
        raise ModelOutputError(
            "the model has 1 output: it cannot be attacked, since there is no other class to "
            "push an input to (argmax over one logit is always class 0); export a binary "
            "classifier with one logit z as two logits, torch.cat([torch.zeros_like(z), z], 1)"
        )
    if out.shape[1] != num_classes:
        raise ModelOutputError(
            f"the model outputs {out.shape[1]} classes but the data set has {num_classes}; "
            "pass the matching data set or --class-names"
        )
    # A few non-finite rows count as misclassified (see attacks.base.predict); none finite means
    # a model that does not run on these inputs at all.
    if not torch.isfinite(out).all(dim=1).any():
        raise ModelOutputError(
            "the model's outputs contain NaN or inf on real inputs; check the model and "
            "the input range (robaudit feeds pixels in [0, 1]: use --mean/--std to normalise)"
        )
    with torch.no_grad():
        again = module(x)
    if not torch.allclose(out, again, rtol=1e-4, atol=1e-5, equal_nan=True):
        sanity.append({"check": "randomised_model", "message": (
            "two clean passes over the same batch disagree: the model is randomised (dropout "
            "left on, noise layers), which masks gradients; audit it with an expectation over "
            "its randomness (EOT) or remove the randomness")})
    if bool((out >= 0).all()) and torch.allclose(out.sum(dim=1), torch.ones(out.shape[0],
                                                                             device=out.device),
                                                 atol=1e-3):
        sanity.append({"check": "probability_outputs", "message": (
            "the model's outputs look like probabilities (non-negative rows summing to 1); "
            "attacks need logits, so robust accuracy may be overestimated: export the model "
            "without its final softmax")})


def sanity_checks(summary: Summary, sweep: list[dict[str, Any]], mode: str) -> list[dict[str, str]]:
    """The signs of gradient masking (Athalye et al. 2018; Croce and Hein 2020)."""
    found = []
    for name, share in summary.bad_gradient_share.items():
        if share > 0.05:
            found.append({"check": "bad_gradients", "message": (
                f"{name}: {share:.0%} of attacked examples had zero or non-finite input "
                "gradients at some step, a sign of gradient masking; robust accuracy may be "
                "overestimated")})
    robust = summary.robust_acc
    pairs = one_step_pairs([a for a in robust if a != WORST]) if mode == "each" else []
    for one, many in pairs:
        if robust[one] < robust[many] - 0.01:
            found.append({"check": "fgsm_stronger_than_pgd", "message": (
                f"{one} ({robust[one]:.1%}) is stronger than {many} ({robust[many]:.1%}): a "
                "one-step attack should never beat many steps unless gradients are masked")})
            break
    for lower, higher in itertools.pairwise(sweep):
        low, high = lower["robust_acc"]["worst"], higher["robust_acc"]["worst"]
        if high > low + 0.01:
            found.append({"check": "rises_with_eps", "message": (
                f"robust accuracy rises from {low:.1%} at eps {lower['eps_text']} to {high:.1%} "
                f"at eps {higher['eps_text']}: a larger ball must not be harder to break, so the "
                "attack is failing (gradient masking?)")})
    return found


def nonfinite_warnings(records: Sequence[Records], num_classes: int) -> list[str]:
    """Where the model's outputs were NaN or inf (``records``: one per ε): those examples count
    as misclassified, clean or under attack (their prediction is ``num_classes``, no class)."""
    if not records or not len(records[0]):
        return []
    clean_pred = records[0].array("clean_pred")
    attacked = int(records[0].clean_correct().sum())
    clean = int((clean_pred == num_classes).sum())
    broken: set[int] = set()
    attacks: list[str] = []
    for rec in records:
        index = rec.array("index").astype(np.int64)
        attacked_here = rec.clean_correct()
        for a in rec.independent:
            hit = attacked_here & (rec.array("adv_pred", a) == num_classes)
            if hit.any() and a not in attacks:
                attacks.append(a)
            broken.update(index[hit].tolist())
    where = []
    if broken:
        where.append(f"{len(broken)} of the {attacked} attacked examples ({', '.join(attacks)})")
    if clean:
        where.append(f"{clean} clean example(s)")
    if not where:
        return []
    return [f"the model's outputs were NaN or inf on {' and on '.join(where)}: those count as "
            "misclassified (a non-finite output is no prediction, and its gradients are not "
            "taken for gradient masking); the model is numerically unstable near the data: look "
            "for log, sqrt or division of values that can reach zero"]


def runtime_warnings(summary: Summary) -> list[str]:
    if summary.runtime_robust_acc is None:
        return []
    gap = abs(summary.runtime_robust_acc - summary.robust_acc["worst"])
    if gap <= RUNTIME_AGREEMENT_WARN:
        return []
    return [f"onnxruntime confirms a worst-case robust accuracy of "
            f"{summary.runtime_robust_acc:.1%} against {summary.robust_acc['worst']:.1%} in "
            "torch: the converted model and the runtime disagree near the decision boundary"]
