"""Explicit int8: ONNX Runtime's static QDQ quantizer, calibrated on real training images through the eval transform.

`quantize_int8` turns the exported fp32 ONNX into a QDQ ONNX (QuantizeLinear/DequantizeLinear around every Conv, the
Gemm, the residual Adds and the SE blocks), in one of two flavours, because no one file is right for both runtimes:

- TensorRT (`activations="int8"`, `serve quantize --target tensorrt`, model.int8.onnx): symmetric signed int8 for
  activations AND weights (zero point 0) and float biases. TensorRT imports only symmetric int8 Q/DQ ("TRT only
  supports symmetric quantization - zeroPt must be all zeros",
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html), and its ONNX
  importer refuses DequantizeLinear of INT32 (onnx/onnx-tensorrt#850), which is how ORT stores quantized biases by
  default; `QuantizeBias: False` keeps them float (onnxruntime/quantization/qdq_quantizer.py reads it, ORT 1.32).
  The file is checked against TensorRT's rules (serve/tensorrt_qdq.py) before it is written.
- CPU (`activations="uint8"`, `--target cpu`, model.int8.cpu.onnx): ORT's CPU recipe, uint8 activations and int32
  biases, which its CPU kernels run fused (QLinearConv). On a Zen 4 CPU with VNNI it ran ~3x faster than fp32 while
  the TensorRT file ran slower than fp32 (0.79x / 0.64x at batch 1 / 16), same top-1: a CPU repository serves it.
- Per-channel weights: per-output-channel scales keep ResNet convolutions accurate (ORT's quantize_static docstring).
- reduce_range (7-bit weights, still symmetric int8 with zero point 0, so TensorRT takes it): on x86 CPUs without VNNI
  (AVX2 only) ONNX Runtime's int8 kernels add u8*s8 products pairwise in int16 (VPMADDUBSW) and saturate; the ORT
  docstring advises reduce_range there. Measured on such a host: without it 36-46% of a small CNN's top-1 answers
  changed; with it the demo model's changed on 0.6% of the test split.
- Softmax and Sigmoid stay fp32: an int8 softmax quantises the probabilities to 1/127 steps, making top-1 ties.
- `quant_pre_process` first (shape inference + graph optimisation, as ORT recommends before static quantization).
- Static, not dynamic: dynamic int8 of convolutions measured 3-12x slower than fp32 on CPU.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from serve.contract import EXPORT_INT8_CPU_ONNX, EXPORT_INT8_ONNX, EXPORT_ONNX, INPUT_NAME, INT8_TARGETS, OUTPUT_NAME
from serve.errors import ServeError
from serve.export import ort_session
from serve.tensorrt_qdq import require_tensorrt_qdq
from train.transforms import EvalSpec, ImageDecodeError, decode_image, eval_transform

QUANT_OPS = ["Conv", "Gemm", "Add", "Mul", "GlobalAveragePool", "Relu", "Flatten"]  # not Softmax/Sigmoid (see above)
MAX_TOP1_DISAGREEMENT = 0.02    # largest fraction of validation images whose top-1 may change
MAX_ACCURACY_DROP = 0.01        # largest top-1 accuracy loss (fraction) on labelled validation images
CALIB_BATCH = 32
# Per target: activation type and ORT extra_options (onnxruntime/quantization/quantize.py documents the keys).
ACTIVATIONS = {"tensorrt": "int8", "cpu": "uint8"}
TARGET_FILES = {"tensorrt": EXPORT_INT8_ONNX, "cpu": EXPORT_INT8_CPU_ONNX}
# DedicatedQDQPair: an activation read by several quantized nodes (a residual block's input: its first Conv and the
# Add; the SE block's input: GlobalAveragePool and Mul) gets its own Q/DQ pair per reader instead of one shared pair,
# as ORT's qdq_quantizer.py says TensorRT wants ("In TRT, QDQ pair can't be shared between nodes") and as NVIDIA's
# ONNX PTQ for TensorRT (TensorRT Model Optimizer's trt_guided_options) sets it: each pair is then fused into its own
# consumer. Same scale and zero point per pair, so the numbers are unchanged. QDQOpTypePerChannelSupportToAxis is
# not needed: ORT's default axes are already TensorRT's for the ops quantized here (Conv 0, Gemm with transB 0), and
# serve/tensorrt_qdq.py checks them.
TENSORRT_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False, "DedicatedQDQPair": True}
CPU_OPTIONS = {"ActivationSymmetric": False, "WeightSymmetric": True}   # ORT's defaults: int32 biases


def eval_spec(spec) -> EvalSpec:
    """The eval-transform spec from any of: EvalSpec, a Config (``.data``), a DataConfig, a serving spec dict
    ({"eval": {...}}, as written next to an export) or the bare eval dict (image_size, eval_resize, mean, std)."""
    if isinstance(spec, EvalSpec):
        return spec
    if hasattr(spec, "data") and hasattr(spec.data, "image_size"):
        return EvalSpec.from_data_config(spec.data)
    if hasattr(spec, "image_size") and hasattr(spec, "eval_resize"):
        return EvalSpec.from_data_config(spec)
    if isinstance(spec, dict):
        d = spec.get("eval", spec)
        try:
            return EvalSpec.from_dict(d)
        except (KeyError, TypeError, ValueError) as err:
            raise ServeError(f"the spec has no usable eval transform ({type(err).__name__}: {err}); pass the export "
                             "folder's serving_spec.json or the training config.") from None
    raise ServeError(f"cannot read an eval-transform spec from a {type(spec).__name__}; pass a training config or "
                     "the export folder's serving_spec.json as a dict.")


def pixels(paths: Sequence[Path], spec) -> np.ndarray:
    """Image files -> float32 [N, 3, S, S] through the training eval transform (what preprocess serves)."""
    es = eval_spec(spec)
    tf = eval_transform(es)
    out = []
    for p in paths:
        try:
            out.append(tf(decode_image(Path(p).read_bytes(), spec=es)).numpy())
        except (OSError, ImageDecodeError) as err:
            raise ServeError(f"image '{p}' cannot be used for int8 calibration/validation ({err}); remove it.") from None
    return np.stack(out).astype(np.float32)


def session(path: str | Path, threads: int = 0):
    """A CPU ONNX Runtime session with all graph optimisations (which fuse DQ->Conv->Q into QLinearConv)."""
    return ort_session(path, threads)


def predict(sess, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def sample(paths: Iterable[Path], n: int, seed: int = 0) -> list[Path]:
    """n files drawn without replacement (seeded, order-independent); all of them when there are fewer."""
    files = sorted(Path(p) for p in paths)
    return files if len(files) <= n else random.Random(seed).sample(files, n)


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a pixel array, CALIB_BATCH images per call."""

    def __init__(self, x: np.ndarray):
        self.batches = iter([x[i:i + CALIB_BATCH] for i in range(0, len(x), CALIB_BATCH)])

    def get_next(self):
        b = next(self.batches, None)
        return None if b is None else {INPUT_NAME: b}


def _labels(paths: Sequence[Path], classes: Optional[Sequence[str]]) -> Optional[np.ndarray]:
    """Class indices from ImageFolder parent-folder names, or None when any file's folder is not a class."""
    if not classes:
        return None
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(Path(p).parent.name) for p in paths]
    return None if any(v is None for v in labels) else np.array(labels)


def drift(fp32: np.ndarray, int8: np.ndarray, labels: Optional[np.ndarray] = None) -> dict:
    """Top-1 disagreement of two probability arrays, and both accuracies when labels are known."""
    a, b = fp32.argmax(1), int8.argmax(1)
    out = {"images": int(len(a)), "top1_disagreement": float((a != b).mean()),
           "max_abs_prob_diff": float(np.abs(fp32 - int8).max())}
    if labels is not None:
        out["fp32_top1"] = float((a == labels).mean())
        out["int8_top1"] = float((b == labels).mean())
        out["top1_drop_points"] = 100.0 * (out["fp32_top1"] - out["int8_top1"])
    return out


def quantize_int8(onnx_in: Path, onnx_out: Path, calibration_images: list[Path], spec, n: int = 256, *,
                  validation_images: Optional[Sequence[Path]] = None, classes: Optional[Sequence[str]] = None,
                  activations: str = "int8", method: str = "minmax", reduce_range: bool = True, seed: int = 0,
                  max_disagreement: float = MAX_TOP1_DISAGREEMENT, max_accuracy_drop: float = MAX_ACCURACY_DROP) -> dict:
    """Write ``onnx_out``: a static QDQ int8 model calibrated on ``n`` of ``calibration_images`` (training images).

    ``spec``: a training config or a serving-spec dict (see `eval_spec`); ``classes`` defaults to spec["classes"].
    ``validation_images`` (default: up to 256 calibration images not drawn for calibration): fp32 and int8 are
    compared on them; labels come from their parent folders when those are class names. Raises ServeError when the
    top-1 disagreement exceeds ``max_disagreement`` or the accuracy drop exceeds ``max_accuracy_drop``.
    Returns the report (also written as ``<onnx_out stem>_report.json``): sizes, size ratio, drift, seconds.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    if not onnx_in.is_file():
        raise ServeError(f"ONNX model '{onnx_in}' does not exist; run 'python -m serve export' first.")
    if n < 1 or not calibration_images:
        raise ServeError("int8 calibration needs training images (n >= 1); pass the training split, e.g. data/animals/train.")
    if activations not in ("int8", "uint8"):
        raise ServeError(f"activations must be 'int8' (symmetric: TensorRT) or 'uint8' (ONNX Runtime on CPUs), not {activations!r}.")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ServeError(f"calibration method must be one of {', '.join(methods)}, not {method!r}.")
    if classes is None and isinstance(spec, dict):
        classes = spec.get("classes")
    calib = sample(calibration_images, n, seed)
    if validation_images is None:
        chosen = set(calib)
        validation_images = sample([p for p in calibration_images if Path(p) not in chosen], 256, seed + 1)
    t0 = time.perf_counter()
    x_cal = pixels(calib, spec)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quant-", dir=onnx_out.parent) as tmp:
        prepped, written = Path(tmp) / "prepped.onnx", Path(tmp) / onnx_out.name
        quant_pre_process(str(onnx_in), str(prepped), skip_symbolic_shape=True)
        act = QuantType.QInt8 if activations == "int8" else QuantType.QUInt8
        quantize_static(
            str(prepped), str(written), _Reader(x_cal), quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANT_OPS,
            per_channel=True, reduce_range=reduce_range, activation_type=act, weight_type=QuantType.QInt8, calibrate_method=methods[method],
            extra_options=dict(TENSORRT_OPTIONS if activations == "int8" else CPU_OPTIONS))
        onnx.checker.check_model(str(written))
        if activations == "int8":  # the TensorRT file: refused here, not on the GPU node that builds the plan
            require_tensorrt_qdq(written, f"the int8 file for TensorRT ({onnx_out.name})")
        written.replace(onnx_out)
    seconds = time.perf_counter() - t0
    report = {"onnx_fp32": str(onnx_in), "onnx_int8": str(onnx_out), "activations": activations, "method": method,
              "target": "tensorrt" if activations == "int8" else "cpu",
              "reduce_range": reduce_range,
              "calibration_images": len(calib), "quantize_seconds": round(seconds, 2),
              "fp32_bytes": onnx_in.stat().st_size, "int8_bytes": onnx_out.stat().st_size}
    report["size_ratio"] = report["int8_bytes"] / report["fp32_bytes"]
    report["qdq_nodes"] = qdq_summary(onnx_out)
    if validation_images:
        x_val = pixels(list(validation_images), spec)
        report["validation"] = drift(predict(session(onnx_in), x_val), predict(session(onnx_out), x_val),
                                     _labels(list(validation_images), classes))
    (onnx_out.parent / f"{onnx_out.stem}_report.json").write_text(json.dumps(report, indent=2))
    v = report.get("validation")
    if v and v["top1_disagreement"] > max_disagreement:
        raise ServeError(f"int8 changed the top-1 of {v['top1_disagreement']:.1%} of {v['images']} validation images "
                         f"(bound {max_disagreement:.1%}); calibrate on more training images or serve fp32.")
    if v and "top1_drop_points" in v and v["top1_drop_points"] > 100 * max_accuracy_drop:
        raise ServeError(f"int8 lost {v['top1_drop_points']:.2f} points of top-1 on {v['images']} validation images "
                         f"(bound {100 * max_accuracy_drop:.2f}); calibrate on more training images or serve fp32.")
    return report


def quantize_export(export_dir: str | Path, calibration_images: list[Path], targets: Sequence[str] = INT8_TARGETS,
                    **kwargs) -> dict[str, dict]:
    """Quantize an export folder's model.onnx for each of ``targets``: 'tensorrt' -> model.int8.onnx (symmetric,
    TensorRT's rules checked), 'cpu' -> model.int8.cpu.onnx (uint8 activations). ``kwargs`` go to `quantize_int8`;
    the spec is the folder's serving_spec.json. Returns {target: report}."""
    from serve.export import read_export

    bad = [t for t in targets if t not in INT8_TARGETS]
    if bad or not targets:
        raise ServeError(f"unknown int8 target(s) {bad}; choose from {', '.join(INT8_TARGETS)}.")
    d = Path(export_dir)
    spec = read_export(d)
    return {t: quantize_int8(d / EXPORT_ONNX, d / TARGET_FILES[t], calibration_images, spec, activations=ACTIVATIONS[t],
                             **kwargs) for t in targets}


def qdq_summary(path: str | Path) -> dict:
    """Counts of QuantizeLinear/DequantizeLinear nodes and of Convs whose data input and weight both come from DQ."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    producer = {o: node.op_type for node in g.node for o in node.output}
    convs = [node for node in g.node if node.op_type == "Conv"]

    def from_dq(name: str) -> bool:
        return producer.get(name) == "DequantizeLinear"

    return {"QuantizeLinear": sum(node.op_type == "QuantizeLinear" for node in g.node),
            "DequantizeLinear": sum(node.op_type == "DequantizeLinear" for node in g.node),
            "Conv": len(convs), "Conv_int8": sum(from_dq(c.input[0]) and from_dq(c.input[1]) for c in convs)}


def latency_ms(sess, x: np.ndarray, repeats: int) -> float:
    """Median ms of ``repeats`` runs of one batch (after one warm-up run)."""
    sess.run([OUTPUT_NAME], {INPUT_NAME: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run([OUTPUT_NAME], {INPUT_NAME: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def compare_latency(fp32_onnx: Path, int8_onnx: Path, x: np.ndarray, batch_sizes=(1, 16), threads: int = 2,
                    rounds: int = 5, repeats: int = 10) -> dict:
    """fp32 vs int8 latency, same threads, alternated round by round (fp32, int8, fp32, ...); medians of rounds."""
    sessions = {"fp32": session(fp32_onnx, threads), "int8": session(int8_onnx, threads)}
    out = {}
    for b in batch_sizes:
        xb = np.resize(x, (b,) + x.shape[1:]).astype(np.float32)
        ms = {k: [] for k in sessions}
        for r in range(rounds):
            order = list(sessions) if r % 2 == 0 else list(sessions)[::-1]
            for k in order:
                ms[k].append(latency_ms(sessions[k], xb, repeats))
        for k in sessions:
            out[f"{k}_latency_ms_b{b}"] = float(np.median(ms[k]))
        out[f"int8_vs_fp32_b{b}_speedup"] = out[f"fp32_latency_ms_b{b}"] / out[f"int8_latency_ms_b{b}"]
    out["threads"] = threads
    return out
