"""Image files a user points the server tools at (files and folders), and real sample photos (scikit-image's bundled
JPEG/PNG files) that export's parity check runs when no images are given."""
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
