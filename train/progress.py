"""Where a run stands and where it ends, in images seen (the one unit the lr schedule, resume, progressive resizing
and the time budget share): the planned total rounded to whole global batches, the schedule rebuilt from the current
position, and the time budget fixing the total once after measuring the step rate."""
from __future__ import annotations

import logging
import math
import time
from typing import Optional

import torch

from train.config import Config
from train.distributed import DistInfo, decide_on_main
from train.optim import LrSchedule, parse_duration, peak_lr
from train.resume import ResumeState, TimeBudget, plan_total_images

log = logging.getLogger(__name__)


class Progress:
    """The run's position (images seen, optimizer steps) and its plan (total images, schedule, budget)."""

    def __init__(self, cfg: Config, n_train: int, spe: int, world: int):
        self.cfg, self.n_train, self.spe = cfg, n_train, spe
        self.global_batch = world * cfg.data.batch_size
        self.epoch_images = spe * self.global_batch
        self.reference_batch = cfg.optim.reference_batch or self.global_batch
        self.images_seen = self.global_step = 0
        self.budget = TimeBudget(parse_duration(cfg.train.time_budget)) if cfg.train.time_budget else None
        self.total_images = plan_total_images(cfg, spe, self.global_batch)
        if self.budget:   # provisional: long enough to measure the rate before the budget fixes the real length
            self.total_images = max(self.total_images, (TimeBudget.WARMUP_STEPS + TimeBudget.MEASURE_STEPS + 1)
                                    * self.global_batch)
        self.size_now = cfg.data.image_size
        self.rebuild_schedule()

    @property
    def epoch(self) -> float:
        return self.images_seen / self.n_train

    def done(self) -> bool:
        return self.images_seen >= self.total_images

    def at_epoch_end(self) -> bool:
        return self.images_seen % self.epoch_images == 0

    def advance(self) -> None:
        self.images_seen += self.global_batch
        self.global_step += 1

    def rebuild_schedule(self) -> None:
        """Round the plan to whole global batches from the current position, so the schedule ends at eta_min exactly."""
        left = max(0, math.ceil((self.total_images - self.images_seen) / self.global_batch))
        self.total_images = self.images_seen + left * self.global_batch
        self.schedule = LrSchedule.from_config(self.cfg, peak_lr(self.cfg, self.global_batch, self.reference_batch),
                                               self.n_train, max(self.total_images, 1))

    def train_size(self, epoch: int) -> int:
        """Progressive resizing (FFCV's ResNet recipes): low resolution early, data.image_size from
        data.progressive_until of the planned run on; even sizes only."""
        data = self.cfg.data
        if not data.progressive_min_size:
            return data.image_size
        frac = min(1.0, (epoch + 0.5) / max(self.total_images / self.epoch_images * data.progressive_until, 1e-9))
        size = data.progressive_min_size + (data.image_size - data.progressive_min_size) * frac
        return min(data.image_size, int(round(size / 2)) * 2)

    def restore(self, r: ResumeState, world: int) -> None:
        """The position and plan a checkpoint recorded (train.resume.ResumeState), rescheduled from there."""
        self.images_seen, self.global_step, self.reference_batch = r.images_seen, r.global_step, r.reference_batch
        if r.total_images is not None:
            self.total_images = r.total_images
        if self.budget and r.budget:
            self.budget.restore(r.budget)
        if r.world_size != world:
            log.warning("resuming with %d ranks (was %s): position kept in images seen (%d, epoch %.2f), peak lr "
                        "rescaled by optim.lr_scaling=%s for the global batch %d", world, r.world_size,
                        self.images_seen, self.epoch, self.cfg.optim.lr_scaling, self.global_batch)
        self.rebuild_schedule()

    def state(self) -> dict:
        """The checkpoint's record of the position and plan (read back by ResumeState.from_checkpoint)."""
        return {"epoch": self.epoch, "global_step": self.global_step, "images_seen": self.images_seen,
                "total_images": self.total_images, "global_batch": self.global_batch,
                "reference_batch": self.reference_batch, "steps_per_epoch": self.spe,
                "budget": self.budget.state() if self.budget else None}

    def budget_step(self, dinfo: DistInfo, t_start: float, n_val: int, n_test: int) -> None:
        """With train.time_budget, after every step: once the rate is measured, fix the total (same on every rank)."""
        b = self.budget
        if b is None or b.fixed:
            return
        if dinfo.device.type == "cuda":   # the loop never waits for the GPU: time what it did, not what was queued
            torch.cuda.synchronize(dinfo.device)   # (only over the first WARMUP + MEASURE steps)
        if not b.observe(self.global_step, time.perf_counter()):
            return
        # Progressive resizing: the rate was measured at a smaller crop; plan with the full-size cost (cost taken as
        # proportional to pixels, which over-estimates small crops), so the run can end early but never late.
        b.rate_steps_per_s *= (self.size_now / self.cfg.data.image_size) ** 2
        reserve = self.eval_reserve(b.rate_steps_per_s * self.global_batch, n_val, n_test)
        total_steps = decide_on_main(dinfo, lambda: b.fix(time.perf_counter() - t_start, self.global_step, reserve))
        b.fixed, b.total_steps = True, total_steps
        self.total_images = total_steps * self.global_batch
        self.rebuild_schedule()
        log.info("time budget %s: measured %.1f img/s, reserving %.0f s for evaluation -> %d steps (%.2f epochs)",
                 self.cfg.train.time_budget, b.rate_steps_per_s * self.global_batch, reserve, total_steps,
                 self.total_images / self.n_train)

    def eval_reserve(self, train_img_s: float, n_val: int, n_test: int) -> float:
        """Seconds the rest of the run spends outside training steps: validations, the final val+test pass (forward
        only, taken as 3x the training rate) and checkpoint writes (~2 s each)."""
        epochs = max(1, round(self.budget.budget_s * train_img_s / self.n_train))
        evals = epochs // self.cfg.train.eval_every_epochs + 1
        return (evals * n_val + n_val + n_test) / (3 * max(train_img_s, 1e-6)) + 2.0 * (epochs + 2)


def planned(p: Progress, budget: Optional[str]) -> str:
    """The plan in words, for the start-up log line."""
    return (f"steps/epoch={p.spe} planned images={p.total_images} ({p.total_images / p.n_train:.2f} epochs)"
            + (f", time budget {budget}" if budget else ""))
