"""``python -m launch preflight``: what a training job will do on the described (or local) hardware, decided by the
same code the engine runs at every job start (train.hardware.decide), plus the checks of paths in the config."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from train.config import Config
from train.hardware import decide, described_facts, local_facts


def preflight(cfg: Config, engine: Optional[str] = None, gpu_arch: Optional[str] = None, nnodes: int = 1,
              nproc_per_node: int = 1) -> dict:
    """One object: the plan (precision, data_backend, torch_cuda_archs, image, ...) and ``problems`` (sentences)."""
    facts = described_facts(gpu_arch, nproc_per_node) if gpu_arch else local_facts()
    plan = decide(cfg, facts, engine)
    out = plan.to_dict()
    out.update(engine=engine or cfg.engine, nnodes=nnodes, nproc_per_node=nproc_per_node,
               world_size=nnodes * nproc_per_node, global_batch=nnodes * nproc_per_node * cfg.data.batch_size,
               described=facts.described)
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
    lines += [f"note:          {n}" for n in result["notes"]]
    lines += [f"PROBLEM:       {p}" for p in result["problems"]] or ["problems:      none"]
    return "\n".join(lines)
