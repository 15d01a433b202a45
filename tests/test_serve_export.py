"""Serving without a server: ONNX parity, int8 drift, TensorRT guard + trtexec command, config.pbtxt validity, CLI errors."""
from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve.errors import ServeError
from tests.serve_fixtures import make_checkpoint, reference_probabilities

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from serve.export import export_onnx

    d = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(d / "ckpt")
    report = export_onnx(ckpt, d / "onnx")
    return ckpt, d / "onnx" / "model.onnx", report


def test_onnx_matches_pytorch_on_real_images(exported):
    from serve.export import INPUT_NAME, OUTPUT_NAME, eval_batch, load_checkpoint, ort_session
    from serve.samples import sample_image_bytes

    import onnx

    ckpt, onnx_path, report = exported
    p = report["parity"]
    assert p["ok"] and p["images"] >= 6 and p["max_abs_diff"] < 1e-4 and p["top1_agreement"] == 1.0
    model = onnx.load(str(onnx_path))
    assert model.opset_import[0].version == 17
    assert [i.name for i in model.graph.input] == [INPUT_NAME] and [o.name for o in model.graph.output] == [OUTPUT_NAME]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    # Independent recomputation at another batch size: values, not just success.
    images = list(sample_image_bytes().values())
    _, cfg, _ = load_checkpoint(ckpt)
    got = ort_session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: eval_batch(images[:3], cfg).numpy()})[0]
    ref, _ = reference_probabilities(ckpt, images[:3])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert got.max() > 0.12  # not a uniform answer: the fixture's outputs are informative


def test_parity_failure_is_reported(exported, monkeypatch):
    import serve.export as ex

    ckpt, _, _ = exported
    monkeypatch.setattr(ex, "parity", lambda *a, **k: {"ok": False, "max_abs_diff": 0.5, "top1_agreement": 0.5, "atol": 1e-4})
    with pytest.raises(ServeError, match="parity check failed"):
        ex.export_onnx(ckpt, Path(exported[1]).parent.parent / "bad")


def test_int8_linear_quantization_drift_within_bound(exported, tmp_path):
    from serve.export import quantize_linear_int8
    import onnx

    ckpt, onnx_path, _ = exported
    r = quantize_linear_int8(onnx_path, tmp_path / "model.int8.onnx", ckpt, repeats=3)
    assert r["top1_drift"] <= r["max_drift"] and r["max_abs_prob_diff"] < 0.05
    assert r["int8_bytes"] < r["fp32_bytes"] and r["fp32_latency_ms_b1"] > 0 and r["int8_latency_ms_b8"] > 0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "model.int8.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    assert "ConvInteger" not in ops  # Conv stays fp32 (int8 Conv is 3-12x slower on this CPU)


def test_tensorrt_without_tensorrt_is_one_clear_error(exported):
    from serve.tensorrt import build_plan

    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(ServeError, match=r"^TensorRT is not installed here \(import tensorrt failed\)"):
        build_plan(exported[1], Path(exported[1]).parent / "plans", "fp16")
    proc = subprocess.run([sys.executable, "-m", "serve", "trt", "--onnx", str(exported[1]), "--out", "/tmp/plans"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: TensorRT is not installed here") and len(proc.stderr.strip().splitlines()) == 1
    assert "trtexec --onnx=" in proc.stdout


def test_trtexec_command_matches_profile(exported):
    from serve.tensorrt import init_container_script, trtexec_command

    cmd = trtexec_command(exported[1], "/models/se_resnet50/1/model.sm80.plan", "int8", 1, 16, 32, calib_cache="cal.cache")
    assert cmd[0] == "trtexec" and f"--onnx={exported[1]}" in cmd
    assert "--minShapes=input:1x3x32x32" in cmd and "--optShapes=input:16x3x32x32" in cmd and "--maxShapes=input:32x3x32x32" in cmd
    assert "--int8" in cmd and "--calib=cal.cache" in cmd and "--saveEngine=/models/se_resnet50/1/model.sm80.plan" in cmd
    assert "--fp16" in trtexec_command(exported[1], "p.plan", "fp16") and "--fp16" not in trtexec_command(exported[1], "p.plan", "fp32")
    script = init_container_script("/models/se_resnet50/1/model.onnx", "/models/se_resnet50/1", "fp16", image_size=224)
    assert "nvidia-smi --query-gpu=compute_cap" in script and "model.sm${CC}.plan" in script
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    shlex.split(script.splitlines()[-1].split("then ", 1)[1].rsplit(";", 1)[0])


@pytest.mark.parametrize("target", ["cpu", "onnx", "tensorrt"])
def test_every_config_pbtxt_parses_as_model_config(exported, tmp_path, target):
    from serve.repository import parse_pbtxt, write_model_repository

    ckpt, onnx_path, _ = exported
    repo = write_model_repository(ckpt, tmp_path / "repo", target, onnx_path=onnx_path, ort_tensorrt=(target == "onnx"))
    configs = {p.parent.name: parse_pbtxt(p.read_text()) for p in repo.glob("*/config.pbtxt")}
    expected = {"cpu": {"classify", "preprocess", "se_resnet50"}}.get(target, {"classify", "preprocess", "se_resnet50", "postprocess"})
    assert set(configs) == expected
    cls = configs["se_resnet50"]
    assert [i.name for i in cls.input] == ["input"] and [o.name for o in cls.output] == ["probabilities"]
    assert list(cls.input[0].dims) == [3, 32, 32] and list(cls.output[0].dims) == [10] and cls.output[0].label_filename == "labels.txt"
    assert cls.max_batch_size == 32 and list(cls.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert cls.model_warmup and cls.instance_group[0].count == 1
    assert (repo / "se_resnet50" / "labels.txt").read_text().split() == [
        "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
    if target == "cpu":
        assert cls.backend == "python" and (repo / "se_resnet50/1/model.py").is_file()
    elif target == "onnx":
        assert cls.platform == "onnxruntime_onnx"
        acc = cls.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert acc.name == "tensorrt" and acc.parameters["trt_engine_cache_enable"] == "true"
    else:
        assert cls.platform == "tensorrt_plan" and cls.cc_model_filenames["8.0"] == "model.sm80.plan"
    assert (repo / "se_resnet50/1/model.onnx").is_file()  # always shipped: fallback and init-container input
    ens = configs["classify"]
    assert ens.platform == "ensemble" and ens.input[0].name == "image" and list(ens.input[0].dims) == [-1]
    assert ens.max_batch_size == 32 and ens.input[0].data_type == 2  # TYPE_UINT8
    pre = configs["preprocess"]
    params = {k: v.string_value for k, v in pre.parameters.items()}
    assert params["IMAGE_SIZE"] == "32" and params["EVAL_RESIZE"] == "32" and params["MEAN"] == "[0.485, 0.456, 0.406]"
    assert int(params["MAX_IMAGE_PIXELS"]) == 40_000_000 and Path(params["PROJECT_ROOT"]) == ROOT
    assert (repo / "preprocess/warmup/sample.jpg").stat().st_size == pre.model_warmup[0].inputs["image"].dims[0]


def test_bad_config_text_is_rejected():
    from google.protobuf.text_format import ParseError

    from serve.repository import parse_pbtxt

    with pytest.raises(ParseError):
        parse_pbtxt('name: "x"\nmax_batch: 3\n')


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "serve", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_help_lists_every_command():
    out = _cli("--help").stdout
    for cmd in ("export", "quantize", "trt", "repository", "up", "classify"):
        assert cmd in out
        assert _cli(cmd, "--help").returncode == 0


def test_cli_user_errors_are_one_sentence(tmp_path, exported):
    cases = [
        (("export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")), "does not exist"),
        (("repository", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "r")), "does not exist"),
        (("up", "--repository", str(tmp_path / "nothing")), "does not exist"),
        (("up", "--repository", str(tmp_path)), "holds no models"),
        (("classify", "--url", "127.0.0.1:1", str(tmp_path / "none.jpg")), "does not exist"),
    ]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    repo = tmp_path / "repo"
    (repo / "m").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text('name: "m"\n')
    cases.append((("up", "--repository", str(repo), "--http-port", str(busy.getsockname()[1])), "is in use"))
    try:
        for args, needle in cases:
            proc = _cli(*args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert "Traceback" not in proc.stderr and needle in proc.stderr, (args, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    finally:
        busy.close()
