"""The ONNX side of the TensorRT plan recipe (serve/tensorrt.py): what an ONNX file holds (input size, Q/DQ
nodes, fp16 weights), its fp16-typed copy for a strongly typed fp16 plan, and trtexec's performance summary."""
from __future__ import annotations

import re
from pathlib import Path

from serve.contract import INPUT_NAME
from serve.errors import ServeError

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _onnx_graph(onnx_path: str | Path):
    import onnx

    p = Path(onnx_path)
    if not p.is_file():
        raise ServeError(f"ONNX model '{p}' does not exist; run 'python -m serve export' first.")
    return onnx.load(str(p), load_external_data=False).graph


def onnx_image_size(onnx_path: str | Path) -> int:
    for inp in _onnx_graph(onnx_path).input:
        if inp.name == INPUT_NAME:
            return int([d.dim_value for d in inp.type.tensor_type.shape.dim][-1])
    raise ServeError(f"'{onnx_path}' has no input named '{INPUT_NAME}'; export it with 'python -m serve export'.")


def onnx_has_qdq(onnx_path: str | Path) -> bool:
    return any(n.op_type in QDQ_OPS for n in _onnx_graph(onnx_path).node)


def onnx_is_fp16(onnx_path: str | Path) -> bool:
    """True when the graph's weights are fp16 (the fp16-typed copy of ``write_fp16_onnx``)."""
    from onnx import TensorProto

    return any(t.data_type == TensorProto.FLOAT16 for t in _onnx_graph(onnx_path).initializer)


def _sort_topologically(graph) -> None:
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ServeError("the fp16 ONNX has a node whose inputs no other node produces; it cannot be ordered.")
        for n in ready:
            known.update(n.output)
        ordered += ready
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def write_fp16_onnx(src: str | Path, dst: str | Path) -> Path:
    """The fp16-typed copy of an fp32 ONNX, input and output kept fp32 (Casts at the edges), for a strongly typed
    fp16 plan. ONNX Runtime's own converter (onnxruntime/transformers/float16.py: convert_float_to_float16,
    keep_io_types) with its default list of ops left in fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if onnx_has_qdq(src):
        raise ServeError(f"'{src}' carries Q/DQ nodes: it builds as int8 only, not fp16; pass --precision int8.")
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _sort_topologically(model.graph)   # the converter appends its input Casts last; TensorRT's parser reads in order
    onnx.checker.check_model(model)
    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


_PERF_LINES = {"Throughput": "throughput_qps", "Latency": "latency_ms", "GPU Compute Time": "gpu_compute_ms"}


def parse_trtexec_perf(text: str) -> dict:
    """The performance summary of a ``trtexec --loadEngine`` run: throughput (batches/s) and latency stats (ms)."""
    out: dict = {}
    for line in text.splitlines():
        m = re.search(r"\] (Throughput|Latency|GPU Compute Time): (.*)$", line)
        if not m:
            continue
        key, rest = _PERF_LINES[m[1]], m[2]
        if key == "throughput_qps":
            out[key] = float(rest.split()[0])
        else:
            out[key] = {k.replace("percentile(", "p").rstrip("%)"): float(v)
                        for k, v in re.findall(r"([a-z]+|percentile\(\d+(?:\.\d+)?%\)) = ([\d.eE+-]+) ms", rest)}
    if "throughput_qps" not in out or "latency_ms" not in out:
        raise ServeError("trtexec printed no performance summary (Throughput/Latency lines); see its log.")
    return out
