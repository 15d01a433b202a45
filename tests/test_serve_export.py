"""Serving without a server: ONNX parity, int8 drift, TensorRT guard + trtexec command, config.pbtxt validity, CLI errors."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve.errors import ServeError
from tests.serve_fixtures import make_checkpoint, reference_probabilities
from tests.conftest import require

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
    from serve.images import sample_image_bytes

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


def test_tensorrt_without_tensorrt_is_one_clear_error(exported):
    from serve.tensorrt import build_plan

    require("onnx")
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


@pytest.fixture(scope="module")
def export_dir(exported):
    """The export folder, with a model.int8.cpu.onnx and a model.int8.onnx (dynamic int8 here: the CPU route only copies
    the file; the GPU routes refuse it, it breaks TensorRT's Q/DQ rules)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from serve.contract import EXPORT_INT8_CPU_ONNX, EXPORT_INT8_ONNX

    d = Path(exported[1]).parent
    for name in (EXPORT_INT8_CPU_ONNX, EXPORT_INT8_ONNX):
        quantize_dynamic(str(exported[1]), str(d / name), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    return d


@pytest.mark.parametrize("target", ["cpu", "onnx", "tensorrt", "int8"])
def test_every_config_pbtxt_parses_as_model_config(export_dir, tmp_path, target):
    import json

    from serve import contract as C
    from serve.repository import parse_pbtxt, write_model_repository

    repo = write_model_repository(export_dir, tmp_path / "repo", target, ort_tensorrt=(target == "onnx"))
    configs = {p.parent.name: parse_pbtxt(p.read_text()) for p in repo.glob("*/config.pbtxt")}
    python_classifier = target in ("cpu", "int8")
    expected = {C.ENSEMBLE, C.PREPROCESS, C.CLASSIFIER} | (set() if python_classifier else {C.POSTPROCESS})
    assert set(configs) == expected
    cls = configs[C.CLASSIFIER]
    assert [i.name for i in cls.input] == [C.INPUT_NAME] and [o.name for o in cls.output] == [C.OUTPUT_NAME]
    assert list(cls.input[0].dims) == [3, 32, 32] and list(cls.output[0].dims) == [10] and cls.output[0].label_filename == "labels.txt"
    assert cls.max_batch_size == 32 and list(cls.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert cls.model_warmup and cls.instance_group[0].count == 1
    assert (repo / C.CLASSIFIER / "labels.txt").read_text().split() == [
        "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
    precision = "int8" if target == "int8" else "fp32"
    assert cls.parameters["PRECISION"].string_value == precision
    served = (repo / C.CLASSIFIER / "1" / C.EXPORT_ONNX).read_bytes()  # always shipped: fallback and init-container input
    assert served == (export_dir / (C.EXPORT_INT8_CPU_ONNX if precision == "int8" else C.EXPORT_ONNX)).read_bytes()
    if python_classifier:
        assert cls.backend == "python" and cls.parameters["ONNX_FILE"].string_value == C.EXPORT_ONNX
        assert {p.name for p in (repo / C.CLASSIFIER / "1").iterdir()} >= {"model.py", "seresnet_serving.py", "seresnet_contract.py"}
    elif target == "onnx":
        assert cls.platform == "onnxruntime_onnx" and cls.default_model_filename == C.EXPORT_ONNX
        acc = cls.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert acc.name == "tensorrt" and acc.parameters["trt_engine_cache_enable"] == "true"
    else:
        assert cls.platform == "tensorrt_plan"
        assert dict(cls.cc_model_filenames) == {cc: C.plan_filename(cc) for cc in C.DEFAULT_GPU_CCS}
    if not python_classifier:
        post = configs[C.POSTPROCESS]
        assert post.backend == "python" and post.dynamic_batching.max_queue_delay_microseconds == 2000
    ens = configs[C.ENSEMBLE]
    assert ens.platform == "ensemble" and ens.input[0].name == C.ENSEMBLE_INPUT and list(ens.input[0].dims) == [-1]
    assert ens.max_batch_size == 4 and ens.input[0].data_type == 2  # TYPE_UINT8; <= the python preprocess (/dev/shm bound)
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [C.PREPROCESS, C.CLASSIFIER] + ([] if python_classifier else [C.POSTPROCESS])
    pre = configs[C.PREPROCESS]
    params = {k: v.string_value for k, v in pre.parameters.items()}
    assert params == {"EVAL_SPEC_FILE": C.EVAL_SPEC_FILE, "MAX_IMAGE_BYTES": "20000000", "MAX_IMAGE_PIXELS": "40000000",
                      "MAX_REQUEST_BYTES": "40000000", "TORCH_THREADS": "1"}
    assert json.loads((repo / C.PREPROCESS / "1" / C.EVAL_SPEC_FILE).read_text()) == {
        "image_size": 32, "eval_resize": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "reducing_gap": 3.0}
    assert (repo / "preprocess/warmup/sample.jpg").stat().st_size == pre.model_warmup[0].inputs["image"].dims[0]
    # Load shedding: every batched model (all but the ensemble) rejects at once past a bounded queue or a queue timeout.
    for name, c in configs.items():
        if name == C.ENSEMBLE:
            assert c.WhichOneof("scheduling_choice") == "ensemble_scheduling"
            continue
        q = c.dynamic_batching.default_queue_policy
        bound = 536870912 // 40_000_000 if name == C.PREPROCESS else 4 * 32   # encoded requests: 512 MiB of them
        assert (q.timeout_action, q.max_queue_size, q.default_timeout_microseconds) == (q.REJECT, bound, 2_000_000), name
    # Standalone: nothing in the repository names the checkout or any path of the machine that wrote it.
    for f in repo.rglob("*"):
        if f.is_file() and f.suffix in (".py", ".pbtxt", ".json", ".txt"):
            text = f.read_text()
            assert "PROJECT_ROOT" not in text and str(ROOT) not in text and str(export_dir) not in text, f
    meta = json.loads((repo / "repository.json").read_text())
    assert meta["precision"] == precision and meta["target"] == ("cpu" if target == "int8" else target)
    assert meta["source"] == export_dir.name and meta["checkpoint"] == "last.pt"
    assert meta["limits"]["max_queue_size"] == 128 and meta["limits"]["queue_timeout_ms"] == 2000
    assert meta["limits"]["max_queue_size_encoded"] == 13


def test_repository_from_a_checkpoint_names_no_path_of_its_builder(exported, tmp_path):
    """The checkpoint route exports into a temporary folder: neither it, the checkpoint's folder nor tmp_path may
    appear in any file of the repository (repository.json, export_report.json, configs)."""
    from serve.repository import write_model_repository

    ckpt = exported[0]
    repo = write_model_repository(ckpt, tmp_path / "repo", "cpu", max_queue_size=7, queue_timeout_ms=250)
    texts = {f: f.read_text() for f in repo.rglob("*") if f.is_file() and f.suffix in (".py", ".pbtxt", ".json", ".txt")}
    assert repo / "repository.json" in texts and repo / "export_report.json" in texts
    for f, text in texts.items():
        for path in (str(tmp_path), str(Path(ckpt).parent), "/tmp/", str(ROOT)):
            assert path not in text, (f, path)
    assert "max_queue_size: 7" in texts[repo / "preprocess" / "config.pbtxt"]
    assert "default_timeout_microseconds: 250000" in texts[repo / "se_resnet50" / "config.pbtxt"]


def test_gpu_int8_repository_refuses_a_file_tensorrt_cannot_build(export_dir, tmp_path):
    """The init container builds a TensorRT plan from the int8 file of a GPU repository: one that breaks TensorRT's
    Q/DQ rules (here dynamic int8, no Q/DQ at all) is refused when the repository is written."""
    from serve.repository import write_model_repository

    for target in ("tensorrt", "onnx"):
        with pytest.raises(ServeError, match=r"model\.int8\.onnx' breaks TensorRT's explicit-quantization rules: it has no "):
            write_model_repository(export_dir, tmp_path / target, target, precision="int8")


def test_serving_eval_module_is_train_transforms_verbatim(export_dir, tmp_path):
    """One eval transform: the copy in the repository is train/transforms.py line for line (its one annotation-only import commented)."""
    from serve.repository import ANNOTATION_ONLY_IMPORT, write_model_repository

    repo = write_model_repository(export_dir, tmp_path / "repo", "cpu")
    copy = (repo / "preprocess/1/seresnet_eval.py").read_text().splitlines()
    original = (ROOT / "train/transforms.py").read_text().splitlines()
    assert copy[0].startswith("# Copied verbatim") and len(copy) == len(original) + 1
    for a, b in zip(copy[1:], original):
        assert a == b or (b == ANNOTATION_ONLY_IMPORT and a.startswith(f"# {ANNOTATION_ONLY_IMPORT}")), (a, b)


def test_repository_out_refuses_a_folder_it_did_not_write(export_dir, tmp_path):
    from serve.contract import REPOSITORY_MARKER
    from serve.repository import write_model_repository

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ServeError, match="non-empty folder that 'serve repository' did not write"):
        write_model_repository(export_dir, foreign, "cpu")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    proc = _cli("repository", "--export", str(export_dir), "--out", str(foreign))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "did not write" in proc.stderr
    repo = write_model_repository(export_dir, tmp_path / "new", "cpu")   # new folder: written, marked
    assert (repo / REPOSITORY_MARKER).is_file()
    (repo / "classify" / "stale.txt").write_text("x")
    write_model_repository(export_dir, repo, "onnx")                         # ours: rewritten in place
    assert not (repo / "classify" / "stale.txt").exists() and (repo / "postprocess" / "config.pbtxt").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (write_model_repository(export_dir, empty, "cpu") / "classify" / "config.pbtxt").is_file()


def test_bad_config_text_is_rejected():
    from google.protobuf.text_format import ParseError

    from serve.repository import parse_pbtxt

    with pytest.raises(ParseError):
        parse_pbtxt('name: "x"\nmax_batch: 3\n')


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "serve", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_help_lists_every_command():
    out = _cli("--help").stdout
    for cmd in ("export", "quantize", "trt", "repository", "up", "classify", "evaluate"):
        assert cmd in out
        assert _cli(cmd, "--help").returncode == 0


def test_cli_user_errors_are_one_sentence(tmp_path, exported):
    cases = [
        (("export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")), "does not exist"),
        (("repository", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "r")), "does not exist"),
        (("repository", "--export", str(tmp_path), "--out", str(tmp_path / "r2")), "lacks model.onnx"),
        (("repository", "--out", str(tmp_path / "r3")), "pass exactly one of --export"),
        (("evaluate", "--url", "127.0.0.1:1", str(tmp_path / "nofolder")), "is not a folder"),
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
