"""torchrun command builders: one machine (standalone) and several nodes (c10d rendezvous).

DeepSpeed runs under the same torchrun command (no SSH/pdsh launcher, so one command works on bare metal, Slurm and Kubernetes): the trainer reads
RANK/WORLD_SIZE/LOCAL_RANK and calls ``deepspeed.initialize`` itself, so no SSH/pdsh launcher is needed.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
# A source checkout (pyproject.toml beside the packages) puts itself on the ranks' path and keeps DeepSpeed's compiled
# ops in its .cache; an installed package (site-packages) is importable already and caches under the user's cache.
SOURCE_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file()
EXTENSIONS_CACHE = (REPO_ROOT / ".cache" if SOURCE_CHECKOUT else
                    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seresnet") / "torch_extensions"
ENGINES = ("ddp", "deepspeed")


class LaunchError(ValueError):
    """A user-caused launcher problem, one clear sentence (the CLI exits 2 with it)."""


@dataclass(frozen=True)
class NodeRange:
    min_nodes: int
    max_nodes: int

    def __str__(self) -> str:
        return str(self.min_nodes) if self.min_nodes == self.max_nodes else f"{self.min_nodes}:{self.max_nodes}"


def parse_nnodes(text: str) -> NodeRange:
    """``N`` or ``MIN:MAX`` (elastic), both >= 1 and MIN <= MAX."""
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", text or "")
    if not m:
        raise LaunchError(f"--nnodes expects N or MIN:MAX (for example 2 or 2:4), got '{text}'.")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if lo < 1 or hi < lo:
        raise LaunchError(f"--nnodes {text}: need 1 <= MIN <= MAX.")
    return NodeRange(lo, hi)


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` for the c10d rendezvous (the store runs on that host)."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LaunchError(f"--rdzv-endpoint expects HOST:PORT with a port in 1..65535, got '{text}'.")
    return host, int(port)


def _check_engine(engine: Optional[str]) -> None:
    if engine is not None and engine not in ENGINES:
        raise LaunchError(f"--engine must be one of {', '.join(ENGINES)}, got '{engine}'.")


def trainer_args(train_args: Sequence[str], engine: Optional[str]) -> list[str]:
    """The trainer's own arguments; ``--engine`` becomes a trailing ``--set engine=...`` so it wins."""
    args = list(train_args)
    if args and args[0] == "--":
        args = args[1:]
    if engine is not None:
        args += ["--set", f"engine={engine}"]
    return args


def torchrun_prefix(python: Optional[str] = None) -> list[str]:
    """``python -m torch.distributed.run`` with this interpreter (the ``torchrun`` script, venv-proof)."""
    return [python or sys.executable, "-m", "torch.distributed.run"]


def build_local_argv(nproc: int, train_args: Sequence[str] = (), engine: Optional[str] = None,
                     python: Optional[str] = None) -> list[str]:
    """One machine, ``nproc`` processes, rendezvous on a free local port (``--standalone``)."""
    _check_engine(engine)
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}.")
    return [*torchrun_prefix(python), "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}",
            "-m", "train", *trainer_args(train_args, engine)]


def build_multinode_argv(nnodes: str, nproc_per_node: int, rdzv_endpoint: str, rdzv_id: str,
                         train_args: Sequence[str] = (), engine: Optional[str] = None,
                         max_restarts: int = 3, python: Optional[str] = None) -> list[str]:
    """Every node runs this same command; c10d rendezvous admits MIN..MAX nodes and restarts on failures."""
    _check_engine(engine)
    nodes = parse_nnodes(nnodes)
    parse_endpoint(rdzv_endpoint)
    if nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node must be >= 1, got {nproc_per_node}.")
    if not rdzv_id or not re.fullmatch(r"[A-Za-z0-9._-]+", rdzv_id):
        raise LaunchError(f"--rdzv-id must be a non-empty job id of letters, digits, '.', '_' or '-', got '{rdzv_id}'.")
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {max_restarts}.")
    return [*torchrun_prefix(python), f"--nnodes={nodes}", f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
            f"--max-restarts={max_restarts}", "-m", "train", *trainer_args(train_args, engine)]


def launch_env(base: Optional[dict] = None) -> dict:
    """Environment for the launched ranks: the repo importable, one shared DeepSpeed extension cache, and the
    rendezvous store not shared with the workers (so elastic jobs can grow back)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_CACHE))
    # Elastic scale-up: with the agent's TCPStore shared with the workers (torch's default since 2.5), a node
    # that joins in a later round waits for MASTER_ADDR under that round's prefix, but rank 0 writes it only in
    # its own first round (RendezvousStoreInfo.build is skipped once it holds a store server: torch/distributed/
    # elastic/rendezvous/dynamic_rendezvous.py, next_rendezvous) -> "wait timeout ... MASTER_ADDR" on both nodes
    # and the job dies instead of growing back. Opting out builds fresh store info every round
    # (pytorch/pytorch#135712: the shared store is not compatible with torchelastic restarts). Proven by
    # tests/test_multinode.py (a node killed and restarted rejoins).
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if SOURCE_CHECKOUT:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env
