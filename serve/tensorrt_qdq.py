"""TensorRT's explicit-quantization rules, checked on a Q/DQ ONNX file without TensorRT or a GPU.

A Q/DQ file that breaks one of these fails only at `trtexec`/init-container time on a GPU node (a crash-looping
rollout); `serve quantize` runs `check_tensorrt_qdq` before it writes the TensorRT file, and the tests and
`make bench` run it on the files they produce. The rules, from TensorRT's "Working with Quantized Types"
(https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html) and the
onnx-tensorrt Q/DQ importer (onnx/onnx-tensorrt#850: DequantizeLinear of INT32 is refused, it takes INT8/FP8/INT4):

- int8 Q/DQ only (our recipe): every zero point is an INT8 constant. A missing zero point means UINT8 in ONNX.
- Symmetric: every zero point is 0 ("TRT only supports symmetric quantization - zeroPt must be all zeros").
- Scales are build-time constants, finite and > 0.
- Activations are quantized per tensor: per-channel scales only on weights (constant inputs of DequantizeLinear).
- Per-channel weights are quantized along their output channels: axis 0 of a Conv weight (K), of a Gemm weight with
  transB=1 ([N, K]) and 1 without ([K, N]); the last axis of a MatMul weight ([K, N]). These are the axes ONNX Runtime
  picks (onnxruntime/quantization/operators/gemm.py QDQGemm: default_axis 0 if transB else 1; matmul.py: 1). A
  negative axis counts from the end (axis=-4 of a 4-D weight is 0).
- Scales are FLOAT (float32), and no Q/DQ node sets `block_size` (blocked quantization is INT4 weight-only, not int8).
- No DequantizeLinear of INT32 (ONNX Runtime's quantized biases, its default `QuantizeBias`).
"""
from __future__ import annotations

from pathlib import Path

from serve.errors import ServeError
from serve.trt_onnx import QDQ_OPS

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def weight_channel_axis(node, rank: int) -> int:
    """The output-channel axis of the weight (input 1) of a Conv, Gemm or MatMul node with a ``rank``-D weight."""
    from onnx import helper

    if node.op_type == "Gemm":
        return 0 if next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0) else 1
    return rank - 1 if node.op_type == "MatMul" else 0


def check_tensorrt_qdq(path: str | Path) -> list[str]:
    """Every violation of the rules above in the ONNX file at ``path``, one short sentence each; [] when TensorRT can
    build it as an explicitly quantized int8 engine."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    g = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:  # Constant nodes are build-time constants too
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    qdq = [n for n in g.node if n.op_type in QDQ_OPS]
    if not qdq:
        return ["it has no QuantizeLinear/DequantizeLinear nodes (not an explicitly quantized file)"]
    problems: list[str] = []
    for n in qdq:
        where = f"{n.op_type} '{n.name or n.output[0]}'"
        scale = consts.get(n.input[1])
        zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if scale is None:
            problems.append(f"{where}: its scale is not a constant")
        elif scale.dtype != np.float32:
            problems.append(f"{where}: its scale is {scale.dtype.name.upper()}, TensorRT's int8 Q/DQ takes FLOAT scales")
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{where}: a scale is not finite and positive")
        if any(a.name == "block_size" and helper.get_attribute_value(a) for a in n.attribute):
            problems.append(f"{where}: sets block_size (blocked quantization), TensorRT's int8 is per tensor or per channel")
        if zp is None:
            problems.append(f"{where}: no constant INT8 zero point (a missing one means UINT8)")
        elif zp.dtype != np.int8:
            problems.append(f"{where}: zero point is {zp.dtype.name.upper()}, TensorRT imports INT8 Q/DQ here")
        elif zp.any():
            problems.append(f"{where}: zero point is not 0 (TensorRT quantizes symmetrically)")
        x = consts.get(n.input[0])
        if n.op_type == "DequantizeLinear" and x is not None and x.dtype == np.int32:
            problems.append(f"{where}: dequantizes INT32 (a quantized bias), which onnx-tensorrt refuses")
        if scale is not None and scale.size > 1 and x is None:  # not a weight (a constant input) but an activation
            problems.append(f"{where}: an activation is quantized per channel (TensorRT: per tensor)")
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    for node in (n for n in g.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in dq):
        w = dq[node.input[1]]
        scale, weight = consts.get(w.input[1]), consts.get(w.input[0])
        if scale is None or scale.size <= 1 or weight is None:
            continue
        rank = weight.ndim
        got = next((helper.get_attribute_value(a) for a in w.attribute if a.name == "axis"), 1)  # ONNX default 1
        got = got + rank if got < 0 else got
        want = weight_channel_axis(node, rank)
        if got != want:
            problems.append(f"{node.op_type} '{node.name}': weights quantized per channel along axis {got}, "
                            f"TensorRT takes axis {want} (output channels)")
    return problems


def require_tensorrt_qdq(path: str | Path, what: str = "") -> None:
    """Raise one ServeError sentence naming the first violations when TensorRT could not build ``path`` as int8."""
    problems = check_tensorrt_qdq(path)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ServeError(f"{what or Path(path).name} breaks TensorRT's explicit-quantization rules: "
                         f"{'; '.join(problems[:3])}{more}; quantize it with 'python -m serve quantize --target tensorrt'.")
