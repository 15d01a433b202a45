"""The plain training loop: one epoch of steps through a backend object (DDP or DeepSpeed alike), with the lr taken
from the schedule at each step's position in images seen, non-finite losses agreed on by every rank, progress bar,
metrics and mid-epoch checkpoints."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

from train.distributed import all_agree, all_reduce_mean

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    steps: int = 0
    images: int = 0
    train_seconds: float = 0.0


def memory_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    try:
        import psutil
        return float(psutil.Process().memory_info().rss)
    except ImportError:
        import resource
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def train_one_epoch(t, loader, n_steps: int, start_step: int, desc: str,
                    after_step: Optional[Callable[[], None]] = None) -> EpochStats:
    """``t`` is the Trainer: its backend, criterion, schedule, labels, metrics and counters. Stops early when
    ``t.done()`` (the planned images are reached, or a time budget just fixed a shorter plan)."""
    cfg, d = t.cfg, t.dinfo
    stats = EpochStats()
    bar = tqdm(total=start_step + n_steps, initial=start_step, desc=desc, unit="step", disable=not d.is_main,
               dynamic_ncols=True, mininterval=1.0 if os.isatty(2) else 15.0)
    win_t, win_imgs, win_loss, win_n = time.perf_counter(), 0, 0.0, 0
    t_ready = time.perf_counter()
    for images, index in loader:
        if t.done():
            break
        t_got = time.perf_counter()
        images = images.to(d.device, non_blocking=True)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = t.labels["train"][index].to(d.device, non_blocking=True)
        if t.samples_file:
            t.samples_file.write(" ".join(map(str, index.tolist())) + "\n")
        lr = t.schedule(t.images_seen)   # the lr of this step's position
        t.backend.set_lr(lr)
        logits = t.backend.forward(images)
        loss = t.criterion(logits.float(), target)
        if not all_agree(bool(torch.isfinite(loss.detach())), d):   # every rank takes the same branch
            t.handle_nonfinite()
            t_ready = time.perf_counter()
            continue
        t.backend.step(loss)
        if t.ema is not None:
            t.ema.update_parameters(t.backend.module)
        t.images_seen += t.global_batch
        t.global_step += 1
        t_done = time.perf_counter()
        stats.steps += 1
        stats.images += len(index)
        stats.train_seconds += t_done - t_ready
        t.metrics.observe_step(t_done - t_got, t_got - t_ready, len(index))
        win_imgs += len(index)
        win_loss += float(loss.detach())
        win_n += 1
        bar.update(1)
        if t.global_step % cfg.train.log_every_steps == 0 or t.done():
            elapsed = time.perf_counter() - win_t
            loss_mean, ips = all_reduce_mean([win_loss / max(win_n, 1), win_imgs / max(elapsed, 1e-9)], d)
            ep = t.images_seen / t.n_train
            t.metrics.update(images_per_second=win_imgs / max(elapsed, 1e-9), loss=loss_mean, lr=lr, epoch=ep,
                             memory=memory_bytes(d.device))
            bar.set_postfix_str(f"img/s={ips * d.world:.1f} loss={loss_mean:.4f} lr={lr:.2e}")
            t.jsonl.write({"step": t.global_step, "epoch": round(ep, 4), "loss": loss_mean, "lr": lr,
                           "images_seen": t.images_seen, "images_per_second": ips * d.world, "time": time.time()})
            win_t, win_imgs, win_loss, win_n = time.perf_counter(), 0, 0.0, 0
        if after_step is not None:
            after_step()
        every = cfg.train.checkpoint_every_steps
        if every and t.global_step % every == 0 and not t.at_epoch_end() and not t.done():
            t.save_checkpoint()
        t_ready = time.perf_counter()
    bar.close()
    return stats
