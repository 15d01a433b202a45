"""Sample plans (which indices each rank sees, per epoch, seeded) and the loaders that follow them: DALI or
torchvision, each built once per (split, rank, image size) and re-planned per epoch. Listing the folder lives in
train.listing (re-exported here); DALI pipelines in train.dali."""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from train.config import DataConfig
from train.dali import dali_available, dali_eval_passes, dali_train_passes
from train.hardware import data_backend
from train.listing import (IMAGE_EXTENSIONS, SPLITS, DataError, Dataset, Split, check_image, list_classes,  # noqa: F401
                           list_dataset, scan_split)
from train.transforms import EvalSpec, draft_for_eval, eval_transform, train_transform

log = logging.getLogger(__name__)


def scan_imagefolder(data: DataConfig, splits: tuple[str, ...] = SPLITS, cache_dir: Optional[Path] = None) -> Dataset:
    """The data set listed (no decode unless data.verify); see train.listing.list_dataset."""
    return list_dataset(data, splits, cache_dir)


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
# torchvision backend: workers decode and augment to uint8 (4x less to pin and copy than float); the Loader
# converts and normalises on the device (timm's PrefetchLoader does the same), bit-identical to ToTensor+Normalize.


def _uint8_transform(compose: T.Compose) -> tuple[T.Compose, tuple, tuple]:
    """The same transform ending in a uint8 CHW tensor, and the (mean, std) its Normalize applied."""
    *head, to_tensor, normalize = compose.transforms
    if not (isinstance(to_tensor, T.ToTensor) and isinstance(normalize, T.Normalize)):
        raise TypeError("train.transforms must end with ToTensor() and Normalize() for the uint8 loader path")
    return T.Compose([*head, T.PILToTensor()]), tuple(normalize.mean), tuple(normalize.std)


class _FolderDataset(torch.utils.data.Dataset):
    """Item key (sample index, epoch) -> (uint8 CHW image, index actually used, 1 if substituted for a bad file)."""

    def __init__(self, paths: list[str], transform, seed: Optional[int], on_corrupt: str, eval_spec: Optional[EvalSpec]):
        self.paths, self.transform, self.seed, self.on_corrupt = paths, transform, seed, on_corrupt
        self.eval_spec = eval_spec  # eval: large JPEGs decode at reduced scale, as serving's decode_image(spec=) does

    def __len__(self) -> int:
        return len(self.paths)

    def _open(self, idx: int) -> Image.Image:
        with Image.open(self.paths[idx]) as im:
            if self.eval_spec is not None:
                draft_for_eval(im, self.eval_spec)
            return im.convert("RGB")

    def _load(self, idx: int) -> tuple[Image.Image, int, int]:
        try:
            return self._open(idx), idx, 0
        except Exception as err:  # noqa: BLE001 - any decode failure means "corrupt"
            problem = f"{self.paths[idx]} ({type(err).__name__}: {err})"
        if self.on_corrupt == "fail":
            raise DataError(f"Unreadable image met in training: {problem}. Fix or remove it, or set data.on_corrupt=skip "
                            "(data.verify=true checks every image at start).")
        for step in range(1, len(self.paths)):
            j = (idx + step) % len(self.paths)
            if check_image(self.paths[j]) is None:
                log.warning("unreadable image met in training, replaced by the next readable sample "
                            "(data.on_corrupt=skip): %s", problem)
                return self._open(j), j, 1
        raise DataError(f"No readable image left in the split of {problem}; check the data folder.")

    def __getitem__(self, key: tuple[int, int]):
        img, idx, substituted = self._load(int(key[0]))
        if self.seed is not None:
            # Augmentation is a pure function of (seed, epoch, sample): resume and worker count don't change it.
            torch.manual_seed(_sample_seed(self.seed, key[1], idx))
        return self.transform(img), idx, substituted


class _PlanBatches(torch.utils.data.Sampler):
    """Batch sampler over the current pass's indices, as (index, epoch) keys; re-planned without new workers."""

    def __init__(self, batch: int):
        self.batch, self.indices, self.epoch = batch, np.empty(0, dtype=np.int64), 0

    def plan(self, indices: np.ndarray, epoch: int) -> None:
        self.indices, self.epoch = np.asarray(indices), epoch

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch)

    def __iter__(self):
        for s in range(0, len(self.indices), self.batch):
            yield [(int(i), self.epoch) for i in self.indices[s: s + self.batch]]


class _TorchPasses:
    """One DataLoader (persistent workers) per (split, rank, size); ``passes(indices, epoch)`` yields normalised
    float NCHW images on ``device`` and their sample indices."""

    def __init__(self, data: DataConfig, paths: list[str], compose: T.Compose, seed: Optional[int],
                 device: Optional[torch.device], channels_last: bool, eval_spec: Optional[EvalSpec] = None):
        transform, mean, std = _uint8_transform(compose)
        self.device, self.channels_last = device or torch.device("cpu"), channels_last
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.batches = _PlanBatches(data.batch_size)
        self.substituted = 0
        ds = _FolderDataset(paths, transform, seed, data.on_corrupt, eval_spec)
        w = data.workers
        self.loader = torch.utils.data.DataLoader(ds, batch_sampler=self.batches, num_workers=w,
                                                  pin_memory=self.device.type == "cuda", persistent_workers=w > 0,
                                                  prefetch_factor=4 if w else None)

    def passes(self, indices: np.ndarray, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.batches.plan(indices, epoch)
        it = iter(self.loader)
        while True:
            try:
                x, idx, substituted = next(it)
            except StopIteration:
                return
            except DataError as err:  # re-raised from a worker with its traceback in the text: keep the sentence
                raise DataError(str(err).rsplit("DataError: ", 1)[-1].strip()) from None
            self.substituted += int(substituted.sum())
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # the ops of ToTensor (float, /255) then Normalize (-mean, /std), in that order: bit-identical
            yield x.to(torch.float32).div_(255).sub_(self.mean).div_(self.std), idx


# ---------------------------------------------------------------------------------------------------------
# Loaders: built once per key and kept (workers / DALI pipelines live across epochs), re-planned per call.

_PASSES: "OrderedDict[tuple, object]" = OrderedDict()
_MAX_KEPT = 6  # train + val + test per image size, with room for a progressive-resizing schedule


def _kept(key: tuple, make: Callable[[], object]):
    if key in _PASSES:
        _PASSES.move_to_end(key)
        return _PASSES[key]
    obj = _PASSES[key] = make()
    while len(_PASSES) > _MAX_KEPT:
        _PASSES.popitem(last=False)  # its DataLoader workers / DALI pipeline go with it
    return obj


def release_loaders() -> None:
    """Drop every kept DataLoader (its worker processes) and DALI pipeline."""
    _PASSES.clear()


def _split_key(split: Split) -> str:
    return split.fingerprint or hashlib.blake2b("\0".join(split.paths).encode(), digest_size=16).hexdigest()


class Loader:
    """Iterates (images float NCHW, sample indices int64) batches; labels are looked up from the indices.
    ``substituted`` counts unreadable files replaced so far (data.on_corrupt=skip) by this loader's pipeline."""

    def __init__(self, make_iter: Callable[[], Iterator], steps: int, passes=None):
        self._make_iter, self.steps, self._passes = make_iter, steps, passes

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._make_iter()

    @property
    def substituted(self) -> int:
        return getattr(self._passes, "substituted", 0)


def resolve_backend(data: DataConfig) -> str:
    if data.backend == "dali" and not dali_available():
        raise DataError("data.backend=dali but nvidia-dali is not installed; pip install '.[dali]' or set data.backend=torchvision.")
    return data_backend(data.backend, dali_available())   # the rule hardware.decide applies


def build_train_loader(data: DataConfig, split: Split, world: int, rank: int, seed: int, epoch: int,
                       start_step: int = 0, device: Optional[torch.device] = None, channels_last: bool = False,
                       image_size: Optional[int] = None) -> Loader:
    """Rank ``rank``'s batches of ``epoch`` from ``start_step`` on. ``image_size`` overrides data.image_size (the
    crop size: progressive resizing); each size keeps its own pipeline. With ``channels_last`` the images come
    channels_last-contiguous (DALI: NHWC output permuted, no copy)."""
    size = image_size or data.image_size
    mine = train_plan(len(split), world, data.batch_size, seed, epoch)[rank][start_step * data.batch_size:]
    steps = len(mine) // data.batch_size
    backend = resolve_backend(data)
    key = ("train", backend, _split_key(split), world, rank, seed, size, str(device), channels_last,
           data.model_dump_json())
    if backend == "dali":
        # seeded once per pipeline: a resumed run continues at the exact sample with a new augmentation stream
        dseed = (seed * 1000003 + epoch * 101 + rank + start_step * 7919) % (2**31 - 1)
        passes = _kept(key, lambda: dali_train_passes(data, split.paths, dseed, device, channels_last, size))
        return Loader(lambda: passes.passes(mine), steps, passes)
    sized = data.model_copy(update={"image_size": size})
    passes = _kept(key, lambda: _TorchPasses(data, split.paths, train_transform(sized), seed, device, channels_last))
    return Loader(lambda: passes.passes(mine, epoch), steps, passes)


def build_eval_loader(data: DataConfig, split: Split, world: int, rank: int, device: Optional[torch.device] = None,
                      channels_last: bool = False) -> Loader:
    mine = eval_shard(len(split), world, rank)
    steps = -(-len(mine) // data.batch_size)
    backend = resolve_backend(data)
    key = ("eval", backend, _split_key(split), world, rank, str(device), channels_last, data.model_dump_json())
    if backend == "dali":
        passes = _kept(key, lambda: dali_eval_passes(data, split.paths, device, channels_last))
        return Loader(lambda: passes.passes(mine), steps, passes)
    spec = EvalSpec.from_data_config(data)
    passes = _kept(key, lambda: _TorchPasses(data, split.paths, eval_transform(spec), None, device, channels_last, spec))
    return Loader(lambda: passes.passes(mine, 0), steps, passes)


def cpu_threads_per_rank(local_world: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, local_world))
