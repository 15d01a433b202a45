"""ImageFolder scanning (classes, corrupt files), per-epoch sharded sample plans, and the DALI / torchvision loaders."""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from train.config import DataConfig
from train.transforms import EvalSpec, eval_transform, train_transform

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """A problem with the user's data folder, stated in one sentence."""


@dataclass
class Split:
    name: str
    paths: list[str]
    labels: np.ndarray
    skipped_corrupt: list[str] = field(default_factory=list)
    skipped_non_image: int = 0

    def __len__(self) -> int:
        return len(self.paths)


def _check_image(path: str) -> Optional[str]:
    try:
        with Image.open(path) as im:
            im.load()  # full decode: catches truncation that verify() misses
        return None
    except Exception as err:  # noqa: BLE001 - any decode failure means "corrupt"
        return f"{path} ({type(err).__name__}: {err})"


def list_classes(root: Path) -> list[str]:
    train_dir = root / "train"
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"'{train_dir}' has no class folders; expected {train_dir}/<class>/<image>.")
    return classes


def scan_split(root: Path, split: str, classes: list[str], on_corrupt: str, threads: int = 8) -> Split:
    """List <root>/<split>/<class>/<image>, check each image decodes, apply the corrupt-file policy."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"Split folder '{split_dir}' does not exist; data.root must hold train/, val/ and test/.")
    present = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise DataError(f"'{split_dir}' has class folders not in train/: {unknown}; the classes are fixed by train/.")
    paths, labels, non_image = [], [], 0
    for label, cls in enumerate(classes):
        cdir = split_dir / cls
        files = sorted(p for p in cdir.rglob("*") if p.is_file()) if cdir.is_dir() else []
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        non_image += len(files) - len(images)
        if split == "train" and not images:
            raise DataError(f"Class folder '{cdir}' has no images; remove the folder or add images to it.")
        paths += [str(p) for p in images]
        labels += [label] * len(images)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        problems = list(pool.map(_check_image, paths))
    bad = [msg for msg in problems if msg]
    if bad:
        if on_corrupt == "fail":
            listing = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DataError(f"{len(bad)} unreadable image(s) in '{split_dir}': {listing}. "
                            "Fix or remove them, or set data.on_corrupt=skip.")
        keep = [i for i, msg in enumerate(problems) if not msg]
        log.warning("%s: skipped %d unreadable image(s), e.g. %s", split, len(bad), bad[0])
        paths = [paths[i] for i in keep]
        labels = [labels[i] for i in keep]
    if non_image:
        log.info("%s: ignored %d non-image file(s)", split, non_image)
    if not paths:
        raise DataError(f"Split folder '{split_dir}' has no readable images.")
    return Split(split, paths, np.asarray(labels, dtype=np.int64), [m for m in bad], non_image)


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    splits: dict[str, Split]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.splits["train"].labels, minlength=len(self.classes))


def scan_imagefolder(data: DataConfig, splits: tuple[str, ...] = SPLITS) -> Dataset:
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"Data folder '{root}' does not exist; set data.root to an ImageFolder with train/, val/ and test/.")
    if not (root / "train").is_dir():
        raise DataError(f"Data folder '{root}' has no train/ folder; expected {root}/train/<class>/<image>.")
    classes = list_classes(root)
    return Dataset(root, classes, {s: scan_split(root, s, classes, data.on_corrupt) for s in splits})


def class_weights(counts: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 over the classes."""
    counts = np.maximum(counts.astype(np.float64), 1.0)
    w = counts.sum() / (len(counts) * counts)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Sample plans: which sample indices each rank sees, in which order. Pure functions of (seed, epoch), so a
# resumed run sees exactly the rest of the interrupted epoch, and the ranks' shards are disjoint.


def train_plan(n: int, world: int, batch: int, seed: int, epoch: int) -> np.ndarray:
    """[world, steps*batch] sample indices for one epoch: a seeded permutation, drop-last, row r for rank r."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // (world * batch)
    if steps == 0:
        raise DataError(f"The training split has {n} images, fewer than one global batch ({world} ranks x {batch}); "
                        "lower data.batch_size.")
    return perm[: steps * world * batch].reshape(steps * batch, world).T.copy()


def steps_per_epoch(n: int, world: int, batch: int) -> int:
    return n // (world * batch)


def eval_shard(n: int, world: int, rank: int) -> np.ndarray:
    return np.arange(rank, n, world)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


# ---------------------------------------------------------------------------------------------------------
# torchvision backend


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], indices: np.ndarray, transform, seed: Optional[int], epoch: int):
        self.paths, self.indices, self.transform = paths, indices, transform
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = int(self.indices[i])
        with Image.open(self.paths[idx]) as im:
            img = im.convert("RGB")
        if self.seed is not None:
            # Augmentation is a pure function of (seed, epoch, sample): resume and worker count don't change it.
            torch.manual_seed(_sample_seed(self.seed, self.epoch, idx))
        return self.transform(img), idx


def _torch_loader(ds, batch: int, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=False,
                                       prefetch_factor=4 if workers else None)


class Loader:
    """Iterates (images float NCHW, sample indices int64) batches; labels are looked up from the indices."""

    def __init__(self, it, steps: int):
        self._it, self.steps = it, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._it)


def resolve_backend(data: DataConfig) -> str:
    if data.backend != "auto":
        if data.backend == "dali" and not dali_available():
            raise DataError("data.backend=dali but nvidia-dali is not installed; pip install '.[dali]' or set data.backend=torchvision.")
        return data.backend
    return "dali" if dali_available() else "torchvision"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def build_train_loader(data: DataConfig, split: Split, world: int, rank: int, seed: int, epoch: int,
                       start_step: int = 0, device: Optional[torch.device] = None) -> Loader:
    plan = train_plan(len(split), world, data.batch_size, seed, epoch)
    if resolve_backend(data) == "dali":
        from train.dali import dali_train_loader
        return dali_train_loader(data, split.paths, plan, rank, seed, epoch, start_step, device)
    mine = plan[rank][start_step * data.batch_size:]
    ds = _FolderDataset(split.paths, mine, train_transform(data), seed, epoch)
    return Loader(_torch_loader(ds, data.batch_size, data.workers), len(mine) // data.batch_size)


def build_eval_loader(data: DataConfig, split: Split, world: int, rank: int,
                      device: Optional[torch.device] = None) -> Loader:
    mine = eval_shard(len(split), world, rank)
    if resolve_backend(data) == "dali":
        from train.dali import dali_eval_loader
        return dali_eval_loader(data, split.paths, mine, device)
    ds = _FolderDataset(split.paths, mine, eval_transform(EvalSpec.from_data_config(data)), None, 0)
    return Loader(_torch_loader(ds, data.batch_size, data.workers), -(-len(mine) // data.batch_size))


def cpu_threads_per_rank(local_world: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, local_world))
