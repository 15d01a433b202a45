"""One backend object per engine (DDP, DeepSpeed): wrap the model, run a step under the right precision, set the lr,
save and load training state, and give the weights for export. The training loop never asks which engine it has
(DLE's Executor/Trainer split; timm's NativeScaler hides AMP the same way)."""
from __future__ import annotations

import logging
import pickle
import shutil
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from train.checkpoint import (CheckpointError, CheckpointManager, newest_sealed_folder, safe_load, seal_folder,
                              write_pointer)
from train.config import Config
from train.distributed import DistInfo, decide_on_main
from train.optim import apply_hyperparameters, set_lr

log = logging.getLogger(__name__)


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def float_state(module: nn.Module) -> dict:
    """Full fp32 weights on the CPU, for checkpoints that export and serve."""
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in module.state_dict().items()}


class DDPBackend:
    """torch DDP (or one process): native autocast, GradScaler for fp16, optional fp16/bf16 gradient compression."""

    def __init__(self, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, dinfo: DistInfo, precision: str):
        self.cfg, self.dinfo, self.module, self.optimizer = cfg, dinfo, model, optimizer
        self.autocast = autocast_for(precision, dinfo.device)
        self.scaler = torch.amp.GradScaler(dinfo.device.type) if precision == "fp16" else None
        self.wrap()

    def wrap(self) -> None:
        """(Re)build the DDP wrapper: DDP fixes its gradient buckets at construction (call again after unfreezing)."""
        d = self.dinfo
        if d.world == 1:
            self.engine = self.module
            return
        self.engine = nn.parallel.DistributedDataParallel(
            self.module, device_ids=[d.local_rank] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)
        hook = self.cfg.train.grad_compression
        if hook != "none":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            self.engine.register_comm_hook(None, default_hooks.fp16_compress_hook if hook == "fp16"
                                           else default_hooks.bf16_compress_hook)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.engine(images)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, ckpt: CheckpointManager, out: Path, meta: dict, extra: dict, step: int, is_best: bool) -> None:
        if self.dinfo.is_main:
            ckpt.save({**meta, **extra, "optimizer": self.optimizer.state_dict(),
                       "scaler": self.scaler.state_dict() if self.scaler else None}, step, is_best=is_best)

    def resume(self, ckpt: CheckpointManager, out: Path) -> Optional[tuple[dict, str]]:
        def latest() -> Optional[tuple[dict, Path]]:
            found = ckpt.load_latest()   # every checkpoint corrupt: CheckpointError, sent to every rank
            if found is None:
                return None
            state, path = found
            if "optimizer" not in state:
                log.warning("%s holds weights only (no optimizer state); starting over", path)
                return None
            return state, path

        return shared_checkpoint(self.dinfo, latest)

    def load(self, state: dict) -> None:
        self.module.load_state_dict(state.get("train_model", state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])
        apply_hyperparameters(self.optimizer, self.cfg)
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# ZeRO gradient buckets, in elements: DeepSpeed's default 5e8 per bucket and comm dtype (deepspeed/runtime/zero/
# config.py) reserves ~4 GB of GPU memory for a model of 28 M parameters. 5e6 (20 MB in fp32, DDP's 25 MB order)
# holds the largest SE-ResNet50 tensor (2.4 M) and still splits the gradients into ~6 buckets that overlap with the
# backward pass. deepspeed.extra.zero_optimization may override both keys.
ZERO_BUCKETS = {"reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000}


class DeepSpeedBackend:
    """DeepSpeed under torchrun. Mixed precision through DeepSpeed's ``torch_autocast``: parameters, BatchNorm running
    statistics and the optimizer stay fp32 and autocast runs convolutions in bf16/fp16 (DeepSpeed's bf16/fp16 modes
    cast the whole module, BN buffers included). Our own optimizer is passed in; optimizers outside DeepSpeed's tested
    list (SGD) need ``zero_allow_untested_optimizer`` at ZeRO >= 1 (deepspeed/runtime/engine.py,
    _do_optimizer_sanity_check). channels_last: the parameters stay contiguous (DeepSpeed's start-up broadcast views
    them as flat bytes), the inputs are channels_last, and cuDNN/oneDNN pick the channels_last kernels when either the
    input or the weight is (ATen ConvUtils: cudnn_conv_suggest_memory_format)."""

    def __init__(self, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, dinfo: DistInfo, precision: str):
        import deepspeed

        self.cfg, self.dinfo, self.module = cfg, dinfo, model
        extra = dict(cfg.deepspeed.extra)
        zero = {"stage": cfg.deepspeed.zero_stage, **ZERO_BUCKETS,
                **{k: int(v) for k, v in extra.pop("zero_optimization", {}).items()}}
        ours = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "torch_autocast": {"enabled": precision in ("bf16", "fp16"),
                               "dtype": "bfloat16" if precision == "bf16" else "float16"},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        # config.py refuses deepspeed.extra keys that would override these (DEEPSPEED_DERIVED_KEYS)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config={**ours, **extra})
        # DeepSpeed's default checkpoint engine unpickles with weights_only=False; ours never unpickles code.
        self.engine.checkpoint_engine.load = _deepspeed_safe_load

    def wrap(self) -> None:  # ZeRO fixes the trainable set at start (hardware.decide refuses unfreezing)
        pass

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images)

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()
        # fp16 at ZeRO 1/2: DeepSpeed's ZeRO optimizer finds the overflow and skips the step, but returns before the
        # only GradScaler.step/update of torch_autocast (deepspeed/runtime/zero/stage_1_and_2.py, step() and
        # _optimizer_step(), 0.19.8), so the scale would never fall and every later step would be skipped too: back
        # it off here as GradScaler.update does on an inf (ZeRO 0 runs its GradScaler in full: nothing to do).
        zero = self.engine.optimizer
        scaler = getattr(zero, "torch_autocast_gradscaler", None)
        if scaler is not None and getattr(zero, "overflow", False):
            state = scaler.state_dict()
            state.update(scale=state["scale"] * state["backoff_factor"], _growth_tracker=0)
            scaler.load_state_dict(state)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, ckpt: CheckpointManager, out: Path, meta: dict, extra: dict, step: int, is_best: bool) -> None:
        ds_dir = out / "checkpoints" / "deepspeed"
        client = {**meta, **{k: v for k, v in extra.items() if k not in ("model", "train_model")}}
        if "train_model" in extra:  # EMA on: DeepSpeed holds the raw weights, ``model`` the averaged ones
            client["ema_model"] = extra["model"]
        tag = f"step-{step:08d}"
        self.engine.save_checkpoint(str(ds_dir), tag=tag, client_state=client, save_latest=False)
        if self.dinfo.is_main:   # every rank's files are written (save_checkpoint ends in a barrier): checksum them
            seal_folder(ds_dir / tag)
            write_pointer(ds_dir / "latest", tag)   # DeepSpeed's pointer, written after the seal, atomically
            tags = sorted(p for p in ds_dir.glob("step-*") if p.is_dir())
            for old in tags[: -self.cfg.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            ckpt.save({**meta, "model": extra["model"]}, step, is_best=is_best)   # weights only, for export

    def resume(self, ckpt: CheckpointManager, out: Path) -> Optional[tuple[dict, str]]:
        ds_dir = out / "checkpoints" / "deepspeed"
        # Rank 0 picks the newest tag whose SHA256SUMS verifies (a save a kill interrupted has none) and every rank
        # loads that tag (its own ZeRO shard); none verifying is refused on every rank in one sentence.
        tag = decide_on_main(self.dinfo, lambda: newest_sealed_folder(ds_dir) if ds_dir.is_dir() else None)
        if not tag:
            return None
        wait_visible(ds_dir / tag, None, self.dinfo.rank)
        try:
            path, client = self.engine.load_checkpoint(str(ds_dir), tag=tag)
        except (pickle.UnpicklingError, RuntimeError) as err:
            raise CheckpointError(f"DeepSpeed checkpoint in '{ds_dir}' could not be loaded safely "
                                  f"({str(err).strip().splitlines()[0][:200]}); delete it or set train.resume=false.") from None
        if path is None:
            raise CheckpointError(f"DeepSpeed checkpoint in '{ds_dir}' could not be loaded; delete it or set train.resume=false.")
        apply_hyperparameters(self.optimizer, self.cfg)
        if "ema_model" in client:
            client["model"] = client["ema_model"]
        return client, path

    def load(self, state: dict) -> None:  # load_checkpoint already restored model, optimizer and loss scaler
        pass


# How long a rank waits for a checkpoint rank 0 verified to become visible on its own view of output_dir (an NFS
# client's attribute cache lags the writer by up to acdirmax, 60 s by default; nfs(5)).
VISIBLE_TIMEOUT_S = 180.0


def shared_checkpoint(dinfo: DistInfo, find: Callable[[], Optional[tuple[dict, Path]]]) -> Optional[tuple[dict, str]]:
    """(state, path) of the checkpoint ``find`` picks on rank 0, on every rank, or None. Only rank 0 reads and
    SHA-256-verifies it (``find`` loads through train.checkpoint.safe_load); it broadcasts the path, size and
    mtime, and the other ranks load that very file, once their view of it shows the same size and mtime, without
    hashing it again. A CheckpointError on rank 0 stops every rank with the same sentence."""
    msg: Optional[dict] = None
    found = None
    if dinfo.is_main:
        try:
            found = find()
            if found is not None:
                st = Path(found[1]).stat()
                msg = {"path": str(found[1]), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except CheckpointError as err:
            msg = {"error": str(err)}
    if dinfo.world > 1:
        box = [msg]
        dist.broadcast_object_list(box, src=0)
        msg = box[0]
    if msg is None:
        return None
    if "error" in msg:
        raise CheckpointError(msg["error"])
    if dinfo.is_main:
        return found[0], msg["path"]
    path = Path(msg["path"])
    wait_visible(path, (msg["size"], msg["mtime_ns"]), dinfo.rank)
    return safe_load(path, check=False), msg["path"]


def wait_visible(path: Path, identity: Optional[tuple[int, int]], rank: int, timeout: float = VISIBLE_TIMEOUT_S) -> None:
    """Wait until ``path`` exists here (with ``identity`` = (size, mtime_ns) when given): a node whose view of shared
    storage lags rank 0's waits instead of failing or loading an older file."""
    def seen() -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        return identity is None or (st.st_size, st.st_mtime_ns) == tuple(identity)

    if seen():
        return
    log.warning("checkpoint '%s' verified on rank 0 is not visible here yet; waiting up to %.0f s", path, timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if seen():
            return
    raise CheckpointError(f"rank {rank} cannot see the checkpoint '{path}' that rank 0 verified after {timeout:.0f} s; "
                          f"output_dir must be on storage every node sees at the same path (NFS, Lustre, a "
                          f"ReadWriteMany volume).")


def _deepspeed_safe_globals() -> list:
    """The few plain DeepSpeed classes its own ZeRO optimizer states pickle (data only; no code runs on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _deepspeed_safe_load(path, map_location=None):
    """DeepSpeed's checkpoint_engine.load with weights_only=True, allowing only the DeepSpeed classes listed above."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def build_backend(cfg: Config, model: nn.Module, optimizer, dinfo: DistInfo, precision: str):
    return (DeepSpeedBackend if cfg.engine == "deepspeed" else DDPBackend)(cfg, model, optimizer, dinfo, precision)
