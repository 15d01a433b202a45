"""Benchmark inputs (`make bench` must not import from tests/): the photo mix, images by format and
size, a checkpoint to measure when no trained one is given, and labelled ImageFolder splits."""
from __future__ import annotations

import io
from pathlib import Path

from serve.errors import ServeError
from scripts.samples import random_checkpoint
from serve.images import IMAGE_SUFFIXES, sample_image_bytes

# Preprocess cost by format and size: real photos (scikit-image's astronaut, 512x512) re-encoded at a small and a
# large size. Small ~ a thumbnail-sized upload, large ~ a phone photo scaled down to ~1000 px.
SIZES = {"small": 96, "large": 1000}
FORMATS = ("JPEG", "PNG")


def photo_mix() -> list[bytes]:
    """The serving benchmarks' request mix: 8 real colour photos, alternately JPEG and PNG (serve.images)."""
    return list(sample_image_bytes().values())


def images_by_format_and_size() -> dict[str, bytes]:
    """'jpeg_small', 'jpeg_large', 'png_small', 'png_large' -> encoded bytes of one real photo at that size."""
    import skimage.data
    from PIL import Image

    photo = Image.fromarray(skimage.data.astronaut()).convert("RGB")
    out = {}
    for size_name, side in SIZES.items():
        img = photo.resize((side, side), Image.BILINEAR)
        for fmt in FORMATS:
            buf = io.BytesIO()
            img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            out[f"{fmt.lower()}_{size_name}"] = buf.getvalue()
    return out


def checkpoint(work: str | Path, given: str | Path | None = None) -> Path:
    """The checkpoint to benchmark: ``given`` when set (a trained model), else an untrained demo-shaped one in ``work``."""
    if given is not None:
        p = Path(given)
        if not p.is_file():
            raise ServeError(f"checkpoint '{p}' does not exist; train one (python -m train) or omit --checkpoint.")
        return p
    return random_checkpoint(Path(work) / "ckpt")


def split_files(root: str | Path, split: str) -> list[Path]:
    """Every image file of ``root/split/<class>/`` (sorted), e.g. the demo's full test split."""
    d = Path(root) / split
    if not d.is_dir():
        raise ServeError(f"'{d}' does not exist; prepare the data first (python -m scripts.prepare_animals).")
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ServeError(f"'{d}' holds no images; prepare the data first (python -m scripts.prepare_animals).")
    return files
