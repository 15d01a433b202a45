"""One step of the GPU check in its own process: ``python -m scripts.gpu_check.step NAME --out DIR --work DIR
[--tiny]``. Writes <work>/steps/NAME.json ({status: ok|skipped|failed, reason, figures}); the runner
(scripts/gpu_check/__main__.py) times it, kills it at its timeout, and folds it into gpu_check.json."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from functools import partial
from pathlib import Path

from scripts.gpu_check import facts, onnx_gpu, resume, throughput, zero
from scripts.gpu_check.common import CheckFailed, Ctx, Skip

# In the order they run; the runner's budget skips the tail first, so the costly, optional ones come last.
STEPS = {
    "facts": facts.facts,
    "data": facts.data,
    "preflight": facts.preflight,
    "throughput_se_resnet50_bf16": partial(throughput.run, model="se_resnet50", precision="bf16"),
    "throughput_resnet50_bf16": partial(throughput.run, model="resnet50", precision="bf16"),
    "throughput_se_resnet50_fp16": partial(throughput.run, model="se_resnet50", precision="fp16"),
    "throughput_resnet50_fp16": partial(throughput.run, model="resnet50", precision="fp16"),
    "train_resume": resume.run,
    "deepspeed_bf16": zero.bf16,
    "deepspeed_fp16_overflow": zero.fp16,
    "onnx_export_gpu": onnx_gpu.run,
    "dali_serving": onnx_gpu.dali_serving,
    "tensorrt_fp16": onnx_gpu.tensorrt,
    "compile_se_resnet50_bf16": partial(throughput.run, model="se_resnet50", precision="bf16", compiled=True),
}
# Steps that cannot run without CUDA outside --tiny: the runner skips them without starting a process when step
# ``facts`` found no CUDA (each step also checks for itself).
HOST_STEPS = ("facts", "data", "preflight")
NEEDS_CUDA = tuple(n for n in STEPS if n not in HOST_STEPS)


def run_step(name: str, ctx: Ctx) -> dict:
    try:
        figures = STEPS[name](ctx)
        return {"status": "ok", "reason": "", "figures": figures}
    except Skip as err:
        return {"status": "skipped", "reason": str(err), "figures": {}}
    except CheckFailed as err:
        return {"status": "failed", "reason": str(err), "figures": err.figures}
    except Exception as err:  # noqa: BLE001 - any crash is this step's failure, with its last frames
        traceback.print_exc()
        where = traceback.extract_tb(err.__traceback__)[-1]
        return {"status": "failed", "figures": {},
                "reason": f"{type(err).__name__}: {str(err).strip()[:600]} ({Path(where.filename).name}:{where.lineno})"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.gpu_check.step")
    p.add_argument("name", choices=list(STEPS))
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ctx = Ctx(Path(a.out), Path(a.work), a.tiny)
    result = run_step(a.name, ctx)
    dst = ctx.work / "steps" / f"{a.name}.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(result, indent=1, default=str))
    print(f"[{a.name}] {result['status']} {result['reason']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
