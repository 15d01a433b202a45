"""Training-side benchmark, every pair measured side by side in one run (alternating, repeated, medians):
DALI CPU vs torchvision DataLoader on the same JPEG folder; our Trainer vs a plain PyTorch loop (same model, batch,
precision, data); bf16 autocast vs fp32 on this CPU.

`run(out_dir, quick=False) -> dict` of flat figures (ratios end in _ratio/_speedup); `python -m scripts.bench_train`.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _median(xs) -> float:
    return float(statistics.median(xs))


def make_jpeg_folder(root: Path, n_per_class: int, classes: int = 4, size=(500, 375)) -> Path:
    """Real JPEGs (500x375 like Pascal/ImageNet photos): shapes on noise, drawn with PIL."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import SHAPES, draw_sample

    rng = np.random.default_rng(0)
    for split, n in (("train", n_per_class), ("val", 2), ("test", 2)):
        for c in SHAPES[:classes]:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_sample(c, rng, 400).resize(size).save(d / f"{i:04d}.jpg", quality=90)
    return root


def _loader_rate(cfg, split, epochs: int) -> float:
    from train.data import build_train_loader

    n, t0 = 0, None
    for epoch in range(epochs + 1):
        loader = build_train_loader(cfg.data, split, 1, 0, 0, epoch)
        for images, _ in loader:
            if t0 is None:  # first batch of the first (warm-up) epoch is excluded
                t0 = time.perf_counter()
                continue
            n += len(images)
    return n / (time.perf_counter() - t0)


def bench_data(root: Path, repeats: int, quick: bool) -> dict:
    from train.config import load_config
    from train.data import scan_imagefolder

    base = ["data.image_size=224", "data.eval_resize=256", "data.batch_size=32", "data.workers=2", f"data.root={root}"]
    cfgs = {b: load_config(None, base + [f"data.backend={b}"]) for b in ("dali", "torchvision")}
    split = scan_imagefolder(cfgs["dali"].data, ("train",)).splits["train"]
    rates = {b: [] for b in cfgs}
    for _ in range(repeats):
        for b, cfg in cfgs.items():
            rates[b].append(_loader_rate(cfg, split, 1 if quick else 2))
    d, t = _median(rates["dali"]), _median(rates["torchvision"])
    return {"data_dali_cpu_img_per_s": round(d, 1), "data_torchvision_img_per_s": round(t, 1),
            "data_dali_vs_torchvision_speedup": round(d / t, 3), "data_images": len(split), "data_crop_px": 224}


PLAIN_LOOP = "plain 30-line loop: DataLoader -> model -> CrossEntropy -> AdamW, no metrics/checkpoints/DDP"


def plain_loop(cfg, steps: int) -> float:
    """The alternative our engine is measured against: the loop anyone would write. Returns img/s."""
    from train.data import build_train_loader, scan_imagefolder
    from train.models import create_model

    torch.manual_seed(0)
    split = scan_imagefolder(cfg.data, ("train",)).splits["train"]
    labels = torch.as_tensor(split.labels)
    model = create_model(cfg.model, int(labels.max()) + 1).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    model.train()
    done, n, busy = 0, 0, 0.0
    epoch = 0
    while done < steps:
        loader = build_train_loader(cfg.data, split, 1, 0, 0, epoch)
        t0 = time.perf_counter()  # like the engine: from the first batch request, loader construction excluded
        for images, index in loader:
            images = images.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(images), labels[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            n += len(images)
            if done >= steps:
                break
        busy += time.perf_counter() - t0
        epoch += 1
    return n / busy


def engine_rate(cfg, steps: int, out: Path) -> float:
    from train.engine import Trainer

    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = str(out)
    cfg.train.max_steps = steps
    trainer = Trainer(cfg)
    try:
        report = trainer.fit()
    finally:
        trainer.close()
    return float(report["train_images_per_second"])


def bench_engine(root: Path, work: Path, repeats: int, quick: bool) -> dict:
    from train.config import load_config

    steps = 8 if quick else 20
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"data.root={root}", "data.batch_size=32", "data.image_size=32", "data.eval_resize=32", "data.workers=1",
        "data.backend=torchvision", "train.precision=fp32", "train.checkpoint_every_steps=0", "train.log_every_steps=5",
        "train.threads=0", "train.epochs=100", "train.resume=false", "data.class_weights=false",
        "optim.label_smoothing=0.0", "schedule.warmup_epochs=0"])
    ours, plain = [], []
    for i in range(repeats):
        plain.append(plain_loop(cfg, steps))
        ours.append(engine_rate(cfg, steps, work / f"engine-{i}"))
    o, p = _median(ours), _median(plain)
    return {"train_engine_img_per_s": round(o, 2), "train_plain_loop_img_per_s": round(p, 2),
            "train_engine_vs_plain_ratio": round(o / p, 3), "train_engine_overhead_pct": round(100 * (1 - o / p), 2),
            "train_bench_steps": steps, "train_bench_batch": 32, "train_bench_px": 32}


def bench_precision(repeats: int, quick: bool) -> dict:
    """bf16 autocast vs fp32, forward+backward+AdamW on SE-ResNet50 (small stem) at 32 px and 112 px."""
    from train.config import ModelConfig
    from train.engine import cpu_has_fast_bf16
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
        jpegs = make_jpeg_folder(work / "jpegs", 16 if quick else 64)
        figures = {}
        figures.update(bench_data(jpegs, repeats, quick))
        small = make_jpeg_folder(work / "small", 40 if quick else 80, size=(40, 40))
        figures.update(bench_engine(small, work, repeats, quick))
        figures.update(bench_precision(repeats, quick))
    figures["train_plain_loop"] = PLAIN_LOOP
    return figures


if __name__ == "__main__":
    import argparse
    import logging

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--quick", action="store_true", help="one repetition, fewer images and steps")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(Path(args.out), args.quick), indent=2))
