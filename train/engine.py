"""The training run, set up (DLE's Executor/Trainer split): hardware plan and preflight, data, model, one backend
object (DDP or DeepSpeed), the non-finite guard, the plan of images to see (train.progress), metrics; checkpoints,
resume and validation. The loop itself, the epoch ends and the final report are train.loop's free functions."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from train.backends import autocast_for, build_backend, float_state
from train.checkpoint import CheckpointManager, check_finite
from train.config import Config, save_config
from train.data import build_eval_loader, class_weights, cpu_threads_per_rank, release_loaders, scan_imagefolder, steps_per_epoch
from train.distributed import (LISTING_TIMEOUT, barrier, decide_on_main, gather_rng, seed_everything, set_rng_state,
                               setup_distributed, setup_logging, shutdown)
from train.evaluate import evaluate
from train.hardware import decide, local_facts
from train.loop import train_loop
from train.metrics import Board, JsonlWriter, TrainingMetrics
from train.models import create_model, set_backbone_trainable
from train.optim import NonFiniteGuard, build_optimizer
from train.progress import Progress, planned
from train.resume import ResumeState, check_compatible, data_changed, data_listing

log = logging.getLogger(__name__)
__all__ = ["Trainer", "EngineError", "setup_logging"]


class EngineError(RuntimeError):
    """A training problem the user can act on, in one sentence."""


class Trainer:
    """One training run: ``Trainer(cfg).fit()`` trains, evaluates, and writes checkpoints and the report."""

    def __init__(self, cfg: Config):
        self.cfg, self.t_start = cfg, time.perf_counter()
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
        self.precision, self.channels_last, self.data_backend = self.plan.precision, self.plan.channels_last, self.plan.data_backend
        # Listed once on rank 0 and broadcast: no rank decodes the data set at start, and all agree on the file list.
        self.data = decide_on_main(d, lambda: scan_imagefolder(cfg.data, cache_dir=self.out / "cache"), LISTING_TIMEOUT)
        self.classes, self.train_split = self.data.classes, self.data.splits["train"]
        self.labels = {k: torch.as_tensor(v.labels) for k, v in self.data.splits.items()}
        n_train = len(self.train_split)
        spe = steps_per_epoch(n_train, d.world, cfg.data.batch_size)
        if spe == 0:
            raise EngineError(f"The training split has {n_train} images, fewer than one global batch "
                              f"({d.world} ranks x {cfg.data.batch_size}); lower data.batch_size.")
        self.progress = Progress(cfg, n_train, spe, d.world)

        seed_everything(cfg.train.seed)
        model = create_model(cfg.model, len(self.classes)).to(d.device)
        if self.channels_last and cfg.engine == "ddp":   # DeepSpeed: inputs only (see DeepSpeedBackend)
            model = model.to(memory_format=torch.channels_last)
        if cfg.model.freeze_backbone:
            set_backbone_trainable(model, ())
        weights = class_weights(self.data.class_counts()).to(d.device) if cfg.data.class_weights else None
        self.criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.optim.label_smoothing)
        optimizer = build_optimizer(cfg, model, fused=cfg.engine == "ddp" and d.device.type in ("cpu", "cuda"))
        self.guard = NonFiniteGuard(optimizer, d.device)   # on the optimizer's step hooks: either engine
        self.backend = build_backend(cfg, model, optimizer, d, self.precision)
        self.ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
                    if cfg.train.ema_decay > 0 else None)
        self.best_top1, self.last_val, self.nan_skips = -1.0, None, 0
        self.samples_file, self._unfrozen = None, False
        self.metrics = TrainingMetrics(d.rank, (cfg.metrics.port + d.local_rank if cfg.metrics.port else 0)
                                       if cfg.metrics.enabled else None, cfg.metrics.address)
        self.jsonl = JsonlWriter(self.out / "metrics.jsonl" if d.is_main else None)
        self.board = Board(self.out / "tensorboard" if cfg.metrics.tensorboard and d.is_main else None)
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        log.info("engine=%s world=%d device=%s precision=%s channels_last=%s data=%s (%d train / %d val / %d test, "
                 "%d classes) %s", cfg.engine, d.world, d.device, self.precision, self.channels_last, self.data_backend,
                 n_train, len(self.data.splits["val"]), len(self.data.splits.get("test", [])), len(self.classes),
                 planned(self.progress, cfg.train.time_budget))

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.backend.module

    def fit(self) -> dict:
        return train_loop(self)

    # -- checkpoints
    def save_checkpoint(self, is_best: bool = False) -> None:
        p = self.progress
        extra = {"model": float_state(self.eval_model), "rng": gather_rng(self.dinfo)}
        if self.ema is not None:
            extra["train_model"] = float_state(self.backend.module)
        check_finite(extra["model"], p.global_step)   # before any engine writes (DeepSpeed saves its own first)
        if "train_model" in extra:
            check_finite(extra["train_model"], p.global_step)
        meta = {**p.state(), "world_size": self.dinfo.world, "config": self.cfg.to_dict(), "classes": self.classes,
                "best_top1": self.best_top1, "val_top1": self.last_val, "precision": self.precision,
                "data_listing": data_listing(self.data)}
        self.backend.save(self.ckpt, self.out, meta, extra, p.global_step, is_best)
        barrier(self.dinfo)
        log.info("checkpoint saved at step %d (epoch %.2f)%s", p.global_step, p.epoch, " [best]" if is_best else "")

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
        p = self.progress
        p.restore(ResumeState.from_checkpoint(state, self.cfg, p.spe, p.global_batch), self.dinfo.world)
        self.best_top1, self.last_val = float(state.get("best_top1", -1.0)), state.get("val_top1")
        if data_changed(state, self.data):   # val/ changed: best.pt's score is not comparable (train.resume rule)
            self.best_top1 = -1.0
        rng = state.get("rng") or []
        if len(rng) == self.dinfo.world:
            set_rng_state(rng[self.dinfo.rank])
        log.info("resuming from %s (epoch %.2f, step %d of %d, %d of %d images)", path, p.epoch, p.global_step,
                 p.total_images // p.global_batch, p.images_seen, p.total_images)
        return True

    # -- steps
    def handle_nonfinite(self, skipped: int, first: int, last: int) -> None:
        """``skipped`` non-finite steps so far (agreed by every rank), new ones among steps first..last: the guard
        left the weights alone; train.nan_policy decides whether the run goes on."""
        new, self.nan_skips = skipped - self.nan_skips, skipped
        where = f"step {last}" if first == last else f"{new} of steps {first}-{last}"
        if self.cfg.train.nan_policy == "stop" or skipped > self.cfg.train.max_nan_skips:
            raise EngineError(f"Loss became NaN/inf at {where}; stopped without saving a checkpoint after the last "
                              f"good one. Lower optim.lr (a rerun honours it), use precision fp32/bf16, or set "
                              f"train.nan_policy=skip.")
        log.warning("non-finite loss at %s: step skipped (%d so far)", where, skipped)

    def maybe_unfreeze(self, epoch: int) -> None:
        m = self.cfg.model
        if m.freeze_backbone and m.unfreeze_after_epochs and epoch >= m.unfreeze_after_epochs and not self._unfrozen:
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

    def close(self) -> None:
        self.board.close()
        release_loaders()   # kept DataLoader workers and DALI pipelines
        shutdown()
