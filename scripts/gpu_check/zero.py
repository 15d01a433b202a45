"""Steps ``deepspeed_bf16`` and ``deepspeed_fp16_overflow``, through the Trainer (engine=deepspeed, one process, its
own single-rank group) on the synthetic batch of the throughput steps.
- bf16: ZeRO-1 and ZeRO-2 next to DDP (engine=ddp): images/s and peak memory of each.
- fp16: ZeRO stages 0, 1 and 2. A stage the trainer refuses (train.hardware.decide) is recorded with its sentence.
  Otherwise, after a few steps, an inf is injected into one parameter's gradient (a tensor hook on the leaf): the
  step must be skipped (weights unchanged) and the loss scale must fall; the next steps must train again.
Each engine runs in a process of its own (``python -m scripts.gpu_check.zero``): DeepSpeed keeps its process groups
in module globals that go stale once a run's group is destroyed, and a fresh process also makes each peak memory
figure that engine's alone."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from scripts.gpu_check.common import ROOT, CheckFailed, Ctx, Skip, WindowClock, need_module, peak_gib, reset_peak
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


def _spawn(ctx: Ctx, what: str, engine: str, stage: int) -> dict:
    """One engine in a fresh process; its log goes to this step's, its result is the last line of its stdout."""
    cmd = [sys.executable, "-m", "scripts.gpu_check.zero", what, engine, str(stage), str(ctx.out), str(ctx.work)]
    r = subprocess.run(cmd + (["--tiny"] if ctx.tiny else []), cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(r.stdout[-3000:] + r.stderr[-6000:])
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} ZeRO-{stage} {what} exited {r.returncode}: "
                           + " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:]))
    return json.loads(lines[-1])


def bf16(ctx: Ctx) -> dict:
    ctx.device   # noqa: B018 - skipped without CUDA
    need_module("deepspeed", "DeepSpeed")
    out = {"batch": ctx.sizes.ds_batch, "image_px": ctx.sizes.image, "steps": ctx.sizes.ds_steps}
    for engine, stage in (("ddp", 0), ("deepspeed", 1), ("deepspeed", 2)):
        out["ddp" if engine == "ddp" else f"zero{stage}"] = _spawn(ctx, "bf16", engine, stage)
    if out["ddp"]["peak_gib"]:
        for z in ("zero1", "zero2"):
            out[f"{z}_peak_vs_ddp"] = round(out[z]["peak_gib"] / out["ddp"]["peak_gib"], 3)
    return out


def _bf16_one(ctx: Ctx, engine: str, stage: int) -> dict:
    device = ctx.device
    trainer = _trainer(ctx, engine, stage, "bf16")
    try:
        reset_peak(device)
        _steps(trainer, ctx, device, 2)             # warm-up (cudnn.benchmark, DeepSpeed's buckets)
        clock = _steps(trainer, ctx, device, ctx.sizes.ds_steps)
        return {"img_s": clock.images_per_second(), "peak_gib": peak_gib(device)}
    finally:
        trainer.close()


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


def _refusal(ctx: Ctx, stage: int):
    """The trainer's own verdict on fp16 at this stage (train.hardware.decide), without building anything."""
    from train.hardware import decide, local_facts

    cfg = _config(ctx, "se_resnet50", "fp16", ctx.sizes.ds_batch, str(ctx.work / "zero" / "check"),
                  ("engine=deepspeed", f"deepspeed.zero_stage={stage}"))
    problems = decide(cfg, local_facts()).problems
    return " ".join(problems) if problems else None


def fp16(ctx: Ctx) -> dict:
    device = ctx.device
    if device.type != "cuda":
        raise Skip("fp16 loss scaling is a CUDA path")
    need_module("deepspeed", "DeepSpeed")
    out, bad = {}, []
    for stage in (0, 1, 2):
        refused = _refusal(ctx, stage)
        res = {"refused": refused} if refused else _spawn(ctx, "fp16", "deepspeed", stage)
        out[f"zero{stage}"] = res
        if not refused and not res["ok"]:
            bad.append(f"ZeRO-{stage}")
    if bad:
        raise CheckFailed(out, f"fp16 overflow not handled at {', '.join(bad)}: the step must be skipped and the "
                               f"loss scale must fall")
    return out


def _fp16_one(ctx: Ctx, stage: int) -> dict:
    device = ctx.device
    trainer = _trainer(ctx, "deepspeed", stage, "fp16")
    try:
        _steps(trainer, ctx, device, 3)
        module = trainer.backend.module
        before, scale0 = _snapshot(module), loss_scale(trainer.backend)
        skipped0 = getattr(trainer.backend.engine, "skipped_steps", None)
        param = next(p for p in module.parameters() if p.requires_grad)
        hook = param.register_hook(lambda g: torch.full_like(g, math.inf))   # this step's gradient overflows
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
        return res
    finally:
        trainer.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.gpu_check.zero")
    p.add_argument("what", choices=("bf16", "fp16"))
    p.add_argument("engine", choices=("ddp", "deepspeed"))
    p.add_argument("stage", type=int)
    p.add_argument("out")
    p.add_argument("work")
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    ctx = Ctx(Path(a.out), Path(a.work), a.tiny)
    res = _bf16_one(ctx, a.engine, a.stage) if a.what == "bf16" else _fp16_one(ctx, a.stage)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
