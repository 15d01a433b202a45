"""Fixtures shared by the tests and the benchmarks: the sample photos written to a folder, the 32 px small-stem
overrides, the demo's class names and an untrained checkpoint with non-degenerate outputs."""
from __future__ import annotations

from pathlib import Path

import torch

from serve.images import sample_image_bytes
from train.checkpoint import CheckpointManager
from train.config import load_config
from train.models import create_model


def write_sample_images(directory: str | Path) -> list[Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in sample_image_bytes().items():
        p = d / name
        p.write_bytes(data)
        paths.append(p)
    return paths


SMALL_OVERRIDES = ["model.stem=small", "model.stem_stride=2", "data.image_size=32", "data.eval_resize=32",
                   "model.zero_init_residual=false"]
DEMO_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def random_checkpoint(directory: str | Path, overrides: list[str] | None = None, seed: int = 0,
                      classes: list[str] | None = None) -> Path:
    """An untrained 32 px small-stem SE-ResNet50 checkpoint with non-degenerate outputs (for tests and benchmarks); returns <dir>/last.pt."""
    classes = list(classes or DEMO_CLASSES)
    cfg = load_config(None, SMALL_OVERRIDES + list(overrides or []))
    torch.manual_seed(seed)
    model = create_model(cfg.model, len(classes), load_pretrained=False)
    # Spread BatchNorm statistics and the head so the softmax is far from uniform: comparisons of top-1 mean something.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
        model.fc.weight.mul_(20.0)
    CheckpointManager(directory).save({"model": model.state_dict(), "config": cfg.to_dict(), "classes": classes}, step=0)
    return Path(directory) / "last.pt"
