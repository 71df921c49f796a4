"""robaudit harden: weighting schemes, calibration, checkpoints and resume, export and rescan."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DIGITS, harden_config

from robaudit.cli import main
from robaudit.config import ScanConfig
from robaudit.errors import ConfigError, UsageError
from robaudit.harden.calibrate import _search
from robaudit.harden.checkpoint import load_checkpoint
from robaudit.harden.export import write_model
from robaudit.harden.holdout import hold_out, minimum_per_class
from robaudit.harden.reweight import SCHEMES, Feedback, make_scheme
from robaudit.harden.state import Budget, Candidate, RunState, noise
from robaudit.harden.train import Split, Validation, load_split, train_epoch
from robaudit.models import load_model

# Small and quick: 10 examples per class, 3 attack steps, PGD only.
FAST = ["--per-class", "10", "--steps", "3", "--attacks", "pgd", "--train-steps", "2",
        "--train-batch-size", "16", "--config", str(DIGITS / "robaudit.toml")]


def harden_args(model: str, out: Path, *extra: str) -> list[str]:
    return ["harden", str(DIGITS / model), "--data", str(DIGITS / "train.npz"),
            "--val-data", str(DIGITS / "test.npz"), "--out", str(out), *FAST, *extra]


config = harden_config


# --- weighting schemes ---------------------------------------------------------------------


def test_frl_weights_follow_the_lagrangian_of_the_class_gaps():
    scheme = make_scheme(config(reweight="frl", frl_rate=0.5, frl_tau=0.05), 2)
    # Class 1: clean 0.9 (error 0.1, mean 0.05), robust 0.3 (boundary error 0.6, mean 0.35).
    scheme.update(Feedback(val_clean=[1.0, 0.9], val_robust=[0.9, 0.3]))
    assert scheme.state["phi_nat"] == pytest.approx([0.0, 0.5 * (0.1 - 0.05 - 0.05)])
    assert scheme.state["phi_bndy"] == pytest.approx([0.0, 0.5 * (0.6 - 0.35 - 0.05)])
    s = scheme.settings()
    # K * (1/K + phi_i - mean phi): phi_bndy = (0, 0.1) gives 1 -/+ 0.1.
    assert s.bndy_weight == pytest.approx([0.9, 1.1])
    assert s.nat_weight == pytest.approx([1.0, 1.0])
    assert s.eps == [0.2, 0.2]  # Remargin only with class_eps


def test_frl_multipliers_stay_on_the_simplex_and_remargin_grows_eps():
    scheme = make_scheme(config(reweight="frl", frl_rate=5.0, frl_limit=0.8, class_eps=True), 2)
    scheme.update(Feedback(val_clean=[1.0, 1.0], val_robust=[1.0, 0.0]))
    assert sum(scheme.state["phi_bndy"]) == pytest.approx(0.8)
    s = scheme.settings()
    assert min(s.bndy_weight) > 0
    assert s.eps[0] == pytest.approx(0.2) and s.eps[1] == pytest.approx(0.4)  # capped at 2 eps


def test_cfa_calibrates_eps_and_beta_by_training_robust_accuracy():
    scheme = make_scheme(config(reweight="cfa", objective="trades", beta=6.0), 2)
    first = scheme.settings()
    assert first.eps == [0.2, 0.2] and first.beta == [6.0, 6.0]
    scheme.update(Feedback([1.0, 1.0], [0.5, 0.5], train_robust=[0.7, 0.2]))
    s = scheme.settings()
    assert s.eps == pytest.approx([(0.3 + 0.7) * 0.2, (0.3 + 0.2) * 0.2])  # λ1 = 0.3 (TRADES)
    assert s.beta == pytest.approx([(0.5 + 0.7) * 6.0, (0.5 + 0.2) * 6.0])


def test_inverse_weights_are_proportional_to_robust_error():
    scheme = make_scheme(config(reweight="inverse"), 3)
    scheme.update(Feedback([1.0] * 3, [0.8, 0.6, 0.4]))
    assert scheme.settings().nat_weight == pytest.approx([0.5, 1.0, 1.5])


def test_none_is_uniform():
    scheme = make_scheme(config(reweight="none"), 2)
    scheme.update(Feedback([1.0, 0.5], [0.9, 0.1], [0.9, 0.1]))
    s = scheme.settings()
    assert s.nat_weight == s.bndy_weight == [1.0, 1.0] and s.eps == [0.2, 0.2]


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"reweight": "fair"}, "reweight must be one of"),
    ({"epochs": 0}, "without --calibrate"),
    ({"reweight": "none", "class_eps": True}, "--class-eps applies"),
    ({"out": "hardened.pt2"}, "keep the input's format"),
])
def test_bad_settings_are_config_errors(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config(**overrides)


# --- calibration ---------------------------------------------------------------------------


def test_calibration_search_lifts_the_worst_class_within_the_clean_cap():
    # Class 1's adversarial logits lose by 0.3; a bias of +0.5 on class 1 wins them back while
    # every clean example keeps its label (class 0 leads by 2 when clean and under attack).
    y = torch.tensor([0, 0, 1, 1])
    clean = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    adv = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.3, 0.0], [0.3, 0.0]])
    bias = _search(clean, adv, y, torch.zeros(2), floor=1.0)
    assert float(bias[1] - bias[0]) > 0.3 and float(bias[1] - bias[0]) < 2.0


def test_calibration_never_trades_more_clean_accuracy_than_allowed():
    y = torch.tensor([0, 1])
    clean = torch.tensor([[1.0, 0.0], [0.0, 0.1]])  # class 1 wins by only 0.1 when clean
    adv = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # class 1 needs +1 to survive the attack
    # Any bias raising class 1 by more than 1 breaks class 0's clean example: cap forbids it.
    bias = _search(clean, adv, y, torch.zeros(2), floor=1.0)
    clean_ok = ((clean + bias).argmax(1) == y).all()
    assert bool(clean_ok)


# --- end to end ----------------------------------------------------------------------------


def test_hardened_onnx_scans_with_runtime_figures_matching_torch(tmp_path, capsys):
    out = tmp_path / "hardened.onnx"
    report = tmp_path / "harden.json"
    code = main(harden_args("model.onnx", out, "--epochs", "1", "--reweight", "frl",
                            "--calibrate", "--json", str(report),
                            "--html", str(tmp_path / "harden.html")))
    printed = capsys.readouterr().out
    doc = json.loads(report.read_text())
    assert code == doc["verdict"]["exit_code"] and code in (0, 1)
    assert "before -> after" in printed and "kept epoch" in printed
    assert "epochs within it: 0" in printed
    assert doc["kept"]["criterion"].startswith("highest worst-class")
    assert doc["kept"]["budget"]["max_mean_drop"] == 0.02
    within = doc["kept"]["within_budget"]
    assert 0 in within and doc["kept"]["epoch"] in within
    assert doc["model"]["runtime_max_abs_diff"] < 1e-4
    # One before/after page: both scans, a before and an after bar per class.
    page = (tmp_path / "harden.html").read_text()
    assert not (tmp_path / "harden.before.html").exists()
    assert page.count('<rect class="bar"') == 2 * 10 and "Per-class change" in page
    assert "Which epoch was kept" in page and page.count("<h3>before: ") == 1
    weights = json.loads((tmp_path / "hardened.class-weights.json").read_text())
    assert weights["reweight"] == "frl" and len(weights["epochs"]) == 1
    assert len(weights["calibration_bias"]) == 10
    # The checkpoint holds only tensors and plain data.
    state = torch.load(tmp_path / "hardened.onnx.ckpt", weights_only=True)
    assert state["epoch"] == 1

    scan_report = tmp_path / "scan.json"
    main(["scan", str(out), "--data", str(DIGITS / "test.npz"), "--per-class", "10",
          "--steps", "3", "--attacks", "pgd", "--config", str(DIGITS / "robaudit.toml"),
          "--json", str(scan_report)])
    summary = json.loads(scan_report.read_text())["summary"]
    assert summary["runtime_robust_acc"] == pytest.approx(summary["robust_acc"]["worst"])
    assert summary["runtime_clean_acc"] == pytest.approx(summary["clean_acc"])


def test_calibration_alone_with_zero_epochs(tmp_path):
    out = tmp_path / "calibrated.pt2"
    code = main(harden_args("model.pt2", out, "--epochs", "0", "--calibrate",
                            "--json", str(tmp_path / "h.json")))
    doc = json.loads((tmp_path / "h.json").read_text())
    assert code in (0, 1) and doc["kept"]["epoch"] == 0
    cal = doc["calibration"]
    assert cal["after"]["worst_robust"] >= cal["before"]["worst_robust"]
    assert cal["after"]["clean_acc"] >= cal["before"]["clean_acc"] - 0.01 - 1e-9
    # The bias is a layer of the written program: the rescanned model includes it.
    program = torch.export.load(out).module()
    assert program(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def _tensors(state: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint, by path."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(state, torch.Tensor):
        found[prefix] = state
    elif isinstance(state, dict):
        for k, v in state.items():
            found.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            found.update(_tensors(v, f"{prefix}/{i}"))
    return found


def test_resume_after_sigkill_mid_epoch_gives_identical_weights(tmp_path):
    args = ["--epochs", "3", "--reweight", "cfa"]
    killed = tmp_path / "killed.pt2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "robaudit", *harden_args("model.pt2", killed, *args, "-v")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "CI": "true", "OMP_NUM_THREADS": "2"},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # -v off a TTY logs a line per training batch
        if "training epoch 2/3 batch 1/" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = Path(f"{killed}.ckpt")
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1  # killed during epoch 2
    assert not killed.exists()

    assert main(harden_args("model.pt2", killed, *args, "--resume")) in (0, 1)
    straight = tmp_path / "straight.pt2"
    assert main(harden_args("model.pt2", straight, *args)) in (0, 1)

    resumed = _tensors(torch.load(checkpoint, weights_only=True))
    reference = _tensors(torch.load(f"{straight}.ckpt", weights_only=True))
    assert resumed.keys() == reference.keys() and any(k.startswith("/model") for k in resumed)
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
    a = torch.export.load(killed).module().state_dict()
    b = torch.export.load(straight).module().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    # cfa: from epoch 2 each class trains in its own ball, eps_k = (0.5 + t_k) * eps, with t_k
    # the class's robust accuracy on its epoch-1 training examples.
    history = torch.load(checkpoint, weights_only=True)["history"]
    t = history[1]["train_robust"]
    assert history[2]["settings"]["eps"] == pytest.approx([(0.5 + tk) * 0.2 for tk in t])
    assert len(set(history[2]["settings"]["eps"])) > 1


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    cfg = config(out=str(tmp_path / "h.onnx"))
    with pytest.raises(UsageError, match="no checkpoint"):
        load_checkpoint(cfg.checkpoint_path, {"reweight": "frl"})


def test_without_val_data_harden_validates_on_a_hold_out_it_never_trains_on(tmp_path, capsys):
    out = tmp_path / "h.pt2"
    code = main(["harden", str(DIGITS / "model.pt2"), "--data", str(DIGITS / "train.npz"),
                 "--out", str(out), *FAST, "--per-class", "20", "--epochs", "1",
                 "--json", str(tmp_path / "h.json")])
    assert code in (0, 1)
    doc = json.loads((tmp_path / "h.json").read_text())
    holdout = doc["validation"]["holdout"]
    # 10% would be 2 of each class's 20; resolving the 2-point budget takes 25, capped at half.
    assert holdout == {"fraction": 0.1, "minimum_per_class": 25, "seed": 0,
                       "file": str(tmp_path / "h.holdout.pt"), "held_out": 100,
                       "trained_on": 100}
    # The before/after scans ran on the hold-out file, ten examples of each class.
    assert doc["after"]["data"]["spec"] == holdout["file"]
    assert doc["after"]["data"]["audited"] == 100
    assert "100 examples held out of the training data" in capsys.readouterr().out
    held = torch.load(holdout["file"], weights_only=True)
    assert held["x"].dtype == torch.uint8 and held["y"].bincount().tolist() == [10] * 10


def test_val_fraction_with_val_data_is_a_usage_error(tmp_path, capsys):
    code = main(harden_args("model.pt2", tmp_path / "h.pt2", "--val-fraction", "0.2"))
    assert code == 4 and "--val-fraction holds out part of --data" in capsys.readouterr().err


def test_hold_out_is_stratified_seeded_and_disjoint_from_training():
    scan = ScanConfig(model=str(DIGITS / "model.pt2"), data=str(DIGITS / "train.npz"))
    data = load_split(str(DIGITS / "train.npz"), scan, split="train")
    train, val = hold_out(data, 0.1, seed=0)
    assert len(train.y) + len(val.y) == len(data.y) == 1257
    # round(10% of each class): 12 or 13 of 122..128.
    assert val.y.bincount().tolist() == [12, 13, 12, 13, 13, 13, 13, 12, 12, 13]
    assert set(val.source_index.tolist()).isdisjoint(train.index.tolist())
    assert torch.equal(data.x[val.source_index], val.x)  # the held-out images themselves
    again, other = hold_out(data, 0.1, seed=0)[1], hold_out(data, 0.1, seed=1)[1]
    assert torch.equal(again.source_index, val.source_index)
    assert not torch.equal(other.source_index, val.source_index)


# --- export --------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664)])
def test_the_hardened_onnx_model_keeps_the_users_umask(tmp_path, umask, mode):
    # Like every report and checkpoint: a CI artifact other users read, not tempfile's 0600.
    loaded = load_model(DIGITS / "model.onnx")
    out = tmp_path / "hardened.onnx"
    previous = os.umask(umask)
    try:
        difference = write_model(loaded, out, torch.rand(4, 1, 8, 8), bias=None)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert difference is not None and difference < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["hardened.onnx"]  # no temporary left behind


# --- the budget ----------------------------------------------------------------------------


def _validation(clean: float, mean: float, worst: float) -> Validation:
    return Validation([clean] * 2, [worst, mean], clean, mean, worst, "0")


def test_an_epoch_that_lifts_the_worst_class_but_breaks_the_budget_is_not_kept():
    base = _validation(clean=0.98, mean=0.63, worst=0.07)
    run = RunState(0, Budget.around(base, max_mean_drop=0.02, max_clean_drop=0.01),
                   Candidate(0, {}, base))
    # Epoch 5: a higher class mean alone does not displace the input model.
    assert run.offer(Candidate(5, {}, _validation(0.98, 0.66, 0.07)))
    assert run.best.epoch == 0
    # Epoch 1: worst +19 points, but the class mean falls 4 points: out of budget.
    assert not run.offer(Candidate(1, {}, _validation(0.98, 0.59, 0.26)))
    assert run.best.epoch == 0
    # Epoch 2: clean accuracy falls 2 points: out of budget too.
    assert not run.offer(Candidate(2, {}, _validation(0.96, 0.63, 0.20)))
    # Epoch 3: worst +10 points at 1.5 points of mean: within, kept.
    assert run.offer(Candidate(3, {}, _validation(0.98, 0.615, 0.17)))
    # Epoch 4: within, but lifts the worst class less than epoch 3: not kept.
    assert run.offer(Candidate(4, {}, _validation(0.99, 0.64, 0.15)))
    assert run.best.epoch == 3
    assert run.budget.mean_floor == pytest.approx(0.61)


def test_cfa_weight_averaging_starts_from_the_first_model_that_clears_the_threshold():
    scheme = make_scheme(config(reweight="cfa", cfa_decay=0.5), 2)
    scheme.update(Feedback([1.0, 1.0], [0.8, 0.3]))  # the input model: threshold 0.3 (its worst)
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert scheme.hand_back(model, 0.25) == {"fawa_joined": False, "fawa_threshold": 0.3}
    notes = scheme.hand_back(model, 0.3)
    assert notes["fawa_joined"] and float(notes["averaged"]["weight"]) == 2.0
    with torch.no_grad():
        model.weight.fill_(4.0)
    assert float(scheme.hand_back(model, 0.4)["averaged"]["weight"]) == 3.0  # 0.5·2 + 0.5·4
    assert SCHEMES["cfa"].class_eps is True and SCHEMES["none"].class_eps is False


# --- validation as the gate judges, the noise, the moving average ----------------------------


def _judged(correct: list[int], n: int, verdicts: list[str], clean: float = 1.0) -> Validation:
    robust = [c / n for c in correct]
    worst = min(range(len(robust)), key=lambda k: robust[k])
    return Validation([clean] * len(robust), robust, clean, sum(robust) / len(robust),
                      robust[worst], str(worst), [n] * len(robust), correct, verdicts)


def test_an_epoch_that_fails_a_class_the_input_passed_is_refused_whatever_it_gains():
    base = _judged([2, 15, 20], 25, ["flagged", "passed", "passed"])
    budget = Budget.around(base, 0.02, 0.01, ["a", "b", "c"])
    assert budget.keep_passing == ["b", "c"]
    run = RunState(0, budget, Candidate(0, {}, base), class_names=["a", "b", "c"])
    # Class a +32 points and the mean up, but c slips under the gate on validation.
    lifted = _judged([10, 17, 19], 25, ["passed", "passed", "flagged"])
    assert budget.refusals(lifted, ["a", "b", "c"]) == ["fails c, which passed before"]
    assert not run.offer(Candidate(1, {}, lifted)) and run.best.epoch == 0


def test_a_worst_class_gain_within_one_standard_error_does_not_displace_the_input_model():
    base = _judged([2, 20], 25, ["flagged", "passed"])
    run = RunState(0, Budget.around(base, 0.02, 0.01, ["a", "b"]), Candidate(0, {}, base),
                   class_names=["a", "b"])
    # Agresti-Caffo: 2/25 -> p 3/27, 4/25 -> 5/27, 5/25 -> 6/27 (se over 27 examples).
    two_more = _judged([4, 20], 25, ["flagged", "passed"])
    assert noise(two_more, base) == pytest.approx(0.0962, abs=5e-4)
    assert run.offer(Candidate(1, {}, two_more)) and run.best.epoch == 0  # +8 pp < 9.6 pp
    three_more = _judged([5, 20], 25, ["flagged", "passed"])
    assert noise(three_more, base) == pytest.approx(0.1003, abs=5e-4)
    assert run.offer(Candidate(2, {}, three_more)) and run.best.epoch == 2  # +12 pp > 10.0 pp
    low, high = three_more.class_interval(0)
    assert (round(low, 3), round(high, 3)) == (0.089, 0.391)  # Wilson, 5 of 25


def test_the_hold_out_holds_enough_examples_to_resolve_the_budget():
    assert minimum_per_class(10, 0.02) == 25 and minimum_per_class(10, 0.01) == 50
    assert minimum_per_class(100, 0.02) == 3
    scan = ScanConfig(model=str(DIGITS / "model.pt2"), data=str(DIGITS / "train.npz"))
    data = load_split(str(DIGITS / "train.npz"), scan, split="train")
    assert hold_out(data, 0.1, 0, minimum=25)[1].y.bincount().tolist() == [25] * 10
    # Never more than half a class: 61-64 of 122-128.
    half = hold_out(data, 0.1, 0, minimum=1000)[1].y.bincount().tolist()
    assert half == [62, 63, 62, 64, 63, 63, 63, 62, 61, 63]


def test_the_moving_average_follows_every_step():
    module = torch.nn.Linear(4, 2)
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    ema = {k: v.clone() for k, v in start.items()}
    data = Split(torch.rand(8, 4), torch.tensor([0, 1] * 4), torch.arange(8), ["a", "b"])
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    train_epoch(module, optimizer, data, make_scheme(config(reweight="none"), 2).settings(),
                objective="pgd-at", steps=1, batch_size=8, seed=0, epoch=1, ema=ema,
                ema_decay=0.9)
    for name, value in module.state_dict().items():  # one step: 0.9·θ0 + 0.1·θ1
        assert torch.allclose(ema[name], 0.9 * start[name] + 0.1 * value)
        assert not torch.equal(value, start[name])


def test_harden_judges_epochs_as_the_gate_and_keeps_the_input_when_an_epoch_fails_a_class(
        tmp_path, capsys):
    out = tmp_path / "h.pt2"
    code = main(harden_args("model.pt2", out, "--epochs", "1", "--lr", "0.05",
                            "--json", str(tmp_path / "h.json"), "--html", str(tmp_path / "h.html")))
    err = capsys.readouterr()
    doc = json.loads((tmp_path / "h.json").read_text())
    assert code == 1 and "Traceback" not in err.err and doc["schema_version"] == 3
    # Epoch 0's validation is the before scan itself: the worst case and the gate's verdicts.
    base = doc["history"][0]["validation"]
    before = doc["before"]["classes"]
    assert base["robust"] == [c["robust"]["worst"]["acc"] for c in before]
    assert base["verdicts"] == [c["verdict"]["status"] for c in before]
    assert base["bars"] == [0.4] * 10  # the config's floor: what the gate scheme aims above
    # Each example's outcome, as the counts count them: what epochs are paired by.
    assert [o.count("1") for o in base["outcomes"]] == base["correct"]
    assert [len(o) for o in base["outcomes"]] == base["n"] == [10] * 10
    assert doc["kept"]["budget"]["keep_passing"] == ["0", "1", "2", "3", "4", "5", "6", "7"]
    # lr 0.05 wrecks the model: refused, the input kept, and the report says why.
    epoch = doc["history"][1]
    assert not epoch["within_budget"] and epoch["refused"][-1] == \
        "fails 1, 2, 3, 4, 5, 6, which passed before"
    assert doc["kept"]["epoch"] == 0
    assert doc["warnings"][0].startswith("the input model is kept: no epoch lifted the weakest")
    assert "fails 1, 2, 3, 4, 5, 6, which passed before" in doc["warnings"][0]
    assert doc["warnings"][0].endswith(
        "every epoch broke the budget: a smaller --lr (this run: 0.05) may keep within it")
    assert [c["before"]["verdict"] for c in doc["classes"]] == base["verdicts"]
    assert [c["after"]["verdict"] for c in doc["classes"]] == base["verdicts"]
    # Intervals on every validation figure, in the JSON and on the page.
    assert base["ci95"][8] == [0.0, pytest.approx(0.2775, abs=1e-4)]  # 0 of 10
    page = (tmp_path / "h.html").read_text()
    assert "class mean (95% CI)" in page and "[0%, 28%]" in page
    assert "no: class mean 24.0% &lt; 66.0%" in page
