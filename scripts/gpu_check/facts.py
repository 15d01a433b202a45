"""Steps ``facts`` (the machine and the torch build), ``data`` (the check's own JPEG photos, drawn in seconds) and
``preflight`` (train.hardware.decide for this GPU: what a job started here would do)."""
from __future__ import annotations

import importlib.metadata
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw

from scripts.gpu_check.common import CLASSES, Ctx

SPLITS = ("train", "val", "test")   # images per class: Sizes.per_class (2,400 JPEGs in all on a GPU)
SIZE_RANGE = (400, 480)


def facts(ctx: Ctx) -> dict:
    f = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
         "arch_list": list(torch.cuda.get_arch_list()), "cuda_available": torch.cuda.is_available(),
         "cpu_count": os.cpu_count(), "tiny": ctx.tiny}
    for dist in ("torchvision", "deepspeed", "pydantic", "onnx", "onnxruntime", "numpy"):
        try:   # the installed version, without importing it (DeepSpeed's import alone takes seconds)
            f[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            f[dist] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        f.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                 multiprocessors=p.multi_processor_count, gpu_count=torch.cuda.device_count())
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if r.returncode == 0 and r.stdout.strip():
            driver, sm, sm_max = (x.strip() for x in r.stdout.splitlines()[0].split(","))
            f.update(driver=driver, sm_clock_idle=sm, sm_clock_max=sm_max)
    return f


_NOISE: list = []


def _noise() -> Image.Image:
    """One sensor-noise tile per worker process (grey 128 +- noise), cropped at a random offset for each photo and
    added in C by ImageChops (fresh numpy noise for every pixel would dominate the step's time)."""
    if not _NOISE:
        tile = np.random.default_rng(1).normal(128, 5, (SIZE_RANGE[1] + 64,) * 2 + (3,))
        _NOISE.append(Image.fromarray(np.clip(tile, 0, 255).astype(np.uint8)))
    return _NOISE[0]


def _draw(job) -> None:
    """One photo-like JPEG: a class-coloured gradient background, 2-4 class-dependent shapes, sensor noise."""
    path, cls, seed = job
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(*SIZE_RANGE, size=2))
    hue = np.array([(cls * 97) % 256, (cls * 57 + 80) % 256, (cls * 151 + 30) % 256], np.float32)
    corners = np.clip(0.4 * hue + rng.normal(0, 30, (2, 2, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(corners).resize((w, h), Image.BILINEAR)   # a smooth gradient in one resize
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 5))):
        r = int(rng.integers(min(w, h) // 10, min(w, h) // 4))
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        color = tuple(int(np.clip(c + rng.normal(0, 25), 0, 255)) for c in (255 - hue))
        kind = cls % 5
        box = [cx - r, cy - r, cx + r, cy + r]
        if kind == 0:
            d.ellipse(box, fill=color)
        elif kind == 1:
            d.rectangle(box, fill=color)
        elif kind == 2:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        elif kind == 3:
            d.line([(cx - r, cy - r), (cx + r, cy + r)], fill=color, width=max(3, r // 4))
            d.line([(cx - r, cy + r), (cx + r, cy - r)], fill=color, width=max(3, r // 4))
        else:
            d.ellipse(box, outline=color, width=max(3, r // 5))
        if cls >= 5:   # classes 5-9: the same shapes, striped
            for k in range(-r, r, max(6, r // 4)):
                d.line([(cx + k, cy - r), (cx + k, cy + r)], fill=tuple(int(c) for c in hue), width=2)
    oy, ox = (int(v) for v in rng.integers(0, 64, size=2))
    noisy = ImageChops.add(img, _noise().crop((ox, oy, ox + w, oy + h)), scale=1.0, offset=-128)   # img + noise
    noisy.save(path, quality=int(rng.integers(80, 95)))


def data(ctx: Ctx) -> dict:
    t0 = time.perf_counter()
    jobs = []
    for s_i, (split, n) in enumerate(zip(SPLITS, ctx.sizes.per_class)):
        for c in range(CLASSES):
            folder = ctx.data / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(folder / f"{i:04d}.jpg", c, (s_i * CLASSES + c) * 10_000 + i) for i in range(n)]
    with mp.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_draw, jobs, chunksize=16)
    files = list(ctx.data.rglob("*.jpg"))
    sizes = [Image.open(files[0]).size, Image.open(files[-1]).size]
    return {"images": len(files), "classes": CLASSES, "splits": {s: n * CLASSES for s, n in zip(SPLITS, ctx.sizes.per_class)},
            "min_side_px": min(min(s) for s in sizes), "seconds": round(time.perf_counter() - t0, 1),
            "bytes": sum(p.stat().st_size for p in files), "root": str(ctx.data)}


def preflight(ctx: Ctx) -> dict:
    from train.config import load_config
    from train.hardware import decide, local_facts

    facts_here = local_facts()
    out = {}
    for engine in ("ddp", "deepspeed"):
        cfg = load_config(None, [f"data.root={ctx.data}", f"engine={engine}"])
        out[engine] = decide(cfg, facts_here).to_dict()
    problems = out["ddp"]["problems"]
    if problems:
        raise RuntimeError("preflight refuses the default job on this machine: " + " ".join(problems))
    return out
