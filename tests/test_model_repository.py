"""model_repository/ (the committed Triton model definitions) is what the writer generates for the demo config;
`serve repository --set serve.KEY=VALUE` overrides the serving settings the checkpoint froze; classifier versions sit
side by side under a version_policy and the real tritonserver loads the versions the policy names."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from launch.torchrun import REPO_ROOT
from scripts import model_repository as defs
from serve.contract import CLASSIFIER, ENSEMBLE, PREPROCESS
from serve.errors import ServeError
from serve.export import export_onnx
from serve.images import sample_image_bytes
from serve.repository import parse_pbtxt
from serve.repository_versions import write_versioned_repository
from serve.server import TritonServer
from tests.serve_fixtures import make_checkpoint

REGENERATE = "python -m scripts.model_repository"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    export_onnx(make_checkpoint(d / "ckpt"), d / "export")
    return d / "export"


def _config(repo: Path, model: str):
    return parse_pbtxt((repo / model / "config.pbtxt").read_text())


@pytest.mark.slow
def test_committed_definitions_are_what_the_writer_generates():
    with tempfile.TemporaryDirectory() as tmp:
        want = defs.generate(Path(tmp))
    have = defs.definitions(REPO_ROOT / "model_repository")
    stale = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    assert not stale, f"model_repository/ differs from the writer's output in {stale}; regenerate it with `{REGENERATE}`"
    # The reviewed files are the ones Triton loads: config.pbtxt of every model, the python models and their modules.
    assert {"classify/config.pbtxt", "preprocess/config.pbtxt", "preprocess/1/model.py", "se_resnet50/config.pbtxt",
            "se_resnet50/1/model.py"} <= set(have)
    assert have["se_resnet50/1/model.py"] == (REPO_ROOT / "serve" / "triton_runtime" / "classifier.py").read_bytes()
    ignored = subprocess.run(["git", "check-ignore", "model_repository/se_resnet50/1/model.onnx", "model_repository/se_resnet50/labels.txt",
                              "model_repository/se_resnet50/2/model.py", "model_repository/repository.json"],
                             cwd=REPO_ROOT, capture_output=True, text=True).stdout.split()
    assert len(ignored) == 4, ignored
    tracked = subprocess.run(["git", "check-ignore", *[f"model_repository/{k}" for k in have]], cwd=REPO_ROOT,
                             capture_output=True, text=True).stdout.split()
    assert not tracked, f"definitions that .gitignore hides: {tracked}"


def test_committed_python_models_are_the_runtime_sources():
    """Fast half of the check above: the committed python models and modules are the writer's sources today."""
    from serve.repository import MODEL_SOURCES, eval_module_source, runtime_files

    root = REPO_ROOT / "model_repository"
    for model in (CLASSIFIER, PREPROCESS):
        for rel, src in runtime_files(model).items():
            assert (root / model / rel).read_bytes() == Path(src).read_bytes(), \
                f"model_repository/{model}/{rel} is not {src}; regenerate with `{REGENERATE}`"
    assert (root / PREPROCESS / "1" / "seresnet_eval.py").read_text() == eval_module_source(), \
        f"model_repository/preprocess/1/seresnet_eval.py is not train/transforms.py; regenerate with `{REGENERATE}`"
    assert MODEL_SOURCES[CLASSIFIER].read_bytes() == (root / CLASSIFIER / "1" / "model.py").read_bytes()


def test_serve_settings_are_set_at_repository_time(export, tmp_path):
    repo = write_versioned_repository(export, tmp_path / "repo", serve_overrides=[
        "serve.max_batch_size=2", "serve.preferred_batch_sizes=[1,2]", "serve.instances=3", "serve.max_queue_delay_us=500",
        "serve.preprocess_instances=1", "serve.max_image_bytes=123456"])
    cls, pre, ens = (_config(repo, m) for m in (CLASSIFIER, PREPROCESS, ENSEMBLE))
    assert cls.max_batch_size == pre.max_batch_size == ens.max_batch_size == 2
    assert list(cls.dynamic_batching.preferred_batch_size) == [1, 2] and cls.dynamic_batching.max_queue_delay_microseconds == 500
    assert cls.instance_group[0].count == 3 and pre.instance_group[0].count == 1
    assert pre.parameters["MAX_IMAGE_BYTES"].string_value == "123456"
    meta = json.loads((repo / "repository.json").read_text())
    assert meta["serve"]["max_batch_size"] == 2 and meta["serve_overrides"][0] == "serve.max_batch_size=2"
    # Without --set: the export's (the checkpoint's) settings.
    plain = _config(write_versioned_repository(export, tmp_path / "plain"), CLASSIFIER)
    spec = json.loads((export / "serving_spec.json").read_text())["serve"]
    assert plain.max_batch_size == spec["max_batch_size"] and plain.instance_group[0].count == spec["instances"]
    for bad, says in ((["serve.bogus=1"], "Unknown config key 'serve.bogus'"),
                      (["data.image_size=64"], "only serving settings can be set at repository time"),
                      (["serve.max_batch_size=4"], "serve.preferred_batch_sizes [8, 16, 32] must be between 1 and serve.max_batch_size (4)"),
                      (["serve.instances"], "--set expects key=value")):
        with pytest.raises(ServeError, match=says.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
            write_versioned_repository(export, tmp_path / "bad", serve_overrides=bad)


def test_cli_set_reaches_the_repository(export, tmp_path):
    r = subprocess.run([sys.executable, "-m", "serve", "repository", "--export", str(export), "--out", str(tmp_path / "r"),
                        "--set", "serve.max_batch_size=4", "--set", "serve.preferred_batch_sizes=[4]"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _config(tmp_path / "r", CLASSIFIER).max_batch_size == 4
    r = subprocess.run([sys.executable, "-m", "serve", "repository", "--export", str(export), "--out", str(tmp_path / "r2"),
                        "--set", "model.stem=small"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "serve.KEY=VALUE" in r.stderr


@pytest.mark.slow
def test_versions_side_by_side_under_a_version_policy_are_served(export, tmp_path):
    repo = tmp_path / "repo"
    write_versioned_repository(export, repo)
    second = tmp_path / "export2"
    export_onnx(make_checkpoint(tmp_path / "ckpt2", seed=1), second)   # retrained: other weights, same classes
    write_versioned_repository(second, repo, version=2, version_policy="all")
    assert (repo / CLASSIFIER / "1" / "model.onnx").read_bytes() == (export / "model.onnx").read_bytes()
    assert (repo / CLASSIFIER / "2" / "model.onnx").read_bytes() == (second / "model.onnx").read_bytes()
    cfg = _config(repo, CLASSIFIER)
    assert cfg.version_policy.HasField("all")
    meta = json.loads((repo / "repository.json").read_text())
    assert meta["versions"] == [1, 2] and meta["version_policy"] == "all"
    with pytest.raises(ServeError, match="differs from versions 1, 2 already in .* in target"):
        write_versioned_repository(second, repo, version=3, target="onnx")
    assert sorted(p.name for p in (repo / CLASSIFIER).iterdir() if p.is_dir()) == ["1", "2"], "a refused version leaves the others"
    with pytest.raises(ServeError, match="does not serve version 3"):
        write_versioned_repository(second, repo, version=3, version_policy="specific:1,2")

    import tritonclient.grpc as grpcclient

    with TritonServer(repo, ready_timeout=240) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert client.is_model_ready(CLASSIFIER, "1") and client.is_model_ready(CLASSIFIER, "2")
        x = np.zeros((1, 3, 32, 32), np.float32)
        outs = []
        for version in ("1", "2"):
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            outs.append(client.infer(CLASSIFIER, [inp], model_version=version).as_numpy("probabilities"))
        assert not np.allclose(outs[0], outs[1]), "the two versions are the two exports"
    # latest:1 (Triton's default when the policy is dropped back): only the newest version loads.
    write_versioned_repository(second, repo, version=2, version_policy="latest:1")
    with TritonServer(repo, ready_timeout=240) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert client.is_model_ready(CLASSIFIER, "2") and not client.is_model_ready(CLASSIFIER, "1")
        assert client.is_model_ready(ENSEMBLE)


def test_pvc_overlay_loads_the_repository_from_a_claim(kubectl):
    """k8s/serving/overlays/model-pvc: the init container's source repository is the claim, not the image's copy."""
    from scripts import validate_manifests as v

    objs = v.kustomize_build(REPO_ROOT / "k8s" / "serving" / "overlays" / "model-pvc", kubectl)
    for obj in objs:
        v.validate_object(obj)
    pvc = next(o for o in objs if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "seresnet-model-repository")
    pod = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    src = next(e["value"] for e in init["env"] if e["name"] == "SRC_REPOSITORY")
    mount = next(m for m in init["volumeMounts"] if m["mountPath"] == src)
    vol = next(vol for vol in pod["volumes"] if vol["name"] == mount["name"])
    assert vol["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"], "readOnly": True} and mount["readOnly"]
