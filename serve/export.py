"""ONNX export of a checkpoint (opset 17, dynamic batch, softmax in the graph) with a PyTorch parity check; the export
folder the repository writer reads (int8: serve/quantize.py)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from serve.contract import EXPORT_LABELS, EXPORT_ONNX, EXPORT_SPEC, INPUT_NAME, OUTPUT_NAME
from serve.errors import ServeError
from serve.model_card import training_report, write_model_card
from train.checkpoint import CheckpointError
from train.config import ConfigError
from train.inference import load_for_inference
from train.provenance import provenance
from train.transforms import EvalSpec, decode_image, eval_transform

log = logging.getLogger(__name__)

OPSET = 17
PARITY_ATOL = 1e-4              # max |p_onnx - p_torch| over all classes and images


class WithSoftmax(nn.Module):
    """The classifier as served: probabilities, so scores from the classification extension read as confidences."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


def load_checkpoint(checkpoint: str | Path):
    """(model, cfg, classes) via train.inference.load_for_inference; its errors become one-sentence ServeErrors."""
    try:
        return load_for_inference(checkpoint)
    except (CheckpointError, ConfigError) as err:
        raise ServeError(str(err)) from None


def eval_batch(images: Sequence[bytes], cfg) -> torch.Tensor:
    """Encoded images -> [N, 3, S, S] through the training eval transform (the same code preprocess runs)."""
    spec = EvalSpec.from_data_config(cfg.data)
    tf = eval_transform(spec)
    return torch.stack([tf(decode_image(b, cfg.serve.max_image_bytes, cfg.serve.max_image_pixels, spec)) for b in images])


def serving_spec(cfg, classes: list[str]) -> dict:
    """What a Triton repository needs besides the ONNX: the eval-transform spec, the serving limits, the classes."""
    d, sv = cfg.data, cfg.serve
    return {
        "eval": EvalSpec.from_data_config(d).to_dict(),
        "serve": {k: getattr(sv, k) for k in ("max_batch_size", "preferred_batch_sizes", "max_queue_delay_us", "instances",
                                              "preprocess_instances", "max_image_bytes", "max_image_pixels")}
                 | ({"max_request_bytes": sv.max_request_bytes} if hasattr(sv, "max_request_bytes") else {}),
        "classes": list(classes),
    }


def write_spec(out_dir: str | Path, cfg, classes: list[str], checkpoint: str | Path | None = None) -> Path:
    """Write ``serving_spec.json`` and ``labels.txt`` into an export folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = serving_spec(cfg, classes)
    if checkpoint is not None:
        spec["checkpoint"] = str(Path(checkpoint).resolve())
    (out / EXPORT_SPEC).write_text(json.dumps(spec, indent=2))
    (out / EXPORT_LABELS).write_text("".join(f"{c}\n" for c in classes))
    return out / EXPORT_SPEC


def read_export(export_dir: str | Path) -> dict:
    """The serving spec of an export folder, checked: ONNX + serving_spec.json + labels.txt."""
    d = Path(export_dir)
    missing = [n for n in (EXPORT_ONNX, EXPORT_SPEC, EXPORT_LABELS) if not (d / n).is_file()]
    if missing:
        raise ServeError(f"export folder '{d}' lacks {', '.join(missing)}; write it with 'python -m serve export --checkpoint CKPT --out {d}'.")
    try:
        spec = json.loads((d / EXPORT_SPEC).read_text())
        labels = [line for line in (d / EXPORT_LABELS).read_text().splitlines() if line.strip()]
        for key in ("image_size", "eval_resize", "mean", "std"):
            spec["eval"][key]
        spec["serve"]["max_batch_size"]
    except (ValueError, KeyError, TypeError) as err:
        raise ServeError(f"'{d / EXPORT_SPEC}' is not a serving spec ({type(err).__name__}: {err}); export again with 'python -m serve export'.") from None
    if labels != spec.get("classes", labels):
        raise ServeError(f"'{d / EXPORT_LABELS}' does not list the classes of '{d / EXPORT_SPEC}'; export again with 'python -m serve export'.")
    spec["classes"] = labels
    return spec


def _read_images(images: Optional[Iterable[str | Path]], limit: int = 64) -> dict[str, bytes]:
    if images:
        from serve.images import find_images

        files = find_images(images)[:limit]
        if not files:
            raise ServeError("no image files found in the given paths; pass JPEG/PNG files or folders of them.")
        return {str(p): p.read_bytes() for p in files}
    from serve.images import sample_image_bytes

    return sample_image_bytes()


def ort_session(path: str | Path, threads: int = 0, spinning: bool = True):
    """A CPU ONNX Runtime session; ``spinning=False`` when other processes (image decoders) share its cores."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def parity(model: nn.Module, onnx_path: str | Path, batch: torch.Tensor, atol: float = PARITY_ATOL) -> dict:
    """Compare ONNX Runtime against PyTorch eager on the same normalised batch."""
    with torch.inference_mode():
        ref = WithSoftmax(model).eval()(batch).numpy()
    got = ort_session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    # A top-1 flip is only a failure when PyTorch's own top-2 margin is wider than the tolerance.
    srt = np.sort(ref, axis=1)
    decisive = (srt[:, -1] - srt[:, -2]) > 2 * atol
    agree = ref.argmax(1) == got.argmax(1)
    return {
        "images": int(batch.shape[0]),
        "max_abs_diff": diff,
        "top1_agreement": float(agree.mean()),
        "decisive_top1_disagreements": int((~agree & decisive).sum()),
        "atol": atol,
        "ok": bool(diff <= atol and not (~agree & decisive).any()),
    }


def export_onnx(checkpoint: str | Path, out_dir: str | Path, images: Optional[Iterable[str | Path]] = None,
                atol: float = PARITY_ATOL, opset: int = OPSET) -> dict:
    """Write ``out_dir/model.onnx`` (+ labels.txt, serving_spec.json, export_report.json), check it with onnx.checker and against PyTorch on real images.

    Raises ServeError when the parity check fails. Returns the report dict (also written as JSON).
    """
    import onnx

    model, cfg, classes = load_checkpoint(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    size = cfg.data.image_size
    dummy = torch.zeros(2, 3, size, size)
    t0 = time.perf_counter()
    with torch.inference_mode():
        torch.onnx.export(
            WithSoftmax(model).eval(), (dummy,), str(onnx_path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True,
        )
    export_s = time.perf_counter() - t0
    onnx.checker.check_model(str(onnx_path), full_check=True)
    write_spec(out, cfg, classes, checkpoint)
    named = _read_images(images)
    report = {
        "onnx": str(onnx_path),
        "opset": opset,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)]},
        "classes": classes,
        "onnx_bytes": onnx_path.stat().st_size,
        "export_seconds": round(export_s, 2),
        "parity": {"files": sorted(named), **parity(model, onnx_path, eval_batch(list(named.values()), cfg), atol)},
    }
    trained = training_report(checkpoint) or {}
    report["provenance"] = {**provenance(cfg.to_dict()), **{k: v for k, v in (trained.get("provenance") or {}).items()
                                                             if k == "data_fingerprint"}}
    (out / "export_report.json").write_text(json.dumps(report, indent=2))
    write_model_card(out, cfg, classes, report, checkpoint)
    p = report["parity"]
    if not p["ok"]:
        raise ServeError(
            f"ONNX parity check failed: max |ONNX - PyTorch| = {p['max_abs_diff']:.2e} (tolerance {atol:.0e}), "
            f"top-1 agreement {p['top1_agreement']:.3f}; the exported graph does not match the checkpoint.")
    return report
