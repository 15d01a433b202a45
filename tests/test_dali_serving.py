"""`serve repository --preprocess dali` (GPU targets): the repository it writes, the DALI pipeline the DALI backend
autoserializes from it (loaded here exactly as dali_backend loads it, run with a CPU decoder), its pixel parity with the
python preprocess, and the guard in front of it, served by the real tritonserver (per-request error isolation).

What needs a GPU (the 'mixed' decoder, the DALI backend inside Triton's image) runs in scripts/gpu_serving_check.sh."""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve import contract as C
from serve.errors import ServeError
from serve.repository import parse_pbtxt, write_model_repository
from serve.repository_dali import UNCHECKED_ENV
from serve.images import sample_image_bytes
from tests.conftest import require
from train.transforms import EvalSpec, decode_image, eval_transform

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dali_repo(tmp_path_factory):
    from serve.export import export_onnx
    from tests.serve_fixtures import make_checkpoint

    d = tmp_path_factory.mktemp("dali")
    export_onnx(make_checkpoint(d / "ckpt"), d / "export")
    with pytest.MonkeyPatch.context() as mp:   # these tests are part of checking the route (as gpu_dali_check is)
        mp.setenv(UNCHECKED_ENV, "1")
        return write_model_repository(d / "export", d / "repo", "onnx", preprocess="dali")


def test_the_route_stays_off_until_the_pinned_images_dali_ran_it(dali_repo, tmp_path, monkeypatch):
    """dali.py is autoserialized by the DALI of the Triton image (the table's), not the DALI the tests run: until
    `make gpu-check` ran it with that DALI (dali_checked), writing the route is refused up front, nothing lost."""
    from train.compat import load_table

    serving = load_table()["serving"]
    row = serving["rows"][serving["current"]]
    monkeypatch.delenv(UNCHECKED_ENV, raising=False)
    out = tmp_path / "repo"
    shutil.copytree(dali_repo, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    if row["dali_checked"]:
        pytest.skip("the pinned image's DALI has run the route (dali_checked)")
    with pytest.raises(ServeError, match=rf"the DALI route is off: its dali.py has not yet been run by DALI {row['dali']}") as err:
        write_model_repository(dali_repo.parent / "export", out, "onnx", preprocess="dali")
    assert len(str(err.value).splitlines()) == 1 and "--preprocess python" in str(err.value)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    r = subprocess.run([sys.executable, "-m", "serve", "repository", "--export", str(dali_repo.parent / "export"),
                        "--out", str(tmp_path / "cli"), "--target", "onnx", "--preprocess", "dali"],
                       cwd=ROOT, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != UNCHECKED_ENV})
    assert r.returncode == 2 and r.stderr.startswith("error: the DALI route is off") and "Traceback" not in r.stderr


def test_dali_repository_layout_and_configs(dali_repo):
    cfg = {m: parse_pbtxt((dali_repo / m / "config.pbtxt").read_text()) for m in (C.GUARD, C.PREPROCESS, C.ENSEMBLE)}
    ens = cfg[C.ENSEMBLE]
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [C.GUARD, C.PREPROCESS, C.CLASSIFIER, C.POSTPROCESS]
    g, pre = ens.ensemble_scheduling.step[0], ens.ensemble_scheduling.step[1]
    assert dict(g.input_map) == {C.ENSEMBLE_INPUT: C.ENSEMBLE_INPUT} and dict(g.output_map) == {C.CHECKED_IMAGE: C.CHECKED_IMAGE}
    assert dict(pre.input_map) == {C.CHECKED_IMAGE: C.CHECKED_IMAGE} and dict(pre.output_map) == {C.PIXELS: C.PIXELS}
    p = cfg[C.PREPROCESS]
    assert p.backend == "dali" and [i.name for i in p.input] == [C.CHECKED_IMAGE] and list(p.output[0].dims) == [3, 32, 32]
    assert p.input[0].allow_ragged_batch and cfg[C.GUARD].input[0].allow_ragged_batch
    w = p.model_warmup[0].inputs[C.CHECKED_IMAGE]
    assert w.input_data_file == "sample.jpg" and list(w.dims) == [(dali_repo / C.PREPROCESS / "warmup" / "sample.jpg").stat().st_size]
    assert p.instance_group[0].kind == p.instance_group[0].KIND_GPU and p.instance_group[0].count == 1
    assert cfg[C.GUARD].backend == "python" and cfg[C.GUARD].parameters["MAX_IMAGE_PIXELS"].string_value == "40000000"
    files = {f.name for f in (dali_repo / C.PREPROCESS / "1").iterdir()}
    # dali.py (autoserialized at load), no model.dali: the DALI backend tries model.dali first, then dali.py
    assert files == {C.DALI_PIPELINE_FILE, C.DALI_EVAL_FILE, C.EVAL_SPEC_FILE, C.DALI_PARAMS_FILE}
    assert (dali_repo / C.PREPROCESS / "1" / C.DALI_EVAL_FILE).read_bytes() == (ROOT / "train" / "dali_eval.py").read_bytes()
    assert "guard" in (dali_repo / "repository.json").read_text()


def test_dali_preprocess_needs_a_gpu_target(tmp_path):
    with pytest.raises(ServeError, match="--preprocess dali decodes on a GPU; use it with --target onnx or tensorrt"):
        write_model_repository(tmp_path / "missing-but-checked-after", tmp_path / "r", "cpu", preprocess="dali")
    with pytest.raises(ServeError, match="unknown preprocess 'nvjpeg'"):
        write_model_repository(tmp_path, tmp_path / "r", "onnx", preprocess="nvjpeg")


def load_like_dali_backend(path: Path):
    """dali_backend's autoserialization (src/model_provider/model_provider.h): importlib from the file's path."""
    spec = importlib.util.spec_from_file_location("autoserialize_mod", str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules["autoserialize_mod"] = module
    spec.loader.exec_module(module)
    return module


def test_autoserialized_pipeline_matches_the_python_preprocess(dali_repo, tmp_path):
    """The generated dali.py, loaded the backend's way from a moved copy of the folder: exactly one @autoserialize
    pipeline; its graph with a CPU decoder gives the python preprocess's pixels on the sample photos (JPEG and PNG,
    300-1024 px) and small inputs. Stated tolerance: the decoders and large-image resize paths differ, so mean
    |diff| <= 1 grey level, and on inputs under 3x the target (no reduce-on-load) every pixel within 2 levels.
    (It caught a one-pixel crop shift: DALI rounds a half-pixel centre-crop margin up, torchvision to even.)"""
    require("nvidia.dali")
    from nvidia.dali import pipeline_def
    from nvidia.dali._utils.autoserialize import _discover_autoserialize

    folder = tmp_path / "moved"
    shutil.copytree(dali_repo / C.PREPROCESS / "1", folder)
    mod = load_like_dali_backend(folder / C.DALI_PIPELINE_FILE)
    assert len(_discover_autoserialize(mod, visited=[])) == 1 and mod.PARAMS["input"] == C.CHECKED_IMAGE

    images = dict(sample_image_bytes())
    for side in (20, 28, 40, 60):   # demo-sized: both paths resize in one pass
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            Image.open(io.BytesIO(images["chelsea.jpg"])).resize((side, side + 7)).save(buf, format=fmt)
            images[f"small{side}.{fmt}"] = buf.getvalue()
    names = list(images)

    @pipeline_def(batch_size=len(names), num_threads=1, device_id=None)
    def cpu_pipe():
        return mod.graph("cpu")

    pipe = cpu_pipe()
    pipe.feed_input(C.CHECKED_IMAGE, [np.frombuffer(images[n], np.uint8) for n in names])
    (out,) = pipe.run()
    dali = np.stack([np.asarray(out[i]) for i in range(len(names))])
    spec = EvalSpec.from_dict(mod.SPEC)
    pil = np.stack([eval_transform(spec)(decode_image(images[n], spec=spec)).numpy() for n in names])
    assert dali.shape == pil.shape == (len(names), 3, 32, 32)
    grey = np.abs(dali - pil) * np.array(spec.std).reshape(1, 3, 1, 1) * 255
    assert grey.mean() <= 1.0, grey.mean(axis=(1, 2, 3))
    small = [i for i, n in enumerate(names) if n.startswith("small")]
    assert grey[small].max() <= 2.0 + 1e-3, grey[small].max(axis=(1, 2, 3))


@pytest.mark.slow
def test_guard_served_by_tritonserver_fails_bad_requests_alone(dali_repo, tmp_path):
    """The guard model of a DALI repository, served alone by the real tritonserver: in one dynamic batch of good and
    bad requests, each bad one (not an image, GIF, truncated JPEG, header over the pixel limit) fails with
    INVALID_ARG and its reason counted; the good ones come back byte for byte."""
    import tritonclient.grpc as g

    from serve.server import TritonServer
    from tests.serve_fixtures import big_png, gif_bytes

    repo = tmp_path / "guard_only"
    shutil.copytree(dali_repo / C.GUARD, repo / C.GUARD)
    good = sample_image_bytes()
    jpeg = good["chelsea.jpg"]
    bad = {"not an image": (b"hello world", "format"), "gif": (gif_bytes(), "format"),
           "truncated jpeg": (jpeg[: len(jpeg) // 2], "decode"), "bomb header": (big_png(8000, 8000), "pixels")}
    with TritonServer(repo, ready_timeout=120) as server:
        client = g.InferenceServerClient(server.grpc_url)
        sent = [("good", b, None) for b in list(good.values())[:4]] + [(k, b, r) for k, (b, r) in bad.items()]
        results = {}

        def done(key):
            return lambda result, error: results.__setitem__(key, (result, error))

        for i, (name, data, _) in enumerate(sent):   # async: the dynamic batcher groups them
            inp = g.InferInput(C.ENSEMBLE_INPUT, [1, len(data)], "UINT8")
            inp.set_data_from_numpy(np.frombuffer(data, np.uint8)[None])
            client.async_infer(C.GUARD, [inp], done(i), outputs=[g.InferRequestedOutput(C.CHECKED_IMAGE)])
        import time
        deadline = time.time() + 60
        while len(results) < len(sent) and time.time() < deadline:
            time.sleep(0.05)
        assert len(results) == len(sent)
        for i, (name, data, reason) in enumerate(sent):
            result, error = results[i]
            if reason is None:
                assert error is None, (name, error)
                assert result.as_numpy(C.CHECKED_IMAGE).tobytes() == data
            else:
                assert result is None and error is not None and "INVALID_ARG" in str(error.status()), (name, error)
        metrics = __import__("urllib.request").request.urlopen(server.metrics_url).read().decode()
    counted = {line.split('reason="')[1].split('"')[0]: float(line.split()[-1])
               for line in metrics.splitlines() if line.startswith(C.REJECTED_METRIC + "{")}
    assert counted["format"] == 2 and counted["decode"] == 1 and counted["pixels"] == 1, counted
