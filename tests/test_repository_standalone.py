"""A generated repository stands alone: copied to another folder (the checkout's export and repository deleted) and
served by the real tritonserver whose python stubs run in an environment that cannot import this project, it answers
with the training eval transform's pixels and PyTorch's probabilities."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests.serve_fixtures import make_checkpoint, reference_probabilities

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def stub_environment(d: Path) -> Path:
    """A venv (no pip) whose only extra path is this venv's site-packages (torch, onnxruntime, numpy<2) added by a
    .pth *path* line: the .pth files there (the project's editable install) are not processed
    (https://docs.python.org/3/library/site.html), so `train` and `serve` cannot be imported. A second .pth line
    drops a file named after the pid of every interpreter that starts in it: the proof the stubs ran here."""
    env = d / "stubenv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(env)], check=True)
    site = env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (d / "started").mkdir()
    (site / "seresnet_deps.pth").write_text(
        f"{sysconfig.get_paths()['purelib']}\n"
        f"import os; open(os.path.join({str(d / 'started')!r}, str(os.getpid())), 'w').close()\n")
    return env


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    from serve.export import export_onnx
    from serve.repository import write_model_repository
    from serve.images import sample_image_bytes

    d = tmp_path_factory.mktemp("standalone")
    ckpt = make_checkpoint(d / "ckpt")
    export_onnx(ckpt, d / "export")
    repo = write_model_repository(d / "export", d / "repo", "cpu")
    moved = d / "elsewhere" / "models"
    shutil.copytree(repo, moved)
    shutil.rmtree(repo)
    shutil.rmtree(d / "export")
    return {"dir": d, "ckpt": ckpt, "repo": moved, "env": stub_environment(d), "images": sample_image_bytes()}


def test_stub_environment_has_the_libraries_but_not_the_project(standalone):
    code = ("import importlib.util, numpy, torch, torchvision, onnxruntime, PIL; "
            "assert int(numpy.__version__.split('.')[0]) < 2, numpy.__version__; "
            "print([importlib.util.find_spec(m) is None for m in ('train', 'serve', 'launch', 'tests')])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(standalone["env"] / "bin" / "python3"), "-c", code], capture_output=True, text=True,
                          cwd=standalone["dir"] / "elsewhere", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[True, True, True, True]"


def test_moved_repository_served_from_stub_environment_classifies_like_pytorch(standalone):
    import psutil
    import tritonclient.grpc as g

    from serve.client import TritonClassifier
    from serve.export import load_checkpoint
    from serve.server import TritonServer
    from train.transforms import EvalSpec, decode_image, eval_transform

    images = standalone["images"]
    ref, classes = reference_probabilities(standalone["ckpt"], list(images.values()))
    _, cfg, _ = load_checkpoint(standalone["ckpt"])
    spec = EvalSpec.from_data_config(cfg.data)
    tf = eval_transform(spec)
    started = standalone["dir"] / "started"
    for f in started.iterdir():
        f.unlink()
    with TritonServer(standalone["repo"], ready_timeout=300, stub_python_bin=standalone["env"] / "bin",
                      cwd=standalone["dir"] / "elsewhere") as server:
        stubs = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True) if "stub" in p.name()}
        assert stubs and stubs <= {int(f.name) for f in started.iterdir()}, (stubs, sorted(started.iterdir()))
        client = g.InferenceServerClient(server.grpc_url)
        clf = TritonClassifier(server.grpc_url, "grpc")
        assert clf.check(3) == len(classes)
        for i, (name, data) in enumerate(images.items()):
            # Pixel parity: the copied eval transform serves exactly the trainer's eval pixels.
            inp = g.InferInput("image", [1, len(data)], "UINT8")
            inp.set_data_from_numpy(np.frombuffer(data, np.uint8)[None])
            pixels = client.infer("preprocess", [inp]).as_numpy("pixels")
            np.testing.assert_allclose(pixels[0], tf(decode_image(data, spec=spec)).numpy(), rtol=0, atol=1e-6, err_msg=name)
            r = clf.classify_bytes(data, k=3, name=name)
            assert r.ok, r.error
            assert r.top[0].label == classes[int(ref[i].argmax())] and abs(r.top[0].score - float(ref[i].max())) < 1e-4, (name, r)
        bad = clf.classify_bytes(b"GIF89a" + bytes(100), name="x.gif")
        assert not bad.ok and "accepts JPEG and PNG only" in bad.error
