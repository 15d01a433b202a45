"""Regenerate model_repository/, the Triton model definitions committed for review: what `seresnet serve repository`
writes for the demo config (configs/demo.yaml, its 10 classes, CPU target, python preprocess), minus what an
export adds (weights, labels, warm-up image, repository.json). tests/test_model_repository.py holds the committed
files equal to this output.

    python -m scripts.model_repository            # rewrite model_repository/ (the weights you filled in stay)
    python -m scripts.model_repository --check    # exit 1 and name the files that differ
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from launch.torchrun import REPO_ROOT
from scripts.samples import DEMO_CLASSES
from serve.export import export_onnx
from serve.repository_versions import write_versioned_repository
from train.checkpoint import CheckpointManager
from train.config import load_config
from train.models import create_model

COMMITTED = REPO_ROOT / "model_repository"
# What `serve repository` adds from an export (kept out of git by .gitignore): not definitions.
GENERATED = ("repository.json", "export_report.json")
GENERATED_NAMES = ("labels.txt", "model.onnx")


def is_definition(rel: Path) -> bool:
    """A file of the committed definitions (rel to the repository root)?"""
    parts = rel.parts
    if rel.name in GENERATED_NAMES or str(rel) in GENERATED or "warmup" in parts or rel.suffix in (".onnx", ".plan"):
        return False
    return not (len(parts) > 2 and parts[1].isdigit() and parts[1] != "1")   # versions 2.. are filled in


def definitions(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file() and is_definition(p.relative_to(repo))}


def generate(work: Path) -> dict[str, bytes]:
    """The demo repository's definitions, written by the real writer from a real (untrained) demo export."""
    cfg = load_config("demo", ["output_dir=" + str(work / "train")])
    torch.manual_seed(0)
    model = create_model(cfg.model, len(DEMO_CLASSES), load_pretrained=False)
    CheckpointManager(work / "ckpt").save({"model": model.state_dict(), "config": cfg.to_dict(), "classes": DEMO_CLASSES}, step=0)
    export_onnx(work / "ckpt" / "last.pt", work / "export")
    return definitions(write_versioned_repository(work / "export", work / "repo", target="cpu"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.model_repository", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when model_repository/ differs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="seresnet-definitions-") as tmp:
        want = generate(Path(tmp))
    have = definitions(COMMITTED) if COMMITTED.is_dir() else {}
    stale = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if args.check:
        if stale:
            print("model_repository/ differs from the writer's output (run `python -m scripts.model_repository`): "
                  + ", ".join(stale))
            return 1
        return 0
    for rel in stale:
        target = COMMITTED / rel
        if rel in want:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(want[rel])
        else:
            target.unlink()
    print(f"model_repository/: {len(want)} definition files, {len(stale)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
