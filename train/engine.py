"""The training run: hardware plan and preflight, data, model, one backend object (DDP or DeepSpeed), the plan of
images to see (epochs, max_steps or a time budget), resume, the epoch loop, validation, checkpoints and the report."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from train.backends import (_deepspeed_safe_load, autocast_for, build_backend, float_state,  # noqa: F401 (re-export)
                            shared_checkpoint)
from train.checkpoint import CheckpointManager, check_finite, safe_load
from train.config import Config, save_config
from train.data import (build_eval_loader, build_train_loader, class_weights, cpu_threads_per_rank, release_loaders,
                        scan_imagefolder, steps_per_epoch)
from train.distributed import (LISTING_TIMEOUT, barrier, decide_on_main, gather_rng, seed_everything, set_rng_state, setup_distributed,
                               setup_logging, shutdown)
from train.evaluate import evaluate, write_report
from train.hardware import cpu_has_fast_bf16, decide, local_facts  # noqa: F401 (re-export)
from train.loop import train_one_epoch
from train.metrics import JsonlWriter, TrainingMetrics
from train.models import create_model, set_backbone_trainable
from train.optim import LrSchedule, build_optimizer, parse_duration, peak_lr
from train.resume import ResumeState, TimeBudget, check_compatible, plan_total_images

log = logging.getLogger(__name__)
__all__ = ["Trainer", "EngineError", "setup_logging"]


class EngineError(RuntimeError):
    """A training problem the user can act on, in one sentence."""


class Trainer:
    """One training run: ``Trainer(cfg).fit()`` trains, evaluates, and writes checkpoints and the report."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.t_start = time.perf_counter()
        self.plan = decide(cfg, local_facts())   # the same rules `python -m launch preflight` prints
        if self.plan.problems:
            raise EngineError(" ".join(self.plan.problems))
        for note in self.plan.notes:
            log.info(note)
        self.dinfo = d = setup_distributed(self.plan.device, cfg.engine)
        if d.device.type == "cpu":
            torch.set_num_threads(cfg.train.threads or cpu_threads_per_rank(d.local_world))
        else:
            torch.backends.cudnn.benchmark = True
        self.out = Path(cfg.output_dir)
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.train.keep_last)
        self.precision = self.plan.precision
        self.channels_last = self.plan.channels_last
        self.data_backend = self.plan.data_backend
        # Listed once on rank 0 and broadcast: no rank decodes the data set at start, and all agree on the file list.
        self.data = decide_on_main(d, lambda: scan_imagefolder(cfg.data, cache_dir=self.out / "cache"), LISTING_TIMEOUT)
        self.classes = self.data.classes
        self.train_split = self.data.splits["train"]
        self.labels = {k: torch.as_tensor(v.labels) for k, v in self.data.splits.items()}
        self.n_train = len(self.train_split)
        self.global_batch = d.world * cfg.data.batch_size
        self.spe = steps_per_epoch(self.n_train, d.world, cfg.data.batch_size)
        if self.spe == 0:
            raise EngineError(f"The training split has {self.n_train} images, fewer than one global batch "
                              f"({d.world} ranks x {cfg.data.batch_size}); lower data.batch_size.")
        self.epoch_images = self.spe * self.global_batch
        self.budget = TimeBudget(parse_duration(cfg.train.time_budget)) if cfg.train.time_budget else None
        self.total_images = plan_total_images(cfg, self.spe, self.global_batch)
        if self.budget:   # provisional: long enough to measure the rate before the budget fixes the real length
            self.total_images = max(self.total_images, (TimeBudget.WARMUP_STEPS + TimeBudget.MEASURE_STEPS + 1)
                                    * self.global_batch)

        seed_everything(cfg.train.seed)
        model = create_model(cfg.model, len(self.classes)).to(d.device)
        if self.channels_last and cfg.engine == "ddp":   # DeepSpeed: inputs only (see DeepSpeedBackend)
            model = model.to(memory_format=torch.channels_last)
        if cfg.model.freeze_backbone:
            set_backbone_trainable(model, ())
        weights = class_weights(self.data.class_counts()).to(d.device) if cfg.data.class_weights else None
        self.criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.optim.label_smoothing)
        optimizer = build_optimizer(cfg, model, fused=cfg.engine == "ddp" and d.device.type in ("cpu", "cuda"))
        self.backend = build_backend(cfg, model, optimizer, d, self.precision)
        self.ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
                    if cfg.train.ema_decay > 0 else None)
        self.reference_batch = cfg.optim.reference_batch or self.global_batch
        self.images_seen = 0
        self.global_step = 0
        self.best_top1 = -1.0
        self.last_val: Optional[float] = None
        self.nan_skips = 0
        self.samples_file = None
        self._train_size_now = cfg.data.image_size
        self._rebuild_schedule()
        self.metrics = TrainingMetrics(d.rank, (cfg.metrics.port + d.local_rank if cfg.metrics.port else 0)
                                       if cfg.metrics.enabled else None, cfg.metrics.address)
        self.jsonl = JsonlWriter(self.out / "metrics.jsonl" if d.is_main else None)
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        log.info("engine=%s world=%d device=%s precision=%s channels_last=%s data=%s (%d train / %d val / %d test, "
                 "%d classes) steps/epoch=%d planned images=%d (%.2f epochs)%s", cfg.engine, d.world, d.device,
                 self.precision, self.channels_last, self.data_backend, self.n_train, len(self.data.splits["val"]),
                 len(self.data.splits.get("test", [])), len(self.classes), self.spe, self.total_images,
                 self.total_images / self.n_train, f", time budget {cfg.train.time_budget}" if self.budget else "")

    # -- plan and schedule
    def _rebuild_schedule(self) -> None:
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

    def done(self) -> bool:
        return self.images_seen >= self.total_images

    def at_epoch_end(self) -> bool:
        return self.images_seen % self.epoch_images == 0

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.backend.module

    # -- checkpoints
    def _meta(self) -> dict:
        return {"epoch": self.images_seen / self.n_train, "global_step": self.global_step, "images_seen": self.images_seen,
                "total_images": self.total_images, "global_batch": self.global_batch, "reference_batch": self.reference_batch,
                "steps_per_epoch": self.spe, "world_size": self.dinfo.world, "config": self.cfg.to_dict(),
                "classes": self.classes, "best_top1": self.best_top1, "val_top1": self.last_val, "precision": self.precision,
                "budget": self.budget.state() if self.budget else None}

    def save_checkpoint(self, is_best: bool = False) -> None:
        extra = {"model": float_state(self.eval_model), "rng": gather_rng(self.dinfo)}
        if self.ema is not None:
            extra["train_model"] = float_state(self.backend.module)
        check_finite(extra["model"], self.global_step)   # before any engine writes (DeepSpeed saves its own first)
        if "train_model" in extra:
            check_finite(extra["train_model"], self.global_step)
        self.backend.save(self.ckpt, self.out, self._meta(), extra, self.global_step, is_best)
        barrier(self.dinfo)
        log.info("checkpoint saved at step %d (epoch %.2f)%s", self.global_step, self.images_seen / self.n_train,
                 " [best]" if is_best else "")

    def try_resume(self) -> bool:
        if not self.cfg.train.resume:
            decide_on_main(self.dinfo, self.ckpt.set_aside)   # starting over never mixes with an older history
            return False
        found = self.backend.resume(self.ckpt, self.out)
        if found is None:
            return False
        state, path = found
        check_compatible(self.cfg, state, self.classes, path)
        self.backend.load(state)
        if self.ema is not None:
            self.ema.module.load_state_dict(state["model"])
        r = ResumeState.from_checkpoint(state, self.cfg, self.spe, self.global_batch)
        self.images_seen, self.global_step, self.reference_batch = r.images_seen, r.global_step, r.reference_batch
        if r.total_images is not None:
            self.total_images = r.total_images
        if self.budget and r.budget:
            self.budget.restore(r.budget)
        if r.world_size != self.dinfo.world:
            log.warning("resuming with %d ranks (was %s): position kept in images seen (%d, epoch %.2f), peak lr "
                        "rescaled by optim.lr_scaling=%s for the global batch %d", self.dinfo.world, r.world_size,
                        self.images_seen, self.images_seen / self.n_train, self.cfg.optim.lr_scaling, self.global_batch)
        self._rebuild_schedule()
        self.best_top1 = float(state.get("best_top1", -1.0))
        self.last_val = state.get("val_top1")
        rng = state.get("rng") or []
        if len(rng) == self.dinfo.world:
            set_rng_state(rng[self.dinfo.rank])
        log.info("resuming from %s (epoch %.2f, step %d of %d, %d of %d images)", path, self.images_seen / self.n_train,
                 self.global_step, self.total_images // self.global_batch, self.images_seen, self.total_images)
        return True

    # -- steps
    def handle_nonfinite(self) -> None:
        self.nan_skips += 1
        if self.cfg.train.nan_policy == "stop" or self.nan_skips > self.cfg.train.max_nan_skips:
            raise EngineError(f"Loss became NaN/inf at step {self.global_step + 1}; stopped without saving a checkpoint "
                              f"after the last good one. Lower optim.lr (a rerun honours it), use precision fp32/bf16, "
                              f"or set train.nan_policy=skip.")
        log.warning("non-finite loss at step %d: step skipped (%d so far)", self.global_step + 1, self.nan_skips)
        self.backend.skip_step()

    def _budget_step(self) -> None:
        """With train.time_budget: after the measured steps, fix the total once (same on every rank)."""
        b = self.budget
        if b is None or b.fixed or not b.observe(self.global_step, time.perf_counter()):
            return
        # Progressive resizing: the rate was measured at a smaller crop; plan with the full-size cost (cost taken as
        # proportional to pixels, which over-estimates small crops), so the run can end early but never late.
        b.rate_steps_per_s *= (self._train_size_now / self.cfg.data.image_size) ** 2
        reserve = self._eval_reserve(b.rate_steps_per_s * self.global_batch)
        total_steps = decide_on_main(self.dinfo, lambda: b.fix(time.perf_counter() - self.t_start, self.global_step,
                                                                 reserve))
        b.fixed, b.total_steps = True, total_steps
        self.total_images = total_steps * self.global_batch
        self._rebuild_schedule()
        log.info("time budget %s: measured %.1f img/s, reserving %.0f s for evaluation -> %d steps (%.2f epochs)",
                 self.cfg.train.time_budget, b.rate_steps_per_s * self.global_batch, reserve, total_steps,
                 self.total_images / self.n_train)

    def _eval_reserve(self, train_img_s: float) -> float:
        """Seconds the rest of the run spends outside training steps: validations, the final val+test pass (forward
        only, taken as 3x the training rate) and checkpoint writes (~2 s each)."""
        n_val, n_test = len(self.data.splits["val"]), len(self.data.splits.get("test", []))
        epochs = max(1, round(self.budget.budget_s * train_img_s / self.n_train))
        evals = epochs // self.cfg.train.eval_every_epochs + 1
        return (evals * n_val + n_val + n_test) / (3 * max(train_img_s, 1e-6)) + 2.0 * (epochs + 2)

    def _maybe_unfreeze(self, epoch: int) -> None:
        m = self.cfg.model
        if m.freeze_backbone and m.unfreeze_after_epochs and epoch >= m.unfreeze_after_epochs and not getattr(self, "_unfrozen", False):
            set_backbone_trainable(self.backend.module, ("layer3", "layer4"))
            self.backend.wrap()
            self._unfrozen = True
            log.info("epoch %d: unfroze layer3 and layer4", epoch)

    def validate(self, split: str = "val") -> dict:
        d = self.dinfo
        loader = build_eval_loader(self.cfg.data, self.data.splits[split], d.world, d.rank, d.device,
                                   channels_last=self.channels_last)
        return evaluate(self.eval_model, loader, self.labels[split], len(self.classes), d.device,
                        autocast_for(self.precision, d.device), self.channels_last)

    # -- loop
    def fit(self) -> dict:
        cfg, d = self.cfg, self.dinfo
        resumed = self.try_resume()
        if cfg.train.record_samples:
            (self.out / "samples").mkdir(parents=True, exist_ok=True)
            self.samples_file = open(self.out / "samples" / f"rank{d.rank}.txt", "a")
        if self.budget:
            self.budget.start(self.global_step, time.perf_counter())
        train_time, images = 0.0, 0
        self.backend.train()
        while not self.done():
            epoch, offset = divmod(self.images_seen, self.epoch_images)
            start = offset // self.global_batch
            self._maybe_unfreeze(epoch)
            size = self._train_size_now = self.train_size(epoch)
            loader = build_train_loader(cfg.data, self.train_split, d.world, d.rank, cfg.train.seed, epoch,
                                        start_step=start, device=d.device, channels_last=self.channels_last,
                                        image_size=size)
            n_steps = min(self.spe - start, math.ceil((self.total_images - self.images_seen) / self.global_batch))
            desc = f"epoch {epoch + 1}/{math.ceil(self.total_images / self.epoch_images)}" + (
                f" @{size}px" if size != cfg.data.image_size else "")
            stats = train_one_epoch(self, loader, n_steps, start, desc, after_step=self._budget_step)
            train_time += stats.train_seconds
            images += stats.images
            if self.at_epoch_end() or self.done():
                self._end_of_epoch()
        if self.samples_file:
            self.samples_file.close()
        return self._finish(resumed, train_time, images)

    def _end_of_epoch(self) -> None:
        epoch = math.ceil(self.images_seen / self.epoch_images)
        is_best = False
        if epoch % self.cfg.train.eval_every_epochs == 0 or self.done():
            r = self.validate("val")
            self.last_val = r["top1"]
            is_best = r["top1"] > self.best_top1
            self.best_top1 = max(self.best_top1, r["top1"])
            self.metrics.update(val_top1=r["top1"])
            self.jsonl.write({"step": self.global_step, "epoch": epoch, "val_top1": r["top1"], "val_top5": r["top5"],
                              "time": time.time()})
            log.info("epoch %d: val top-1 %.2f%% top-5 %.2f%% (best %.2f%%)", epoch, 100 * r["top1"], 100 * r["top5"],
                     100 * self.best_top1)
        self.save_checkpoint(is_best=is_best)

    def _finish(self, resumed: bool, train_time: float, images: int) -> dict:
        cfg, d = self.cfg, self.dinfo
        final_lr = self.schedule(self.images_seen)
        found = shared_checkpoint(d, lambda: (safe_load(self.ckpt.best), self.ckpt.best) if self.ckpt.best.exists() else None)
        if found:   # read and verified on rank 0 only; the other ranks load the same file
            best = found[0]
            model = self.eval_model
            model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in best["model"].items()})
            log.info("evaluating the best checkpoint (step %d, val top-1 %.2f%%)", best["global_step"],
                     100 * (best.get("val_top1") or 0))
        results = {"val": self.validate("val")}
        if "test" in self.data.splits:
            results["test"] = self.validate("test")
        total = time.perf_counter() - self.t_start
        report = {}
        if d.is_main:
            extra = {"train_seconds": round(train_time, 2), "total_seconds": round(total, 2),
                     "train_images_per_second": round(images / max(train_time, 1e-9) * d.world, 2),
                     "epochs": round(self.images_seen / self.n_train, 3), "steps": self.global_step,
                     "images_seen": self.images_seen, "final_lr": final_lr, "resumed": resumed, "engine": cfg.engine,
                     "world_size": d.world, "device": str(d.device), "precision": self.precision,
                     "data_backend": self.data_backend, "model": cfg.model.name, "ema_decay": cfg.train.ema_decay,
                     "time_budget": cfg.train.time_budget, "budget": self.budget.state() if self.budget else None,
                     "best_checkpoint": str(self.ckpt.best), "nan_skipped_steps": self.nan_skips}
            report = write_report(self.out, self.classes, results, extra)
            if "test_top1" in report:
                log.info("test top-1 %.2f%% (%d images); report: %s", 100 * report["test_top1"], report["test_images"],
                         self.out / "report.json")
        barrier(d)
        return report

    def close(self) -> None:
        release_loaders()   # kept DataLoader workers and DALI pipelines
        shutdown()
