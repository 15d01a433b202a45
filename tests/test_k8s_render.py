"""`python -m launch k8s` renders training jobs from a training config: engines, kinds, image per GPU generation,
RDMA and gang scheduling; every rendered job builds with kubectl kustomize and validates (core kinds and CRDs)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from scripts import validate_manifests as v
from launch.k8s import Gang, Rdma, render_training_job
from launch.torchrun import REPO_ROOT, LaunchError
from tests.test_k8s_manifests import RDMA_CAPS, assert_pods_secure, find_secrets
from train.config import load_config

PY = sys.executable

@pytest.mark.parametrize("kind,engine", [("pytorchjob", "ddp"), ("pytorchjob", "deepspeed"), ("indexed-job", "deepspeed")])
def test_launch_k8s_renders_the_job_from_the_training_config(tmp_path, kubectl, kind, engine):
    sets = [f"engine={engine}", "cluster.image=registry.example.com/team/seresnet-train:2.3.1", "cluster.namespace=research",
            "cluster.nnodes=2", f"cluster.max_nnodes={4 if kind == 'pytorchjob' else 0}", "cluster.gpus_per_node=4",
            "cluster.cpu='48'", "cluster.memory=300Gi", "cluster.shm_size=32Gi", "cluster.max_restarts=7",
            "cluster.data_pvc=my-data", "cluster.checkpoint_pvc=my-ckpt", "optim.lr=0.5"]
    config = REPO_ROOT / "configs" / "smoke.yaml"
    out = tmp_path / "job"
    r = subprocess.run([PY, "-m", "launch", "k8s", "--config", str(config), *sum([["--set", s] for s in sets], []),
                        "--out", str(out), "--kind", kind], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    objs = v.kustomize_build(out, kubectl)
    for obj in objs:
        v.validate_object(obj)
        assert obj["metadata"]["namespace"] == "research"
    assert find_secrets(objs) == []
    assert assert_pods_secure(objs) == 1
    cfg = load_config(config, sets)
    job = next(o for o in objs if o["kind"] in ("PyTorchJob", "Job"))
    if kind == "pytorchjob":
        assert job["metadata"]["name"] == f"seresnet50-{engine}"
        assert job["spec"]["nprocPerNode"] == "4"
        assert job["spec"]["elasticPolicy"] | {} == {"rdzvBackend": "c10d", "rdzvPort": 29400, "minReplicas": 2,
                                                     "maxReplicas": 4, "maxRestarts": 7}
        tmpl = job["spec"]["pytorchReplicaSpecs"]["Worker"]
        assert tmpl["replicas"] == 2
        tmpl = tmpl["template"]
        args = tmpl["spec"]["containers"][0]["args"]
        assert args[0] == "--nproc-per-node=4" and args[-1] == f"engine={engine}"
        job_label = "training.kubeflow.org/job-name"
    else:
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
        tmpl = job["spec"]["template"]
        args = tmpl["spec"]["containers"][0]["args"]
        assert {"--nnodes=2", "--nproc-per-node=4", "--max-restarts=7", f"--engine={engine}"} <= set(args)
        job_label = "job-name"
    spec = tmpl["spec"]
    c = spec["containers"][0]
    # No cluster.gpu_arch: the cu130 build (Turing .. Blackwell), named by the tag suffix from train/compat.yaml.
    assert c["image"] == "registry.example.com/team/seresnet-train:2.3.1-cu130"
    assert c["resources"] == {"requests": {"cpu": "48", "memory": "300Gi", "nvidia.com/gpu": "4"},
                              "limits": {"memory": "300Gi", "nvidia.com/gpu": "4"}}
    vols = {vol["name"]: vol for vol in spec["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "my-data"
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "my-ckpt"
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert sorted(p["containerPort"] for p in c["ports"] if p["name"].startswith("metrics-")) == [9400, 9401, 9402, 9403]
    pm = next(o for o in objs if o["kind"] == "PodMonitor")
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == [f"metrics-{i}" for i in range(4)]
    assert pm["spec"]["selector"]["matchLabels"][job_label] == job["metadata"]["name"] == pm["metadata"]["name"]
    # Only this job's pods reach its torchrun store and collectives (another job in the namespace does not).
    pol = next(o for o in objs if o["kind"] == "NetworkPolicy")
    mine = {job_label: job["metadata"]["name"]}
    assert pol["metadata"]["name"] == job["metadata"]["name"] and pol["spec"]["podSelector"]["matchLabels"] == mine
    assert pol["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": mine}}]
    assert pol["spec"]["egress"][0]["to"] == [{"podSelector": {"matchLabels": mine}}]
    # The ConfigMap the pods read IS the training config, with only the in-pod paths rewritten.
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"]
    pod_cfg = yaml.safe_load(cm["data"]["config.yaml"])
    expected = cfg.to_dict()
    expected["data"]["root"] = "/data"
    expected["output_dir"] = f"/checkpoints/{job['metadata']['name']}"
    expected["metrics"].update(address="0.0.0.0", port=9400)
    assert pod_cfg == expected
    assert load_config(None, []).__class__.model_validate(pod_cfg).optim.lr == 0.5


# The plan-building init script (k8s/serving/base/build-plans.sh) is tested in tests/test_build_plans.py.


def test_two_rendered_jobs_in_one_namespace_do_not_collide(tmp_path, kubectl):
    names = {}
    for job in ("exp-a", "exp-b"):
        r = subprocess.run([PY, "-m", "launch", "k8s", "--config", str(REPO_ROOT / "configs" / "smoke.yaml"),
                            "--name", job, "--out", str(tmp_path / job)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        names[job] = {(o["kind"], o["metadata"]["name"]) for o in v.kustomize_build(tmp_path / job, kubectl)}
    assert not names["exp-a"] & names["exp-b"], names
    assert ("PyTorchJob", "exp-a") in names["exp-a"] and ("PodMonitor", "exp-a") in names["exp-a"]


def _render(tmp_path, kubectl, sets, **kw):
    cfg = load_config(REPO_ROOT / "configs" / "imagenet.yaml", sets)
    out = render_training_job(cfg, tmp_path / "job", **kw)
    objs = v.kustomize_build(out, kubectl)
    for obj in objs:
        v.validate_object(obj)   # schedulingPolicy, envFrom, the rdma resource: all against the real schemas
    return objs


def test_volta_cluster_gets_the_cu126_image_and_rdma_gang_job_validates(tmp_path, kubectl):
    objs = _render(tmp_path, kubectl, ["cluster.nnodes=4", "cluster.max_nnodes=6", "cluster.gpu_arch='7.0'"],
                   rdma=Rdma("rdma/ib", 2, "mlx5_0,mlx5_1", "net1"), gang=Gang(queue="research"))
    job = next(o for o in objs if o["kind"] == "PyTorchJob")
    spec = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["image"] == "ghcr.io/seresnet-stack/train:0.1.0-cu126"
    assert c["resources"]["requests"]["rdma/ib"] == c["resources"]["limits"]["rdma/ib"] == "2"
    assert "rdma/hca_shared_devices_a" not in c["resources"]["limits"]
    assert c["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert assert_pods_secure(objs, RDMA_CAPS) == 1
    cm_name = c["envFrom"][0]["configMapRef"]["name"]
    nccl = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cm_name)["data"]
    assert nccl["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and nccl["NCCL_SOCKET_IFNAME"] == "net1" and nccl["NCCL_IB_DISABLE"] == "0"
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4, "scheduleTimeoutSeconds": 600, "queue": "research"}
    # The same job without the options: no capability added back, no RDMA, no gang policy; H100 -> cu130.
    plain = next(o for o in _render(tmp_path, kubectl, ["cluster.gpu_arch='9.0'"]) if o["kind"] == "PyTorchJob")
    c = plain["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["image"].endswith(":0.1.0-cu130") and "envFrom" not in c and "add" not in c["securityContext"]["capabilities"]
    assert "schedulingPolicy" not in plain["spec"]["runPolicy"]


def test_rdma_on_an_indexed_job_and_clear_errors(tmp_path, kubectl):
    objs = _render(tmp_path, kubectl, ["cluster.nnodes=2"], kind="indexed-job", rdma=Rdma())
    c = next(o for o in objs if o["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["rdma/hca_shared_devices_a"] == "1" and c["envFrom"]
    cfg = load_config(REPO_ROOT / "configs" / "imagenet.yaml", [])
    with pytest.raises(LaunchError, match="Indexed Job use Kueue"):
        render_training_job(cfg, tmp_path / "x", kind="indexed-job", gang=Gang())
    with pytest.raises(LaunchError, match="No training image serves GPU compute capability 6.0"):
        render_training_job(cfg, tmp_path / "x", gpu_arch="6.0")
    with pytest.raises(LaunchError, match="needs the cu126 build"):
        render_training_job(load_config(REPO_ROOT / "configs" / "imagenet.yaml", ["cluster.image=r.io/t:1-cu130"]),
                            tmp_path / "x", gpu_arch="7.0")


RUNTIME = REPO_ROOT / "k8s" / "schemas" / "trainer.kubeflow.org_clustertrainingruntime_torch-distributed.yaml"


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_trainjob_on_the_torch_distributed_runtime(tmp_path, kubectl, engine):
    """Kubeflow Trainer v2: a TrainJob valid against the vendored v2.3 CRD, nodes / processes / resources in
    spec.trainer, torchrun taking nodes, rank and master from the PET_* variables the runtime injects, and pod
    patches that name the upstream runtime's own replicated job and container."""
    sets = [f"engine={engine}", "cluster.nnodes=3", "cluster.gpus_per_node=4", "cluster.cpu='48'", "cluster.memory=300Gi",
            "cluster.data_pvc=my-data", "cluster.checkpoint_pvc=my-ckpt", "cluster.shm_size=32Gi", "cluster.namespace=research"]
    objs = _render(tmp_path, kubectl, sets, kind="trainjob")
    job = next(o for o in objs if o["kind"] == "TrainJob")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["metadata"]["name"] == f"seresnet50-trainjob-{engine}"
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    t = job["spec"]["trainer"]
    assert (t["numNodes"], t["numProcPerNode"]) == (3, 4)
    assert t["resourcesPerNode"] == {"requests": {"cpu": "48", "memory": "300Gi", "nvidia.com/gpu": "4"},
                                     "limits": {"memory": "300Gi", "nvidia.com/gpu": "4"}}
    assert t["image"] == "ghcr.io/seresnet-stack/train:0.1.0-cu130"
    # No node count, rank or address on the command line: torchrun reads PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
    # PET_MASTER_ADDR and PET_MASTER_PORT, which the runtime sets and forbids in trainer.env.
    assert t["command"] == ["python", "-m", "torch.distributed.run"] and t["args"] == ["-m", "train", "--config", "/etc/seresnet/config.yaml"]
    assert not [e for e in t["env"] if e["name"].startswith("PET_")]
    runtime = yaml.safe_load(RUNTIME.read_text())
    assert runtime["kind"] == "ClusterTrainingRuntime" and runtime["metadata"]["name"] == "torch-distributed"
    rjobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    patched = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert patched["name"] in rjobs
    runtime_containers = {c["name"] for c in rjobs[patched["name"]]["template"]["spec"]["template"]["spec"]["containers"]}
    pod = patched["template"]["spec"]["template"]
    assert {c["name"] for c in pod["spec"]["containers"]} <= runtime_containers
    assert pod["metadata"]["labels"]["seresnet.io/engine"] == engine
    vols = {vol["name"]: vol for vol in pod["spec"]["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "my-data"
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "my-ckpt"
    assert vols["dshm"]["emptyDir"]["sizeLimit"] == "32Gi"
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"]   # the hashed name, rewritten in the CRD
    assert yaml.safe_load(cm["data"]["config.yaml"])["engine"] == engine
    assert assert_pods_secure(objs) == 1
    pm = next(o for o in objs if o["kind"] == "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"]["jobset.sigs.k8s.io/jobset-name"] == job["metadata"]["name"]
    assert [e["portNumber"] for e in pm["spec"]["podMetricsEndpoints"]] == [9400, 9401, 9402, 9403]


def test_trainjob_refuses_what_it_cannot_render(tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "imagenet.yaml", ["cluster.nnodes=2", "cluster.max_nnodes=4"])
    with pytest.raises(LaunchError, match="fixed number of nodes"):
        render_training_job(cfg, tmp_path / "x", kind="trainjob")
    cfg = load_config(REPO_ROOT / "configs" / "imagenet.yaml", [])
    with pytest.raises(LaunchError, match="for a TrainJob or an Indexed Job use Kueue"):
        render_training_job(cfg, tmp_path / "x", kind="trainjob", gang=Gang())
    with pytest.raises(LaunchError, match="ClusterTrainingRuntime that requests the HCAs"):
        render_training_job(cfg, tmp_path / "x", kind="trainjob", rdma=Rdma())


@pytest.mark.parametrize("kind,extra", [("trainjob", []), ("pytorchjob", ["--rdma", "--gang"])])
def test_rendered_overlay_is_self_contained(tmp_path, kubectl, kind, extra):
    """The rendered folder builds the same objects after it is moved away from where it was written (a GitOps
    repository): every path it names is inside it."""
    out = tmp_path / "render" / "job"
    r = subprocess.run([PY, "-m", "launch", "k8s", "--config", "imagenet", "--kind", kind, *extra, "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    before = v.kustomize_build(out, kubectl)
    for f in out.rglob("kustomization.yaml"):
        doc = yaml.safe_load(f.read_text())
        for ref in doc.get("resources", []) + doc.get("components", []):
            assert (f.parent / ref).resolve().is_relative_to(out.resolve()), f"{f}: {ref} leaves the rendered folder"
    moved = tmp_path / "gitops" / "clusters" / "a" / "job"
    moved.parent.mkdir(parents=True)
    out.rename(moved)
    assert v.kustomize_build(moved, kubectl) == before
    assert str(tmp_path) not in "".join(p.read_text() for p in moved.rglob("*.yaml"))
