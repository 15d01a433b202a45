"""Render a Kubernetes training job from a training config (one config is the source of truth: a cluster job cannot drift from its config).

The output folder is a small kustomize overlay on the repository's own manifests (k8s/training/...):
it swaps in the resolved config as the job's ConfigMap and patches image, nodes, GPUs per node,
resources, volumes and restarts from ``cluster.*``, so the job applied to a cluster is the config.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import yaml

from launch.torchrun import REPO_ROOT, LaunchError

TRAINING_DIR = REPO_ROOT / "k8s" / "training"
KINDS = ("pytorchjob", "indexed-job")
BASE_IMAGE = "ghcr.io/seresnet-stack/train"
METRICS_PORT = 9400
RDZV_PORT = 29400
DATA_MOUNT = "/data"
CHECKPOINT_MOUNT = "/checkpoints"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


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


def _common_pod_patches(prefix: str, cfg, nproc: int) -> list[dict]:
    c = cfg.cluster
    gpus = str(c.gpus_per_node)
    return [
        {"op": "replace", "path": f"{_container(prefix)}/resources", "value": {
            "requests": {"cpu": c.cpu, "memory": c.memory, "nvidia.com/gpu": gpus},
            "limits": {"memory": c.memory, "nvidia.com/gpu": gpus}}},
        {"op": "replace", "path": f"{prefix}/volumes/0/persistentVolumeClaim/claimName", "value": c.data_pvc},
        {"op": "replace", "path": f"{prefix}/volumes/1/persistentVolumeClaim/claimName", "value": c.checkpoint_pvc},
        {"op": "replace", "path": f"{prefix}/volumes/3/emptyDir/sizeLimit", "value": c.shm_size},
    ]


def _ports(rdzv_name: str, nproc: int) -> list[dict]:
    return [{"name": rdzv_name, "containerPort": RDZV_PORT}] + [
        {"name": f"metrics-{i}", "containerPort": METRICS_PORT + i} for i in range(nproc)]


def _podmonitor_patch(nproc: int, job_label: str, job_name: str) -> dict:
    return {"target": {"group": "monitoring.coreos.com", "version": "v1", "kind": "PodMonitor", "name": "seresnet-train"},
            "patch": yaml.safe_dump([
                # Named after the job: two jobs in one namespace keep one PodMonitor each.
                {"op": "replace", "path": "/metadata/name", "value": job_name},
                {"op": "replace", "path": "/spec/podMetricsEndpoints",
                 "value": [{"port": f"metrics-{i}", "interval": "15s"} for i in range(nproc)]},
                {"op": "replace", "path": f"/spec/selector/matchLabels/{job_label.replace('/', '~1')}", "value": job_name},
            ], sort_keys=False)}


def render_training_job(cfg, out_dir: str | Path, kind: str = "pytorchjob", name: Optional[str] = None,
                        data_root: str = DATA_MOUNT) -> Path:
    """Write ``out_dir/kustomization.yaml`` and ``out_dir/train-config.yaml``; return the folder."""
    if kind not in KINDS:
        raise LaunchError(f"--kind must be one of {', '.join(KINDS)}, got '{kind}'.")
    c = cfg.cluster
    if c.gpus_per_node < 1:
        raise LaunchError("cluster.gpus_per_node must be >= 1 for a Kubernetes GPU job; set it to the GPUs of one node.")
    if c.max_nnodes and c.max_nnodes < c.nnodes:
        raise LaunchError(f"cluster.max_nnodes ({c.max_nnodes}) must be 0 or >= cluster.nnodes ({c.nnodes}).")
    if not data_root.startswith("/"):
        raise LaunchError(f"--data-root must be an absolute path inside the pod (the data PVC is at {DATA_MOUNT}), got '{data_root}'.")
    nproc = c.gpus_per_node
    max_nodes = c.max_nnodes or c.nnodes
    overlay = cfg.engine if kind == "pytorchjob" else "indexed-job"
    base_name = {"pytorchjob": f"seresnet50-{cfg.engine}", "indexed-job": "seresnet50-indexed"}[kind]
    job_name = name or base_name
    if not _DNS_LABEL.fullmatch(job_name) or len(job_name) > 40:
        raise LaunchError(f"--name '{job_name}' must be a DNS label (lowercase letters, digits, '-') of at most 40 characters.")

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "train-config.yaml").write_text(
        "# Rendered by `python -m launch k8s` from the training config; the pods read this file.\n"
        + yaml.safe_dump(cluster_train_config(cfg, job_name, data_root), sort_keys=False))

    job_label = "training.kubeflow.org/job-name" if kind == "pytorchjob" else "job-name"
    patches = [_podmonitor_patch(nproc, job_label, job_name)]
    if kind == "pytorchjob":
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
            *_common_pod_patches(prefix, cfg, nproc),
        ]
        patches.append({"target": {"group": "kubeflow.org", "version": "v1", "kind": "PyTorchJob", "name": base_name},
                        "patch": yaml.safe_dump(ops, sort_keys=False)})
    else:
        if max_nodes != c.nnodes:
            raise LaunchError("The indexed-job variant runs a fixed number of nodes; set cluster.max_nnodes to 0 or use --kind pytorchjob for elastic jobs.")
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
            *_common_pod_patches(prefix, cfg, nproc),
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
        "resources": [os.path.relpath(TRAINING_DIR / "overlays" / overlay, out)],
        "images": [split_image(c.image)],
        "configMapGenerator": [{"name": "seresnet-train-config", "behavior": "replace",
                                "files": ["config.yaml=train-config.yaml"]}],
        "patches": patches,
    }
    (out / "kustomization.yaml").write_text(
        f"# Rendered by `python -m launch k8s` ({kind}, engine={cfg.engine}, {c.nnodes}"
        f"{'' if max_nodes == c.nnodes else f'..{max_nodes}'} node(s) x {nproc} GPU(s)).\n"
        f"# Apply: kubectl apply -k {out}\n" + yaml.dump(kustomization, Dumper=_BlockDumper, sort_keys=False, width=200))
    return out
