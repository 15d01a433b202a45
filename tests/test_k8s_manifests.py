"""Kubernetes manifests: every kustomization builds with kubectl kustomize and every object validates
(core kinds with kubernetes-validate, strict; CRDs against the schemas vendored in k8s/schemas); security, secrets,
wiring between objects; the job rendered by `launch k8s` equals its config (image per GPU generation,
RDMA, gang scheduling)."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import yaml

from scripts import validate_manifests as v
from launch.torchrun import REPO_ROOT
from train.compat import load_table

PY = sys.executable
DIRS = v.kustomization_dirs()
POD_KINDS = {"Deployment", "Job", "PyTorchJob", "TrainJob"}


@pytest.fixture(scope="module")
def rendered(kubectl):
    return {str(d.relative_to(REPO_ROOT)): v.kustomize_build(d, kubectl) for d in DIRS}


def objects(rendered, where=None):
    for d, objs in rendered.items():
        if where is None or d == where:
            yield from objs


def pod_specs(obj):
    if obj["kind"] == "Deployment" or obj["kind"] == "Job":
        yield obj["spec"]["template"]
    elif obj["kind"] == "PyTorchJob":
        for spec in obj["spec"]["pytorchReplicaSpecs"].values():
            yield spec["template"]
    elif obj["kind"] == "TrainJob":   # the pod settings the TrainJob adds to its runtime's pods (runtimePatches)
        for patch in obj["spec"].get("runtimePatches", []):
            for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                yield job["template"]["spec"]["template"]


def test_the_tree_has_the_expected_kustomizations():
    names = {str(d.relative_to(REPO_ROOT)) for d in DIRS}
    assert {"k8s/training/overlays/ddp", "k8s/training/overlays/deepspeed", "k8s/training/overlays/indexed-job",
            "k8s/training/storage", "k8s/serving/base", "k8s/serving/overlays/production",
            "k8s/serving/overlays/staging", "k8s/monitoring"} <= names


@pytest.mark.parametrize("kdir", DIRS, ids=lambda d: str(d.relative_to(REPO_ROOT)))
def test_every_kustomization_builds_and_every_object_validates(kdir, rendered):
    objs = rendered[str(kdir.relative_to(REPO_ROOT))]
    assert objs, kdir
    for obj in objs:
        v.validate_object(obj)


def test_expected_kinds_are_rendered(rendered):
    kinds = {(d, o["kind"]) for d, objs in rendered.items() for o in objs}
    for d in ("k8s/training/overlays/ddp", "k8s/training/overlays/deepspeed"):
        assert {(d, "PyTorchJob"), (d, "PodMonitor"), (d, "ConfigMap")} <= kinds
    assert {("k8s/training/overlays/indexed-job", k) for k in ("Job", "Service", "PodMonitor")} <= kinds
    assert {("k8s/training/storage", "PersistentVolumeClaim")} <= kinds
    assert {("k8s/serving/overlays/production", k) for k in (
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor",
        "ServiceAccount", "ConfigMap")} <= kinds
    assert {("k8s/monitoring", "PrometheusRule"), ("k8s/monitoring", "ConfigMap")} <= kinds


def test_validation_rejects_broken_objects(rendered):
    """The validators are not vacuous: a typo in a core kind and in each CRD kind is caught."""
    dep = copy.deepcopy(next(o for o in objects(rendered, "k8s/serving/overlays/production") if o["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(v.ManifestError, match="imagePullPolicyy"):
        v.validate_object(dep)
    job = copy.deepcopy(next(o for o in objects(rendered, "k8s/training/overlays/ddp") if o["kind"] == "PyTorchJob"))
    job["spec"]["elasticPolicy"]["minReplica"] = 1
    with pytest.raises(v.ManifestError, match="minReplica"):
        v.validate_object(job)
    job = copy.deepcopy(next(o for o in objects(rendered, "k8s/training/overlays/ddp") if o["kind"] == "PyTorchJob"))
    job["spec"]["elasticPolicy"]["maxRestarts"] = "three"
    with pytest.raises(v.ManifestError):
        v.validate_object(job)
    rule = copy.deepcopy(next(o for o in objects(rendered, "k8s/monitoring") if o["kind"] == "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = 5
    with pytest.raises(v.ManifestError):
        v.validate_object(rule)
    sm = copy.deepcopy(next(o for o in objects(rendered, "k8s/serving/overlays/production") if o["kind"] == "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(v.ManifestError, match="intervall"):
        v.validate_object(sm)


# ---------------------------------------------------------------- security

# Capabilities a container may add back after dropping ALL: IPC_LOCK only where the job asks for RDMA (the
# verbs library pins registered memory), nothing anywhere else.
RDMA_CAPS = ["IPC_LOCK"]


def assert_pods_secure(objs, allowed_add=()) -> int:
    """Every pod non-root with seccomp, no host namespaces/paths; EVERY container (init containers too) non-root
    at container level, no privilege escalation, read-only root, capabilities dropped. Returns containers checked."""
    checked = 0
    for obj in objs:
        if obj["kind"] not in POD_KINDS:
            continue
        for tmpl in pod_specs(obj):
            spec = tmpl["spec"]
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"].get("runAsUser", 1) != 0, where
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
            assert all("hostPath" not in vol for vol in spec.get("volumes", [])), where
            for c in spec["containers"] + spec.get("initContainers", []):
                sc = c.get("securityContext", {})
                name = f"{where} container {c['name']}"
                assert sc.get("runAsNonRoot") is True, f"{name}: securityContext.runAsNonRoot must be true"
                assert sc.get("runAsUser", 1) != 0, name
                assert sc["allowPrivilegeEscalation"] is False, name
                assert sc["capabilities"]["drop"] == ["ALL"], name
                assert set(sc["capabilities"].get("add", [])) <= set(allowed_add), name
                assert sc["readOnlyRootFilesystem"] is True, name
                assert not sc.get("privileged"), name
                checked += 1
    return checked


def test_pods_run_non_root_without_privileges_and_read_only_root(rendered):
    checked = 0
    for d, objs in rendered.items():
        checked += assert_pods_secure(objs, RDMA_CAPS if d.endswith("-rdma") else ())
    assert checked >= 8


def test_security_check_catches_a_root_container(rendered):
    """The check is not vacuous: an init container without container-level runAsNonRoot fails it."""
    job = copy.deepcopy(_job(rendered, "indexed-job"))
    init = copy.deepcopy(job["spec"]["template"]["spec"]["containers"][0])
    init["name"] = "fetch"
    del init["securityContext"]["runAsNonRoot"]
    job["spec"]["template"]["spec"]["initContainers"] = [init]
    with pytest.raises(AssertionError, match="container fetch"):
        assert_pods_secure([job])
    job = copy.deepcopy(_job(rendered, "ddp"))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["securityContext"][
        "capabilities"]["add"] = ["IPC_LOCK"]
    with pytest.raises(AssertionError):
        assert_pods_secure([job])
    assert assert_pods_secure([job], RDMA_CAPS) == 1


SECRET_KEY_NAMES = re.compile(r"(pass(word)?|secret|token|api[-_]?key|private[-_]?key|credential|auth)", re.I)
SECRET_VALUES = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                                   # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),                         # GitHub tokens
    re.compile(r"xox[baprs]-[A-Za-z0-9-]{10,}"),                       # Slack tokens
    re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\."),        # JWTs
    re.compile(r"(?i)(password|passwd|secret|token|api[-_]?key|[-_]key)\s*[=:]\s*(?!\$\()[^\s,;\"'$]{6,}"),
]


def _walk(node, path=()):
    if isinstance(node, dict):
        for k, val in node.items():
            yield from _walk(val, path + (str(k),))
    elif isinstance(node, list):
        for i, val in enumerate(node):
            yield from _walk(val, path + (str(i),))
    else:
        yield path, node


def find_secrets(objs) -> list[str]:
    found = []
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Secret":
            found.append(f"{name}: a Secret object in the manifests")
        for path, value in _walk(obj):
            if not isinstance(value, str):
                continue
            for pat in SECRET_VALUES:
                if pat.search(value):
                    found.append(f"{name} {'/'.join(path)}: value looks like a secret")
        for tmpl in pod_specs(obj) if obj["kind"] in POD_KINDS else ():
            for c in tmpl["spec"]["containers"] + tmpl["spec"].get("initContainers", []):
                for env in c.get("env", []):
                    if SECRET_KEY_NAMES.search(env["name"]) and "value" in env:
                        found.append(f"{name} env {env['name']}: literal value; use valueFrom.secretKeyRef")
    return found


def test_no_secrets_in_rendered_manifests(rendered):
    assert find_secrets(objects(rendered)) == []
    # ... and the scanner does find one when it is there.
    leak = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"template": {"spec": {
        "containers": [{"name": "c", "args": ["--http-restricted-api=model-repository:admin-key=hunter2hunter2"],
                        "env": [{"name": "ADMIN_TOKEN", "value": "abc"}, {"name": "K", "value": "AKIAABCDEFGHIJKLMNOP"}]}]}}}}
    assert len(find_secrets([leak])) == 3


# ---------------------------------------------------------------- serving

def _prod(rendered, kind):
    return next(o for o in objects(rendered, "k8s/serving/overlays/production") if o["kind"] == kind)


def test_triton_deployment_production_settings(rendered):
    dep = _prod(rendered, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    triton = spec["containers"][0]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", triton["image"]) and not triton["image"].endswith(":latest")
    assert "--model-repository=/repository" in triton["args"]
    assert "--model-control-mode=none" in triton["args"] and not any("explicit" in a for a in triton["args"])
    assert_non_inference_apis_restricted(triton)
    assert "--metrics-config=summary_latencies=true" in triton["args"]
    assert {p["containerPort"] for p in triton["ports"]} == {8000, 8001, 8002}
    # Liveness on readiness: with --strict-readiness a dead python stub makes Triton (>= 26.04) not ready, and Triton
    # never restarts it; /v2/health/live would stay 200 and keep the broken pod. A minute, not a blip, restarts it.
    assert "--strict-readiness=true" in triton["args"]
    serving = load_table()["serving"]
    assert serving["rows"][serving["current"]]["ready_reports_dead_stub"] is True, "liveness on readiness needs it"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert triton[probe]["httpGet"]["path"] == "/v2/health/ready", probe
    live = triton["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60 and live.get("timeoutSeconds", 1) >= 5, live
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    init = spec["initContainers"][0]
    assert init["image"] == triton["image"], "plans must be built by the TensorRT that loads them"
    assert init["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert init["command"] == ["/bin/sh", "/scripts/build-plans.sh"]
    mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert mounts["plan-cache"]["mountPath"] == "/plan-cache"
    vols = {vol["name"]: vol for vol in spec["volumes"]}
    # The plan cache is the pod's own unless an overlay uses components/shared-plan-cache: no claim that can stay
    # Pending (an RWX claim on a cluster whose default class is RWO) keeps a serving pod from scheduling.
    assert vols["plan-cache"] == {"name": "plan-cache", "emptyDir": {"sizeLimit": "10Gi"}}
    assert not [o for o in objects(rendered, "k8s/serving/overlays/production") if o["kind"] == "PersistentVolumeClaim"]
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert vols["scripts"]["configMap"]["name"].startswith("triton-build-plans-")  # hashed, rewritten by kustomize
    # Under an HPA the Deployment carries no replicas (a re-apply would reset the scaled count); the HPA's minimum rules.
    assert "replicas" not in dep["spec"] and dep["metadata"]["namespace"] == "serving"
    assert _prod(rendered, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


# Triton's APIs (tritonserver --help, "Allowed APIs"); a caller of the classify ensemble needs only these three.
OPEN_APIS = {"health", "metadata", "inference"}
TRITON_APIS = OPEN_APIS | {"shared-memory", "model-config", "model-repository", "statistics", "trace", "logging"}


def assert_non_inference_apis_restricted(container) -> None:
    """Every API but health/metadata/inference needs the admin key on HTTP and on gRPC; the key comes from a Secret."""
    for flag in ("--http-restricted-api=", "--grpc-restricted-protocol="):
        values = [a[len(flag):] for a in container["args"] if a.startswith(flag)]
        assert len(values) == 1, f"{flag} given {len(values)} times"
        apis, _, header = values[0].partition(":")
        assert set(apis.split(",")) == TRITON_APIS - OPEN_APIS, f"{flag} restricts {apis}"
        assert header == "triton-admin-key=$(TRITON_ADMIN_KEY)", header
    env = {e["name"]: e for e in container["env"]}
    assert env["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "triton-admin-key", "key": "key"}
    assert "value" not in env["TRITON_ADMIN_KEY"]


def test_staging_restricts_model_control_with_a_key_from_a_secret(rendered):
    dep = next(o for o in objects(rendered, "k8s/serving/overlays/staging") if o["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--model-control-mode=explicit" in c["args"] and "--model-control-mode=none" not in c["args"]
    assert_non_inference_apis_restricted(c)
    # Explicit model control: not ready while a model loads through the API or after a failed load; a liveness probe on
    # readiness would restart the pod and drop what was loaded, so staging's liveness is the process's.
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_shared_plan_cache_component_takes_the_storage_class(kubectl, tmp_path):
    """An overlay that shares the plan cache names its RWX class; the Deployment then mounts the claim."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(REPO_ROOT / "k8s/serving", overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "serving",
        "resources": [f"{rel}/overlays/production"], "components": [f"{rel}/components/shared-plan-cache"],
        "patches": [{"target": {"kind": "PersistentVolumeClaim", "name": "triton-plan-cache"},
                     "patch": '[{"op": "add", "path": "/spec/storageClassName", "value": "nfs-rwx"}]'}]}))
    objs = v.kustomize_build(overlay, kubectl)
    for obj in objs:
        v.validate_object(obj)
    pvc = next(o for o in objs if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "nfs-rwx" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    dep = next(o for o in objs if o["kind"] == "Deployment")
    vols = {vol["name"]: vol for vol in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["plan-cache"] == {"name": "plan-cache", "persistentVolumeClaim": {"claimName": "triton-plan-cache"}}


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity))
    return int(m[1]) * units.get(m[2], 1)


def test_dev_shm_holds_every_python_models_worst_case(rendered, tmp_path):
    """/dev/shm (memory-backed; a pod over its sizeLimit is evicted) holds every python stub's worst case at once:
    instances x batch x (largest request + output) + the stub's own region, for the configs the image ships
    (train/configs/imagenet.yaml limits, instances = the triton container's CPU request), python and DALI routes."""
    from types import SimpleNamespace

    from serve.model_config import python_shm_bytes
    from serve.repository import default_max_request_bytes, postprocess_config, preprocess_config, to_pbtxt
    from serve.repository_dali import guard_config
    from train.config import load_config

    spec = _prod(rendered, "Deployment")["spec"]["template"]["spec"]
    triton = spec["containers"][0]
    instances = int(str(triton["resources"]["requests"]["cpu"]))
    dshm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert dshm["medium"] == "Memory" and {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
    cfg = load_config("imagenet")
    s = SimpleNamespace(**cfg.serve.model_dump())
    size, classes, request = cfg.data.image_size, 1000, default_max_request_bytes(s)
    pixels = 3 * size * size * 4
    pre, post = preprocess_config(s, size, 100, instances, request), postprocess_config(s, classes)
    guard = guard_config(s, instances, request)
    assert int(pre.parameters["MAX_REQUEST_BYTES"].string_value) == request
    post_bytes = python_shm_bytes(1, post.max_batch_size, 4 * classes, 4 * classes)
    routes = {"python": python_shm_bytes(instances, pre.max_batch_size, request, pixels) + post_bytes,
              "dali": python_shm_bytes(instances, guard.max_batch_size, request, request) + post_bytes}
    for route, need in routes.items():
        assert need <= _bytes(dshm["sizeLimit"]), f"{route} route needs {need / 2**30:.2f} GiB of /dev/shm, sizeLimit {dshm['sizeLimit']}"
    # The bound is what makes it fit: at the classifier's batch (64) the python route alone would need ~30 GB.
    assert python_shm_bytes(instances, s.max_batch_size, request, pixels) > 4 * _bytes(dshm["sizeLimit"])
    assert _bytes(triton["resources"]["limits"]["memory"]) >= 2 * _bytes(dshm["sizeLimit"])   # tmpfs pages count here
    # The init container knows the volume's size and refuses a pod whose python models could outgrow it, computing
    # the same sum from the configs it serves (after setting the instance counts from the CPU request).
    init_env = {e["name"]: e.get("value") for e in spec["initContainers"][0]["env"]}
    assert int(init_env["PYTHON_SHM_BYTES"]) == _bytes(dshm["sizeLimit"])
    src = tmp_path / "models"
    for name, model_cfg in (("preprocess", preprocess_config(s, size, 100, 1, request)), ("postprocess", post),
                            ("guard", guard_config(s, 1, request))):
        (src / name).mkdir(parents=True)
        (src / name / "config.pbtxt").write_text(to_pbtxt(model_cfg))

    def build_plans(shm_bytes: int):
        dst = tmp_path / f"repository-{shm_bytes}"
        dst.mkdir()
        return subprocess.run(["/bin/sh", str(REPO_ROOT / "k8s/serving/base/build-plans.sh")], capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin", "SRC_REPOSITORY": str(src), "DST_REPOSITORY": str(dst),
                                               "PLAN_CACHE": str(tmp_path / "cache"), "PLAN_FAILURE_POLICY": "fallback",
                                               "PLAN_TERMINATION_LOG": str(tmp_path / "termination"), "PLAN_MODELS": "none",
                                               "PREPROCESS_INSTANCES": str(instances), "PYTHON_SHM_BYTES": str(shm_bytes)})

    both = routes["python"] + routes["dali"] - post_bytes    # this test repository has preprocess and guard both
    r = build_plans(both)
    assert r.returncode == 0 and f"python models: at most {both} of {both} bytes of /dev/shm" in r.stdout, r.stdout + r.stderr
    r = build_plans(both - 1)
    assert r.returncode == 2 and "the python models may hold" in r.stdout and "raise the dshm sizeLimit" in r.stdout


def test_service_servicemonitor_hpa_and_adapter_fit_together(rendered):
    svc, sm, hpa = _prod(rendered, "Service"), _prod(rendered, "ServiceMonitor"), _prod(rendered, "HorizontalPodAutoscaler")
    dep = _prod(rendered, "Deployment")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    # The rules select job="triton": the ServiceMonitor's default job label is the Service name.
    assert svc["metadata"]["name"] == "triton" and "jobLabel" not in sm["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = _prod(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", ["production", "staging"])
def test_every_hpa_asks_for_the_metric_the_prometheus_adapter_values_serve(rendered, overlay):
    """The HPA scales on the custom metric prometheus-adapter serves from its chart values (generated by
    scripts/monitoring.py); a renamed metric on either side leaves the HPA without a signal."""
    from scripts import monitoring as m
    hpa = next(o for o in objects(rendered, f"k8s/serving/overlays/{overlay}") if o["kind"] == "HorizontalPodAutoscaler")
    served = {r["name"]["as"] for r in yaml.safe_load(m.ADAPTER_VALUES_FILE.read_text())["rules"]["custom"]}
    asked = {metric["pods"]["metric"]["name"] for metric in hpa["spec"]["metrics"]}
    assert asked == {m.HPA_METRIC} and asked <= served


def test_monitoring_objects_carry_the_selector_label_of_their_kustomization(rendered, kubectl, tmp_path):
    """kube-prometheus-stack selects ServiceMonitors and PrometheusRules by `release: <its release>`: the label is a
    parameter of each kustomization (the prometheus-selector component), put on those objects only."""
    for d in ("k8s/serving/overlays/production", "k8s/serving/overlays/staging", "k8s/monitoring"):
        for o in objects(rendered, d):
            labels = o["metadata"].get("labels", {})
            if o["kind"] in ("ServiceMonitor", "PrometheusRule"):
                assert labels.get("release") == "kube-prometheus-stack", f"{d}: {o['kind']}"
            else:
                assert "release" not in labels, f"{d}: {o['kind']}/{o['metadata']['name']} got the selector label"
            assert o["metadata"]["name"] != "prometheus-selector", "the parameter ConfigMap is local-config, never applied"
    # Another release name is one line in an overlay that uses the component (kustomize wants relative paths).
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(REPO_ROOT / "k8s/serving/base", tmp_path)],
        "components": [os.path.relpath(REPO_ROOT / "k8s/monitoring/components/prometheus-selector", tmp_path)],
        "configMapGenerator": [{"name": "prometheus-selector", "literals": ["release=monitoring"], "options": {
            "disableNameSuffixHash": True, "annotations": {"config.kubernetes.io/local-config": "true"}}}]}))
    sm = next(o for o in v.kustomize_build(tmp_path, kubectl) if o["kind"] == "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "monitoring"


def test_python_preprocess_instances_follow_the_pods_cpu_request(rendered, tmp_path):
    """One setting sizes both: the triton container's CPU request reaches the init container through the downward
    API, and build-plans.sh (run here for real) gives the python preprocess one instance per requested core."""
    from types import SimpleNamespace

    from serve.repository import parse_pbtxt, postprocess_config, preprocess_config, to_pbtxt
    dep = _prod(rendered, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    triton, init = spec["containers"][0], spec["initContainers"][0]
    env = {e["name"]: e for e in init["env"]}
    assert env["PREPROCESS_INSTANCES"]["valueFrom"]["resourceFieldRef"] == {
        "containerName": triton["name"], "resource": "requests.cpu", "divisor": "1"}
    cpus = -(-int(str(triton["resources"]["requests"]["cpu"]).replace("m", "")) // (1000 if "m" in str(
        triton["resources"]["requests"]["cpu"]) else 1))   # the downward API rounds up to whole cores
    assert cpus >= 8, "a GPU pod decodes on these cores; a handful caps it far below an fp16 TensorRT classifier"
    s = SimpleNamespace(max_batch_size=64, preferred_batch_sizes=[16, 32, 64], max_queue_delay_us=500,
                        max_image_bytes=1 << 20, max_image_pixels=1 << 24)
    src, dst = tmp_path / "models", tmp_path / "repository"
    for name, cfg in (("preprocess", preprocess_config(s, 224, 100, 2)), ("postprocess", postprocess_config(s, 3))):
        (src / name).mkdir(parents=True)
        (src / name / "config.pbtxt").write_text(to_pbtxt(cfg))
    dst.mkdir()

    def build_plans(instances):
        return subprocess.run(["/bin/sh", str(REPO_ROOT / "k8s/serving/base/build-plans.sh")], capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin", "SRC_REPOSITORY": str(src), "DST_REPOSITORY": str(dst),
                                               "PLAN_CACHE": str(tmp_path / "cache"), "PLAN_FAILURE_POLICY": "fallback",
                                               "PLAN_TERMINATION_LOG": str(tmp_path / "termination"),
                                               "PREPROCESS_INSTANCES": instances})

    r = build_plans(str(cpus))
    assert r.returncode == 0, r.stdout + r.stderr
    counts = {name: [g.count for g in parse_pbtxt((dst / name / "config.pbtxt").read_text()).instance_group]
              for name in ("preprocess", "postprocess")}
    assert counts == {"preprocess": [cpus], "postprocess": [1]}, r.stdout
    r = build_plans("3.5")
    assert r.returncode == 2 and "PREPROCESS_INSTANCES='3.5' is not a positive integer" in r.stdout


def test_network_policy_admits_only_the_gateway_and_prometheus(rendered):
    np_ = _prod(rendered, "NetworkPolicy")
    assert set(np_["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    sources = []
    for rule in np_["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every pod in the cluster"
        ports = sorted(p["port"] for p in rule["ports"])
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            sources.append((ns, tuple(sorted(peer.get("podSelector", {}).get("matchLabels", {}).items())), tuple(ports)))
    assert sorted(sources) == [("gateway", (), (8000, 8001)),
                               ("monitoring", (("app.kubernetes.io/name", "prometheus"),), (8002,))]
    assert egress_peers(np_) == [("kube-system", (("k8s-app", "kube-dns"),), (("TCP", 53), ("UDP", 53)))]


def egress_peers(np_) -> list:
    """(namespace or None for the policy's own, pod labels, ports) of every egress peer; an egress rule without `to`
    (``egress: [{}]``) or a peer without selectors allows everything and fails here."""
    peers = []
    for rule in np_["spec"].get("egress", []):
        assert rule.get("to"), f"an egress rule without `to` allows all egress: {rule}"
        ports = tuple(sorted((p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])))
        for peer in rule["to"]:
            assert "ipBlock" not in peer and peer.get("podSelector", {}).get("matchLabels"), peer
            ns = peer.get("namespaceSelector")
            peers.append((ns["matchLabels"]["kubernetes.io/metadata.name"] if ns else None,
                          tuple(sorted(peer["podSelector"]["matchLabels"].items())), ports))
    return sorted(peers, key=str)


TRAINING_OVERLAYS = ["ddp", "ddp-rdma", "deepspeed", "indexed-job", "trainjob"]


@pytest.mark.parametrize("overlay", TRAINING_OVERLAYS)
def test_training_pods_reach_only_their_job_dns_and_prometheus_and_mount_no_token(rendered, overlay):
    """torchrun's c10d store and gloo/NCCL sockets are open to the job's pods only; Prometheus reaches the metrics
    ports; egress goes to the job's pods and DNS; no service-account token is mounted where the kind allows it."""
    objs = list(objects(rendered, f"k8s/training/overlays/{overlay}"))
    pols = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert len(pols) == 1, [o["kind"] for o in objs]
    np_ = pols[0]
    me = (("app.kubernetes.io/name", "seresnet-train"),)
    assert tuple(sorted(np_["spec"]["podSelector"]["matchLabels"].items())) == me
    assert set(np_["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for obj in objs:
        for tpl in pod_specs(obj):   # the policy selects every training pod
            assert np_["spec"]["podSelector"]["matchLabels"].items() <= tpl["metadata"]["labels"].items(), obj["kind"]
    ingress = []
    for rule in np_["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every pod in the cluster"
        ports = tuple((p["port"], p.get("endPort")) for p in rule.get("ports", []))
        for peer in rule["from"]:
            assert "ipBlock" not in peer and peer["podSelector"]["matchLabels"], peer
            ns = peer.get("namespaceSelector")
            ingress.append((ns["matchLabels"]["kubernetes.io/metadata.name"] if ns else None,
                            tuple(sorted(peer["podSelector"]["matchLabels"].items())), ports))
    assert sorted(ingress, key=str) == [("monitoring", (("app.kubernetes.io/name", "prometheus"),), ((9400, 9407),)),
                                        (None, me, ())], ingress
    assert egress_peers(np_) == [("kube-system", (("k8s-app", "kube-dns"),), (("TCP", 53), ("UDP", 53))),
                                 (None, me, ())]
    for obj in objs:
        if obj["kind"] in ("PyTorchJob", "Job"):   # a TrainJob's pods take it from their ClusterTrainingRuntime
            for tpl in pod_specs(obj):
                assert tpl["spec"].get("automountServiceAccountToken") is False, obj["metadata"]["name"]


# ---------------------------------------------------------------- training

def _job(rendered, overlay):
    return next(o for o in objects(rendered, f"k8s/training/overlays/{overlay}") if o["kind"] in ("PyTorchJob", "Job"))


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_pytorchjob_overlays_run_torchrun_with_the_engine(rendered, engine):
    job = _job(rendered, engine)
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    c = worker["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch"
    assert c["command"] == ["python", "-m", "torch.distributed.run"]
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert c["args"][:5] == [f"--nproc-per-node={gpus}", "-m", "train", "--config", "/etc/seresnet/config.yaml"]
    assert c["args"][-2:] == ["--set", f"engine={engine}"]
    assert "deepspeed" not in c["command"]
    # torchrun runs directly in the pod: the elastic rejoin fix of launch_env must be in the pod's env too.
    assert {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"} in c["env"]
    assert job["spec"]["nprocPerNode"] == gpus
    ep = job["spec"]["elasticPolicy"]
    assert ep["rdzvBackend"] == "c10d" and ep["minReplicas"] <= ep["maxReplicas"] and "maxRestarts" in ep
    vols = {vol["name"]: vol for vol in worker["template"]["spec"]["volumes"]}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert vols["config"]["configMap"]["name"].startswith(f"seresnet-train-config-{engine}-")
    assert any(t["key"] == "nvidia.com/gpu" for t in worker["template"]["spec"]["tolerations"])
    pm = next(o for o in objects(rendered, f"k8s/training/overlays/{engine}") if o["kind"] == "PodMonitor")
    ports = {p["name"] for p in c["ports"]}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
    assert len(pm["spec"]["podMetricsEndpoints"]) == int(gpus)
    assert pm["spec"]["selector"]["matchLabels"]["training.kubeflow.org/job-name"] == job["metadata"]["name"]


def test_world_size_trap_is_explained_where_the_job_is_defined():
    text = (REPO_ROOT / "k8s/training/pytorchjob/pytorchjob.yaml").read_text()
    assert "WORLD_SIZE" in text and "torchrun overwrites" in text and "PET_NPROC_PER_NODE" in text


def test_indexed_job_runs_the_project_launcher_with_valid_arguments(rendered):
    job = _job(rendered, "indexed-job")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "launch", "multinode"]
    svc = next(o for o in objects(rendered, "k8s/training/overlays/indexed-job") if o["kind"] == "Service")
    assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert f"--rdzv-endpoint={job['metadata']['name']}-0.{svc['metadata']['name']}:29400" in c["args"]
    r = subprocess.run([PY, "-m", "launch", "multinode", *c["args"][:c["args"].index("--")], "--dry-run", "--",
                        *c["args"][c["args"].index("--") + 1:]], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--rdzv-backend=c10d" in r.stdout and "--nnodes=1 " in r.stdout
