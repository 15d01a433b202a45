"""The lr schedule as a function of images seen: warm-up, cosine to eta_min exactly at the planned end, warm restarts,
elastic resizes (same images in all, lr rescaled by the named rule), resume-position maths and time budgets."""
import math

import pytest

from train.config import ConfigError, load_config
from train.optim import LrSchedule, parse_duration, peak_lr
from train.resume import ResumeState, TimeBudget, plan_total_images


def cfg(**over):
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def test_warmup_then_cosine_ends_at_eta_min_exactly():
    c = cfg(**{"schedule.name": "cosine", "schedule.warmup_epochs": 1, "schedule.eta_min": 1e-5, "train.epochs": 4,
               "optim.lr": 0.4})
    s = LrSchedule.from_config(c, 0.4, train_images=1000, total_images=4000)
    assert s(0) == pytest.approx(0.4e-3)
    assert s(500) == pytest.approx(0.4 * (1e-3 + (1 - 1e-3) * 0.5))
    assert s(1000) == pytest.approx(0.4)
    assert s(2500) == pytest.approx(1e-5 + (0.4 - 1e-5) * 0.5)
    assert s(4000) == 1e-5
    lrs = [s(i) for i in range(1000, 4001, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "monotone after warm-up"


def test_warm_restarts_cycle_and_final_point():
    c = cfg(**{"schedule.name": "cosine_warm_restarts", "schedule.warmup_epochs": 0, "schedule.T_0": 1,
               "schedule.T_mult": 2, "schedule.eta_min": 0.0, "train.epochs": 3})
    s = LrSchedule.from_config(c, 1.0, 100, 300)
    assert s(0) == pytest.approx(1.0) and s(50) == pytest.approx(0.5) and s(100) == pytest.approx(1.0)
    assert s(200) == pytest.approx(0.5) and s(300) == 0.0


def test_time_budget_stretches_the_shape_of_the_schedule():
    c = cfg(**{"schedule.name": "cosine", "schedule.warmup_epochs": 1.25, "train.epochs": 5})
    s = LrSchedule.from_config(c, 1.0, 100, 1000)   # the budget allowed 10 epochs: warm-up 2.5 epochs
    assert s.stretch == pytest.approx(2.0)
    assert s(250) == pytest.approx(1.0) and s(125) < 0.51


def test_lr_scaling_rules():
    for rule, expect in (("linear", 0.8), ("sqrt", 0.4 * math.sqrt(2)), ("none", 0.4)):
        assert peak_lr(cfg(**{"optim.lr": 0.4, "optim.lr_scaling": rule}), 2048, 1024) == pytest.approx(expect)


def test_elastic_resize_keeps_the_plan_and_ends_at_eta_min():
    """16 -> 32 GPUs at mid-run: the same images in all, the position kept in images, the end at eta_min exactly."""
    c = cfg(**{"schedule.name": "cosine", "schedule.warmup_epochs": 0.5, "schedule.eta_min": 0.0, "train.epochs": 4,
               "data.batch_size": 8, "optim.lr": 0.1, "optim.lr_scaling": "linear"})
    n, spe16 = 10_000, 10_000 // 128
    total = plan_total_images(c, spe16, 128)
    state = {"config": c.to_dict(), "world_size": 16, "global_batch": 128, "images_seen": 128 * 100, "global_step": 100,
             "total_images": total, "reference_batch": 128}
    r = ResumeState.from_checkpoint(state, c, 10_000 // 256, 256)
    assert (r.images_seen, r.total_images, r.reference_batch, r.world_size) == (12800, total, 128, 16)
    left = math.ceil((r.total_images - r.images_seen) / 256)
    end = r.images_seen + left * 256
    assert abs(end - total) < 256, "within one global batch of the uninterrupted run"
    s = LrSchedule.from_config(c, peak_lr(c, 256, r.reference_batch), n, end)
    assert s.peak == pytest.approx(0.2) and s(end) == 0.0


def test_old_checkpoints_without_images_seen_map_by_steps():
    c = cfg(**{"data.batch_size": 4})
    r = ResumeState.from_checkpoint({"config": c.to_dict(), "world_size": 2, "global_step": 6}, c, 10, 8)
    assert r.images_seen == 48 and r.reference_batch == 8


def test_changed_epochs_replan_but_same_config_keeps_the_plan():
    a = cfg(**{"train.epochs": 2})
    b = cfg(**{"train.epochs": 3})
    state = {"config": a.to_dict(), "world_size": 1, "global_batch": 8, "images_seen": 40, "total_images": 160}
    assert ResumeState.from_checkpoint(state, a, 10, 8).total_images == 160
    assert ResumeState.from_checkpoint(state, b, 10, 8).total_images == 240


def test_time_budget_measures_then_fixes_once():
    b = TimeBudget(100.0)
    b.start(0, 0.0)
    t = 0.0
    fixed_at = None
    for step in range(1, 40):
        t += 0.5
        if b.observe(step, t):
            fixed_at = step
            break
    assert fixed_at == TimeBudget.WARMUP_STEPS + TimeBudget.MEASURE_STEPS
    assert b.rate_steps_per_s == pytest.approx(2.0)
    assert b.fix(elapsed_s=20.0, steps_done=fixed_at, reserve_s=10.0) == fixed_at + 140
    assert b.fix(elapsed_s=200.0, steps_done=fixed_at, reserve_s=10.0) == fixed_at + 1


@pytest.mark.parametrize("text,seconds", [("15m", 900), ("90s", 90), ("1.5h", 5400), ("1h30m", 5400), ("2 h", 7200)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["fifteen", "15", "15x", "0m"])
def test_parse_duration_refuses_in_one_sentence(text):
    with pytest.raises(ConfigError, match="time_budget"):
        parse_duration(text)


def test_progress_plans_whole_global_batches_and_restores_a_resized_run():
    from train.progress import Progress

    c = cfg(**{"data.batch_size": 8, "train.epochs": 2.5, "schedule.eta_min": 0.0})
    p = Progress(c, n_train=100, spe=6, world=2)   # 6 steps of 16 per epoch
    assert (p.global_batch, p.epoch_images, p.total_images) == (16, 96, 15 * 16)
    for _ in range(6):
        p.advance()
    assert p.at_epoch_end() and not p.done() and p.epoch == pytest.approx(0.96)
    state = {**p.state(), "world_size": 2, "config": c.to_dict()}
    q = Progress(c, n_train=100, spe=12, world=1)   # resumed on one rank: same images in all
    q.restore(ResumeState.from_checkpoint(state, c, 12, 8), world=1)
    assert (q.images_seen, q.global_step, q.total_images) == (96, 6, 240) and q.schedule(240) == 0.0


def test_progress_resizes_progressively_and_reserves_time_for_evaluation():
    from train.progress import Progress

    c = cfg(**{"data.image_size": 224, "data.progressive_min_size": 128, "data.progressive_until": 0.5,
               "train.epochs": 10, "train.time_budget": "10m", "train.eval_every_epochs": 2})
    p = Progress(c, n_train=1000, spe=10, world=1)
    sizes = [p.train_size(e) for e in range(int(p.total_images / p.epoch_images) + 1)]
    assert sizes[0] >= 128 and all(s % 2 == 0 for s in sizes) and sizes == sorted(sizes)
    # 100 img/s for 600 s = 60 epochs: 31 validations of 50 images, the final val + test, 62 checkpoints x 2 s
    assert p.eval_reserve(100.0, n_val=50, n_test=50) == pytest.approx((31 * 50 + 100) / 300 + 2.0 * 62)
