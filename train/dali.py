"""DALI pipelines: GPU 'mixed' decode when a CUDA device is given, CPU (device_id=None) otherwise. Each pipeline
is built once (per split, rank and image size) and fed by an external source that reads the files of the current
pass in the order a sample plan gives, so a new epoch is a new order, not a new pipeline. Labels carry the
global sample index. A file the decoder refuses is found, skipped or reported (data.on_corrupt) without a crash.

Self-contained on purpose: train.data imports this module, never the reverse (nvidia.dali is imported lazily,
it is an optional dependency)."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from train.config import DataConfig
from train.dali_eval import eval_graph, normalize
from train.listing import DataError, check_image
from train.transforms import EvalSpec

log = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


def _dali_device(device: Optional[torch.device]) -> tuple[Optional[int], str]:
    """(device_id, decoder device): GPU decode only with a CUDA device; DALI CPU pipelines need device_id=None."""
    if device is not None and device.type == "cuda":
        return device.index or 0, "mixed"
    return None, "cpu"


def _threads(data: DataConfig) -> int:
    return max(1, data.workers)


# nvJPEG buffers of 'mixed' decode: DALI preallocates device_memory_padding once and host_memory_padding (pinned)
# twice per thread of the pipeline (DALI docs, fn.decoders.image). NVIDIA's DeepLearningExamples use 201 / 134 MiB
# per thread: at 8 threads 1.6 GiB of GPU memory outside torch's accounting and 2.1 GiB of pinned host memory per
# pipeline. The training pipeline splits one budget over its threads, never below DALI's own defaults; the eval
# pipeline (one pass an epoch, kept between epochs) uses the defaults: a reallocation there costs nothing that matters.
DEVICE_PADDING_BUDGET = 256 << 20
HOST_PADDING_BUDGET = 128 << 20
DALI_DEVICE_PADDING = 16 << 20   # DALI's defaults
DALI_HOST_PADDING = 8 << 20
PREFETCH_DEPTH = 2
DECODED_MIB_PER_IMAGE = 1.0      # an ImageNet photo decoded (~500x375x3), before the crop


def train_decoder_kwargs(decode_device: str, threads: int) -> dict:
    if decode_device != "mixed":
        return {}
    return {"device_memory_padding": max(DALI_DEVICE_PADDING, DEVICE_PADDING_BUDGET // threads),
            "host_memory_padding": max(DALI_HOST_PADDING, HOST_PADDING_BUDGET // threads)}


def gpu_memory_mib(data: DataConfig, image_size: Optional[int] = None) -> dict:
    """GPU memory (MiB) DALI's train and eval pipelines of one rank hold outside torch's accounting with 'mixed'
    decode: nvJPEG padding per thread, decoded images, and PREFETCH_DEPTH float output batches each."""
    threads, size = _threads(data), image_size or data.image_size
    pad = train_decoder_kwargs("mixed", threads)["device_memory_padding"] * threads + DALI_DEVICE_PADDING * threads
    per_image = 2 * (DECODED_MIB_PER_IMAGE + PREFETCH_DEPTH * 3 * size * size * 4 / 2**20)
    return {"fixed": pad / 2**20, "per_image": per_image}


def _read(path: str) -> np.ndarray:
    # Plain buffered reads (no mmap): safe on NFS/Lustre, the case DALI's readers.file needs dont_use_mmap for.
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8)


class _Source:
    """external_source callback (batch mode): the encoded bytes and global indices of the current pass, batch by
    batch; StopIteration ends the pass. Indices in ``substitute`` are replaced (files the decoder refused)."""

    def __init__(self, paths: list[str], batch: int, threads: int):
        self.paths, self.batch = paths, batch
        self.order = np.empty(0, dtype=np.int64)
        self.fed = 0
        self.substitute: dict[int, int] = {}
        self._pool = ThreadPoolExecutor(threads)

    def start(self, order: np.ndarray) -> None:
        self.order, self.fed = np.asarray(order, dtype=np.int64), 0

    def stop(self) -> None:
        self.order = self.order[: self.fed]

    def fed_indices(self, since: int) -> list[int]:
        return [self.substitute.get(int(i), int(i)) for i in self.order[since: self.fed]]

    def __call__(self):
        if self.fed >= len(self.order):
            raise StopIteration
        idx = [self.substitute.get(int(i), int(i)) for i in self.order[self.fed: self.fed + self.batch]]
        self.fed += len(idx)
        data = list(self._pool.map(_read, [self.paths[i] for i in idx]))
        return data, [np.array([i], dtype=np.int64) for i in idx]


def _source_node(source: _Source):
    from nvidia.dali import fn, types
    return fn.external_source(source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64])


def build_train_pipeline(data: DataConfig, source: _Source, seed: int, device: Optional[torch.device] = None,
                         channels_last: bool = False, image_size: Optional[int] = None):
    """RandomResizedCrop(scale_min..1), flip, brightness/contrast/saturation jitter, rotation, normalise."""
    from nvidia.dali import fn, pipeline_def, types

    device_id, decode_device = _dali_device(device)
    j, r, size = data.jitter, data.rotate_deg, image_size or data.image_size

    @pipeline_def(batch_size=data.batch_size, num_threads=_threads(data), device_id=device_id, seed=seed,
                  prefetch_queue_depth=PREFETCH_DEPTH, enable_conditionals=r > 0 and decode_device == "cpu")
    def pipe():
        encoded, index = _source_node(source)
        images = fn.decoders.image_random_crop(encoded, device=decode_device, output_type=types.RGB,
                                               random_area=[data.scale_min, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                               **train_decoder_kwargs(decode_device, _threads(data)))
        if r > 0 and decode_device == "cpu":
            images = _resize_rotate_fused(images, size, fn.random.uniform(range=(-r, r)))
        else:
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
            if r > 0:
                images = fn.rotate(images, angle=fn.random.uniform(range=(-r, r)), keep_size=True, fill_value=0,
                                   interp_type=types.INTERP_LINEAR)
        if j > 0:
            images = fn.color_twist(images, brightness=fn.random.uniform(range=(1 - j, 1 + j)),
                                    contrast=fn.random.uniform(range=(1 - j, 1 + j)),
                                    saturation=fn.random.uniform(range=(1 - j, 1 + j)))
        images = normalize(images, data.mean, data.std, None, fn.random.coin_flip(probability=data.flip_p), channels_last)
        return images, index

    return pipe()


def _resize_rotate_fused(images, size: int, angle):
    """Resize to size x size and rotate by ``angle`` about the centre in ONE bilinear warp (CPU pipeline; needs a
    pipeline with enable_conditionals=True).

    Measured per 224 px image on this 2-core AVX2 CPU (batch 32, 2 threads, crops of 300-500 px): DALI's CPU
    antialiased resize then rotate cost 6.8 ms (the rotate alone 3.8 ms; PIL rotates in ~1 ms), which made DALI
    slower than the torchvision DataLoader; this path costs 5.0 ms. One resampling instead of two. A crop whose
    shorter side is over twice the output is first shrunk with an antialiased resize to twice the output (only
    those samples: a resize costs as much for an unchanged size), so bilinear sampling never decimates by more
    than 2x."""
    from nvidia.dali import fn, math as dmath, types

    shape = images.shape(dtype=types.FLOAT)  # HWC
    if dmath.min(shape[0], shape[1]) > 2.0 * size:
        images = fn.resize(images, resize_shorter=2.0 * size, interp_type=types.INTERP_LINEAR, antialias=True)
    shape = images.shape(dtype=types.FLOAT)
    matrix = fn.transforms.combine(fn.transforms.scale(scale=fn.stack(size / shape[1], size / shape[0])),
                                   fn.transforms.rotation(angle=angle, center=(size / 2, size / 2)))
    # inverse_map=False: ``matrix`` maps source to destination (checked: a 200x100 image lands whole in the output)
    return fn.warp_affine(images, size=(size, size), matrix=matrix, fill_value=0, interp_type=types.INTERP_LINEAR,
                          inverse_map=False)


def build_eval_pipeline(data: DataConfig, source: _Source, device: Optional[torch.device] = None,
                        channels_last: bool = False):
    """The DALI twin of train.transforms.eval_transform (train/dali_eval.py: the graph Triton's DALI preprocess runs)."""
    from nvidia.dali import pipeline_def

    device_id, decode_device = _dali_device(device)
    spec = EvalSpec.from_data_config(data)

    @pipeline_def(batch_size=data.batch_size, num_threads=_threads(data), device_id=device_id, seed=0)
    def pipe():
        encoded, index = _source_node(source)
        return eval_graph(encoded, spec.image_size, spec.eval_resize, spec.mean, spec.std, decode_device,
                          channels_last), index

    return pipe()


def _to_torch(tl, device: Optional[torch.device]) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    t = tl.as_tensor()
    on_gpu = device is not None and device.type == "cuda"
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device if on_gpu else "cpu")
    feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device) if on_gpu else None)
    return out


class DaliPasses:
    """One DALI pipeline, many passes: ``passes(order)`` yields (images, global indices) for the samples of
    ``order`` in batches. Images are NCHW float; with ``channels_last`` the pipeline emits NHWC and the tensor is
    its NCHW permute (``is_contiguous(memory_format=torch.channels_last)``, no copy)."""

    def __init__(self, data: DataConfig, paths: list[str], build: Callable[[_Source], object],
                 device: Optional[torch.device], channels_last: bool):
        self.data, self.paths, self.build, self.device, self.channels_last = data, paths, build, device, channels_last
        self.source = _Source(paths, data.batch_size, _threads(data))
        self.pipe = build(self.source)
        self.pipe.build()
        self.substituted = 0
        self._active = False

    def _finish(self) -> None:
        """End a pass the consumer left early: stop feeding, drain what is in flight, reset for the next pass."""
        if not self._active:
            return
        self.source.stop()
        while True:
            try:
                self.pipe.run()
            except StopIteration:
                break
        self.pipe.reset()
        self._active = False

    def passes(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._finish()
        order = np.asarray(order, dtype=np.int64)
        self.source.start(order)
        self._active = True
        consumed = 0  # samples handed out from this pipeline's current pass
        while True:
            try:
                images, index = self.pipe.run()
            except StopIteration:
                break
            except RuntimeError as err:  # the decoder refused a file: find it, then skip it or say which it is
                order = order[consumed:]
                self._recover(self.source.fed_indices(consumed), err)
                self.source.start(order)
                consumed = 0
                continue
            x = _to_torch(images, self.device)
            if self.channels_last:
                x = x.permute(0, 3, 1, 2)
            idx = _to_torch(index, None).reshape(-1)
            consumed += len(idx)
            yield x, idx
        self.pipe.reset()
        self._active = False

    def _recover(self, in_flight: list[int], err: Exception) -> None:
        bad = {i: msg for i in dict.fromkeys(in_flight) if (msg := check_image(self.paths[i]))}
        if not bad:
            raise err
        shown = "; ".join(list(bad.values())[:3])
        if self.data.on_corrupt == "fail":
            raise DataError(f"{len(bad)} unreadable image(s) met in training: {shown}. Fix or remove them, or set "
                            "data.on_corrupt=skip (data.verify=true checks every image at start).")
        n = len(self.paths)
        for i in bad:
            j = (i + 1) % n
            while j in bad or check_image(self.paths[j]):
                j = (j + 1) % n
            self.source.substitute[i] = j
        self.substituted += len(bad)
        log.warning("DALI: %d unreadable image(s) met in training, each replaced by the next readable sample "
                    "(data.on_corrupt=skip; %d so far): %s", len(bad), self.substituted, shown)
        # A pipeline whose operator raised is not reused: build a fresh one (rare: once per bad file).
        self.pipe = self.build(self.source)
        self.pipe.build()


def dali_train_passes(data: DataConfig, paths: list[str], seed: int, device: Optional[torch.device],
                      channels_last: bool = False, image_size: Optional[int] = None) -> DaliPasses:
    return DaliPasses(data, paths, lambda src: build_train_pipeline(data, src, seed, device, channels_last, image_size),
                      device, channels_last)


def dali_eval_passes(data: DataConfig, paths: list[str], device: Optional[torch.device],
                     channels_last: bool = False) -> DaliPasses:
    return DaliPasses(data, paths, lambda src: build_eval_pipeline(data, src, device, channels_last), device,
                      channels_last)
