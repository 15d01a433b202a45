"""Numbered versions of the classifier side by side in one repository (``se_resnet50/1/``, ``se_resnet50/2/``) under a
Triton ``version_policy``, on top of the writer (serve/repository.py)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from serve.contract import CLASSIFIER, REPOSITORY_MARKER
from serve.errors import ServeError
from serve.repository import parse_pbtxt, to_pbtxt, write_model_repository
from serve.repository_lock import writing

# Fields of repository.json that every version of one repository must share: the ensemble, preprocess and labels
# are written once for all versions of the classifier.
SHARED_FIELDS = ("classes", "eval_spec", "target", "preprocess")


def parse_version_policy(text: str) -> tuple[str, list[int]]:
    """'latest:N', 'all' or 'specific:1,2' -> (kind, numbers)."""
    kind, _, rest = text.partition(":")
    try:
        numbers = [int(x) for x in rest.split(",")] if rest else []
    except ValueError:
        numbers = [0]
    ok = (kind == "all" and not numbers) or (kind == "latest" and len(numbers) == 1) or (kind == "specific" and numbers)
    if not ok or any(n < 1 for n in numbers):
        raise ServeError(f"--version-policy '{text}' must be latest:N, all or specific:V1,V2 (whole numbers >= 1).")
    return kind, numbers


def set_version_policy(config_pbtxt: Path, policy: str) -> None:
    cfg = parse_pbtxt(config_pbtxt.read_text())
    kind, numbers = parse_version_policy(policy)
    cfg.ClearField("version_policy")
    if kind == "latest":
        cfg.version_policy.latest.num_versions = numbers[0]
    elif kind == "all":
        cfg.version_policy.all.SetInParent()
    else:
        cfg.version_policy.specific.versions.extend(numbers)
    config_pbtxt.write_text(to_pbtxt(cfg))


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()) if model_dir.is_dir() else []


def write_versioned_repository(source: str | Path, out_dir: str | Path, *, version: int = 1,
                               version_policy: Optional[str] = None, serve_overrides: Sequence[str] = (), **kwargs) -> Path:
    """Write the repository for ``source`` with its classifier as version ``version`` of ``out_dir``: versions
    already there stay (their classes, eval transform, target and preprocess must be the same), the others models
    and labels are rewritten, and ``version_policy`` (Triton's default: latest:1) decides which versions load."""
    if version < 1:
        raise ServeError(f"--version {version} must be a whole number >= 1 (Triton's version folders).")
    if version_policy is not None:
        kind, numbers = parse_version_policy(version_policy)
        if kind == "specific" and version not in numbers:
            raise ServeError(f"--version-policy {version_policy} does not serve version {version}; add it to the list.")
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ServeError(f"--out '{out_dir}' is a file; pass a new or empty folder for the repository.")
    if out.is_dir() and any(out.iterdir()) and not (out / REPOSITORY_MARKER).is_file():
        raise ServeError(f"--out '{out_dir}' is a non-empty folder that 'serve repository' did not write (no {REPOSITORY_MARKER}); "
                         "pass a new or empty folder.")
    with writing(out), tempfile.TemporaryDirectory(prefix="seresnet-repository-", dir=out.parent) as tmp:
        kept = [v for v in _versions(out / CLASSIFIER) if v != version]
        old_meta = json.loads((out / "repository.json").read_text()) if kept and (out / "repository.json").is_file() else None
        new = write_model_repository(source, Path(tmp) / "repo", serve_overrides=list(serve_overrides), **kwargs)
        meta = json.loads((new / "repository.json").read_text())
        if old_meta is not None:
            differ = [f for f in SHARED_FIELDS if old_meta.get(f) != meta.get(f)]
            if differ:
                raise ServeError(f"version {version} differs from versions {', '.join(map(str, kept))} already in '{out_dir}' in "
                                 f"{', '.join(differ)}; versions of one repository share them, so write it to a new --out folder.")
        keep_dir = Path(tmp) / "kept"
        keep_dir.mkdir()
        for v in kept:
            shutil.move(str(out / CLASSIFIER / str(v)), keep_dir / str(v))
        if version != 1:
            (new / CLASSIFIER / "1").rename(new / CLASSIFIER / str(version))
        if version_policy is not None:
            set_version_policy(new / CLASSIFIER / "config.pbtxt", version_policy)
        for v in kept:
            shutil.move(str(keep_dir / str(v)), new / CLASSIFIER / str(v))
        meta.update(version=version, versions=_versions(new / CLASSIFIER), version_policy=version_policy or "latest:1")
        (new / "repository.json").write_text(json.dumps(meta, indent=2))
        out.mkdir(parents=True, exist_ok=True)
        for entry in new.iterdir():   # our folders and files only: anything else in out stays
            dst = out / entry.name
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            elif dst.exists() or dst.is_symlink():
                dst.unlink()
            shutil.move(str(entry), dst)
    return out
