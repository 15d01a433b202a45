"""Where a result came from: the code's git commit (when it runs from a checkout), package versions, and fingerprints of
the data listing and of the resolved config. Reports and exports carry this block so a number can be traced back."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional

# The distributions whose versions decide a result (missing ones are left out of the record).
PACKAGES = ("seresnet-stack", "torch", "torchvision", "numpy", "pillow", "pydantic", "onnx", "onnxruntime",
            "deepspeed", "nvidia-dali-cuda120", "nvidia-dali-cuda130", "tritonclient", "tensorrt")

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = _SOURCE_ROOT) -> Optional[dict]:
    """{"commit", "dirty"} when ``root`` is the top of a git work tree (a source checkout), else None.

    An installed package can sit inside someone else's repository (a venv in a project folder): only a work tree whose
    top is this code's own folder counts."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root.resolve():
        return None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def fingerprint_lines(lines: Iterable[str]) -> str:
    """A short, order-independent hash of text lines (sorted first)."""
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:20]


def listing_fingerprint(items: Iterable[tuple[str, str]]) -> str:
    """Fingerprint of a labelled listing: (path relative to the data root, class name) pairs. The same files and labels
    give the same value on any machine (no absolute path, no mtime); an added, removed or relabelled file changes it."""
    return fingerprint_lines(f"{rel}\t{label}" for rel, label in items)


def dataset_fingerprint(root: str | Path, classes: list[str], splits: dict) -> str:
    """Listing fingerprint of a train.listing.Dataset's splits (``{name: Split}``), paths taken relative to ``root``."""
    root = os.path.abspath(root)
    return listing_fingerprint(
        (f"{name}/{os.path.relpath(os.path.abspath(p), root)}", classes[int(label)])
        for name, split in sorted(splits.items()) for p, label in zip(split.paths, split.labels))


def config_fingerprint(tree: dict) -> str:
    """Fingerprint of a resolved config (``Config.to_dict()``): canonical JSON, keys sorted."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:20]


def provenance(config_tree: Optional[dict] = None, data_fingerprint: Optional[str] = None) -> dict:
    """The block reports and exports carry under the key ``provenance``."""
    record: dict = {"git": git_commit(), "packages": package_versions()}
    if config_tree is not None:
        record["config_fingerprint"] = config_fingerprint(config_tree)
    if data_fingerprint is not None:
        record["data_fingerprint"] = data_fingerprint
    return record
