"""Prepare Animal-MNIST as an ImageFolder: exact duplicates removed, then a stratified train/val/test split.

``python -m scripts.prepare_animals --out data/animals`` reads the pickles shipped in the ``animal-mnist==0.4``
package (10,000 grayscale 28x28 silhouettes, 10 classes, labels 0..9 = the species in alphabetical order),
drops exact duplicate images (284 pairs: a duplicate kept on both sides of a split would inflate test
accuracy, so deduplication happens BEFORE splitting), splits each class with a seeded shuffle (per-split
totals by largest remainder, so every class is within one image of its proportional share) and writes
``<out>/{train,val,test}/<class>/<id>.png``. A marker file ``<out>/.prepared.json`` records the counts; a rerun
whose marker matches the files on disk does nothing. The two pickles are unpickled only after their SHA-256 matches
the digest of the animal-mnist==0.4 release recorded here (a pickle can run code when loaded).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import pickle
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
SPLITS = ("train", "val", "test")
MARKER = ".prepared.json"
FORMAT_VERSION = 2  # 2: val apportioned after test's rounding (train counts balanced too); split_digest
DEFAULT_VAL, DEFAULT_TEST = 0.115, 0.115  # 9,716 unique images -> 7,481 / 1,118 / 1,117
# SHA-256 of the files shipped in the animal-mnist==0.4 wheel (data/Animal_MNIST/); checked before unpickling.
SHA256 = {
    "animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}


class PrepareError(RuntimeError):
    """A problem the user can fix, in one sentence."""


def package_files() -> tuple[Path, Path]:
    """The two pickles inside the installed animal-mnist package (found without importing it: it imports tensorflow)."""
    import importlib.util

    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError("The animal-mnist package is not installed; run `make venv` (it installs animal-mnist==0.4 "
                           "with --no-deps).")
    base = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    data, labels = base / "animal_data_version_3.gz", base / "animal_label_version_3.gz"
    for f in (data, labels):
        if not f.is_file():
            raise PrepareError(f"'{f}' is missing from the animal-mnist package; reinstall animal-mnist==0.4.")
    return data, labels


def verify_file(path: Path) -> None:
    """Raise PrepareError unless ``path`` has the SHA-256 recorded for its name in SHA256."""
    expected = SHA256.get(path.name)
    if expected is None:
        raise PrepareError(f"'{path.name}' is not one of the animal-mnist==0.4 files {sorted(SHA256)}; reinstall "
                           f"animal-mnist==0.4 (`make venv`).")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise PrepareError(f"'{path}' does not have the SHA-256 of the animal-mnist==0.4 release (got "
                           f"{h.hexdigest()[:16]}..., expected {expected[:16]}...), so it was not unpickled; reinstall "
                           f"animal-mnist==0.4 (`make venv`).")


def _load_array(path: Path) -> np.ndarray:
    # A pickle runs code when loaded: only the exact files of the pinned release are unpickled.
    verify_file(path)
    with gzip.open(path, "rb") as f:
        obj = pickle.load(f)  # noqa: S301
    return np.asarray(obj)


def load_animals() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) as shipped."""
    data_path, label_path = package_files()
    images, labels = _load_array(data_path), _load_array(label_path).astype(np.int64).reshape(-1)
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise PrepareError(f"Unexpected animal-mnist format: images {images.shape} {images.dtype}, labels {labels.shape}.")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise PrepareError(f"Unexpected animal-mnist labels outside 0..{len(CLASSES) - 1}.")
    return images, labels


def dedupe(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Indices to keep (first occurrence of each exact image), number of duplicates dropped, and groups whose copies
    disagree on the label (all copies of those are dropped: their label is ambiguous)."""
    flat = images.reshape(len(images), -1)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    conflicting = set()
    for i, g in enumerate(inverse):
        if labels[i] != labels[first[g]]:
            conflicting.add(int(g))
    keep = np.array(sorted(int(first[g]) for g in range(len(first)) if g not in conflicting), dtype=np.int64)
    return keep, len(images) - len(first), len(conflicting)


def _apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, each within one of its real-valued share (largest remainder)."""
    base = np.floor(shares).astype(np.int64)
    rest = total - int(base.sum())
    order = np.argsort(-(shares - base), kind="stable")
    base[order[:rest]] += 1
    return base


def stratified_split(labels: np.ndarray, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Positions into ``labels`` per split: per-class seeded shuffle; split sizes round(N*(val+test)) / round(N*test)."""
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise PrepareError(f"--val ({val}) and --test ({test}) must be fractions in (0, 1) with a sum below 1.")
    n = len(labels)
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes], dtype=np.float64)
    n_test = int(round(n * test))
    n_val = int(round(n * (val + test))) - n_test
    test_c = _apportion(n_test, counts * n_test / n)
    # val apportions what test's rounding left over (share n_c*val + test's rounding error), so each class's train
    # count stays within one image of its share too: train_c = n_c - test_c - val_c.
    val_c = _apportion(n_val, np.maximum(counts * n_val / n + (counts * n_test / n - test_c), 0.0))
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {s: [] for s in SPLITS}
    for c, nt, nv in zip(classes, test_c, val_c):
        pos = np.flatnonzero(labels == c)
        pos = pos[rng.permutation(len(pos))]
        out["test"].append(pos[:nt])
        out["val"].append(pos[nt:nt + nv])
        out["train"].append(pos[nt + nv:])
    return {s: np.sort(np.concatenate(v)) for s, v in out.items()}


def _count_files(root: Path) -> dict[str, dict[str, int]]:
    return {s: {c.name: sum(1 for _ in c.glob("*.png")) for c in sorted((root / s).iterdir()) if c.is_dir()}
            for s in SPLITS if (root / s).is_dir()}


ANIMALS_SOURCE = "animal-mnist==0.4 (animal_{data,label}_version_3.gz)"


def check_prepared(out: Path, format_version: int = FORMAT_VERSION, source: Optional[str] = None) -> Optional[dict]:
    """The marker's contents when ``out`` holds a complete preparation (files on disk match the marker, and the
    source matches when given), else None."""
    try:
        info = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if (info.get("format") != format_version or (source is not None and info.get("source") != source)
            or _count_files(Path(out)) != info.get("counts")):
        return None
    return info


def write_imagefolder(out: str | Path, load: Callable[[], tuple[np.ndarray, np.ndarray]], classes: Sequence[str],
                      marker_fields: dict, format_version: int, val: float = DEFAULT_VAL, test: float = DEFAULT_TEST,
                      seed: int = 0, max_per_class: int = 0, force: bool = False, log=print) -> dict:
    """Shared by every data set script: reuse a verified preparation, else load (the caller's checksum-checked
    loader), remove exact duplicates, subsample, split stratified and seeded, write PNGs and the marker atomically.
    ``marker_fields`` (at least ``source``) go into the marker; its ``source`` must match for a reuse."""
    out = Path(out)
    if max_per_class < 0:
        raise PrepareError("--max-per-class must be 0 (all) or a positive number.")
    settings = {"val": val, "test": test, "seed": seed, "max_per_class": max_per_class}
    if not force:
        info = check_prepared(out, format_version, marker_fields.get("source"))
        if info is not None and info.get("settings") == settings:
            log(f"data: reusing {out} ({_fmt(info['splits'])}; verified against {MARKER})")
            return info
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists() and not force:
        raise PrepareError(f"'{out}' already holds files that this script did not write; choose another --out or "
                           "pass --force to replace it.")
    images, labels = load()
    keep, dropped, conflicting = dedupe(images, labels)
    images, labels = images[keep], labels[keep]
    if max_per_class:
        sub = np.concatenate([np.flatnonzero(labels == c)[:max_per_class] for c in np.unique(labels)])
        sub.sort()
        images, labels = images[sub], labels[sub]
    parts = stratified_split(labels, val, test, seed)
    from PIL import Image

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, dict[str, int]] = {}
    for split, pos in parts.items():
        counts[split] = {}
        for c, name in enumerate(classes):
            d = tmp / split / name
            d.mkdir(parents=True, exist_ok=True)
            mine = [p for p in pos if labels[p] == c]
            for p in mine:
                img = images[p]
                digest = hashlib.blake2b(img.tobytes(), digest_size=6).hexdigest()
                Image.fromarray(img, mode="L").save(d / f"{digest}.png", optimize=False)
            counts[split][name] = len(mine)
    listing = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*.png"))
    info = {"format": format_version,
            "split_digest": hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16], **marker_fields,
            "classes": list(classes), "settings": settings, "duplicates_removed": dropped,
            "conflicting_duplicate_groups_removed": conflicting, "unique_images": int(len(labels)),
            "splits": {s: int(sum(v.values())) for s, v in counts.items()}, "counts": counts}
    (tmp / MARKER).write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    log(f"data: wrote {out} ({_fmt(info['splits'])}; {dropped} exact duplicates removed before splitting)")
    return info


def prepare(out: str | Path, val: float = DEFAULT_VAL, test: float = DEFAULT_TEST, seed: int = 0,
            max_per_class: int = 0, force: bool = False, log=print) -> dict:
    """Write the ImageFolder (or reuse a verified one) and return the marker dict (split totals in ``splits``)."""
    return write_imagefolder(out, load_animals, CLASSES, {"source": ANIMALS_SOURCE}, FORMAT_VERSION, val, test, seed,
                             max_per_class, force, log)


def _fmt(splits: dict) -> str:
    return " / ".join(f"{splits[s]:,} {s}" for s in SPLITS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.prepare_animals",
        description="Write Animal-MNIST (from the installed animal-mnist==0.4 package) as an ImageFolder of PNG files: "
                    "exact duplicates removed first, then a seeded stratified train/val/test split, into "
                    "OUT/{train,val,test}/<class>/. Skipped when OUT/.prepared.json matches the files on disk and the "
                    "same settings.")
    p.add_argument("--out", default="data/animals", help="output folder (default: data/animals)")
    p.add_argument("--val", type=float, default=DEFAULT_VAL, help=f"validation fraction (default {DEFAULT_VAL})")
    p.add_argument("--test", type=float, default=DEFAULT_TEST, help=f"test fraction (default {DEFAULT_TEST})")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--max-per-class", type=int, default=0,
                   help="keep only the first N unique images of each class (small subsets for tests; 0 = all)")
    p.add_argument("--force", action="store_true", help="rewrite OUT even when it is prepared or holds other files")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_per_class < 0:
        print("error: --max-per-class must be 0 (all) or a positive number.", file=sys.stderr)
        return 2
    try:
        prepare(args.out, args.val, args.test, args.seed, args.max_per_class, args.force)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
