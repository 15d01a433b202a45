"""The version table (``train/compat.yaml``): torch build per GPU generation, DALI, DeepSpeed, Triton/TensorRT.

Everything that must agree across Dockerfiles, pyproject.toml, manifests and docs is read from here; tests hold
those files to it."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

TABLE_PATH = Path(__file__).with_name("compat.yaml")


@lru_cache(maxsize=1)
def load_table() -> dict:
    return yaml.safe_load(TABLE_PATH.read_text())


def train_images() -> dict[str, dict]:
    return load_table()["train_images"]


def image_for_arch(arch: str) -> tuple[str, dict]:
    """The training image (name, row) whose torch build serves compute capability ``arch`` ("7.0", "9.0")."""
    major, minor = (int(x) for x in arch.split("."))
    best = None   # the row whose closest arch (same major, minor <= the device's) is highest: 7.5 -> cu130, not Volta
    for name, row in train_images().items():
        for a in row["archs"]:
            amaj, amin = (int(x) for x in a.split("."))
            if amaj == major and amin <= minor and (best is None or amin > best[0]):
                best = (amin, name, row)
    if best is None:
        raise KeyError(arch)
    return best[1], best[2]
