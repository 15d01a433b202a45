"""Training-side benchmark, every pair measured side by side in one run (alternated, repeated, medians): our Trainer
vs a plain PyTorch loop (same model, batch, precision, data pipeline and the same fused optimizer), and bf16 autocast
vs fp32 on this CPU. The data-pipeline pair (DALI CPU vs torchvision) is scripts/bench_data.py's.

Engine vs plain loop: both sides are timed by this script's own clock, not by their own reports: a global
``torch.optim`` step post-hook (torch.optim.optimizer.register_optimizer_step_post_hook) stamps perf_counter at the
end of every optimizer step, whoever owns the optimizer, and each side's rate is the images of steps
WARMUP+1..STEPS over the time between the end of step WARMUP and the end of step STEPS. Start-up, evaluation and
report writing lie outside that window on both sides; data loading lies inside it on both. The training split holds
exactly STEPS global batches, so both sides run one epoch and the Trainer's epoch end (a validation pass and a
~300 MB checkpoint with its SHA-256 and fsync, seconds on a CPU, once per epoch) comes after the last timed step:
with 10-step epochs it used to fall inside the window and weighed as 30% of it, where on a real data set it is one
step in thousands.

`run(out_dir, quick=False) -> dict` of flat figures (ratios end in _ratio/_speedup; ``train_bench_quick`` marks a
quick run); `python -m scripts.bench_train`.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]


def _median(xs) -> float:
    return float(statistics.median(xs))


def make_image_folder(root: Path, n_per_class: int, classes: int = 4, size: int = 40) -> Path:
    """Real PNG files (a coloured disc, square, bar or cross on noise, drawn with PIL) as a train/val/test ImageFolder."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_per_class), ("val", 2), ("test", 2)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8))
                r = int(rng.integers(size // 5, size // 3))
                cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
                color = tuple(int(v) for v in rng.integers(150, 256, size=3))
                draw, kind, w = ImageDraw.Draw(img), c % 4, max(2, r // 3)
                if kind == 0:
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
                elif kind == 1:
                    draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
                else:
                    draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
                    if kind == 3:
                        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
                img.save(d / f"{i:04d}.png")
    return root


class StepClock:
    """perf_counter at the end of every optimizer step of any optimizer, while entered (the same code times both sides)."""

    def __enter__(self) -> "StepClock":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.stamps: list[float] = []
        self._handle = register_optimizer_step_post_hook(lambda *_: self.stamps.append(time.perf_counter()))
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def rate(self, warmup: int, steps: int, batch: int) -> float:
        if len(self.stamps) < steps:
            raise RuntimeError(f"expected {steps} optimizer steps, the clock saw {len(self.stamps)}")
        return (steps - warmup) * batch / (self.stamps[steps - 1] - self.stamps[warmup - 1])


PLAIN_LOOP = ("plain loop: the same data loader -> model -> CrossEntropy -> the engine's fused AdamW, no "
              "metrics/checkpoints/DDP/schedule")


def plain_loop(cfg, steps: int) -> None:
    """The alternative our engine is measured against: the loop anyone would write, with the engine's own optimizer
    (train.optim.build_optimizer, fused, no weight decay on norms and biases), threads and memory format."""
    from train.data import build_train_loader, cpu_threads_per_rank, scan_imagefolder
    from train.models import create_model
    from train.optim import build_optimizer

    torch.set_num_threads(cfg.train.threads or cpu_threads_per_rank(1))  # as the engine sets it for one rank
    torch.manual_seed(0)
    split = scan_imagefolder(cfg.data, ("train",)).splits["train"]
    labels = torch.as_tensor(split.labels)
    model = create_model(cfg.model, int(labels.max()) + 1).to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    model.train()
    done, epoch = 0, 0
    while done < steps:
        for images, index in build_train_loader(cfg.data, split, 1, 0, cfg.train.seed, epoch, channels_last=True):
            loss = loss_fn(model(images), labels[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
        epoch += 1


def engine_run(cfg, steps: int, out: Path) -> float:
    """Our Trainer for ``steps`` steps; returns the seconds its epoch end took (validation + checkpoint), timed
    apart: it is outside the step window."""
    import train.loop
    from train.engine import Trainer

    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = str(out)
    cfg.train.max_steps = steps
    trainer = Trainer(cfg)
    end_of_epoch, spent = train.loop.end_of_epoch, []

    def timed(*a, **kw):
        t0 = time.perf_counter()
        end_of_epoch(*a, **kw)
        spent.append(time.perf_counter() - t0)
    train.loop.end_of_epoch = timed
    try:
        trainer.fit()
    finally:
        train.loop.end_of_epoch = end_of_epoch
        trainer.close()
    return sum(spent)


def _sizes(quick: bool) -> tuple[int, int, int]:
    """(steps, warm-up steps, batch): the timed run is one epoch of ``steps`` batches (make the folder with
    ``steps * batch / CLASSES`` images per class)."""
    return (8, 2, 32) if quick else (20, 3, 32)


CLASSES = 4


def bench_engine(root: Path, work: Path, repeats: int, quick: bool) -> dict:
    from train.config import load_config

    steps, warmup, batch = _sizes(quick)
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"data.root={root}", f"data.batch_size={batch}", "data.image_size=32", "data.eval_resize=32", "data.workers=1",
        "data.backend=torchvision", "train.precision=fp32", "train.checkpoint_every_steps=0", "train.log_every_steps=5",
        "train.threads=0", "train.epochs=100", "train.resume=false", "data.class_weights=false",
        "optim.name=adamw", "optim.label_smoothing=0.0", "schedule.warmup_epochs=0", "metrics.enabled=false"])
    ours, plain, ends = [], [], []
    for i in range(repeats):
        # ABBA order: a drift of the host's speed during the run does not favour one side
        sides = [("plain", None), ("engine", work / f"engine-{i}")]
        for name, out in (sides if i % 2 == 0 else sides[::-1]):
            with StepClock() as clock:
                if name == "plain":
                    plain_loop(cfg, steps)
                else:
                    ends.append(engine_run(cfg, steps, out))
            (plain if name == "plain" else ours).append(clock.rate(warmup, steps, batch))
    o, p = _median(ours), _median(plain)
    return {"train_engine_img_per_s": round(o, 2), "train_plain_loop_img_per_s": round(p, 2),
            "train_engine_vs_plain_ratio": round(o / p, 3), "train_engine_overhead_pct": round(100 * (1 - o / p), 2),
            "train_engine_vs_plain_ratios": [round(a / b, 3) for a, b in zip(ours, plain)],
            "train_engine_epoch_end_s": round(_median(ends), 2),
            "train_engine_epoch_end_steps": round(_median(ends) * o / batch, 1),
            "train_bench_steps": steps, "train_bench_timed_steps": steps - warmup, "train_bench_repeats": repeats,
            "train_bench_batch": batch, "train_bench_px": 32, "train_bench_optimizer": "AdamW fused (both sides)"}


def bench_precision(repeats: int, quick: bool) -> dict:
    """bf16 autocast vs fp32, forward+backward+AdamW on SE-ResNet50 (small stem) at 32 px and 112 px."""
    from train.config import ModelConfig
    from train.hardware import cpu_has_fast_bf16
    from train.models import create_model

    out = {"cpu_has_fast_bf16": cpu_has_fast_bf16()}
    for px, stem in ((32, "small"), (112, "imagenet")):
        model = create_model(ModelConfig(stem=stem, stem_stride=2), 10).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(16, 3, px, px).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,))
        rates = {"bf16": [], "fp32": []}
        for _ in range(repeats):
            for prec in ("fp32", "bf16"):
                times = []
                for _ in range(2 if quick else 3):
                    t0 = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                        logits = model(x)
                    loss = torch.nn.functional.cross_entropy(logits.float(), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    times.append(time.perf_counter() - t0)
                rates[prec].append(len(x) / min(times[1:] or times))
        b, f = _median(rates["bf16"]), _median(rates["fp32"])
        out.update({f"precision_bf16_img_per_s_{px}px": round(b, 2), f"precision_fp32_img_per_s_{px}px": round(f, 2),
                    f"precision_bf16_vs_fp32_speedup_{px}px": round(b / f, 3)})
    return out


def run(out_dir: Path, quick: bool = False) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-train-", dir=out_dir) as tmp:
        work = Path(tmp)
        steps, _, batch = _sizes(quick)
        small = make_image_folder(work / "small", steps * batch // CLASSES, CLASSES)   # one epoch = the timed run
        figures = {"train_bench_quick": quick}
        figures.update(bench_engine(small, work, repeats, quick))
        figures.update(bench_precision(repeats, quick))
    figures["train_plain_loop"] = PLAIN_LOOP
    return figures


if __name__ == "__main__":
    import argparse
    import logging

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--quick", action="store_true", help="one repetition, fewer images and steps (marked quick)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(Path(args.out), args.quick), indent=2))
