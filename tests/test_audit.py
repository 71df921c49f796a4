"""The scan pipeline end to end on the bundled example, against a plain reference PGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robaudit.audit import scan
from robaudit.config import ScanConfig
from robaudit.metrics import WORST


def reference_pgd_robust(model, x, y, eps, steps, generator):
    """Madry's PGD, written plainly: no early stop, whole batch every step."""
    alpha = 2.5 * eps / steps
    correct = model(x).argmax(1) == y
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps, generator=generator)).clamp(0, 1)
    robust = correct.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        robust &= logits.argmax(1) == y
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps)
        x_adv = x_adv.clamp(0, 1)
    with torch.no_grad():
        robust &= model(x_adv).argmax(1) == y
    return robust


@pytest.fixture(scope="module")
def digits_pgd_result():
    from conftest import DIGITS

    config = ScanConfig(model=str(DIGITS / "model.pt2"), data=str(DIGITS / "test.npz"),
                        attacks=("pgd",), eps=0.2, steps=20, schedule="fixed")
    return scan(config)


def test_pgd_agrees_with_a_reference_pgd_on_the_example_model(digits, digits_pgd_result):
    model = torch.export.load(digits / "model.pt2").module()
    data = np.load(digits / "test.npz")
    x = torch.from_numpy(data["x"]).float() / 255
    y = torch.from_numpy(data["y"]).long()
    robust = reference_pgd_robust(model, x, y, 0.2, 20, torch.Generator().manual_seed(0))
    reference = float(robust.float().mean())
    ours = digits_pgd_result.summary.robust_acc["pgd"]
    assert abs(ours - reference) <= 0.01, (ours, reference)
    # And the figure is the example's known one (README of examples/digits): about 65%.
    assert 0.60 <= ours <= 0.70


def test_early_stop_spends_fewer_passes_than_plain_pgd(digits_pgd_result):
    # Plain PGD spends 21 forward passes on every clean-correct example. About two thirds stay
    # robust and pay all 21; the third that breaks stops early, at about 9 passes on average.
    assert 15.0 < digits_pgd_result.summary.mean_forwards["pgd"] < 18.0


def test_class_disparity_of_the_example_is_visible(digits_pgd_result):
    stats = {s.name: s.robust[WORST].acc for s in digits_pgd_result.stats}
    assert stats["8"] < 0.25 and stats["0"] > 0.9
    assert digits_pgd_result.summary.worst_class == "8"


def digits_config(**kwargs):
    from conftest import DIGITS

    base = {"model": str(DIGITS / "model.pt2"), "data": str(DIGITS / "test.npz"), "eps": 0.2,
            "steps": 10, "per_class": 12}
    return ScanConfig(**{**base, **kwargs})


def test_an_eps_sweep_gives_falling_curves_and_gates_on_the_chosen_eps():
    result = scan(digits_config(eps=0.1, eps_sweep=(0.05, 0.1, 0.2), min_class_robust=0.4))
    assert [e["eps"] for e in result.sweep] == [0.05, 0.1, 0.2]
    worst = [e["robust_acc"][WORST] for e in result.sweep]
    assert worst[0] >= worst[1] >= worst[2]
    assert result.summary.robust_acc[WORST] == worst[1]  # the gate's eps
    assert not result.sanity


def test_worst_case_mode_gives_the_same_worst_case_as_each_mode():
    each = scan(digits_config(attacks=("pgd", "cw"), finish=()))
    worst = scan(digits_config(attacks=("pgd", "cw"), mode="worst-case", finish=()))
    assert each.summary.robust_acc[WORST] == worst.summary.robust_acc[WORST]
    assert each.summary.robust_acc["pgd"] == worst.summary.robust_acc["pgd"]
    # Cumulative: cw in worst-case mode is "after pgd and cw".
    assert worst.summary.robust_acc["cw"] == worst.summary.robust_acc[WORST]
    assert sum(worst.summary.mean_forwards.values()) < sum(each.summary.mean_forwards.values())


def test_the_gallery_shows_reproduced_adversarial_examples_of_flagged_classes():
    result = scan(digits_config(min_class_robust=0.4))
    flagged = {v.name for v in result.flagged}
    assert flagged and set(result.gallery) <= flagged
    for name, items in result.gallery.items():
        assert 1 <= len(items) <= 8
        for item in items:
            assert item["true"] == name and item["pred"] != name
            assert item["adversarial"].startswith("data:image/png;base64,")
            assert 0 < item["confidence"] <= 1


class Quantised(torch.nn.Module):
    """Rounds its input to 8 bits first: the input gradient is zero everywhere."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.linear((torch.round(x * 255) / 255).flatten(1))


class Noisy(torch.nn.Module):
    """Adds fresh noise on every call: a randomised model."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x.flatten(1)) + torch.randn(x.shape[0], 10)


class Softmaxed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x):
        return torch.softmax(self.linear(x.flatten(1)), dim=1)


def exported(tmp_path, module) -> str:
    torch.manual_seed(0)
    model = module().eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    path = tmp_path / f"{module.__name__}.pt2"
    torch.export.save(program, path)
    return str(path)


@pytest.mark.parametrize(
    ("module", "check"),
    [(Quantised, "bad_gradients"), (Noisy, "randomised_model"),
     (Softmaxed, "probability_outputs")],
)
def test_sanity_checks_find_the_signs_of_gradient_masking(tmp_path, module, check):
    from conftest import DIGITS

    config = ScanConfig(model=exported(tmp_path, module), data=str(DIGITS / "test.npz"),
                        eps=0.2, steps=3, per_class=3)
    result = scan(config)
    assert check in [item["check"] for item in result.sanity]
    assert any(check != "bad_gradients" or "gradient masking" in w for w in result.warnings)


def test_strict_turns_sanity_findings_into_exit_4(tmp_path, capsys):
    from conftest import DIGITS

    from robaudit.cli import main

    args = ["scan", exported(tmp_path, Quantised), "--data", str(DIGITS / "test.npz"),
            "--eps", "0.2", "--steps", "3", "--per-class", "3", "--json", str(tmp_path / "r.json")]
    # No policy is set, but the quantised model's zero gradients remain after escalation: every
    # class is unreliable and fails, unless the user allows it by name.
    assert main(args) == 1
    assert main([*args, "--allow-unreliable"]) == 0
    # --strict needs a policy (a floor of 0 flags nothing) before it judges the sanity checks.
    assert main([*args, "--strict", "--min-class-robust", "0"]) == 4
    err = capsys.readouterr().err
    assert "--strict: the sanity checks found signs of gradient masking (bad_gradients" in err
    assert (tmp_path / "r.json").exists()  # the reports are still written


def test_fgsm_stronger_than_pgd_and_curves_rising_with_eps_are_flagged():
    import dataclasses

    from robaudit.sanity import sanity_checks

    result = scan(digits_config(attacks=("fgsm", "pgd"), steps=2))
    summary = dataclasses.replace(result.summary,
                                  robust_acc={"fgsm": 0.30, "pgd": 0.50, WORST: 0.30})
    sweep = [{"eps_text": "0.1", "robust_acc": {WORST: 0.4}},
             {"eps_text": "0.2", "robust_acc": {WORST: 0.6}}]
    checks = [item["check"] for item in sanity_checks(summary, sweep, result.config.mode)]
    assert checks == ["fgsm_stronger_than_pgd", "rises_with_eps"]
    assert sanity_checks(result.summary, [], result.config.mode) == []


# ---------------------------------------------------------------------------------------------
# Ctrl-C lands where a scan spends its time: in an engine step, or while onnxruntime checks the
# examples that finished. tests/test_cli.py and tests/test_reliability.py send real signals.


def test_after_an_interrupt_no_attack_work_runs(monkeypatch):
    from robaudit.attacks.engine import Engine

    steps = []
    step = Engine.step

    def step_until_interrupted(self):
        steps.append(self)
        if len(steps) == 40:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Engine, "step", step_until_interrupted)
    result = scan(digits_config(per_class=None, batch_size=8, min_class_robust=0.4))
    # Not one step after the interrupted one: no attack, no escalation, no gallery.
    assert len(steps) == 40
    assert result.partial and 0 < result.data["audited"] < 540
    assert result.flagged and result.gallery == {}  # a whole scan attacks these examples again


def test_an_interrupt_while_onnxruntime_checks_records_each_finished_example_once(monkeypatch):
    from conftest import DIGITS

    import robaudit.audit

    load_model = robaudit.audit.load_model
    calls = []

    def load_interrupted_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        runtime = model.runtime

        def interrupted_runtime(x):
            calls.append(len(x))
            # 1: the conversion check; 2-4: the first batch's clean and two attacks' inputs.
            if len(calls) == 3:
                raise KeyboardInterrupt  # what Python raises when onnxruntime returns
            return runtime(x)

        model.runtime = interrupted_runtime
        return model

    monkeypatch.setattr(robaudit.audit, "load_model", load_interrupted_model)
    result = scan(digits_config(model=str(DIGITS / "model.onnx"), per_class=None, batch_size=8))
    assert result.partial and len(calls) == 6  # the batch checked again, once, and no other
    audited = result.data["audited"]
    assert audited >= 8 and sum(s.n for s in result.stats) == audited
    assert sum(s.runtime_robust.n for s in result.stats) == audited
