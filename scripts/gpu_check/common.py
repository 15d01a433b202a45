"""What every step shares: the sizes (a GPU run, or ``--tiny``: the same code on the CPU at toy sizes), the skip
signal, the synthetic-batch clock and the memory/clock readers."""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CLASSES = 10


class Skip(Exception):
    """The step needs what this machine lacks (CUDA, DALI, TensorRT, Triton): recorded as skipped, not failed."""


class CheckFailed(Exception):
    """The step ran and its claim does not hold: failed, with the figures it measured."""

    def __init__(self, figures: dict, reason: str):
        super().__init__(reason)
        self.figures = figures


@dataclass(frozen=True)
class Sizes:
    batches: tuple[int, ...]      # throughput batches
    image: int                    # throughput / DeepSpeed crop
    warmup: int                   # steps before the first timed window
    windows: int                  # timed windows (the figure is their median)
    window_steps: int             # steps per window
    train_steps: int              # the real trainer on JPEGs
    kill_at: int                  # ... killed after the checkpoint of this step
    train_batch: int
    train_image: int
    train_workers: int
    ds_batch: int                 # DeepSpeed / DDP memory runs
    ds_steps: int
    onnx_images: int
    per_class: tuple[int, int, int]   # the check's own JPEGs: train, val, test images per class (10 classes)


GPU = Sizes(batches=(256, 128), image=224, warmup=5, windows=3, window_steps=30, train_steps=200, kill_at=100,
            train_batch=64, train_image=160, train_workers=8, ds_batch=128, ds_steps=12, onnx_images=64,
            per_class=(200, 20, 20))
TINY = Sizes(batches=(4, 2), image=32, warmup=1, windows=3, window_steps=1, train_steps=4, kill_at=2,
             train_batch=4, train_image=32, train_workers=1, ds_batch=2, ds_steps=2, onnx_images=4,
             per_class=(8, 2, 2))
TINY_THREADS = 1   # --tiny on a shared CPU box: one intra-op thread (2 threads on 2 busy cores stall at every barrier)


@dataclass
class Ctx:
    out: Path         # the report folder (small: gpu_check.json and the log)
    work: Path        # scratch: data, checkpoints, ONNX files
    tiny: bool

    @property
    def sizes(self) -> Sizes:
        return TINY if self.tiny else GPU

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def device(self) -> torch.device:
        """CUDA, or the CPU in a --tiny rehearsal; a step that needs CUDA on a machine without it is skipped."""
        if torch.cuda.is_available():
            return torch.device("cuda")
        if self.tiny:
            return torch.device("cpu")
        raise Skip("no CUDA")

    def figures(self, name: str) -> dict:
        """Figures another step wrote (e.g. the trainer's checkpoint path), {} if that step did not run."""
        try:
            return json.loads((self.work / "steps" / f"{name}.json").read_text()).get("figures", {})
        except (OSError, ValueError):
            return {}


def need_module(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise Skip(f"{what} is not installed on this machine")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def sm_clock_mhz(device: torch.device):
    """The SM clock now (NVML through torch.cuda.clock_rate); None on the CPU or without NVML."""
    if device.type != "cuda":
        return None
    try:
        return int(torch.cuda.clock_rate(device))
    except Exception:  # noqa: BLE001 - NVML missing or refused: the figure is simply absent
        return None


class WindowClock:
    """A loader that yields the SAME batch over and over and times windows of steps: before handing out the batch
    of step ``warmup + k * window_steps`` it waits for the device and stamps the time, and once more after the last
    step. Any loop that iterates it (the Trainer's own epoch loop, a plain loop) is timed by the same code."""

    def __init__(self, images, index, device, warmup: int, windows: int, window_steps: int):
        self.images, self.index, self.device = images, index, device
        self.warmup, self.windows, self.window_steps = warmup, windows, window_steps
        self.stamps: list[float] = []
        self.clocks: list = []

    @property
    def steps(self) -> int:
        return self.warmup + self.windows * self.window_steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            if i >= self.warmup and (i - self.warmup) % self.window_steps == 0:
                self._stamp()
            yield self.images, self.index
        self._stamp()

    def _stamp(self) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        self.clocks.append(sm_clock_mhz(self.device))

    def images_per_second(self) -> float:
        if len(self.stamps) != self.windows + 1:
            raise RuntimeError(f"timed {len(self.stamps) - 1} windows of {self.windows}: the loop stopped early")
        batch = len(self.index)
        rates = [self.window_steps * batch / (b - a) for a, b in zip(self.stamps, self.stamps[1:])]
        return round(statistics.median(rates), 1)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
