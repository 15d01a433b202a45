"""Data-side benchmark: start-up listing of a 20,000-file folder (no decode) vs the decoding scan every rank used
to run, and the DALI CPU pipeline vs the torchvision DataLoader on the same JPEGs (224 px crops, same threads,
alternated, repeated, medians; wall img/s and CPU ms per image, the latter steadier on a shared machine).

Before this module's loaders (same harness, same 256 JPEGs, 2 threads, 2-core AMD EPYC AVX2, load ~11-15):
DALI 14.2 vs torchvision 11.3 CPU ms/img (0.80x; `make bench` had 0.71-0.77x wall). The causes, measured per 224 px
image: DALI's CPU rotate 3.8 ms and antialiased resize 3.3 ms (now one warp, train/dali.py), the pipeline rebuilt
with every path each epoch, and a CHW output the trainer then copied to channels_last.

`run(quick=False) -> dict` of flat figures (ratios end in _ratio/_speedup); `python -m scripts.bench_data`.
"""
from __future__ import annotations

import gc
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from train.config import DataConfig
from train.data import build_train_loader, list_dataset, release_loaders
from train.dali import dali_available

ROOT = Path(__file__).resolve().parents[1]
LISTING_DIR = ROOT / "runs" / "bench" / "listing"
JPEG_DIR = ROOT / "runs" / "bench" / "jpegs"
LISTING_FILES = 20_000  # 10 classes: 1,800 train + 100 val + 100 test each


def _draw(rng: np.random.Generator, c: int, size: int) -> Image.Image:
    img = Image.fromarray(rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8))
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    color = tuple(int(v) for v in rng.integers(150, 256, size=3))
    draw = ImageDraw.Draw(img)
    (draw.ellipse if c % 2 else draw.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=color)
    return img


def _folder(root: Path, per_split: dict, classes: int, make) -> Path:
    """Write the ImageFolder once; reused while its file count matches."""
    want = sum(per_split.values()) * classes
    if root.is_dir() and sum(1 for p in root.rglob("*") if p.is_file()) == want:
        return root
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make(rng, c, d / f"{i:05d}")
    return root


def listing_folder() -> Path:
    return _folder(LISTING_DIR, {"train": 1800, "val": 100, "test": 100}, 10,
                   lambda rng, c, stem: _draw(rng, c, 8).save(stem.with_suffix(".png")))


def jpeg_folder(n_per_class: int) -> Path:
    """Real JPEGs of 500x375 (Pascal/ImageNet photo size)."""
    return _folder(JPEG_DIR / str(n_per_class), {"train": n_per_class, "val": 2, "test": 2}, 4,
                   lambda rng, c, stem: _draw(rng, c, 400).resize((500, 375)).save(stem.with_suffix(".jpg"), quality=90))


def bench_listing(repeats: int) -> dict:
    root = listing_folder()
    cache = ROOT / "runs" / "bench" / "listing-cache"
    times = {"list": [], "decode": [], "cached": []}
    for _ in range(repeats):  # alternated; all three on a warm page cache
        t0 = time.perf_counter()
        ds = list_dataset(DataConfig(root=str(root)))
        times["list"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        list_dataset(DataConfig(root=str(root), verify=True))  # the full decode check every rank used to run
        times["decode"].append(time.perf_counter() - t0)
        list_dataset(DataConfig(root=str(root), verify=True), cache_dir=cache)
        t0 = time.perf_counter()
        list_dataset(DataConfig(root=str(root), verify=True), cache_dir=cache)  # a restart: the check from the manifest
        times["cached"].append(time.perf_counter() - t0)
    n = sum(len(s) for s in ds.splits.values())
    lst, dec, cached = (statistics.median(times[k]) for k in ("list", "decode", "cached"))
    return {"listing_files": n, "listing_seconds": round(lst, 3), "listing_decode_scan_seconds": round(dec, 2),
            "listing_verify_from_manifest_seconds": round(cached, 3),
            "listing_vs_decode_scan_speedup": round(dec / lst, 1)}


def _cpu_seconds() -> float:
    """This process (DALI threads included) and its finished children (DataLoader workers, joined on release)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _loader_pass(cfg: DataConfig, epochs: int) -> tuple[float, float]:
    """(img/s over epochs after the first batch, CPU ms per image over everything) for one fresh loader."""
    split = list_dataset(cfg, ("train",)).splits["train"]
    n, t0, c0 = 0, None, _cpu_seconds()
    for epoch in range(epochs):
        for x, _ in build_train_loader(cfg, split, 1, 0, 0, epoch, channels_last=True):
            if t0 is None:
                t0 = time.perf_counter()  # the first batch (pipeline start, worker start-up) is excluded
                continue
            n += len(x)
    rate = n / (time.perf_counter() - t0)
    release_loaders()
    gc.collect()
    time.sleep(0.3)
    return rate, (_cpu_seconds() - c0) * 1000 / (epochs * (len(split) // cfg.batch_size) * cfg.batch_size)


def bench_loaders(repeats: int, quick: bool) -> dict:
    root = jpeg_folder(32 if quick else 64)
    base = dict(root=str(root), image_size=224, eval_resize=256, batch_size=32, workers=2)
    backends = ("dali", "torchvision") if dali_available() else ("torchvision",)
    res: dict[str, list] = {b: [] for b in backends}
    for _ in range(repeats):
        for b in backends:
            res[b].append(_loader_pass(DataConfig(**base, backend=b), 2 if quick else 3))
    out = {"data_images": len(list_dataset(DataConfig(**base), ("train",)).splits["train"]), "data_crop_px": 224,
           "data_threads": 2}
    for b in backends:
        out[f"data_{b}_img_per_s"] = round(statistics.median(r for r, _ in res[b]), 1)
        out[f"data_{b}_cpu_ms_per_img"] = round(statistics.median(c for _, c in res[b]), 2)
    if "dali" in res:
        out["data_dali_vs_torchvision_speedup"] = round(out["data_dali_img_per_s"] / out["data_torchvision_img_per_s"], 3)
        out["data_dali_vs_torchvision_cpu_cost_ratio"] = round(
            out["data_torchvision_cpu_ms_per_img"] / out["data_dali_cpu_ms_per_img"], 3)
    return out


def run(quick: bool = False) -> dict:
    repeats = 1 if quick else 3
    figures = bench_listing(repeats)
    figures.update(bench_loaders(repeats, quick))
    return figures


if __name__ == "__main__":
    import argparse
    import logging

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition, fewer images")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(args.quick), indent=2))
