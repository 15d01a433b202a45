"""Listing an ImageFolder without decoding it: classes, splits, the optional decode check (data.verify) and the
manifest that caches that check across starts. Run it on rank 0 only and broadcast the result (a plain picklable
``Dataset``): listing costs one scandir + stat per file, the decode check one full decode per image."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from train.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
OPTIONAL_SPLITS = ("test",)  # ImageNet ships train/ and val/ only
MANIFEST_VERSION = 1
LISTING_VERSION = 1   # the cached listing (dataset-<key>.json in the cache folder)


class DataError(RuntimeError):
    """A problem with the user's data folder, stated in one sentence."""


@dataclass
class Split:
    name: str
    paths: list[str]
    labels: np.ndarray
    skipped_corrupt: list[str] = field(default_factory=list)
    skipped_non_image: int = 0
    fingerprint: str = ""  # hash of (path, size, mtime) of every listed file: keys loader caches and the manifest

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    splits: dict[str, Split]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.splits["train"].labels, minlength=len(self.classes))


def check_image(path: str) -> Optional[str]:
    """None when the file fully decodes, else 'path (Error: message)'."""
    try:
        with Image.open(path) as im:
            im.load()  # full decode: catches truncation that verify() misses
        return None
    except Exception as err:  # noqa: BLE001 - any decode failure means "corrupt"
        return f"{path} ({type(err).__name__}: {err})"


def _subdirs(path: Path) -> list[str]:
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def class_name_problem(name: str) -> Optional[str]:
    """Why a class folder name cannot be a label, or None. Labels go one per line into labels.txt and come back from
    Triton's classification output as 'score:index:label': a line break shifts every later label, a ':' splits the
    answer wrongly, a path separator or undecodable bytes name no folder the same way on another machine."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:   # os.scandir hands undecodable bytes back as surrogate escapes
        return "bytes that are not UTF-8"
    for chars, what in (("\n\r", "a line break"), (":", "a ':'"), ("/\\", "a path separator")):
        if any(c in name for c in chars):
            return what
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "a control character"
    return None


def list_classes(root: Path) -> list[str]:
    train_dir = root / "train"
    classes = _subdirs(train_dir)
    if not classes:
        raise DataError(f"'{train_dir}' has no class folders; expected {train_dir}/<class>/<image>.")
    for name in classes:
        problem = class_name_problem(name)
        if problem:
            raise DataError(f"Class folder {ascii(name)} in '{train_dir}' has {problem} in its name, which would shift or "
                            f"split the served labels (labels.txt, 'score:index:label'); rename it (and its val/ and "
                            f"test/ folders) to letters, digits, spaces, '-', '_' or '.'.")
    return classes


def _walk(top: str, rel: tuple[str, ...], out: list) -> None:
    """Every file under ``top`` as (relative parts, size, mtime_ns); one stat per file, nothing opened."""
    with os.scandir(top) as it:
        entries = list(it)
    for e in entries:
        if e.is_dir():
            _walk(e.path, rel + (e.name,), out)
        elif e.is_file():
            st = e.stat()
            out.append((rel + (e.name,), st.st_size, st.st_mtime_ns))


@dataclass
class _Listing:
    files: list[tuple[str, int, int]]  # (path relative to the split folder, size, mtime_ns), in label order
    labels: list[int]
    non_image: int


def _list_split(split_dir: Path, split: str, classes: list[str]) -> _Listing:
    present = _subdirs(split_dir)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise DataError(f"'{split_dir}' has class folders not in train/: {unknown}; the classes are fixed by train/.")
    files, labels, non_image = [], [], 0
    for label, cls in enumerate(classes):
        cdir = split_dir / cls
        found: list = []
        if cdir.is_dir():
            _walk(str(cdir), (cls,), found)
        found.sort(key=lambda f: f[0])  # component-wise, the order pathlib's sorted(rglob) gave
        images = [f for f in found if os.path.splitext(f[0][-1])[1].lower() in IMAGE_EXTENSIONS]
        non_image += len(found) - len(images)
        if split == "train" and not images:
            raise DataError(f"Class folder '{cdir}' has no images; remove the folder or add images to it.")
        files += [(os.sep.join(parts), size, mtime) for parts, size, mtime in images]
        labels += [label] * len(images)
    return _Listing(files, labels, non_image)


def _fingerprint(split_dir: Path, listing: _Listing) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(split_dir.resolve()).encode())
    for (rel, size, mtime), label in zip(listing.files, listing.labels):
        h.update(f"\0{rel}\0{size}\0{mtime}\0{label}".encode())
    return h.hexdigest()


def _manifest_path(cache_dir: Optional[Path], split: str, fingerprint: str) -> Optional[Path]:
    return Path(cache_dir) / f"listing-{split}-{fingerprint}.json" if cache_dir else None


def _read_manifest(path: Optional[Path], version: int = MANIFEST_VERSION) -> Optional[dict]:
    if path is None or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable listing manifest %s (%s)", path, err)
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("version") == version else None


def _write_manifest(path: Optional[Path], manifest: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as err:
        log.warning("could not write the listing manifest %s (%s); the next start lists again", path, err)


def _decode_problems(split_dir: Path, listing: _Listing, threads: int) -> dict[str, str]:
    """{relative path: problem} from a full decode of every listed image."""
    prefix = str(split_dir) + os.sep
    paths = [prefix + rel for rel, _, _ in listing.files]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        problems = list(pool.map(check_image, paths))
    return {listing.files[i][0]: msg for i, msg in enumerate(problems) if msg}


def scan_split(root: Path, split: str, classes: list[str], on_corrupt: str, threads: int = 8, verify: bool = True,
               cache_dir: Optional[Path] = None) -> Split:
    """List <root>/<split>/<class>/<image>; empty files are always unreadable, a full decode check runs when
    ``verify`` (its result cached in ``cache_dir`` under the listing's fingerprint); apply the corrupt-file policy."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"Split folder '{split_dir}' does not exist; data.root must hold train/ and val/ (test/ optional).")
    listing = _list_split(split_dir, split, classes)
    fingerprint = _fingerprint(split_dir, listing)
    bad = {rel: f"{split_dir / rel} (empty file)" for rel, size, _ in listing.files if size == 0}
    if verify:
        mpath = _manifest_path(cache_dir, split, fingerprint)
        manifest = _read_manifest(mpath)
        if manifest is not None and manifest.get("verified"):
            decoded = manifest["problems"]
            log.info("%s: decode check reused from %s", split, mpath)
        else:
            t0 = time.perf_counter()
            decoded = _decode_problems(split_dir, listing, threads)
            log.info("%s: decoded %d image(s) to check them in %.1f s", split, len(listing.files), time.perf_counter() - t0)
            _write_manifest(mpath, {"version": MANIFEST_VERSION, "split": split, "fingerprint": fingerprint,
                                    "root": str(split_dir.resolve()), "verified": True, "problems": decoded})
        bad.update({rel: msg for rel, msg in decoded.items() if rel not in bad})
    order = [rel for rel, _, _ in listing.files if rel in bad]
    messages = [bad[rel] for rel in order]
    if messages:
        if on_corrupt == "fail":
            shown = "; ".join(messages[:5]) + (f"; and {len(messages) - 5} more" if len(messages) > 5 else "")
            raise DataError(f"{len(messages)} unreadable image(s) in '{split_dir}': {shown}. "
                            "Fix or remove them, or set data.on_corrupt=skip.")
        log.warning("%s: skipped %d unreadable image(s), e.g. %s", split, len(messages), messages[0])
    keep = [i for i, (rel, _, _) in enumerate(listing.files) if rel not in bad]
    if listing.non_image:
        log.info("%s: ignored %d non-image file(s)", split, listing.non_image)
    if not keep:
        raise DataError(f"Split folder '{split_dir}' has no readable images.")
    prefix = str(split_dir) + os.sep  # string joins: pathlib's / costs ~30 us a path, 40 s on ImageNet
    paths = [prefix + listing.files[i][0] for i in keep]
    labels = np.asarray([listing.labels[i] for i in keep], dtype=np.int64)
    return Split(split, paths, labels, messages, listing.non_image, fingerprint)


def _folder_stamp(root: Path, classes: list[str], splits: tuple[str, ...]) -> list:
    """(folder, mtime_ns) of the root, each split and each class folder: a file added, removed or renamed in a
    class folder changes that folder's mtime. One stat per folder (~3,000 on ImageNet), not per file."""
    stamp = []
    for d in [root] + [root / s for s in splits] + [root / s / c for s in splits for c in classes]:
        try:
            stamp.append([str(d.relative_to(root)), d.stat().st_mtime_ns])
        except OSError:
            stamp.append([str(d.relative_to(root)), None])
    return stamp


def _listing_cache_path(cache_dir: Optional[Path], root: Path, data: DataConfig, splits: tuple[str, ...]) -> Optional[Path]:
    """None with data.verify: a file rewritten in place keeps its folder's mtime, and its decode check must run again
    (the listing's per-file size and mtime key that check's manifest)."""
    if not cache_dir or data.verify:
        return None
    key = json.dumps([LISTING_VERSION, str(root.resolve()), list(splits), data.verify, data.on_corrupt, IMAGE_EXTENSIONS])
    return Path(cache_dir) / f"dataset-{hashlib.blake2b(key.encode(), digest_size=12).hexdigest()}.json"


def _cached_dataset(path: Optional[Path], root: Path, classes: list[str], stamp: list) -> Optional[Dataset]:
    manifest = _read_manifest(path, LISTING_VERSION)
    if manifest is None or manifest.get("classes") != classes or manifest.get("stamp") != stamp:
        return None
    out = {}
    for name, sp in manifest["splits"].items():
        prefix = str(root / name) + os.sep
        out[name] = Split(name, [prefix + rel for rel in sp["files"]], np.asarray(sp["labels"], dtype=np.int64),
                          sp["skipped_corrupt"], sp["skipped_non_image"], sp["fingerprint"])
    return Dataset(root, classes, out)


def _cache_dataset(path: Optional[Path], ds: Dataset, stamp: list) -> None:
    splits = {}
    for name, sp in ds.splits.items():
        cut = len(str(ds.root / name)) + 1
        splits[name] = {"files": [p[cut:] for p in sp.paths], "labels": sp.labels.tolist(),
                        "skipped_corrupt": sp.skipped_corrupt, "skipped_non_image": sp.skipped_non_image,
                        "fingerprint": sp.fingerprint}
    _write_manifest(path, {"version": LISTING_VERSION, "root": str(ds.root.resolve()), "classes": ds.classes,
                           "stamp": stamp, "splits": splits})


def list_dataset(data: DataConfig, splits: tuple[str, ...] = SPLITS, cache_dir: Optional[Path] = None) -> Dataset:
    """The data set as a plain picklable object: call it on rank 0 and broadcast (dist.broadcast_object_list).
    A missing optional split (test/) is left out of ``Dataset.splits`` with a log line. With ``cache_dir`` the
    listing is kept there, keyed by the folder, and reused while no split or class folder has changed (an elastic
    restart does not list 1.28 M files again); files in folders nested below a class folder, or a file rewritten in
    place, do not change a class folder's mtime: delete the cache file after such an edit (data.verify lists anew)."""
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"Data folder '{root}' does not exist; set data.root to an ImageFolder with train/ and val/ (test/ optional).")
    if not (root / "train").is_dir():
        raise DataError(f"Data folder '{root}' has no train/ folder; expected {root}/train/<class>/<image>.")
    t0 = time.perf_counter()
    classes = list_classes(root)
    cache = _listing_cache_path(cache_dir, root, data, splits)
    stamp = _folder_stamp(root, classes, splits) if cache else []
    cached = _cached_dataset(cache, root, classes, stamp)
    if cached is not None:
        log.info("listed %s in %.2f s from %s (no split or class folder changed)",
                 ", ".join(f"{len(v)} {k}" for k, v in cached.splits.items()), time.perf_counter() - t0, cache)
        return cached
    out: dict[str, Split] = {}
    for s in splits:
        if s in OPTIONAL_SPLITS and not (root / s).is_dir():
            log.info("no %s/ split in '%s': the run reports no %s metrics (ImageNet-style train/ + val/ folders)", s, root, s)
            continue
        out[s] = scan_split(root, s, classes, data.on_corrupt, verify=data.verify, cache_dir=cache_dir)
    log.info("listed %s in %.2f s (%s)", ", ".join(f"{len(v)} {k}" for k, v in out.items()), time.perf_counter() - t0,
             "every image decoded once (data.verify=true)" if data.verify else
             "no decode check: set data.verify=true to decode every image at start")
    ds = Dataset(root, classes, out)
    _cache_dataset(cache, ds, stamp)
    return ds
