"""A command whose optional dependency is not installed ends in one sentence naming the extra to install (a plain
`pip install .` has no onnx, tritonclient or TensorRT), never in a traceback."""
from __future__ import annotations

import subprocess

from tests.conftest import PY, ROOT, subprocess_env
from tests.serve_fixtures import make_checkpoint


def _without(module: str, tmp_path):
    """An environment in which ``import module`` fails the way it does when the package is not installed."""
    shadow = tmp_path / "shadow"
    shadow.mkdir(exist_ok=True)
    (shadow / f"{module}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{shadow}:{env['PYTHONPATH']}"
    return env


def test_export_without_onnx_names_the_export_extra(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    r = subprocess.run([PY, "-m", "seresnet", "serve", "export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e")],
                       cwd=ROOT, env=_without("onnx", tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "'export' extra" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_offline_evaluate_of_an_onnx_file_without_onnxruntime_names_the_export_extra(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    export = tmp_path / "export"
    export.mkdir()
    for name in ("model.onnx", "labels.txt"):
        (export / name).write_text("cat\n")
    (export / "serving_spec.json").write_text('{"eval": {"image_size": 32, "eval_resize": 32, "mean": [0, 0, 0], '
                                              '"std": [1, 1, 1]}, "serve": {"max_batch_size": 8}, "classes": ["cat"]}')
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "cat" / "a.png")
    r = subprocess.run([PY, "-m", "seresnet", "evaluate", "--onnx", str(export / "model.onnx"), "--data",
                        str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--no-progress"],
                       cwd=ROOT, env=_without("onnxruntime", tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "'export' extra" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
