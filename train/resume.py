"""What a run plans to see and where a resumed run stands: the planned number of images (epochs, max_steps or a
time budget), the position restored from a checkpoint, and what a changed config may and may not change on resume."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

from train.checkpoint import CheckpointError
from train.config import Config
from train.provenance import listing_fingerprint

log = logging.getLogger(__name__)

# A resumed run refuses these changes (the weights or their meaning would not fit) ...
_FIXED = ("model", "data.image_size", "optim.name")
# ... and honours these, at the resumed position (the lr is a function of images seen, so nothing stale survives).
_HONOURED = ("optim.lr", "optim.weight_decay", "optim.momentum", "optim.label_smoothing", "optim.lr_scaling",
             "schedule", "train.epochs", "train.max_steps", "train.ema_decay")


def _get(tree: dict, dotted: str):
    for k in dotted.split("."):
        tree = (tree or {}).get(k) if isinstance(tree, dict) else None
    return tree


def _comparable_model(section: Optional[dict]) -> dict:
    return {k: v for k, v in (section or {}).items() if k not in ("pretrained", "freeze_backbone", "unfreeze_after_epochs")}


def check_compatible(cfg: Config, state: dict, classes: list[str], path) -> None:
    """Refuse a checkpoint whose classes, model or image size differ, in one sentence; log what the new config changes."""
    old, new = state.get("config") or {}, cfg.to_dict()
    fix = f"use another output_dir, or --set train.resume=false to start over in '{cfg.output_dir}'"
    if state.get("classes") and list(state["classes"]) != list(classes):
        raise CheckpointError(f"The checkpoint {path} was trained on {len(state['classes'])} classes "
                              f"({', '.join(state['classes'][:5])}...) and the data now has {len(classes)} "
                              f"({', '.join(classes[:5])}...); {fix}.")
    for key in _FIXED:
        a, b = _get(old, key), _get(new, key)
        if key == "model":
            a, b = _comparable_model(a), _comparable_model(b)
        if old and a != b:
            raise CheckpointError(f"{key} differs from the checkpoint's ({a} there, {b} now), so its weights cannot be "
                                  f"resumed; {fix}.")
    for key in _HONOURED:
        a, b = _get(old, key), _get(new, key)
        if old and a is not None and a != b:
            log.warning("resuming with a changed %s (%s -> %s): honoured from the resumed position", key, a, b)


def data_listing(data) -> dict:
    """Per split: (files, fingerprint of the (path under the data root, class) pairs) of a train.listing.Dataset; kept
    in every checkpoint so a resume sees files added, removed or relabelled since. Computed once per Dataset."""
    cached = getattr(data, "_listing_fingerprints", None)
    if cached is None:
        root = os.path.abspath(data.root)
        cached = {name: {"files": len(split.paths), "fingerprint": listing_fingerprint(
            (os.path.relpath(os.path.abspath(p), root), data.classes[int(label)])
            for p, label in zip(split.paths, split.labels))} for name, split in sorted(data.splits.items())}
        data._listing_fingerprints = cached
    return cached


def data_changed(state: dict, data) -> bool:
    """The rule for a data set that changed between a run and its resume (classes are checked by check_compatible):
    train/ changed -> a warning, and training goes on over the current files from the resumed position; val/ changed
    -> a warning, and the best validation top-1 is forgotten (best.pt's score was measured on other images), so the
    next validation picks best.pt afresh. Returns True when val/ changed. Checkpoints without a listing: no check."""
    then, now = state.get("data_listing") or {}, data_listing(data)
    changed = [s for s in sorted(set(then) | set(now))
               if (then.get(s) or {}).get("fingerprint") != (now.get(s) or {}).get("fingerprint")]
    for s in changed if then else []:
        a, b = (then.get(s) or {}).get("files", 0), (now.get(s) or {}).get("files", 0)
        what = ("training continues over the current files from the resumed position" if s == "train" else
                "the best validation top-1 so far is forgotten: the next validation picks best.pt afresh"
                if s == "val" else "the final report evaluates the current files")
        log.warning("the %s/ files changed since the checkpoint (%d then, %d now; added, removed or relabelled): %s",
                    s, a, b, what)
    return bool(then) and "val" in changed


def plan_total_images(cfg: Config, spe: int, global_batch: int) -> int:
    """Images the run plans to see before a time budget (if any) fixes it: whole epochs' worth of global batches."""
    steps = max(1, math.ceil(cfg.train.epochs * spe))
    if cfg.train.max_steps:
        steps = min(steps, cfg.train.max_steps)
    return steps * global_batch


@dataclass
class ResumeState:
    images_seen: int
    global_step: int
    reference_batch: int
    world_size: int
    total_images: Optional[int]
    budget: Optional[dict]

    @classmethod
    def from_checkpoint(cls, state: dict, cfg: Config, spe: int, global_batch: int) -> "ResumeState":
        old_cfg = state.get("config") or {}
        old_world = int(state.get("world_size", 1))
        old_batch = int(state.get("global_batch") or old_world * int(_get(old_cfg, "data.batch_size") or cfg.data.batch_size))
        seen = int(state.get("images_seen", int(state.get("global_step", 0)) * old_batch))
        # The plan survives a resume (a resized job sees the same images in all) unless the config changed its length.
        same_length = all(_get(old_cfg, k) == _get(cfg.to_dict(), k) for k in ("train.epochs", "train.max_steps",
                                                                            "train.time_budget"))
        total = state.get("total_images") if same_length or (state.get("budget") or {}).get("fixed") else None
        if total is None:
            total = plan_total_images(cfg, spe, global_batch)
        budget = state.get("budget") if _get(old_cfg, "train.time_budget") == cfg.train.time_budget else None
        return cls(images_seen=seen, global_step=int(state.get("global_step", 0)),
                   reference_batch=int(state.get("reference_batch") or old_batch), world_size=old_world,
                   total_images=int(total), budget=budget)


class TimeBudget:
    """Measures the step rate over the first steps of the first attempt, then fixes the number of steps once, so the
    whole schedule (warm-up, cosine to eta_min) ends when the budget does. A resumed run keeps the fixed count."""

    WARMUP_STEPS = 3     # not timed: loader start-up, first-iteration allocations
    MEASURE_STEPS = 12

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.fixed = False
        self.total_steps: Optional[int] = None
        self.rate_steps_per_s = 0.0
        self._t0: Optional[float] = None
        self._s0 = 0
        self._first_step = 0

    def start(self, step: int, now: float) -> None:
        self._first_step = step

    def observe(self, step: int, now: float) -> bool:
        """Called after every step; True once the rate is measured (then ``fix`` must be called)."""
        done = step - self._first_step
        if done == self.WARMUP_STEPS:
            self._t0, self._s0 = now, step
        if self._t0 is not None and step - self._s0 >= self.MEASURE_STEPS:
            self.rate_steps_per_s = (step - self._s0) / max(now - self._t0, 1e-9)
            return True
        return False

    def fix(self, elapsed_s: float, steps_done: int, reserve_s: float) -> int:
        left = max(self.budget_s - elapsed_s - reserve_s, 0.0)
        return steps_done + max(1, int(left * self.rate_steps_per_s))

    def state(self) -> dict:
        return {"budget_seconds": self.budget_s, "fixed": self.fixed, "total_steps": self.total_steps,
                "measured_steps_per_second": round(self.rate_steps_per_s, 5), "recorded": time.time()}

    def restore(self, state: dict) -> None:
        self.fixed = bool(state.get("fixed"))
        self.total_steps = state.get("total_steps")
        self.rate_steps_per_s = float(state.get("measured_steps_per_second") or 0.0)
