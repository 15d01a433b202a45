"""Step ``onnx_export_gpu``: the trained checkpoint (step train_resume's, else a fresh seeded model) exported to ONNX
on the GPU (torch.onnx.export of the served model, WithSoftmax, from CUDA tensors), then ONNX Runtime's answers on
real images (the check's own test JPEGs through the serving eval transform, serve.export.eval_batch) compared with a
reference: the same model on the GPU in fp32 with TF32 OFF (cuDNN and matmul), so the tolerance is fp32's. The
TF32-on difference is recorded beside it. Plus the other served targets this machine may lack (DALI, TensorRT)."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import torch

from scripts.gpu_check.common import CLASSES, ROOT, TINY_THREADS, CheckFailed, Ctx, Skip, need_module

ATOL = 1e-4   # softmax probabilities, fp32 on both sides


def _model(ctx: Ctx):
    from train.inference import load_for_inference
    from train.config import load_config
    from train.models import create_model

    ckpt = ctx.figures("train_resume").get("checkpoint")
    if ckpt:
        model, cfg, _ = load_for_inference(ckpt)
        return model, cfg, ckpt
    cfg = load_config(None, [f"data.root={ctx.data}", f"data.image_size={ctx.sizes.train_image}",
                             f"data.eval_resize={ctx.sizes.train_image + ctx.sizes.train_image // 8}"])
    torch.manual_seed(0)
    return create_model(cfg.model, CLASSES, load_pretrained=False).eval(), cfg, None


def run(ctx: Ctx) -> dict:
    device = ctx.device
    need_module("onnxruntime", "ONNX Runtime")
    from serve.contract import INPUT_NAME, OUTPUT_NAME
    from serve.export import WithSoftmax, eval_batch, ort_session

    if device.type == "cpu":
        torch.set_num_threads(TINY_THREADS)
    model, cfg, ckpt = _model(ctx)
    every = sorted((ctx.data / "test").rglob("*.jpg"))
    files = every[:: max(1, len(every) // ctx.sizes.onnx_images)][: ctx.sizes.onnx_images]   # all classes
    batch = eval_batch([p.read_bytes() for p in files], cfg)
    served = WithSoftmax(model).eval().to(device)
    path = ctx.work / "onnx" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        torch.onnx.export(served, (batch[:2].to(device),), str(path), dynamo=False, opset_version=17,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    export_s = time.perf_counter() - t0

    def reference(tf32: bool) -> np.ndarray:
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            with torch.inference_mode():
                return served(batch.to(device)).float().cpu().numpy()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

    ref, ref_tf32 = reference(False), reference(True)
    got = ort_session(path, threads=TINY_THREADS if device.type == "cpu" else 0).run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    figures = {"checkpoint": ckpt, "images": len(files), "image_px": int(batch.shape[-1]), "export_seconds": round(export_s, 2),
               "onnx_bytes": path.stat().st_size, "max_abs_diff_vs_fp32_tf32_off": diff,
               "max_abs_diff_tf32_on_vs_off": float(np.abs(ref_tf32 - ref).max()),
               "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()), "atol": ATOL,
               "onnx": str(path), "device": str(device)}
    if diff > ATOL:
        raise CheckFailed(figures, f"ONNX exported on {device} differs from the fp32 (TF32 off) reference by {diff:.3g} > {ATOL}")
    return figures


def dali_serving(ctx: Ctx) -> dict:
    """scripts/gpu_dali_check.py on the trained checkpoint: the DALI serving preprocess with nvJPEG vs the python one."""
    if not torch.cuda.is_available():
        raise Skip("no CUDA")
    need_module("nvidia.dali", "NVIDIA DALI")
    ckpt = ctx.figures("train_resume").get("checkpoint")
    if not ckpt:
        raise Skip("no trained checkpoint (step train_resume did not finish)")
    out = ctx.work / "dali_serving"
    r = subprocess.run([sys.executable, "-m", "scripts.gpu_dali_check", ckpt, str(out)], cwd=ROOT, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError("scripts.gpu_dali_check: " + " | ".join((r.stdout + r.stderr).strip().splitlines()[-5:]))
    import json
    return json.loads((out / "dali_serving.json").read_text())


def tensorrt(ctx: Ctx) -> dict:
    """fp16 TensorRT plan of the exported ONNX vs ONNX Runtime (scripts/gpu_serving_check.sh), where TensorRT is."""
    if not torch.cuda.is_available():
        raise Skip("no CUDA")
    need_module("tensorrt", "TensorRT")
    onnx = ctx.figures("onnx_export_gpu").get("onnx")
    if not onnx:
        raise Skip("no ONNX model (step onnx_export_gpu did not finish)")
    out = ctx.work / "tensorrt"
    r = subprocess.run(["bash", "scripts/gpu_serving_check.sh", "--onnx", onnx, "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("gpu_serving_check.sh: " + " | ".join((r.stdout + r.stderr).strip().splitlines()[-5:]))
    import json
    return json.loads((out / "report.json").read_text())
