"""``python -m launch preflight``: what a training job will do on the described (or local) hardware, decided by the
same code the engine runs at every job start (train.hardware.decide), plus the checks of paths in the config."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from train.config import Config
from train.hardware import decide, described_facts, local_facts


def preflight(cfg: Config, engine: Optional[str] = None, gpu_arch: Optional[str] = None, nnodes: int = 1,
              nproc_per_node: int = 1, gpu_memory_gb: Optional[float] = None) -> dict:
    """One object: the plan (precision, data_backend, torch_cuda_archs, image, max_batch_per_gpu, ...), the RDMA
    facts of this process when NCCL is set to use InfiniBand, and ``problems`` (sentences). Run in the pod at job
    start (no --gpu-arch) it checks the pod itself: the locked-memory limit and CAP_IPC_LOCK among them."""
    facts = described_facts(gpu_arch, nproc_per_node, gpu_memory_gb) if gpu_arch else local_facts()
    plan = decide(cfg, facts, engine)
    out = plan.to_dict()
    out.update(engine=engine or cfg.engine, nnodes=nnodes, nproc_per_node=nproc_per_node,
               world_size=nnodes * nproc_per_node, global_batch=nnodes * nproc_per_node * cfg.data.batch_size,
               described=facts.described,
               rdma={"configured": facts.rdma, "memlock_bytes": facts.memlock_bytes, "cap_ipc_lock": facts.cap_ipc_lock}
               if facts.rdma else None)
    if not gpu_arch:   # a local run: its paths must exist here (a remote cluster's paths are not ours to check)
        root = Path(cfg.data.root)
        if not (root / "train").is_dir():
            out["problems"].append(f"data.root '{root}' has no train/ folder; point data.root at an ImageFolder with "
                                   f"train/ and val/ (and optionally test/) of <class>/<image>.")
        elif not (root / "val").is_dir():
            out["problems"].append(f"data.root '{root}' has no val/ folder; add one (a held-out split of train/).")
        if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
            out["problems"].append(f"model.pretrained '{cfg.model.pretrained}' does not exist; give a local weights file "
                                   f"or remove the key.")
    if nproc_per_node > 1 and facts.gpu_count and not facts.described and nproc_per_node > facts.gpu_count:
        out["problems"].append(f"--nproc-per-node {nproc_per_node} exceeds the {facts.gpu_count} GPUs visible here; "
                               f"use one process per GPU.")
    return out


def render(result: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(result, indent=2)
    lines = [f"engine:        {result['engine']} ({result['nnodes']} node(s) x {result['nproc_per_node']} process(es), "
             f"global batch {result['global_batch']})",
             f"device:        {result['device']}" + (f" (compute capability {result['gpu_arch']})" if result["gpu_arch"] else ""),
             f"precision:     {result['precision']}" + (" + GradScaler" if result["grad_scaler"] else ""),
             f"data backend:  {result['data_backend']}",
             f"channels_last: {result['channels_last']}",
             f"torch:         {result['torch_version']} (archs: {' '.join(result['torch_cuda_archs']) or 'none'})"]
    if result.get("image"):
        lines.append(f"image:         {result['image']} (train/compat.yaml)")
    mem = result.get("memory_mib")
    if mem:
        lines.append(f"GPU memory:    batch {result['global_batch'] // result['world_size']} per GPU needs ~"
                     f"{mem['at_batch'] / 1024:.1f} of {mem['gpu'] / 1024:.1f} GiB; estimated to fit up to "
                     f"{result['max_batch_per_gpu']} ({mem['per_image']} MiB per image)")
    elif result["device"] == "cuda":
        lines.append("GPU memory:    unknown (pass --gpu-memory-gb to size the batch)")
    if result.get("rdma"):
        r = result["rdma"]
        lock = "unlimited" if r["memlock_bytes"] == -1 else f"{r['memlock_bytes'] // 1024} KiB"
        lines.append(f"RDMA:          {r['configured']}; ulimit -l {lock}; CAP_IPC_LOCK "
                     f"{'effective' if r['cap_ipc_lock'] else 'not effective'}")
    lines += [f"note:          {n}" for n in result["notes"]]
    lines += [f"PROBLEM:       {p}" for p in result["problems"]] or ["problems:      none"]
    return "\n".join(lines)
