"""The plain training loop: one epoch of steps through a backend object (DDP or DeepSpeed alike), with the lr taken
from the schedule at each step's position in images seen, progress bar, metrics and mid-epoch checkpoints.

Nothing in a step waits for the device: the loss is summed and non-finite steps are skipped and counted on the
device (train.optim.NonFiniteGuard), and both are read and agreed on by every rank only at log steps, before a
checkpoint and at the end of the epoch (timm and DLE log the same way; a per-step ``float(loss)`` would keep the
host from running ahead of a GPU)."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

from train.backends import shared_checkpoint
from train.checkpoint import safe_load
from train.data import build_train_loader
from train.distributed import all_reduce_mean, barrier
from train.evaluate import write_report
from train.provenance import dataset_fingerprint, provenance

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    steps: int = 0
    images: int = 0
    train_seconds: float = 0.0
    clean: bool = True   # no step since the last agreement was skipped as non-finite


def memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    try:
        import psutil
        return float(psutil.Process().memory_info().rss)
    except ImportError:
        import resource
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def agreed_skips(t) -> int:
    """Non-finite steps skipped so far, as every rank counts them (one host read and one small all-reduce)."""
    return round(all_reduce_mean([float(t.guard.count)], t.dinfo)[0] + 0.4999)


def check_nonfinite(t, since_step: int, skipped: Optional[int] = None) -> bool:
    """True when no step since ``since_step`` was skipped; else the Trainer's nan_policy decides (stop raises)."""
    skipped = agreed_skips(t) if skipped is None else skipped
    if skipped <= t.nan_skips:
        return True
    t.handle_nonfinite(skipped, since_step + 1, t.progress.global_step)
    return False


def train_one_epoch(t, loader, n_steps: int, start_step: int, desc: str,
                    after_step: Optional[Callable[[], None]] = None) -> EpochStats:
    """``t`` is the Trainer: its backend, guard, criterion, labels, metrics and progress (schedule and counters).
    Stops early when the planned images are reached (or a time budget just fixed a shorter plan)."""
    cfg, d, p = t.cfg, t.dinfo, t.progress
    stats = EpochStats()
    bar = tqdm(total=start_step + n_steps, initial=start_step, desc=desc, unit="step", disable=not d.is_main,
               dynamic_ncols=True, mininterval=1.0 if os.isatty(2) else 15.0)
    zero = torch.zeros((), dtype=torch.float64, device=d.device)
    win_t, win_imgs, win_loss, win_ok = time.perf_counter(), 0, zero.clone(), zero.clone()
    checked = p.global_step   # non-finite steps are agreed up to here
    t_ready = time.perf_counter()
    clean = True   # no step was found skipped at this step's checks
    for images, index in loader:
        if p.done():
            break
        clean = True
        t_got = time.perf_counter()
        images = images.to(d.device, non_blocking=True)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = t.labels["train"][index].to(d.device, non_blocking=True)
        if t.samples_file:
            t.samples_file.write(" ".join(map(str, index.tolist())) + "\n")
        lr = p.schedule(p.images_seen)   # the lr of this step's position
        t.backend.set_lr(lr)
        logits = t.backend.forward(images)
        loss = t.criterion(logits.float(), target)
        ok = t.guard.watch(loss)
        t.backend.step(loss)   # a non-finite step leaves the weights alone, on the device
        t.guard.settle()
        win_loss += torch.where(ok, loss.detach(), 0.0)
        win_ok += ok
        if t.ema is not None:
            t.ema.update_parameters(t.backend.module)
        p.advance()
        t_done = time.perf_counter()
        stats.steps += 1
        stats.images += len(index)
        stats.train_seconds += t_done - t_ready
        t.metrics.observe_step(t_done - t_got, t_got - t_ready, len(index))   # host times (the GPU may lag)
        win_imgs += len(index)
        bar.update(1)
        if p.global_step % cfg.train.log_every_steps == 0 or p.done():
            elapsed = time.perf_counter() - win_t
            loss_sum, n_ok, count = torch.stack([win_loss, win_ok, t.guard.count.double()]).tolist()
            loss_sum, n_ok, ips, count = all_reduce_mean([loss_sum, n_ok, win_imgs / max(elapsed, 1e-9), count], d)
            clean = check_nonfinite(t, checked, round(count + 0.4999))
            checked = p.global_step
            loss_mean = loss_sum / n_ok if n_ok else float("nan")
            ep = p.epoch
            t.metrics.update(images_per_second=win_imgs / max(elapsed, 1e-9), loss=loss_mean, lr=lr, epoch=ep,
                             memory=memory_bytes(d.device))
            t.board.scalars(p.global_step, loss=loss_mean, lr=lr, images_per_second=ips * d.world)
            bar.set_postfix_str(f"img/s={ips * d.world:.1f} loss={loss_mean:.4f} lr={lr:.2e}")
            t.jsonl.write({"step": p.global_step, "epoch": round(ep, 4), "loss": loss_mean, "lr": lr,
                           "images_seen": p.images_seen, "images_per_second": ips * d.world, "time": time.time()})
            win_t, win_imgs, win_loss, win_ok = time.perf_counter(), 0, zero.clone(), zero.clone()
        if after_step is not None:
            after_step()
        every = cfg.train.checkpoint_every_steps
        if every and p.global_step % every == 0 and not p.at_epoch_end() and not p.done():
            if checked < p.global_step:
                clean = check_nonfinite(t, checked)
                checked = p.global_step
            if clean:   # never a checkpoint right after a skipped step
                t.save_checkpoint()
        t_ready = time.perf_counter()
    bar.close()
    stats.clean = check_nonfinite(t, checked) if p.global_step > checked else clean
    return stats


def train_loop(t) -> dict:
    """The run after start-up (DLE's train_loop): resume, epochs of steps, validation and a checkpoint at each epoch
    end, then the final evaluation of the best checkpoint and the report."""
    cfg, d, p = t.cfg, t.dinfo, t.progress
    resumed = t.try_resume()
    if cfg.train.record_samples:
        (t.out / "samples").mkdir(parents=True, exist_ok=True)
        t.samples_file = open(t.out / "samples" / f"rank{d.rank}.txt", "a")
    if p.budget:
        p.budget.start(p.global_step, time.perf_counter())
    n_val, n_test = len(t.data.splits["val"]), len(t.data.splits.get("test", []))
    train_time, images = 0.0, 0
    t.backend.train()
    while not p.done():
        epoch, offset = divmod(p.images_seen, p.epoch_images)
        start = offset // p.global_batch
        t.maybe_unfreeze(epoch)
        size = p.size_now = p.train_size(epoch)
        loader = build_train_loader(cfg.data, t.train_split, d.world, d.rank, cfg.train.seed, epoch,
                                    start_step=start, device=d.device, channels_last=t.channels_last, image_size=size)
        n_steps = min(p.spe - start, math.ceil((p.total_images - p.images_seen) / p.global_batch))
        desc = f"epoch {epoch + 1}/{math.ceil(p.total_images / p.epoch_images)}" + (
            f" @{size}px" if size != cfg.data.image_size else "")
        stats = train_one_epoch(t, loader, n_steps, start, desc,
                                after_step=lambda: p.budget_step(d, t.t_start, n_val, n_test))
        train_time += stats.train_seconds
        images += stats.images
        if p.at_epoch_end() or p.done():
            end_of_epoch(t, save=stats.clean)
    if t.samples_file:
        t.samples_file.close()
    return finish(t, resumed, train_time, images)


def end_of_epoch(t, save: bool = True) -> None:
    """Validate every train.eval_every_epochs (and at the end), then checkpoint (not right after a skipped step)."""
    p = t.progress
    epoch = math.ceil(p.images_seen / p.epoch_images)
    is_best = False
    if epoch % t.cfg.train.eval_every_epochs == 0 or p.done():
        r = t.validate("val")
        t.last_val = r["top1"]
        is_best = r["top1"] > t.best_top1
        t.best_top1 = max(t.best_top1, r["top1"])
        t.metrics.update(val_top1=r["top1"])
        t.board.scalars(p.global_step, val_top1=r["top1"], val_top5=r["top5"])
        t.jsonl.write({"step": p.global_step, "epoch": epoch, "val_top1": r["top1"], "val_top5": r["top5"],
                       "time": time.time()})
        log.info("epoch %d: val top-1 %.2f%% top-5 %.2f%% (best %.2f%%)", epoch, 100 * r["top1"], 100 * r["top5"],
                 100 * t.best_top1)
    if save:
        t.save_checkpoint(is_best=is_best)


def finish(t, resumed: bool, train_time: float, images: int) -> dict:
    """Evaluate the best checkpoint (read and verified on rank 0, loaded by all) on val and test; write the report."""
    cfg, d, p = t.cfg, t.dinfo, t.progress
    final_lr = p.schedule(p.images_seen)
    found = shared_checkpoint(d, lambda: (safe_load(t.ckpt.best), t.ckpt.best) if t.ckpt.best.exists() else None)
    if found:
        best = found[0]
        model = t.eval_model
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in best["model"].items()})
        log.info("evaluating the best checkpoint (step %d, val top-1 %.2f%%)", best["global_step"],
                 100 * (best.get("val_top1") or 0))
    results = {"val": t.validate("val")}
    if "test" in t.data.splits:
        results["test"] = t.validate("test")
    total = time.perf_counter() - t.t_start
    report = {}
    if d.is_main:
        extra = {"train_seconds": round(train_time, 2), "total_seconds": round(total, 2),
                 "train_images_per_second": round(images / max(train_time, 1e-9) * d.world, 2),
                 "epochs": round(p.epoch, 3), "steps": p.global_step, "images_seen": p.images_seen,
                 "final_lr": final_lr, "resumed": resumed, "engine": cfg.engine, "world_size": d.world,
                 "device": str(d.device), "precision": t.precision, "data_backend": t.data_backend,
                 "model": cfg.model.name, "ema_decay": cfg.train.ema_decay, "time_budget": cfg.train.time_budget,
                 "budget": p.budget.state() if p.budget else None, "best_checkpoint": str(t.ckpt.best),
                 "nan_skipped_steps": t.nan_skips,
                 "provenance": provenance(cfg.to_dict(), dataset_fingerprint(cfg.data.root, t.classes, t.data.splits))}
        report = write_report(t.out, t.classes, results, extra)
        if "test_top1" in report:
            log.info("test top-1 %.2f%% (%d images); report: %s", 100 * report["test_top1"], report["test_images"],
                     t.out / "report.json")
    barrier(d)
    t.board.close()
    return report
