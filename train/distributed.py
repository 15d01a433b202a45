"""Distributed set-up (torchrun's RANK/WORLD_SIZE/LOCAL_RANK, nccl on GPU, gloo on CPU, the per-attempt store),
rank-0 decisions broadcast to every rank, and the small collectives the loop uses."""
from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_logging() -> None:
    """INFO on rank 0, warnings elsewhere, every line tagged with its rank."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(device_type: str, engine: str) -> DistInfo:
    """Join the job. ``device_type`` comes from the hardware plan (train.hardware.decide), never from a silent fallback."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        # Our own init also under DeepSpeed: deepspeed.init_distributed adopts an initialised group.
        store = _attempt_store(world)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    if engine == "deepspeed":
        if "MASTER_ADDR" not in os.environ:  # single process without torchrun: DeepSpeed would want mpi4py
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend)
    return DistInfo(rank, world, local_rank, local_world, device)


def _attempt_store(world: int):
    """Under torchrun the workers share the agent's TCPStore, and it outlives a restart of the group: the keys
    the killed attempt wrote (gloo's peer addresses among them) are still there, so a restarted rank could read a
    dead peer's address and fail ``connectFullMesh`` with "Connection refused". Keys are prefixed by the attempt
    (``TORCHELASTIC_RESTART_COUNT``) so each attempt rendezvous only with itself. None outside torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                         timeout=timedelta(minutes=10))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    return dist.PrefixStore(f"seresnet/{run_id}/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


# The rank-0 listing of the data folder (train.listing): one scandir + stat per file, ~1.28 M on ImageNet, which on
# a cold NFS client can outlast NCCL's default 10-minute collective timeout while the other ranks wait in the
# broadcast. It is sent over a gloo group created with this timeout (a CPU object; NCCL is never involved).
LISTING_TIMEOUT = timedelta(minutes=60)
_long_groups: dict[timedelta, Any] = {}


class _Raised:
    """An exception rank 0 met in ``decide``, sent so that every rank raises it (none waits in a later collective)."""

    def __init__(self, err: BaseException):
        self.err = err


def _group_with_timeout(timeout: timedelta):
    """A gloo group over every rank with ``timeout`` (created once per timeout, by every rank at the same call)."""
    if timeout not in _long_groups:
        _long_groups[timeout] = dist.new_group(backend="gloo", timeout=timeout)
    return _long_groups[timeout]


def decide_on_main(dinfo: DistInfo, decide: Callable[[], Any], timeout: Optional[timedelta] = None) -> Any:
    """Run ``decide`` on rank 0 only and give every rank its answer (or its exception). Rank-local file checks
    (``best.exists()`` on NFS, which another node may not see yet) must never choose which collective a rank enters:
    that is a hang. ``timeout``: how long the other ranks may wait for rank 0 (default: the process group's)."""
    if dinfo.world == 1:
        return decide()
    box: list[Any] = [None]
    if dinfo.is_main:
        try:
            box[0] = decide()
        except Exception as err:  # noqa: BLE001 - re-raised below on every rank
            box[0] = _Raised(err)
    dist.broadcast_object_list(box, src=0, group=_group_with_timeout(timeout) if timeout else None)
    if isinstance(box[0], _Raised):
        raise box[0].err
    return box[0]


def all_reduce_mean(values: list[float], dinfo: DistInfo) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=dinfo.device)
    if dinfo.world > 1:
        dist.all_reduce(t)
        t /= dinfo.world
    return t.tolist()


def barrier(dinfo: DistInfo) -> None:
    if dinfo.world > 1:
        dist.barrier()


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng(dinfo: DistInfo) -> list:
    state = rng_state()
    if dinfo.world == 1:
        return [state]
    states: list[Optional[dict]] = [None] * dinfo.world
    dist.all_gather_object(states, state)
    return states


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
