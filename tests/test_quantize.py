"""serve.quantize: static QDQ int8 of a small real model trained here on real PNGs (the ops of SE-ResNet50: Conv/BN/
ReLU, residual Add, a squeeze-excitation block, Gemm, Softmax), calibrated through the project's eval transform; the
TensorRT file held to TensorRT's explicit-quantization rules (serve/tensorrt_qdq.py)."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from torch import nn

import serve.quantize as quantize
from serve.contract import EXPORT_INT8_CPU_ONNX, EXPORT_INT8_ONNX, EXPORT_ONNX, INPUT_NAME, OUTPUT_NAME
from serve.errors import ServeError
from serve.evaluate import evaluate_folder
from serve.export import WithSoftmax, write_spec
from serve.quantize import eval_spec, pixels, predict, quantize_export, quantize_int8, session
from serve.tensorrt_qdq import check_tensorrt_qdq
from serve.repository import write_model_repository
from serve.server import TritonServer
from tests.conftest import draw_sample
from train.config import load_config

ROOT = Path(__file__).resolve().parent.parent

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230), "yellow": (230, 210, 40)}
SPEC = {"eval": {"image_size": 32, "eval_resize": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "classes": list(COLOURS)}


def colour_folder(root: Path, counts=(48, 24, 24), seed: int = 0) -> Path:
    """Real PNGs: a shape on a noisy background; the class is the shape's colour (jittered), so a few epochs learn it."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), counts):
        for c, rgb in COLOURS.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.asarray(draw_sample(("circle", "square", "triangle", "cross")[i % 4], rng, 40)).copy()
                mask = img.min(axis=2) >= 150  # the shape's pixels (the background is below 90)
                img[mask] = np.clip(np.array(rgb) + rng.integers(-25, 26, size=3), 0, 255)
                Image.fromarray(img).save(root / split / c / f"{i:03d}.png")
    return root


EPOCHS = 4


class TinySE(nn.Module):
    """Stem conv, one residual block with squeeze-excitation, pool, linear head: ~0.1 M parameters. BatchNorm only
    in the stem (folded into the conv by quant_pre_process, as in SE-ResNet50): a few epochs train it stably."""

    def __init__(self, classes: int = 4, width: int = 48):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, width // 4, 1), nn.ReLU(),
                                nn.Conv2d(width // 4, width, 1), nn.Sigmoid())
        self.head = nn.Sequential(nn.Conv2d(width, 4 * width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * width, classes))

    def forward(self, x):
        x = self.stem(x)
        y = self.body(x)
        return self.head(torch.relu(x + y * self.se(y)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(fp32 ONNX, image folder): TinySE trained a few epochs on 4 colour classes, exported with softmax."""
    root = colour_folder(tmp_path_factory.mktemp("q") / "images")
    files = sorted((root / "train").rglob("*.png"))
    x = torch.from_numpy(pixels(files, SPEC))
    y = torch.tensor([SPEC["classes"].index(p.parent.name) for p in files])
    torch.manual_seed(0)
    model = TinySE()
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(EPOCHS):
        for i in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    out = root.parent / "model.onnx"
    with torch.inference_mode():
        torch.onnx.export(WithSoftmax(model).eval(), (x[:2],), str(out), dynamo=False, opset_version=17,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return out, root


def _qdq_nodes(g):
    return [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def test_static_qdq_int8_is_symmetric_small_and_agrees_with_fp32(trained, tmp_path):
    fp32, root = trained
    train = sorted((root / "train").rglob("*.png"))
    held_out = sorted((root / "val").rglob("*.png")) + sorted((root / "test").rglob("*.png"))
    out = tmp_path / "model.int8.onnx"
    report = quantize_int8(fp32, out, train, SPEC, n=128, validation_images=held_out)

    # Q/DQ around every Conv: data input and weight both come from DequantizeLinear, and the Gemm too.
    g = onnx.load(str(out)).graph
    producer = {o: n.op_type for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type in ("Conv", "Gemm"):
            assert producer.get(n.input[0]) == "DequantizeLinear" and producer.get(n.input[1]) == "DequantizeLinear", n.name
    assert report["qdq_nodes"]["Conv_int8"] == report["qdq_nodes"]["Conv"] == 6
    # TensorRT imports only symmetric signed int8 Q/DQ: every zero point is an int8 zero, and no DQ of INT32: the
    # Conv/Gemm biases stay float initializers (onnx-tensorrt refuses ORT's default int32 bias DequantizeLinear).
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    zps = [inits[n.input[2]] for n in _qdq_nodes(g)]
    assert zps and not any(z.any() for z in zps) and {z.dtype for z in zps} == {np.dtype(np.int8)}
    biases = [n.input[2] for n in g.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2]]
    assert len(biases) >= 6 and all(inits[b].dtype == np.float32 for b in biases)
    assert check_tensorrt_qdq(out) == [] and report["target"] == "tensorrt"
    # Dedicated Q/DQ pairs (TensorRT fuses each pair into its one consumer): no Q/DQ output is read by two nodes,
    # though the residual input (first Conv and Add) and the SE input (GlobalAveragePool and Mul) have two readers.
    readers = Counter(i for n in g.node for i in n.input)
    assert not [n.name for n in _qdq_nodes(g) if readers[n.output[0]] > 1]
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and producer.get(n.input[0]) == "Softmax" for n in g.node)
    # Weights stored as int8 with per-channel scales: the file shrinks ~4x.
    assert report["size_ratio"] < 0.35, report["size_ratio"]
    # ONNX Runtime runs it; fp32 learnt the task and int8 keeps its answers.
    v = report["validation"]
    assert v["images"] == len(held_out) == 192
    assert v["fp32_top1"] >= 0.9, v
    assert v["top1_disagreement"] <= 0.03 and v["top1_drop_points"] <= 2.0, v
    x = pixels(held_out[:5], SPEC)
    p8 = predict(session(out), x)
    assert p8.shape == (5, 4) and np.allclose(p8.sum(1), 1, atol=1e-3)
    assert (out.parent / "model.int8_report.json").is_file()


def test_cpu_file_is_ort_cpu_recipe_and_tensorrt_rules_refuse_it(trained, tmp_path):
    """The CPU file: uint8 activations and int32 biases (ORT's fused CPU kernels); the TensorRT check names both."""
    fp32, root = trained
    train = sorted((root / "train").rglob("*.png"))
    r = quantize_int8(fp32, tmp_path / "u8.onnx", train, SPEC, n=16, activations="uint8")
    assert r["calibration_images"] == 16 and r["activations"] == "uint8" and r["target"] == "cpu"
    assert r["validation"]["images"] == len(train) - 16  # default validation: training images not drawn for calibration
    g = onnx.load(str(tmp_path / "u8.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    assert any(inits[n.input[2]].dtype == np.uint8 for n in g.node if n.op_type == "QuantizeLinear")
    problems = " | ".join(check_tensorrt_qdq(tmp_path / "u8.onnx"))
    assert "zero point is UINT8" in problems and "dequantizes INT32" in problems, problems


def test_quantize_refuses_to_write_a_tensorrt_file_that_breaks_its_rules(trained, tmp_path, monkeypatch):
    """ORT's default QuantizeBias (int32 bias DequantizeLinear, the file onnx-tensorrt refuses) is caught before the
    file is written: one sentence, no file."""
    fp32, root = trained
    train = sorted((root / "train").rglob("*.png"))
    monkeypatch.setattr(quantize, "TENSORRT_OPTIONS", {**quantize.TENSORRT_OPTIONS, "QuantizeBias": True})
    out = tmp_path / EXPORT_INT8_ONNX
    with pytest.raises(ServeError, match=r"breaks TensorRT's explicit-quantization rules: .*dequantizes INT32") as err:
        quantize_int8(fp32, out, train, SPEC, n=16, validation_images=[])
    assert "\n" not in str(err.value) and not out.exists() and list(tmp_path.iterdir()) == []


def _mutated(src: Path, dst: Path, edit) -> Path:
    m = onnx.load(str(src))
    edit(m.graph, {t.name: t for t in m.graph.initializer})
    onnx.save(m, str(dst))
    return dst


def _set(inits, name, array):
    inits[name].CopyFrom(numpy_helper.from_array(array, name))


@pytest.fixture(scope="module")
def tensorrt_file(trained, tmp_path_factory):
    fp32, root = trained
    out = tmp_path_factory.mktemp("trt") / EXPORT_INT8_ONNX
    quantize_int8(fp32, out, sorted((root / "train").rglob("*.png")), SPEC, n=16, validation_images=[])
    return out


def test_tensorrt_rules_check_names_each_defect(trained, tensorrt_file, tmp_path):
    """Each rule fails on a file that breaks it alone (mutations of the good TensorRT file) and on the fp32 file."""
    good = tensorrt_file
    assert check_tensorrt_qdq(good) == []
    g = onnx.load(str(good)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    act_q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)
    conv_w = next(n for n in g.node if n.op_type == "DequantizeLinear" and inits.get(n.input[1], np.zeros(1)).size > 1)

    def zp_one(graph, ini):
        _set(ini, act_q.input[2], np.array(1, np.int8))

    def scale_negative(graph, ini):
        _set(ini, act_q.input[1], -numpy_helper.to_array(ini[act_q.input[1]]))

    def axis_one(graph, ini):
        node = next(n for n in graph.node if n.output == conv_w.output)
        node.attribute.remove(next(a for a in node.attribute if a.name == "axis"))  # ONNX default axis: 1

    gemm = next(n for n in g.node if n.op_type == "Gemm")   # the head: transB=1, its weight [N, K] per channel on 0
    gemm_w = next(n for n in g.node if n.output[0] == gemm.input[1])
    assert inits[gemm_w.input[1]].size > 1 and any(a.name == "transB" and a.i == 1 for a in gemm.attribute)

    def set_axis(output, value):
        def edit(graph, ini):
            node = next(n for n in graph.node if n.output[0] == output)
            a = next((a for a in node.attribute if a.name == "axis"), None)
            if a is None:
                node.attribute.append(onnx.helper.make_attribute("axis", value))
            else:
                a.i = value
        return edit

    def gemm_not_transposed(graph, ini):   # [N, K] read as [K, N]: the output channels are now axis 1
        next(a for a in next(n for n in graph.node if n.name == gemm.name).attribute if a.name == "transB").i = 0

    def gemm_as_matmul(graph, ini):   # a MatMul weight [K, N] has its output channels on the last axis
        node = next(n for n in graph.node if n.name == gemm.name)
        node.op_type = "MatMul"
        del node.attribute[:]

    def scale_fp16(graph, ini):
        _set(ini, act_q.input[1], numpy_helper.to_array(ini[act_q.input[1]]).astype(np.float16))

    def blocked(graph, ini):
        next(n for n in graph.node if n.output == conv_w.output).attribute.append(onnx.helper.make_attribute("block_size", 16))

    cases = {"zero point is not 0": zp_one, "scale is not finite and positive": scale_negative,
             "TensorRT takes axis 0": axis_one,
             "Conv '": set_axis(conv_w.output[0], -3),   # -3 of a 4-D weight is 1
             "Gemm '": set_axis(gemm_w.output[0], 1), "Gemm '{}': weights quantized per channel along axis 0, "
             "TensorRT takes axis 1".format(gemm.name): gemm_not_transposed,
             "MatMul '{}': weights quantized per channel along axis 0, TensorRT takes axis 1".format(gemm.name): gemm_as_matmul,
             "takes FLOAT scales": scale_fp16, "sets block_size": blocked}
    for needle, edit in cases.items():
        problems = check_tensorrt_qdq(_mutated(good, tmp_path / "bad.onnx", edit))
        assert problems and all(needle in p for p in problems), (needle, problems)  # a Q and its DQ share constants
    # A negative axis counts from the end: -4 of a 4-D Conv weight and -2 of the 2-D Gemm weight are axis 0.
    assert check_tensorrt_qdq(_mutated(good, tmp_path / "neg.onnx", set_axis(conv_w.output[0], -4))) == []
    assert check_tensorrt_qdq(_mutated(good, tmp_path / "neg.onnx", set_axis(gemm_w.output[0], -2))) == []
    assert check_tensorrt_qdq(trained[0]) == ["it has no QuantizeLinear/DequantizeLinear nodes (not an explicitly quantized file)"]


def test_bounds_and_user_errors_are_one_sentence(trained, tmp_path):
    fp32, root = trained
    train = sorted((root / "train").rglob("*.png"))
    with pytest.raises(ServeError, match="top-1 of"):
        quantize_int8(fp32, tmp_path / "a.onnx", train, SPEC, n=8, max_disagreement=-1.0)
    with pytest.raises(ServeError, match="does not exist; run 'python -m serve export' first"):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "b.onnx", train, SPEC)
    with pytest.raises(ServeError, match="needs training images"):
        quantize_int8(fp32, tmp_path / "c.onnx", [], SPEC)
    with pytest.raises(ServeError, match="unknown int8 target"):
        quantize_export(tmp_path, train, ["gpu"])
    with pytest.raises(ServeError, match="activations must be"):
        quantize_int8(fp32, tmp_path / "d.onnx", train, SPEC, activations="fp8")
    with pytest.raises(ServeError, match="no usable eval transform"):
        eval_spec({"eval": {"image_size": 32}})
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ServeError, match="cannot be used for int8 calibration"):
        pixels([bad], SPEC)
    assert eval_spec(SPEC) == eval_spec(SPEC["eval"])


def _export_folder(fp32: Path, d: Path) -> Path:
    """An export folder (model.onnx, serving_spec.json, labels.txt) around the trained TinySE."""
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(fp32, d / EXPORT_ONNX)
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.image_size={SPEC['eval']['image_size']}",
                                                       f"data.eval_resize={SPEC['eval']['eval_resize']}"])
    write_spec(d, cfg, SPEC["classes"])
    return d


def test_quantize_cli_as_documented(trained, tmp_path):
    """`serve quantize --export DIR --calib-images TRAIN --val-images VAL [--max-drift F]` (docs/serving.md): both files,
    the TensorRT one within TensorRT's rules; a drift bound it cannot meet is one sentence and exit code 2."""
    import subprocess
    import sys

    fp32, root = trained
    export = _export_folder(fp32, tmp_path / "export")
    cmd = [sys.executable, "-m", "serve", "quantize", "--export", str(export), "--calib-images", str(root / "train"),
           "--val-images", str(root / "val"), "--n", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(tensorrt)" in proc.stdout and "(cpu)" in proc.stdout and "images 96" in proc.stdout, proc.stdout
    assert check_tensorrt_qdq(export / EXPORT_INT8_ONNX) == [] and check_tensorrt_qdq(export / EXPORT_INT8_CPU_ONNX)
    bad = subprocess.run(cmd[:-1] + ["8", "--target", "cpu", "--max-drift", "-1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "changed the top-1" in bad.stderr, bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_int8_repository_is_served_by_tritonserver_with_the_accuracy_it_has_in_process(trained, tmp_path):
    """`serve quantize` (both files) in an export folder -> `serve repository --target int8` (the CPU file) -> the
    real tritonserver -> `serve evaluate` on the held-out test split: the served top-1 is what ONNX Runtime gives
    in-process on the same images (one answer of slack for thread-order rounding), and the task is still learnt."""
    fp32, root = trained
    export = _export_folder(fp32, tmp_path / "export")
    train = sorted((root / "train").rglob("*.png"))
    reports = quantize_export(export, train, n=128)
    assert set(reports) == {"cpu", "tensorrt"} and check_tensorrt_qdq(export / EXPORT_INT8_ONNX) == []
    repo = write_model_repository(export, tmp_path / "repo", "int8")
    assert (repo / "se_resnet50" / "1" / EXPORT_ONNX).read_bytes() == (export / EXPORT_INT8_CPU_ONNX).read_bytes()

    test = sorted((root / "test").rglob("*.png"))
    truth = np.array([SPEC["classes"].index(p.parent.name) for p in test])
    in_process = float((predict(session(export / EXPORT_INT8_CPU_ONNX), pixels(test, SPEC)).argmax(1) == truth).mean())
    with TritonServer(repo, ready_timeout=300) as server:
        r = evaluate_folder(server.grpc_url, root / "test", "grpc", tmp_path / "eval", progress=False, concurrency=4)
    assert r["images"] == len(test) == 96 and r["errors"] == 0, r
    assert abs(r["top1"] - in_process) <= 1 / len(test) + 1e-9, (r["top1"], in_process)
    assert r["top1"] >= 0.9, r["top1"]
