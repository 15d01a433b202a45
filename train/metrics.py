"""Training metrics: Prometheus series per rank (prometheus-client) and metrics.jsonl on rank 0."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class MetricsPortError(RuntimeError):
    """A metrics output (the Prometheus port, TensorBoard) the user asked for cannot be served, in one sentence."""


class TrainingMetrics:
    """Prometheus metrics for one rank, served on ``port`` (0 = any free port); every series has label ``rank``."""

    def __init__(self, rank: int, port: Optional[int], address: str = "127.0.0.1"):
        self.rank = str(rank)
        self.registry = CollectorRegistry()
        r = self.registry
        lab = ["rank"]
        self.images_per_second = Gauge("seresnet_train_images_per_second", "Training throughput of this rank", lab, registry=r)
        self.step_seconds = Histogram("seresnet_train_step_seconds", "Optimizer step wall time", lab, buckets=STEP_BUCKETS, registry=r)
        self.data_wait = Histogram("seresnet_train_data_wait_seconds", "Time waiting for the next batch", lab, buckets=WAIT_BUCKETS, registry=r)
        self.loss = Gauge("seresnet_train_loss", "Training loss (mean over ranks at the last log step)", lab, registry=r)
        self.lr = Gauge("seresnet_train_learning_rate", "Current learning rate", lab, registry=r)
        self.epoch = Gauge("seresnet_train_epoch", "Current epoch (fractional)", lab, registry=r)
        self.steps = Counter("seresnet_train_steps", "Optimizer steps taken", lab, registry=r)
        self.images = Counter("seresnet_train_images", "Images trained on by this rank", lab, registry=r)
        self.memory = Gauge("seresnet_train_device_memory_bytes", "Device memory in use (CUDA allocated or process RSS on CPU)", lab, registry=r)
        self.val_top1 = Gauge("seresnet_train_val_top1", "Validation top-1 at the last evaluation", lab, registry=r)
        self.port: Optional[int] = None
        if port is not None:
            try:
                server, _ = start_http_server(port, addr=address, registry=r)
            except OSError as err:
                raise MetricsPortError(f"Cannot serve training metrics on {address}:{port} ({err.strerror}); set "
                                       f"metrics.port to a free port (ranks use port + local_rank), 0 for any free "
                                       f"port, or metrics.enabled=false.") from None
            self.port = server.server_port
            log.info("rank %s: Prometheus metrics on http://%s:%d/metrics", self.rank, address, self.port)

    def observe_step(self, step_s: float, wait_s: float, images: int) -> None:
        self.step_seconds.labels(self.rank).observe(step_s)
        self.data_wait.labels(self.rank).observe(wait_s)
        self.steps.labels(self.rank).inc()
        self.images.labels(self.rank).inc(images)

    def update(self, **values: float) -> None:
        for name, value in values.items():
            getattr(self, name).labels(self.rank).set(value)


class Board:
    """TensorBoard scalars (metrics.tensorboard) under <output_dir>/tensorboard, written by rank 0 through torch's
    SummaryWriter (torch/utils/tensorboard/writer.py; needs the ``tensorboard`` package: the extra of that name).
    Off, or on another rank, every call is a no-op."""

    TAGS = {"loss": "train/loss", "lr": "train/lr", "images_per_second": "train/images_per_second",
            "val_top1": "val/top1", "val_top5": "val/top5"}

    def __init__(self, log_dir: Optional[Path]):
        self.writer = None
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MetricsPortError("metrics.tensorboard=true needs the tensorboard package: pip install "
                                       "'seresnet-stack[tensorboard]' (or tensorboard), or set metrics.tensorboard=false.") from None
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, **values: float) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(self.TAGS[name], value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class JsonlWriter:
    def __init__(self, path: Optional[Path]):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
