"""Real sample photos (scikit-image's bundled JPEG/PNG files) and image-file discovery shared by export, tests and benchmarks."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

from serve.errors import ServeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def sample_image_bytes() -> dict[str, bytes]:
    """name -> encoded bytes of scikit-image's bundled colour photos, alternately re-encoded as JPEG and PNG."""
    try:
        import skimage.data
        from PIL import Image
    except ImportError as err:
        raise ServeError(f"sample images need scikit-image ({err}); install the 'dev' extra or pass image paths.") from None
    out: dict[str, bytes] = {}
    loaders = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel", "camera")
    for i, name in enumerate(loaders):
        arr = getattr(skimage.data, name)()
        img = Image.fromarray(arr).convert("RGB")
        buf = io.BytesIO()
        fmt = "JPEG" if i % 2 == 0 else "PNG"
        img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        out[f"{name}.{fmt.lower().replace('jpeg', 'jpg')}"] = buf.getvalue()
    return out


def write_sample_images(directory: str | Path) -> list[Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in sample_image_bytes().items():
        p = d / name
        p.write_bytes(data)
        paths.append(p)
    return paths


def find_images(items: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image files; a missing path is a ServeError."""
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            found.append(p)
        else:
            raise ServeError(f"image path '{p}' does not exist; pass image files or folders of images.")
    return found


SMALL_OVERRIDES = ["model.stem=small", "model.stem_stride=2", "data.image_size=32", "data.eval_resize=32",
                   "model.zero_init_residual=false"]
DEMO_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def random_checkpoint(directory: str | Path, overrides: list[str] | None = None, seed: int = 0,
                      classes: list[str] | None = None) -> Path:
    """An untrained 32 px small-stem SE-ResNet50 checkpoint with non-degenerate outputs (for tests and benchmarks); returns <dir>/last.pt."""
    import torch

    from train.checkpoint import CheckpointManager
    from train.config import load_config
    from train.models import create_model

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
