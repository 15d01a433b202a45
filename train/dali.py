"""DALI pipelines: GPU 'mixed' decode when a CUDA device is given, CPU (device_id=None) otherwise; sharded with
readers.file (shard_id/num_shards, pad_last_batch, reader_name). Labels carry the global sample index."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from train.config import DataConfig
from train.data import Loader
from train.transforms import EvalSpec

READER = "Reader"


def _dali_device(device: Optional[torch.device]) -> tuple[Optional[int], str]:
    """(device_id, decoder device): GPU decode only with a CUDA device; DALI CPU pipelines need device_id=None."""
    if device is not None and device.type == "cuda":
        return device.index or 0, "mixed"
    return None, "cpu"


def _threads(data: DataConfig) -> int:
    return max(1, data.workers)


def _reader(files, labels, shard_id: int, num_shards: int, pad: bool, seed: int):
    from nvidia.dali import fn
    return fn.readers.file(files=list(files), labels=[int(x) for x in labels], random_shuffle=False,
                           shard_id=shard_id, num_shards=num_shards, pad_last_batch=pad, name=READER, seed=seed)


def _normalize(images, data: DataConfig, crop: Optional[int], mirror):
    from nvidia.dali import fn, types
    kwargs = {"crop": (crop, crop), "crop_pos_x": 0.5, "crop_pos_y": 0.5} if crop else {}
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[m * 255.0 for m in data.mean], std=[s * 255.0 for s in data.std],
                                    mirror=mirror, **kwargs)


def build_train_pipeline(data: DataConfig, files: list[str], labels: np.ndarray, shard_id: int, num_shards: int,
                         seed: int, device: Optional[torch.device] = None):
    """RandomResizedCrop(scale_min..1), flip, brightness/contrast/saturation jitter, rotation, normalise."""
    from nvidia.dali import fn, pipeline_def, types

    device_id, decode_device = _dali_device(device)
    j, r = data.jitter, data.rotate_deg

    @pipeline_def(batch_size=data.batch_size, num_threads=_threads(data), device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipe():
        jpegs, labels_ = _reader(files, labels, shard_id, num_shards, pad=True, seed=seed)
        images = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                               random_area=[data.scale_min, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, resize_x=data.image_size, resize_y=data.image_size, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        if r > 0:
            images = fn.rotate(images, angle=fn.random.uniform(range=(-r, r)), keep_size=True, fill_value=0,
                               interp_type=types.INTERP_LINEAR)
        if j > 0:
            images = fn.color_twist(images, brightness=fn.random.uniform(range=(1 - j, 1 + j)),
                                    contrast=fn.random.uniform(range=(1 - j, 1 + j)),
                                    saturation=fn.random.uniform(range=(1 - j, 1 + j)))
        images = _normalize(images, data, None, fn.random.coin_flip(probability=data.flip_p))
        return images, labels_

    return pipe()


def build_eval_pipeline(data: DataConfig, files: list[str], labels: np.ndarray, shard_id: int = 0,
                        num_shards: int = 1, device: Optional[torch.device] = None):
    """The DALI twin of train.transforms.eval_transform: resize shorter side, centre crop, normalise."""
    from nvidia.dali import fn, pipeline_def, types

    device_id, decode_device = _dali_device(device)
    spec = EvalSpec.from_data_config(data)

    @pipeline_def(batch_size=data.batch_size, num_threads=_threads(data), device_id=device_id, seed=0)
    def pipe():
        jpegs, labels_ = _reader(files, labels, shard_id, num_shards, pad=True, seed=0)
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        images = fn.resize(images, **_torchvision_resize_args(images, spec.eval_resize), interp_type=types.INTERP_LINEAR,
                           antialias=True)
        images = _normalize(images, data, spec.image_size, 0)
        return images, labels_

    return pipe()


def _torchvision_resize_args(images, size: int) -> dict:
    """Output size exactly as torchvision's Resize(int): shorter side -> size, longer side truncated (not rounded)."""
    from nvidia.dali import math as dmath, types

    shape = images.shape(dtype=types.FLOAT)  # HWC
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    # +1e-3 guards float32 error on exact integers; int() in torchvision truncates
    return {"resize_y": dmath.floor(h * size / short + 1e-3), "resize_x": dmath.floor(w * size / short + 1e-3)}


class _DaliBatches:
    def __init__(self, pipe, policy, size_hint: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
        self.it = DALIGenericIterator([pipe], ["images", "index"], reader_name=READER, last_batch_policy=policy,
                                      auto_reset=False)

    def __iter__(self):
        for batch in self.it:
            out = batch[0]
            yield out["images"], out["index"].reshape(-1).long()


def dali_train_loader(data: DataConfig, paths: list[str], plan: np.ndarray, rank: int, seed: int, epoch: int,
                      start_step: int, device: Optional[torch.device]) -> Loader:
    """Every rank builds the same file list (each rank's plan row, resumed at ``start_step``), and DALI's
    shard_id/num_shards hands rank r exactly its own row."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

    world = plan.shape[0]
    rows = plan[:, start_step * data.batch_size:]
    flat = rows.reshape(-1)
    pipe = build_train_pipeline(data, [paths[i] for i in flat], flat, rank, world,
                                seed=(seed * 1000003 + epoch * 101 + rank + start_step * 7919) % (2**31 - 1),
                                device=device)
    steps = rows.shape[1] // data.batch_size
    return Loader(_DaliBatches(pipe, LastBatchPolicy.DROP, steps), steps)


def dali_eval_loader(data: DataConfig, paths: list[str], shard: np.ndarray, device: Optional[torch.device]) -> Loader:
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

    files = [paths[i] for i in shard]
    pipe = build_eval_pipeline(data, files, shard, 0, 1, device)
    return Loader(_DaliBatches(pipe, LastBatchPolicy.PARTIAL, 0), -(-len(shard) // data.batch_size))
