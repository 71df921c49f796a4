"""The engine: continuous batching, step-size halving, modes."""

from __future__ import annotations

import io

import numpy as np
import torch
from conftest import Linear
from PIL import Image

from robaudit.attacks.engine import Engine, Job
from robaudit.attacks.pgd import PGD
from robaudit.attacks.stream import run_jobs, stream_audit
from robaudit.gallery import encode_png


class Counting(torch.nn.Module):
    """A linear model that records the batch size of every forward pass."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.model(x)


def ramp_model() -> Linear:
    # diff = w_0 - w_1 = 1 everywhere on 16 pixels: margin 16*x - 7.5 at a constant image x.
    w = torch.stack([torch.full((16,), 0.5), torch.full((16,), -0.5)])
    return Linear(w, torch.tensor([-7.5, 0.0]))


def test_the_working_batch_stays_full_while_jobs_wait():
    model = Counting(ramp_model())
    # Examples at 0.5 + k/64 have margins 0.5 + k/4: each needs a different number of steps of
    # 0.01 (each lowers the margin by 0.16) before it breaks.
    attack = PGD(0.5, steps=40, step_size=0.01, random_start=False)
    jobs = [Job(k, torch.full((1, 4, 4), 0.5 + k / 64), 0, k, attack) for k in range(12)]
    results = run_jobs(model, jobs, batch_size=4)
    assert sorted(results) == list(range(12))
    for k, done in results.items():
        assert done.broken and done.forwards == int(np.ceil((0.5 + k / 4) / 0.16)) + 1
    # Every pass is full until fewer than 4 jobs remain: the passes over 4 slots do all the work
    # but the tail, where at most 3 jobs (the longest, 21 passes) are left.
    total = sum(r.forwards for r in results.values())
    assert sum(model.sizes) == total
    first_short = next(i for i, n in enumerate(model.sizes) if n < 4)
    assert all(n == 4 for n in model.sizes[:first_short])
    assert sum(model.sizes[first_short:]) <= 3 * 21
    assert len(model.sizes) <= total / 4 + 21


def test_halving_schedule_reaches_the_linear_optimum_and_halves_on_stalls():
    w = torch.stack([torch.full((16,), 0.5), torch.full((16,), -0.5)])
    model = Linear(w, torch.tensor([-7.5 + 16 * 0.2 + 1e-3, 0.0]))  # robust by 1e-3 at -eps
    x = torch.full((1, 1, 4, 4), 0.5)
    attack = PGD(0.2, steps=20, schedule="halving")
    assert attack.step_size == 0.4  # APGD starts at 2*eps
    assert attack.checkpoint_interval(5) == 5 and attack.checkpoint_interval(6) is None
    out = attack(model, x, torch.tensor([0]), torch.tensor([0]))
    assert out.broken.tolist() == [False]
    torch.testing.assert_close(out.x_adv, x - 0.2)


def test_halving_checkpoints_follow_apgd():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of 100 steps.
    attack = PGD(0.1, steps=100, schedule="halving")
    assert sorted(attack._checkpoints) == [22, 41, 57, 70, 80, 87, 93, 99]


def stream(worst_case: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(20, 1, 4, 4)
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3  # three examples wrong when clean
    batches = [(x[i:i + 7], y[i:i + 7], torch.arange(i, i + 7)[: len(x[i:i + 7])])
               for i in range(0, 20, 7)]
    attacks = [PGD(0.05, steps=5, name="a"), PGD(0.05, steps=5, name="b", restarts=2)]
    done = [ex for part in stream_audit(model, batches, [attacks], batch_size=5,
                                        worst_case=worst_case) for ex in part]
    return {ex.index: ex for ex in done}


def test_stream_audit_each_mode_runs_every_attack_on_clean_correct_examples():
    done = stream(worst_case=False)
    assert sorted(done) == list(range(20))
    for i in range(3):
        assert done[i].outcomes == {(0, "a"): None, (0, "b"): None}
    for i in range(3, 20):
        assert done[i].outcomes[(0, "a")] is not None and done[i].outcomes[(0, "b")] is not None


def test_worst_case_mode_skips_what_an_earlier_attack_broke():
    each, worst = stream(worst_case=False), stream(worst_case=True)
    for i in range(3, 20):
        a_each = each[i].outcomes[(0, "a")]
        a_worst, b_worst = worst[i].outcomes[(0, "a")], worst[i].outcomes[(0, "b")]
        assert a_each.broken == a_worst.broken  # the same first attack
        if a_worst.broken:
            assert b_worst is a_worst  # not run: carries the breaking result (cumulative)
        robust_each = not (a_each.broken or each[i].outcomes[(0, "b")].broken)
        assert robust_each == (not b_worst.broken)


def test_engine_refuses_a_job_of_another_shape():
    engine = Engine(ramp_model(), 2)
    attack = PGD(0.1, steps=2)
    engine.add(Job(0, torch.zeros(1, 4, 4), 0, 0, attack))
    try:
        engine.add(Job(1, torch.zeros(1, 5, 5), 0, 0, attack))
    except ValueError as e:
        assert "shape" in str(e)
    else:
        raise AssertionError("no error")


def test_png_encoder_round_trips():
    rgb = (np.arange(5 * 7 * 3) * 7 % 256).astype(np.uint8).reshape(5, 7, 3)
    grey = (np.arange(6 * 4) * 11 % 256).astype(np.uint8).reshape(6, 4)
    for image in (rgb, grey):
        decoded = np.array(Image.open(io.BytesIO(encode_png(image))))
        assert decoded.shape == image.shape and (decoded == image).all()


def test_a_stalled_loss_halves_the_step_size_at_each_checkpoint():
    from conftest import Constant

    engine = Engine(Constant(torch.tensor([1.0, 0.0])), 1)
    engine.add(Job(0, torch.full((1, 4, 4), 0.5), 0, 0, PGD(0.1, steps=20, schedule="halving")))
    alphas = []
    for _ in range(12):
        engine.step()
        alphas.append(round(float(engine.alpha[0]), 6))
    # Checkpoints of 20 steps are after 5, 9, 12, ... steps; the loss never rises.
    assert alphas == [0.2] * 5 + [0.1] * 4 + [0.05] * 3


def test_the_last_check_of_a_batch_runs_without_a_gradient():
    seen: list[bool] = []

    class Recording(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.is_grad_enabled())
            return ramp_model()(x)

    # Robust examples (margin 0.5 at 0.5 + 1/16, eps 0.01): 3 steps, then the final check.
    attack = PGD(0.01, steps=3, step_size=0.01, random_start=False)
    jobs = [Job(k, torch.full((1, 4, 4), 0.5 + 1 / 16), 0, k, attack) for k in range(3)]
    results = run_jobs(Recording(), jobs, batch_size=3)
    assert not any(r.broken for r in results.values())
    assert seen == [True, True, True, False]


def test_with_amp_a_break_counts_only_if_full_precision_agrees():
    # Class 1's weights are 1 + 2**-10, which bf16 rounds to 1: under autocast both logits are
    # 8.0 (a tie that argmax gives to class 0), in fp32 class 1 wins by 0.0078.
    w = torch.stack([torch.full((16,), 1.0), torch.full((16,), 1.0 + 2**-10)])
    model = Linear(w, torch.zeros(2))
    x = torch.full((1, 4, 4), 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert int(model(x[None]).argmax()) == 0  # what bf16 alone would call a break
    attack = PGD(1e-6, steps=2, random_start=False)
    for amp in (False, True):
        (done,) = run_jobs(model, [Job(0, x, 1, 0, attack)], 1, amp=amp).values()
        assert not done.broken and done.forwards == 3
        assert done.logits.dtype == torch.float32
        torch.testing.assert_close(done.logits, torch.tensor([8.0, 8.0 + 8 * 2**-10]))


def test_amp_on_the_example_finds_as_much_and_every_break_is_real_in_fp32(digits):
    from robaudit.attacks import AttackSettings, build_attacks
    from robaudit.models import load_model

    model = load_model(digits / "model.pt2").module
    data = np.load(digits / "test.npz")
    x = torch.from_numpy(data["x"][:200]).float() / 255
    y = torch.from_numpy(data["y"][:200]).long()
    attacks = build_attacks(["pgd", "tpgd"], AttackSettings(eps=0.2, steps=10))
    robust = {}
    for amp in (False, True):
        done = [ex for part in stream_audit(model, [(x, y, torch.arange(200))], [attacks],
                                            batch_size=128, amp=amp) for ex in part]
        broken = [(ex.y, r) for ex in done for r in ex.outcomes.values()
                  if r is not None and r.broken]
        with torch.no_grad():
            logits = model(torch.stack([r.x_adv for _, r in broken]))
        assert (logits.argmax(1) != torch.tensor([label for label, _ in broken])).all()
        torch.testing.assert_close(logits, torch.stack([r.logits for _, r in broken]))
        robust[amp] = sum(all(r is not None and not r.broken for r in ex.outcomes.values())
                          for ex in done)
    assert abs(robust[True] - robust[False]) <= 6  # 3 pp of 200: the search differs, not the rule


def test_without_a_batch_size_small_inputs_get_a_larger_working_batch():
    from robaudit.attacks.jobs import auto_batch_size

    assert auto_batch_size(1 * 8 * 8) == 4096  # the example's digits: 2 MiB would be 8192 rows
    assert auto_batch_size(1 * 28 * 28) == 668
    assert auto_batch_size(3 * 32 * 32) == 256 == auto_batch_size(3 * 224 * 224)
    model = Counting(ramp_model())
    attack = PGD(0.01, steps=1, random_start=False)
    engine = Engine(model, None)
    engine.add_many([Job(k, torch.zeros(1, 4, 4), 0, k, attack) for k in range(300)])
    assert engine.batch_size == 4096 and engine.free == 4096 - 300
    engine.step()
    assert model.sizes == [300]
    assert Engine(model, 7).batch_size == 7  # a batch size the user gives is kept


def test_outcomes_do_not_depend_on_the_working_batch():
    # Rows move when jobs end (the tail fills the holes) and restart in place: none of it may
    # change any job's outcome, whatever the batch, schedule, restarts or mode.
    from robaudit.attacks import AttackSettings, build_attacks

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 3))
    x = torch.rand(40, 1, 4, 4)
    y = model(x).argmax(1)
    batches = [(x[i:i + 16], y[i:i + 16], torch.arange(i, min(i + 16, 40)))
               for i in range(0, 40, 16)]
    for schedule in ("fixed", "halving"):
        sets = [build_attacks(["pgd", "tpgd", "cw"],
                              AttackSettings(eps=eps, steps=6, restarts=2, schedule=schedule))
                for eps in (0.05, 0.15)]
        for worst_case in (False, True):
            runs = []
            for batch_size in (3, 16, None):
                done = [ex for part in stream_audit(model, batches, sets, batch_size=batch_size,
                                                    worst_case=worst_case) for ex in part]
                runs.append({(ex.index, key): (r.broken, r.forwards, r.x_adv)
                             for ex in done for key, r in ex.outcomes.items()})
            broken = [v[0] for v in runs[0].values()]
            assert 0 < sum(broken) < len(broken)  # some break, some do not
            for other in runs[1:]:
                assert other.keys() == runs[0].keys()
                for key, (is_broken, forwards, x_adv) in runs[0].items():
                    assert other[key][:2] == (is_broken, forwards), key
                    torch.testing.assert_close(other[key][2], x_adv)
