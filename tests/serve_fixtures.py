"""Shared helpers for the serving tests: a small untrained checkpoint, sample photos, a served repository."""
from __future__ import annotations

from pathlib import Path

import torch

SMALL_OVERRIDES = ["model.stem=small", "model.stem_stride=2", "data.image_size=32", "data.eval_resize=32",
                   "model.zero_init_residual=false"]
CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def make_checkpoint(directory: str | Path, overrides: list[str] | None = None, seed: int = 0) -> Path:
    """Random-weight SE-ResNet50 checkpoint (32 px small stem) with non-degenerate outputs; returns <dir>/last.pt."""
    from train.checkpoint import CheckpointManager
    from train.config import load_config
    from train.models import create_model

    cfg = load_config(None, SMALL_OVERRIDES + list(overrides or []))
    torch.manual_seed(seed)
    model = create_model(cfg.model, len(CLASSES), load_pretrained=False)
    # Spread BatchNorm statistics and the head so the softmax is far from uniform: parity and top-1 comparisons mean something.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
        model.fc.weight.mul_(20.0)
    CheckpointManager(directory).save({"model": model.state_dict(), "config": cfg.to_dict(), "classes": CLASSES}, step=0)
    return Path(directory) / "last.pt"


def reference_probabilities(checkpoint: Path, images: list[bytes]):
    """PyTorch eager softmax on the training eval transform's pixels: what every served answer must match."""
    from serve.export import WithSoftmax, eval_batch, load_checkpoint

    model, cfg, classes = load_checkpoint(checkpoint)
    with torch.inference_mode():
        return WithSoftmax(model).eval()(eval_batch(images, cfg)).numpy(), classes


def big_png(width: int, height: int) -> bytes:
    """A highly compressible PNG of width x height pixels (a decompression-bomb stand-in that is small on the wire)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()
