"""Render a Kubernetes training job from a training config (one config is the source of truth: a cluster job cannot drift from its config).

Kinds: ``trainjob`` (Kubeflow Trainer v2 TrainJob on the torch-distributed ClusterTrainingRuntime), ``pytorchjob``
(the legacy training-operator v1 PyTorchJob, elastic) and ``indexed-job`` (a plain batch/v1 Indexed Job). The output
folder is a kustomize overlay on a copy of the packaged manifests (k8s/training, shipped as launch/k8s_training) in
its ``base/``: it swaps in the resolved config as the job's ConfigMap and patches image, nodes, GPUs per node,
resources, volumes and restarts from ``cluster.*``. The folder names no path outside itself, so it can be committed
to a GitOps repository as it is.
"""
from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from launch.torchrun import LaunchError
from train.compat import image_for_arch, train_images

# k8s/training in a checkout (launch/k8s_training links to it); the packaged copy in an installed wheel.
TRAINING_DIR = Path(__file__).resolve().parent / "k8s_training"
KINDS = ("pytorchjob", "trainjob", "indexed-job")
BASE = "base"   # the rendered folder's copy of TRAINING_DIR
BASE_IMAGE = "ghcr.io/seresnet-stack/train"
METRICS_PORT = 9400
RDZV_PORT = 29400
DATA_MOUNT = "/data"
CHECKPOINT_MOUNT = "/checkpoints"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DEFAULT_IMAGE_ROW = "ampere_plus"   # no cluster.gpu_arch: the cu130 image (Turing .. Blackwell)


@dataclass(frozen=True)
class Rdma:
    """RDMA/InfiniBand for NCCL across nodes (k8s/training/components/rdma): device-plugin resource, HCAs, interface."""
    resource: str = "rdma/hca_shared_devices_a"
    count: int = 1
    ib_hca: str = "mlx5"
    socket_ifname: str = "eth0"


@dataclass(frozen=True)
class Gang:
    """Gang scheduling (k8s/training/components/gang): all nodes' pods bound at once or none (PyTorchJob only)."""
    queue: Optional[str] = None
    priority_class: Optional[str] = None
    timeout_s: int = 600


def image_for(image: str, gpu_arch: Optional[str]) -> tuple[str, str]:
    """``cluster.image`` (repo:version) + the GPU generation -> (image with the build's tag suffix, row name).

    One training image per GPU generation (train/compat.yaml ``train_images``): ``repo:0.1.0`` becomes
    ``repo:0.1.0-cu126`` for Volta (7.0) and ``repo:0.1.0-cu130`` for Turing and newer. A tag that already ends
    in a build suffix must be the right one; a digest (``@sha256:``) is taken as given."""
    if gpu_arch is None:
        row_name = DEFAULT_IMAGE_ROW
    else:
        if not re.fullmatch(r"\d+\.\d+", str(gpu_arch)):
            raise LaunchError(f"cluster.gpu_arch '{gpu_arch}' must be a compute capability like 7.0 (V100), 8.0 (A100) or 9.0 (H100).")
        try:
            row_name, _ = image_for_arch(str(gpu_arch))
        except KeyError:
            known = sorted({a for r in train_images().values() for a in r["archs"]}, key=lambda a: tuple(map(int, a.split("."))))
            raise LaunchError(f"No training image serves GPU compute capability {gpu_arch}; train/compat.yaml covers {', '.join(known)}.") from None
    if "@" in image:
        return image, row_name
    suffixes = {r["tag_suffix"]: n for n, r in train_images().items()}
    suffix = train_images()[row_name]["tag_suffix"]
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    for other, other_row in suffixes.items():
        if tag == other or tag.endswith("-" + other):
            if other != suffix:
                raise LaunchError(f"cluster.image '{image}' is the {other} build ({other_row}) but GPU compute capability "
                                  f"{gpu_arch or 'unset (Turing or newer)'} needs the {suffix} build; drop the suffix and the renderer adds the right one.")
            return image, row_name
    return f"{name}:{tag}-{suffix}" if tag else f"{image}:{suffix}", row_name


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the inline JSON patches) as readable `|` blocks."""


_BlockDumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def split_image(image: str) -> dict:
    """``repo[:tag]`` or ``repo@sha256:...`` -> a kustomize ``images:`` entry for the base image."""
    entry = {"name": BASE_IMAGE}
    if "@" in image:
        name, digest = image.split("@", 1)
        entry.update(newName=name, digest=digest)
        return entry
    name, tag = image, None
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = image.rsplit(":", 1)
    if not name or (tag is not None and not tag):
        raise LaunchError(f"cluster.image '{image}' is not an image reference like registry/name:tag.")
    entry["newName"] = name
    if tag:
        entry["newTag"] = tag
    return entry


def cluster_train_config(cfg, job_name: str, data_root: str) -> dict:
    """The config the pods read: same recipe, paths and metrics address rewritten for the pod's mounts."""
    tree = cfg.to_dict()
    tree["data"]["root"] = data_root
    tree["output_dir"] = f"{CHECKPOINT_MOUNT}/{job_name}"
    tree["metrics"]["address"] = "0.0.0.0"
    tree["metrics"]["port"] = METRICS_PORT
    return tree


def _container(prefix: str) -> str:
    return f"{prefix}/containers/0"


def _common_pod_patches(prefix: str, cfg, nproc: int, rdma: Optional[Rdma] = None) -> list[dict]:
    c = cfg.cluster
    gpus = str(c.gpus_per_node)
    extra = {rdma.resource: str(rdma.count)} if rdma else {}   # extended resources: request == limit
    return [
        {"op": "replace", "path": f"{_container(prefix)}/resources", "value": {
            "requests": {"cpu": c.cpu, "memory": c.memory, "nvidia.com/gpu": gpus, **extra},
            "limits": {"memory": c.memory, "nvidia.com/gpu": gpus, **extra}}},
        {"op": "replace", "path": f"{prefix}/volumes/0/persistentVolumeClaim/claimName", "value": c.data_pvc},
        {"op": "replace", "path": f"{prefix}/volumes/1/persistentVolumeClaim/claimName", "value": c.checkpoint_pvc},
        {"op": "replace", "path": f"{prefix}/volumes/3/emptyDir/sizeLimit", "value": c.shm_size},
    ]


def _ports(rdzv_name: str, nproc: int) -> list[dict]:
    return [{"name": rdzv_name, "containerPort": RDZV_PORT}] + [
        {"name": f"metrics-{i}", "containerPort": METRICS_PORT + i} for i in range(nproc)]


def _podmonitor_patch(nproc: int, job_label: str, job_name: str, by_number: bool = False) -> dict:
    """Scrape this job's pods only, one endpoint per local rank (named ports, or numbers where the pod declares none)."""
    endpoints = [{"portNumber": METRICS_PORT + i, "interval": "15s"} if by_number else {"port": f"metrics-{i}", "interval": "15s"}
                 for i in range(nproc)]
    return {"target": {"group": "monitoring.coreos.com", "version": "v1", "kind": "PodMonitor", "name": "seresnet-train"},
            "patch": yaml.safe_dump([
                # Named after the job: two jobs in one namespace keep one PodMonitor each.
                {"op": "replace", "path": "/metadata/name", "value": job_name},
                {"op": "replace", "path": "/spec/podMetricsEndpoints", "value": endpoints},
                {"op": "replace", "path": f"/spec/selector/matchLabels/{job_label.replace('/', '~1')}", "value": job_name},
            ], sort_keys=False)}


def _networkpolicy_patch(job_label: str, job_name: str) -> dict:
    """The training NetworkPolicy (k8s/training/common/networkpolicy.yaml) scoped to this job's pods: only they reach
    its torchrun store and collectives, even with other jobs in the namespace."""
    mine = {job_label: job_name}
    return {"target": {"group": "networking.k8s.io", "version": "v1", "kind": "NetworkPolicy", "name": "seresnet-train"},
            "patch": yaml.safe_dump([
                {"op": "replace", "path": "/metadata/name", "value": job_name},
                {"op": "replace", "path": "/spec/podSelector/matchLabels", "value": mine},
                {"op": "replace", "path": "/spec/ingress/0/from/0/podSelector/matchLabels", "value": mine},
                {"op": "replace", "path": "/spec/egress/0/to/0/podSelector/matchLabels", "value": mine},
            ], sort_keys=False)}


def _trainjob_ops(cfg, job_name: str) -> list[dict]:
    """TrainJob patches: nodes, processes and resources per node (spec.trainer), volumes in the runtime patch."""
    c = cfg.cluster
    pod = "/spec/runtimePatches/0/trainingRuntimeSpec/template/spec/replicatedJobs/0/template/spec/template"
    gpus = str(c.gpus_per_node)
    return [
        {"op": "replace", "path": "/metadata/name", "value": job_name},
        {"op": "replace", "path": "/spec/trainer/numNodes", "value": c.nnodes},
        {"op": "replace", "path": "/spec/trainer/numProcPerNode", "value": c.gpus_per_node},
        {"op": "replace", "path": "/spec/trainer/resourcesPerNode", "value": {
            "requests": {"cpu": c.cpu, "memory": c.memory, "nvidia.com/gpu": gpus},
            "limits": {"memory": c.memory, "nvidia.com/gpu": gpus}}},
        {"op": "add", "path": f"{pod}/metadata/labels/seresnet.io~1engine", "value": cfg.engine},
        {"op": "replace", "path": f"{pod}/spec/volumes/0/persistentVolumeClaim/claimName", "value": c.data_pvc},
        {"op": "replace", "path": f"{pod}/spec/volumes/1/persistentVolumeClaim/claimName", "value": c.checkpoint_pvc},
        {"op": "replace", "path": f"{pod}/spec/volumes/3/emptyDir/sizeLimit", "value": c.shm_size},
    ]


def render_training_job(cfg, out_dir: str | Path, kind: str = "pytorchjob", name: Optional[str] = None,
                        data_root: str = DATA_MOUNT, gpu_arch: Optional[str] = None, rdma: Optional[Rdma] = None,
                        gang: Optional[Gang] = None) -> Path:
    """Write ``out_dir/kustomization.yaml`` and ``out_dir/train-config.yaml``; return the folder.

    ``gpu_arch`` (default ``cluster.gpu_arch``) picks the image build; ``rdma`` / ``gang`` add those components."""
    if kind not in KINDS:
        raise LaunchError(f"--kind must be one of {', '.join(KINDS)}, got '{kind}'.")
    c = cfg.cluster
    if c.gpus_per_node < 1:
        raise LaunchError("cluster.gpus_per_node must be >= 1 for a Kubernetes GPU job; set it to the GPUs of one node.")
    if c.max_nnodes and c.max_nnodes < c.nnodes:
        raise LaunchError(f"cluster.max_nnodes ({c.max_nnodes}) must be 0 or >= cluster.nnodes ({c.nnodes}).")
    if not data_root.startswith("/"):
        raise LaunchError(f"--data-root must be an absolute path inside the pod (the data PVC is at {DATA_MOUNT}), got '{data_root}'.")
    if gang is not None and kind != "pytorchjob":
        raise LaunchError("Gang scheduling is rendered for --kind pytorchjob (runPolicy.schedulingPolicy); for a TrainJob or an "
                          "Indexed Job use Kueue (or the runtime's podGroupPolicy) or drop --gang.")
    if rdma is not None and kind == "trainjob":
        raise LaunchError("--rdma patches the PyTorchJob and Indexed Job pods; for a TrainJob use a ClusterTrainingRuntime "
                          "that requests the HCAs, or --kind pytorchjob.")
    if rdma is not None and (rdma.count < 1 or "/" not in rdma.resource):
        raise LaunchError(f"--rdma-resource '{rdma.resource}' x {rdma.count} must be a device-plugin resource like rdma/hca_shared_devices_a with a count >= 1.")
    gpu_arch = gpu_arch if gpu_arch is not None else c.gpu_arch
    image, _ = image_for(c.image, gpu_arch)
    nproc = c.gpus_per_node
    max_nodes = c.max_nnodes or c.nnodes
    overlay = cfg.engine if kind == "pytorchjob" else kind
    base_name = {"pytorchjob": f"seresnet50-{cfg.engine}", "trainjob": "seresnet50-trainjob", "indexed-job": "seresnet50-indexed"}[kind]
    job_name = name or base_name
    if not _DNS_LABEL.fullmatch(job_name) or len(job_name) > 40:
        raise LaunchError(f"--name '{job_name}' must be a DNS label (lowercase letters, digits, '-') of at most 40 characters.")

    if kind != "pytorchjob" and max_nodes != c.nnodes:
        raise LaunchError(f"The {kind} variant runs a fixed number of nodes; set cluster.max_nnodes to 0 or use --kind pytorchjob for elastic jobs.")
    if kind == "trainjob" and not name:
        job_name = f"{base_name}-{cfg.engine}"

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The manifests this overlay builds on, copied in: the folder is self-contained.
    shutil.rmtree(out / BASE, ignore_errors=True)
    shutil.copytree(TRAINING_DIR, out / BASE)
    (out / "train-config.yaml").write_text(
        "# Rendered by `seresnet launch k8s` from the training config; the pods read this file.\n"
        + yaml.safe_dump(cluster_train_config(cfg, job_name, data_root), sort_keys=False))

    job_label = {"pytorchjob": "training.kubeflow.org/job-name", "trainjob": "jobset.sigs.k8s.io/jobset-name"}.get(kind, "job-name")
    patches = [_podmonitor_patch(nproc, job_label, job_name, by_number=kind == "trainjob"),
               _networkpolicy_patch(job_label, job_name)]
    if kind == "trainjob":
        patches.append({"target": {"group": "trainer.kubeflow.org", "version": "v1alpha1", "kind": "TrainJob", "name": base_name},
                        "patch": yaml.safe_dump(_trainjob_ops(cfg, job_name), sort_keys=False)})
    elif kind == "pytorchjob":
        prefix = "/spec/pytorchReplicaSpecs/Worker/template/spec"
        ops = [
            {"op": "replace", "path": "/metadata/name", "value": job_name},
            {"op": "replace", "path": "/spec/nprocPerNode", "value": str(nproc)},
            {"op": "replace", "path": f"{_container(prefix)}/args/0", "value": f"--nproc-per-node={nproc}"},
            {"op": "replace", "path": "/spec/elasticPolicy/minReplicas", "value": c.nnodes},
            {"op": "replace", "path": "/spec/elasticPolicy/maxReplicas", "value": max_nodes},
            {"op": "replace", "path": "/spec/elasticPolicy/maxRestarts", "value": c.max_restarts},
            {"op": "replace", "path": "/spec/pytorchReplicaSpecs/Worker/replicas", "value": c.nnodes},
            {"op": "replace", "path": f"{_container(prefix)}/ports", "value": _ports("pytorchjob-port", nproc)},
            *_common_pod_patches(prefix, cfg, nproc, rdma),
        ]
        if gang is not None:
            policy = {"minAvailable": c.nnodes, "scheduleTimeoutSeconds": gang.timeout_s}
            policy.update({k: v for k, v in (("queue", gang.queue), ("priorityClass", gang.priority_class)) if v})
            ops.append({"op": "replace", "path": "/spec/runPolicy/schedulingPolicy", "value": policy})
        patches.append({"target": {"group": "kubeflow.org", "version": "v1", "kind": "PyTorchJob", "name": base_name},
                        "patch": yaml.safe_dump(ops, sort_keys=False)})
    else:
        prefix = "/spec/template/spec"
        args = [f"--nnodes={c.nnodes}", f"--nproc-per-node={nproc}",
                f"--rdzv-endpoint={job_name}-0.{job_name}:{RDZV_PORT}", f"--rdzv-id={job_name}",
                f"--max-restarts={c.max_restarts}", f"--engine={cfg.engine}", "--", "--config", "/etc/seresnet/config.yaml"]
        ops = [
            {"op": "replace", "path": "/metadata/name", "value": job_name},
            {"op": "replace", "path": "/spec/completions", "value": c.nnodes},
            {"op": "replace", "path": "/spec/parallelism", "value": c.nnodes},
            {"op": "replace", "path": "/spec/template/metadata/labels/seresnet.io~1engine", "value": cfg.engine},
            {"op": "replace", "path": f"{prefix}/subdomain", "value": job_name},
            {"op": "replace", "path": f"{_container(prefix)}/args", "value": args},
            {"op": "replace", "path": f"{_container(prefix)}/ports", "value": _ports("rendezvous", nproc)},
            *_common_pod_patches(prefix, cfg, nproc, rdma),
        ]
        patches.append({"target": {"group": "batch", "version": "v1", "kind": "Job", "name": base_name},
                        "patch": yaml.safe_dump(ops, sort_keys=False)})
        patches.append({"target": {"version": "v1", "kind": "Service", "name": base_name},
                        "patch": yaml.safe_dump([
                            {"op": "replace", "path": "/metadata/name", "value": job_name},
                            {"op": "replace", "path": "/spec/selector/job-name", "value": job_name}])})

    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": c.namespace,
        "resources": [f"{BASE}/overlays/{overlay}"],
        "images": [split_image(image)],
        "configMapGenerator": [{"name": "seresnet-train-config", "behavior": "replace",
                                "files": ["config.yaml=train-config.yaml"]}],
        "patches": patches,
    }
    components = [n for n, on in (("rdma", rdma), ("gang", gang)) if on is not None]
    if components:
        # Components in an inner kustomization: the outer one's generators (merge) and patches then see their
        # objects (kustomize runs a kustomization's own generators before its components), and the inner
        # namespace lets the component's ConfigMap reference be rewritten to its hashed name.
        inner = out / "with-components"
        inner.mkdir(exist_ok=True)
        (inner / "kustomization.yaml").write_text("# Rendered by `seresnet launch k8s`: the job with its components.\n" + yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": c.namespace,
            "resources": [f"../{BASE}/overlays/{overlay}"],
            "components": [f"../{BASE}/components/{n}" for n in components]}, sort_keys=False))
        kustomization["resources"] = [inner.name]
    if rdma is not None:
        kustomization["configMapGenerator"].append({"name": "seresnet-nccl", "behavior": "merge", "literals": [
            f"NCCL_IB_HCA={rdma.ib_hca}", f"NCCL_SOCKET_IFNAME={rdma.socket_ifname}"]})
    (out / "kustomization.yaml").write_text(
        f"# Rendered by `seresnet launch k8s` ({kind}, engine={cfg.engine}, {c.nnodes}"
        f"{'' if max_nodes == c.nnodes else f'..{max_nodes}'} node(s) x {nproc} GPU(s), image {image}"
        f"{', ' + ' + '.join(components) if components else ''}).\n"
        "# Apply: kubectl apply -k <this folder> (it names no path outside itself)\n" + yaml.dump(kustomization, Dumper=_BlockDumper, sort_keys=False, width=200))
    return out


def add_arguments(k8s: argparse.ArgumentParser) -> None:
    """The ``launch k8s`` options beyond the config file: GPU generation, RDMA and gang scheduling."""
    k8s.add_argument("--gpu-arch", help="compute capability of the cluster's GPUs (7.0 V100, 8.0 A100, 9.0 H100; default "
                                        "cluster.gpu_arch): picks the training image build (cu126 for Volta, cu130 for newer)")
    k8s.add_argument("--rdma", action="store_true", help="NCCL over RDMA/InfiniBand between nodes: HCA resource, IPC_LOCK, NCCL_IB_HCA/NCCL_SOCKET_IFNAME")
    k8s.add_argument("--rdma-resource", default=Rdma.resource, help=f"with --rdma: the HCA device-plugin resource (default {Rdma.resource})")
    k8s.add_argument("--nccl-ib-hca", default=Rdma.ib_hca, help=f"with --rdma: NCCL_IB_HCA (default {Rdma.ib_hca})")
    k8s.add_argument("--nccl-socket-ifname", default=Rdma.socket_ifname, help=f"with --rdma: NCCL_SOCKET_IFNAME (default {Rdma.socket_ifname})")
    k8s.add_argument("--gang", action="store_true", help="gang scheduling: runPolicy.schedulingPolicy, minAvailable = cluster.nnodes (PyTorchJob)")
    k8s.add_argument("--queue", help="with --gang: the scheduler queue (Volcano queue)")
    k8s.add_argument("--priority-class", help="with --gang: the PodGroup's priority class")


def options_from_args(args: argparse.Namespace) -> dict:
    """``render_training_job`` keyword arguments from the parsed ``add_arguments`` options."""
    return {"gpu_arch": getattr(args, "gpu_arch", None),
            "rdma": Rdma(args.rdma_resource, 1, args.nccl_ib_hca, args.nccl_socket_ifname) if getattr(args, "rdma", False) else None,
            "gang": Gang(args.queue, args.priority_class) if getattr(args, "gang", False) else None}
