"""The installed package works away from the checkout: `pip install` of the built wheel into a new, empty venv
gives the `seresnet` command, whose packaged configs, GPU table and Kubernetes manifests are read from the
installed package (run from a folder that is not the checkout, with nothing of the checkout on sys.path).

The new venv gets the tested dependency set without downloading it again (torch alone is ~5 GB): a `.pth` file
adds a folder of links to this .venv's installed distributions, minus this project's own (editable) install, and
pip installs the wheel with `--no-index`, so it resolves the wheel's declared requirements against exactly those
distributions and fails if one is missing. No system site-packages, no PYTHONPATH, no editable install."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from launch.torchrun import REPO_ROOT
from scripts import validate_manifests as v
from train.compat import image_for_arch

pytestmark = pytest.mark.slow
PROJECT_DISTS = ("seresnet_stack", "__editable__", "__editable___seresnet_stack")
PACKAGES = ("train", "serve", "launch", "seresnet")


def _copy_tracked_tree(dst: Path) -> Path:
    """The files git tracks (symlinks kept as links), so the wheel is built from the project, not local state."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src, out = REPO_ROOT / rel, dst / rel
        if not src.exists() and not src.is_symlink():
            continue   # deleted in the working tree
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, out)
    return dst


def _dependency_view(dst: Path) -> Path:
    """Links to every distribution installed in this .venv except this project's own install."""
    site = Path(sysconfig.get_paths()["purelib"])
    dst.mkdir()
    for entry in site.iterdir():
        if entry.name.startswith(PROJECT_DISTS) or entry.name in PACKAGES or entry.suffix == ".pth":
            continue
        (dst / entry.name).symlink_to(entry)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("package")
    src = _copy_tracked_tree(tmp / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((tmp / "dist").glob("seresnet_stack-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    venv_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "tested-dependencies.pth").write_text(str(_dependency_view(tmp / "deps")) + "\n")
    # ensurepip's old setuptools would shadow the tested one (torch requires setuptools>=77).
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], capture_output=True, timeout=300)
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    away = tmp / "elsewhere"
    away.mkdir()
    env = {k: val for k, val in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    return {"venv": venv, "py": py, "wheel": wheel, "cwd": away, "env": env, "site": venv_site}


def _run(installed, *argv, timeout=120):
    return subprocess.run(list(argv), cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True, timeout=timeout)


def test_wheel_carries_the_run_time_data(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for data in ("train/compat.yaml", "train/configs/demo.yaml", "train/configs/imagenet.yaml", "train/configs/smoke.yaml",
                 "launch/k8s_training/overlays/trainjob/trainjob.yaml", "launch/k8s_training/pytorchjob/pytorchjob.yaml",
                 "launch/k8s_training/common/podmonitor.yaml", "serve/triton_runtime/preprocess.py"):
        assert data in names, data
    assert not [n for n in names if n.startswith(("tests/", "scripts/"))], "tests and scripts are not part of the package"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "seresnet = seresnet.cli:main" in zipfile.ZipFile(installed["wheel"]).read(entry).decode()


def test_packages_import_from_the_venv_not_the_checkout(installed):
    r = _run(installed, str(installed["py"]), "-c",
             "import json, sys, train, serve, launch, seresnet; "
             "print(json.dumps({'files': [m.__file__ for m in (train, serve, launch, seresnet)], 'path': sys.path}))")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert all(f.startswith(str(installed["site"])) for f in out["files"]), out["files"]
    assert not [p for p in out["path"] if p and Path(p).resolve().is_relative_to(REPO_ROOT)], out["path"]


def test_seresnet_help_lists_every_command(installed):
    r = _run(installed, "seresnet", "--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("train", "evaluate", "preflight", "serve", "launch"):
        assert re.search(rf"^    {cmd}\b", r.stdout, re.M), cmd
    serve_help = _run(installed, "seresnet", "serve", "--help").stdout
    for verb in ("export", "quantize", "repository", "up", "classify", "evaluate", "trt"):
        assert verb in serve_help, verb
    launch_help = _run(installed, "seresnet", "launch", "--help").stdout
    assert "{local,multinode,k8s}" in launch_help


def test_preflight_reads_the_packaged_imagenet_config(installed):
    r = _run(installed, "seresnet", "preflight", "--config", "imagenet", "--gpu-arch", "9.0", "--json")
    plan = json.loads(r.stdout)
    assert r.returncode == (1 if plan["problems"] else 0), r.stderr
    packaged = yaml.safe_load((REPO_ROOT / "train" / "configs" / "imagenet.yaml").read_text())
    assert plan["global_batch"] == packaged["data"]["batch_size"]
    assert plan["precision"] == "bf16" and plan["image"] == image_for_arch("9.0")[0]   # H100: bf16, its image row (compat.yaml)
    bad = _run(installed, "seresnet", "preflight", "--config", "imagenett", "--json")
    assert bad.returncode == 2 and "packaged configs (demo, imagenet, smoke)" in bad.stderr


def test_launch_k8s_renders_from_the_packaged_manifests(installed, kubectl):
    r = _run(installed, "seresnet", "launch", "k8s", "--config", "imagenet", "--kind", "trainjob", "--set", "cluster.nnodes=2",
             "--out", "job")
    assert r.returncode == 0, r.stderr
    out = installed["cwd"] / "job"
    objs = v.kustomize_build(out, kubectl)
    for obj in objs:
        v.validate_object(obj)
    job = next(o for o in objs if o["kind"] == "TrainJob")
    assert job["spec"]["trainer"]["numNodes"] == 2
    assert str(REPO_ROOT) not in "".join(p.read_text() for p in out.rglob("*.yaml"))


def test_serve_repository_writes_from_the_installed_package(installed, tmp_path):
    """The python models and the eval transform the writer copies into a repository are read from the package."""
    from scripts.samples import random_checkpoint

    ckpt = random_checkpoint(tmp_path / "ckpt")
    r = _run(installed, "seresnet", "serve", "repository", "--checkpoint", str(ckpt), "--out", "repo",
             "--set", "serve.max_batch_size=8", "--set", "serve.preferred_batch_sizes=[8]", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    repo = installed["cwd"] / "repo"
    assert (repo / "se_resnet50" / "1" / "model.py").read_bytes() == (REPO_ROOT / "serve" / "triton_runtime" / "classifier.py").read_bytes()
    assert (repo / "preprocess" / "1" / "seresnet_eval.py").is_file() and (repo / "se_resnet50" / "1" / "model.onnx").is_file()
    assert "max_batch_size: 8" in (repo / "se_resnet50" / "config.pbtxt").read_text()
