"""Steps ``deepspeed_bf16`` and ``deepspeed_fp16_overflow``, through the Trainer (engine=deepspeed, one process, its
own single-rank group) on the synthetic batch of the throughput steps.
- bf16: ZeRO-1 and ZeRO-2 next to DDP (engine=ddp): images/s and peak memory of each.
- fp16: ZeRO stages 0, 1 and 2. A stage the trainer refuses (train.hardware.decide) is recorded with its sentence.
  Otherwise, after a few steps, an inf is injected into one parameter's gradient (a tensor hook on the leaf): the
  step must be skipped (weights unchanged) and the loss scale must fall; the next steps must train again."""
from __future__ import annotations

import gc
import math
import os

import torch

from scripts.gpu_check.common import CheckFailed, Ctx, Skip, WindowClock, need_module, peak_gib, reset_peak
from scripts.gpu_check.throughput import _batch, _config


def _trainer(ctx: Ctx, engine: str, stage: int, precision: str):
    from train.distributed import free_port
    from train.engine import Trainer

    # a fresh single-rank rendezvous for every engine this process builds (setup_distributed keeps one it finds)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cfg = _config(ctx, "se_resnet50", precision, ctx.sizes.ds_batch, str(ctx.work / "zero" / f"{engine}{stage}{precision}"),
                  (f"engine={engine}", f"deepspeed.zero_stage={stage}"))
    return Trainer(cfg)


def _steps(trainer, ctx: Ctx, device, n: int) -> WindowClock:
    from train.loop import train_one_epoch

    x, index = _batch(ctx, ctx.sizes.ds_batch, device)
    clock = WindowClock(x, index, device, warmup=0, windows=1, window_steps=n)
    trainer.backend.train()
    train_one_epoch(trainer, clock, clock.steps, 0, "deepspeed")
    return clock


def _close(trainer, device) -> None:
    trainer.close()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bf16(ctx: Ctx) -> dict:
    device = ctx.device
    need_module("deepspeed", "DeepSpeed")
    out = {"batch": ctx.sizes.ds_batch, "image_px": ctx.sizes.image, "steps": ctx.sizes.ds_steps}
    for engine, stage in (("ddp", 0), ("deepspeed", 1), ("deepspeed", 2)):
        name = "ddp" if engine == "ddp" else f"zero{stage}"
        reset_peak(device)
        trainer = _trainer(ctx, engine, stage, "bf16")
        try:
            _steps(trainer, ctx, device, 2)             # warm-up (cudnn.benchmark, DeepSpeed's buckets)
            clock = _steps(trainer, ctx, device, ctx.sizes.ds_steps)
            out[name] = {"img_s": clock.images_per_second(), "peak_gib": peak_gib(device)}
        finally:
            _close(trainer, device)
    if device.type == "cuda":
        for z in ("zero1", "zero2"):
            out[f"{z}_peak_vs_ddp"] = round(out[z]["peak_gib"] / out["ddp"]["peak_gib"], 3)
    return out


def loss_scale(backend):
    """The loss scale DeepSpeed applies in fp16: torch_autocast's GradScaler (the engine's at stage 0, the ZeRO
    optimizer's at 1-2), else DeepSpeed's own fp16 loss scaler (cur_scale)."""
    eng = backend.engine
    for holder, attr in ((eng, "torch_autocast_z0_gradscaler"), (eng.optimizer, "torch_autocast_gradscaler")):
        gs = getattr(holder, attr, None)
        if gs is not None and gs.is_enabled():
            return float(gs.get_scale())
    scale = getattr(eng.optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None


def _snapshot(module) -> dict:
    return {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()
            and "running" not in k and "num_batches" not in k}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def fp16(ctx: Ctx) -> dict:
    device = ctx.device
    if device.type != "cuda":
        raise Skip("fp16 loss scaling is a CUDA path")
    need_module("deepspeed", "DeepSpeed")
    from train.engine import EngineError

    out, bad = {}, []
    for stage in (0, 1, 2):
        try:
            trainer = _trainer(ctx, "deepspeed", stage, "fp16")
        except EngineError as err:
            out[f"zero{stage}"] = {"refused": str(err)}
            continue
        try:
            _steps(trainer, ctx, device, 3)
            module = trainer.backend.module
            before, scale0 = _snapshot(module), loss_scale(trainer.backend)
            skipped0 = getattr(trainer.backend.engine, "skipped_steps", None)
            param = next(p for p in module.parameters() if p.requires_grad)
            hook = param.register_hook(lambda g: torch.full_like(g, math.inf))
            _steps(trainer, ctx, device, 1)
            hook.remove()
            after, scale1 = _snapshot(module), loss_scale(trainer.backend)
            _steps(trainer, ctx, device, 2)
            res = {"loss_scale_before": scale0, "loss_scale_after": scale1,
                   "overflow_step_skipped": _same(before, after),
                   "trains_after_overflow": not _same(after, _snapshot(module)),
                   "engine_skipped_steps": (None if skipped0 is None else
                                            getattr(trainer.backend.engine, "skipped_steps", 0) - skipped0)}
            res["ok"] = bool(res["overflow_step_skipped"] and scale0 and scale1 and scale1 < scale0
                             and res["trains_after_overflow"])
            out[f"zero{stage}"] = res
            if not res["ok"]:
                bad.append(f"ZeRO-{stage}")
        finally:
            _close(trainer, device)
    if bad:
        raise CheckFailed(out, f"fp16 overflow not handled at {', '.join(bad)}: the step must be skipped and the "
                               f"loss scale must fall")
    return out
