"""Steps ``throughput_<model>_<precision>`` and ``compile_se_resnet50_bf16``: training images/s of our Trainer (its own
epoch loop, train.loop.train_one_epoch, over its DDP backend) against a plain PyTorch loop, on the SAME synthetic
batch already on the device: same model (train.models.create_model), optimizer (train.optim.build_optimizer, fused),
precision (autocast; fp16 with a GradScaler), channels_last and cudnn.benchmark. Each side: a few warm-up steps,
then 3 windows of 30 steps, the median window's rate, and the peak memory. Sides alternate (ABBA) between batches."""
from __future__ import annotations

import gc
from contextlib import nullcontext

import torch
from torch import nn

from scripts.gpu_check.common import CLASSES, TINY_THREADS, Ctx, Skip, WindowClock, peak_gib, reset_peak


def _config(ctx: Ctx, model: str, precision: str, batch: int, out: str, extra: tuple = ()):
    from train.config import load_config

    s = ctx.sizes
    return load_config(None, [
        f"output_dir={out}", f"data.root={ctx.data}", "data.backend=torchvision", f"data.batch_size={batch}",
        f"data.image_size={s.image}", f"data.eval_resize={s.image}", "data.workers=0", "data.class_weights=false",
        f"model.name={model}", "model.stem=imagenet", "optim.name=sgd", f"train.precision={precision}",
        "train.channels_last=on", "train.checkpoint_every_steps=0", "train.resume=false", "metrics.enabled=false",
        f"train.threads={TINY_THREADS if ctx.tiny else 0}", *extra])


def _batch(ctx: Ctx, batch: int, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, ctx.sizes.image, ctx.sizes.image, generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last), torch.arange(batch) % 100


def _clock(ctx: Ctx, x, index, device) -> WindowClock:
    s = ctx.sizes
    return WindowClock(x, index, device, s.warmup, s.windows, s.window_steps)


def _compile(module: nn.Module, ctx: Ctx) -> None:
    # nn.Module.compile compiles the module's forward in place, so the Trainer's backend calls the compiled model
    # without a hook in the Trainer. --tiny: the eager backend (graph capture only; no C++/Triton code generation).
    module.compile(**({"backend": "eager"} if ctx.tiny else {}))


def plain_side(ctx: Ctx, cfg, x, index, device, compiled: bool) -> dict:
    from train.models import create_model
    from train.optim import build_optimizer

    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model, CLASSES).to(device).to(memory_format=torch.channels_last).train()
    if compiled:
        _compile(model, ctx)
    opt = build_optimizer(cfg, model, fused=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    fp16 = cfg.train.precision == "fp16"
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    amp = (nullcontext() if cfg.train.precision == "fp32" else
           torch.autocast(device.type, dtype=torch.float16 if fp16 else torch.bfloat16))
    target = (index % CLASSES).to(device)
    clock = _clock(ctx, x, index, device)
    reset_peak(device)
    for images, _ in clock:
        with amp:
            logits = model(images)
        loss = loss_fn(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    return {"img_s": clock.images_per_second(), "peak_gib": peak_gib(device), "sm_clock_mhz": clock.clocks[1:]}


def trainer_side(ctx: Ctx, cfg, x, index, device, compiled: bool) -> dict:
    from train.engine import Trainer
    from train.loop import train_one_epoch

    trainer = Trainer(cfg)
    try:
        if compiled:
            _compile(trainer.backend.module, ctx)
        trainer.backend.train()
        clock = _clock(ctx, x, index, device)
        reset_peak(device)
        train_one_epoch(trainer, clock, clock.steps, 0, "trainer")
        return {"img_s": clock.images_per_second(), "peak_gib": peak_gib(device), "sm_clock_mhz": clock.clocks[1:]}
    finally:
        trainer.close()


def run(ctx: Ctx, model: str, precision: str, compiled: bool = False) -> dict:
    device = ctx.device
    if precision == "fp16" and device.type != "cuda":
        raise Skip("fp16 with a GradScaler needs CUDA (the trainer refuses it on a CPU)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # as the Trainer sets it on a GPU
    else:
        torch.set_num_threads(TINY_THREADS)     # as the Trainer sets it from train.threads
    batches = ctx.sizes.batches[-1:] if compiled else ctx.sizes.batches   # compile: the smaller batch, to fit 90 s
    figures = {"model": model, "precision": precision, "compiled": compiled, "channels_last": True,
               "image_px": ctx.sizes.image, "windows": ctx.sizes.windows, "window_steps": ctx.sizes.window_steps,
               "warmup_steps": ctx.sizes.warmup}
    for i, batch in enumerate(batches):
        x, index = _batch(ctx, batch, device)
        res = {}
        sides = ("plain", "trainer") if i % 2 == 0 else ("trainer", "plain")
        for side in sides:
            cfg = _config(ctx, model, precision, batch, str(ctx.work / "throughput" / f"{model}-{precision}-{batch}"))
            fn = plain_side if side == "plain" else trainer_side
            res[side] = fn(ctx, cfg, x, index, device, compiled)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        figures[f"b{batch}"] = {
            "plain_img_s": res["plain"]["img_s"], "trainer_img_s": res["trainer"]["img_s"],
            "trainer_vs_plain": round(res["trainer"]["img_s"] / res["plain"]["img_s"], 3),
            "plain_peak_gib": res["plain"]["peak_gib"], "trainer_peak_gib": res["trainer"]["peak_gib"],
            "sm_clock_mhz": res["plain"]["sm_clock_mhz"] + res["trainer"]["sm_clock_mhz"]}
    return figures
